"""`blip2 shards search`: a real faiss index over embeddings from the tiny CLIP, local and on moto S3."""
from __future__ import annotations

import html
import json
import re

import numpy as np
import pyarrow as pa
import pytest

from capfilt.curate_config import SearchConfig
from capfilt.embeddings import read_embeddings, write_embeddings
from capfilt.search import QueryEncoder, choose_index, run_search, search, update_index, write_search_page
from capfilt.semdedup import normalized
from orchestration.cli import main
from pipelines.schema import CAPFILT
from pipelines.shardio import ShardSet
from tests.helpers.browser import CHROMIUM, chromium
from tests.helpers.embeddings import write_embedding_set
from tests.helpers.shards import capfilt_rows

QUIET = dict(log=lambda m: None)
pytestmark = pytest.mark.usefixtures("ray_local")   # the index is trained and filled by Ray tasks


@pytest.fixture(scope="module")
def encoder(tiny_models):
    return QueryEncoder(str(tiny_models["ranker"]))


def add_shard(uri: str, corpus, encoder, index: int, start: int, n: int) -> None:
    """CapFilt shard ``index`` from corpus rows start..start+n, embedded by the tiny CLIP ranker."""
    rows = capfilt_rows(corpus, start, n)
    table = pa.Table.from_pylist(rows, schema=CAPFILT.schema)
    ss = ShardSet(uri)
    ss.write_shard(index, table, CAPFILT)
    img = np.array([encoder.image(r["image"]) for r in rows])
    txt = np.array([encoder.text(r["captions"][0]) for r in rows])
    write_embeddings(ss, index, table, img, txt)
    ss.write_manifest(CAPFILT)


def stored(uri: str) -> tuple[np.ndarray, list[str]]:
    ss = ShardSet(uri)
    emb, keys = [], []
    for name in ss.committed():
        table = ss.read_shard(name)
        if table.num_rows:
            emb.append(read_embeddings(ss, int(name[5:10])))
            keys += table.column("key").to_pylist()
    return normalized(np.concatenate(emb)), keys


def test_text_and_image_queries_match_brute_force_and_updates_are_incremental(corpus, encoder, tmp_path):
    uri = str(tmp_path / "set")
    add_shard(uri, corpus, encoder, 0, 0, 12)
    add_shard(uri, corpus, encoder, 1, 12, 12)
    cfg = SearchConfig()
    index, state, stats = update_index(uri, cfg, **QUIET)
    assert (stats["shards_added"], stats["rows"]) == (2, 24) and (tmp_path / "set" / "_index" / "index.faiss").exists()

    emb, keys = stored(uri)
    query = encoder.text("a red circle above a blue square")
    found = search(index, state, query, k=5)
    ref = np.argsort(-(emb @ normalized(query[None])[0]), kind="stable")[:5]
    assert [i for i, _ in found] == ref.tolist()
    np.testing.assert_allclose([s for _, s in found], emb[ref] @ normalized(query[None])[0], atol=1e-5)

    _, items = corpus
    target = corpus[0] / items[7].file        # row 7 of shard 0: the image itself comes first
    result = run_search(uri, cfg, encoder_dir(encoder), image_path=str(target), k=3, **QUIET)
    top = result["hits"][0]
    assert (top.key, top.shard, top.row) == (keys[7], "part-00000.parquet", 7) and top.score > 0.999
    assert top.image == target.read_bytes() and top.caption == capfilt_rows(corpus, 7, 1)[0]["captions"][0]
    assert result["index"]["shards_added"] == 0           # nothing new: nothing re-added

    add_shard(uri, corpus, encoder, 2, 24, 12)
    add_shard(uri, corpus, encoder, 3, 36, 0)             # an empty shard
    _, state, stats = update_index(uri, cfg, **QUIET)
    assert (stats["shards_added"], stats["rows_added"], stats["rows"]) == (2, 12, 36)
    assert [s["offset"] for s in state["shards"]] == [0, 12, 24, 36]
    hit = run_search(uri, cfg, encoder_dir(encoder), image_path=str(corpus[0] / items[30].file), k=1, **QUIET)["hits"][0]
    assert (hit.shard, hit.row) == ("part-00002.parquet", 6)

    add_shard(uri, corpus, encoder, 1, 12, 5)             # shard 1 rewritten: the index is rebuilt
    messages = []
    _, state, stats = update_index(uri, cfg, log=messages.append)
    assert stats["rows"] == 29 and any("part-00001.parquet changed" in m for m in messages)
    with pytest.raises(ValueError, match="not both"):
        run_search(uri, cfg, encoder_dir(encoder), **QUIET)


def encoder_dir(encoder: QueryEncoder) -> str:
    return encoder.ranker.model.name_or_path


def test_ivf_index_trains_on_the_first_shards(corpus, encoder, tmp_path):
    uri = str(tmp_path / "set")
    add_shard(uri, corpus, encoder, 0, 0, 24)
    add_shard(uri, corpus, encoder, 1, 24, 24)
    cfg = SearchConfig(factory="IVF2,Flat", nprobe=2, train_rows=24)
    index, state, stats = update_index(uri, cfg, **QUIET)
    assert stats["rows"] == 48 and index.is_trained
    emb, _ = stored(uri)
    query = encoder.text("a green triangle")
    found = search(index, state, query, k=4, nprobe=2)          # every list probed: exact
    assert [i for i, _ in found] == np.argsort(-(emb @ normalized(query[None])[0]))[:4].tolist()
    messages = []
    update_index(uri, SearchConfig(), log=messages.append)      # another factory: rebuilt
    assert any("factory 'IVF2,Flat'" in m for m in messages)


def test_cli_on_s3_with_html_and_json(corpus, encoder, s3_bucket, tmp_path, tiny_models, capsys):
    uri = f"{s3_bucket}/capfilt"
    add_shard(uri, corpus, encoder, 0, 0, 12)
    add_shard(uri, corpus, encoder, 1, 12, 12)
    args = ["shards", "search", uri, "--text", "a blue square", "-k", "4", "--html", str(tmp_path / "hits.html"),
            "--json", str(tmp_path / "hits.json"), f"capfilt.ranker={tiny_models['ranker']}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    hits = json.loads((tmp_path / "hits.json").read_text())["hits"]
    assert len(hits) == 4 and [h["rank"] for h in hits] == [1, 2, 3, 4]
    assert all(h["key"] in out for h in hits) and "over 24 vectors in 2 shards" in out
    assert ShardSet(f"{uri}/_index").fs.exists(ShardSet(f"{uri}/_index").path("index.json"))
    page = (tmp_path / "hits.html").read_text()
    assert page.count("class='thumb' src='data:image/jpeg;base64,") == 4
    assert main(["shards", "search", uri, "--text", "", f"capfilt.ranker={tiny_models['ranker']}"]) == 2
    assert "no tokens" in capsys.readouterr().err


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); "
                                             ".ci/run installs it before the suite")
def test_search_page_renders_in_headless_chromium(corpus, encoder, tmp_path):
    uri = str(tmp_path / "set")
    add_shard(uri, corpus, encoder, 0, 0, 12)
    result = run_search(uri, SearchConfig(), encoder_dir(encoder), text="a red circle", k=6, **QUIET)
    result["hits"][0].caption = "<script>document.title='pwned'</script>"
    page = write_search_page(uri, result, str(tmp_path / "hits.html"))
    dom = chromium(["--dump-dom", f"file://{page}"], tmp_path / "profile")
    thumbs = re.findall(r'<img class="thumb" src="data:image/jpeg;base64,[A-Za-z0-9+/=]+"', dom)
    assert len(thumbs) == 6 and "<title>search: text: a red circle</title>" in dom
    assert "&lt;script&gt;" in dom
    for h in result["hits"][1:]:
        assert html.escape(h.caption) in dom and f"{h.score:.3f}" in dom and f"row {h.row}" in dom


def test_an_interrupted_update_is_rebuilt(corpus, encoder, tmp_path):
    """index.faiss written but index.json not (a crash in between): the next update rebuilds."""
    uri = str(tmp_path / "set")
    add_shard(uri, corpus, encoder, 0, 0, 12)
    update_index(uri, SearchConfig(), **QUIET)
    state_path = tmp_path / "set" / "_index" / "index.json"
    old_state = state_path.read_text()
    add_shard(uri, corpus, encoder, 1, 12, 12)
    update_index(uri, SearchConfig(), **QUIET)
    state_path.write_text(old_state)                      # the json of before, the index of after
    messages = []
    index, state, stats = update_index(uri, SearchConfig(), log=messages.append)
    assert any("disagree" in m for m in messages) and stats["rows"] == index.ntotal == 24
    assert [s["name"] for s in state["shards"]] == ["part-00000.parquet", "part-00001.parquet"]


def clustered(n: int, dim: int = 16, clusters: int = 64, seed: int = 0) -> np.ndarray:
    """Unit rows around ``clusters`` centres (neighbours are meaningful, as with CLIP embeddings)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    return normalized(centres[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)


def test_auto_picks_the_index_for_the_size_and_memory_budget():
    cfg = SearchConfig()
    assert choose_index(50_000, 768, cfg).factory == "Flat"                       # exact below exact_rows
    assert choose_index(5_000_000, 768, cfg).factory == "IVF2048_HNSW32,SQ8"     # 3.9 GB: SQ8 fits 16 GB
    big = choose_index(129_000_000, 768, cfg)                                    # SQ8 would take 100 GB
    assert big.factory == "IVF8192_HNSW32,PQ96" and big.bytes <= 16 * 2**30 and big.train_rows == 64 * 8192
    assert choose_index(129_000_000, 768, SearchConfig(memory_gb=128)).factory == "IVF8192_HNSW32,SQ8"
    with pytest.raises(ValueError, match="fits search.memory_gb=16"):
        choose_index(5_000_000_000, 768, cfg)
    small = SearchConfig(exact_rows=1000)
    assert choose_index(4000, 16, small).factory == "IVF64,SQ8"
    assert choose_index(4000, 16, SearchConfig(exact_rows=1000, memory_gb=60_000 / 2**30)).factory == "IVF64,PQ4"
    assert choose_index(4000, 16, SearchConfig(exact_rows=1000, train_rows=390)).factory == "IVF10,SQ8"  # <= rows/39


def test_auto_index_is_filled_in_parallel_merged_and_recalls_exact_search(tmp_path):
    emb = clustered(4000)
    uri = str(tmp_path / "set")
    write_embedding_set(uri, emb[:3500], per_shard=500)
    cfg = SearchConfig(exact_rows=1000, rows_per_task=1000, nprobe=8)
    index, state, stats = update_index(uri, cfg, **QUIET)
    assert stats["factory"] == "IVF64,SQ8" and stats["parts"] == 4 and index.ntotal == 3500
    write_embedding_set(uri, emb, per_shard=500)          # one more shard: merged into the stored index
    index, state, stats = update_index(uri, cfg, **QUIET)
    assert (stats["shards_added"], stats["rows"], index.ntotal) == (1, 4000, 4000)
    queries = clustered(50, seed=1)
    f16 = normalized(emb.astype(np.float16))
    exact = np.argsort(-(queries @ f16.T), axis=1)[:, :10]
    recall = {}
    for rerank in (1, 4):   # 4: 40 candidates re-scored with the stored rows
        found = [search(index, state, q, 10, cfg.nprobe, set_uri=uri, rerank=rerank) for q in queries]
        recall[rerank] = np.mean([len({i for i, _ in f} & set(t)) / 10 for f, t in zip(found, exact.tolist())])
    assert recall[1] >= 0.95 and recall[4] >= recall[1]
    np.testing.assert_allclose([s for _, s in found[0]], f16[[i for i, _ in found[0]]] @ queries[0], atol=1e-5)
    assert search(index, state, emb[3777], 1, cfg.nprobe)[0][0] == 3777   # ids = shard offset + row


@pytest.mark.parametrize("factory", ["auto", "IVF2,Flat"])
def test_nan_and_inf_embeddings_are_skipped_and_counted(tmp_path, factory):
    emb = clustered(60)
    emb[[3, 31]] = np.nan
    emb[44, 2] = np.inf
    uri = str(tmp_path / "set")
    write_embedding_set(uri, emb, per_shard=20)
    messages = []
    index, state, stats = update_index(uri, SearchConfig(factory=factory, nprobe=2), log=messages.append)
    assert (stats["rows"], stats["rows_skipped"]) == (57, 3) and index.ntotal == 57
    assert [s["skipped"] for s in state["shards"]] == [1, 1, 1] and any("NaN or inf" in m for m in messages)
    found = search(index, state, emb[32], 60, nprobe=2)
    assert found[0][0] == 32 and not {3, 31, 44} & {i for i, _ in found}


def test_bad_k_factory_and_too_few_training_rows_are_clear_errors(tmp_path, tiny_models, capsys):
    uri = str(tmp_path / "set")
    write_embedding_set(uri, clustered(11), per_shard=6)
    common = ["shards", "search", uri, "--text", "a red circle", f"capfilt.ranker={tiny_models['ranker']}"]
    for extra, message in ((["-k", "0"], "k (hits to return) must be >= 1, got 0"),
                           (["-k", "-5"], "must be >= 1, got -5"),
                           (["search.factory=Garbage"], "search.factory='Garbage' is not a faiss index_factory string"),
                           (["search.factory=IVF4096,Flat"], "needs at least 4096 training vectors, the set has 11"),
                           (["search.k=0"], "search: k, nprobe, rows_per_task and rerank must be >= 1")):
        assert main(common + extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
