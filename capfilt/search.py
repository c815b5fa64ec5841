"""``blip2 shards search``: a faiss index over a shard set's CLIP image embeddings, queried by text or image.

The index lives beside the set (``<set>/_index/``) or where ``search.index`` says, local or ``s3://``:

    index.faiss   the faiss index (``search.factory``, inner product over L2-normalised vectors)
    index.json    the shards it holds, in the order added: name, rows, offset (= first id), sha256

Vector id = offset of its shard + row in the shard, so a hit maps back to (shard, row) without
a per-row table. Updating only adds committed shards the index does not hold yet; when a held
shard changed or vanished (its commit record's sha256 differs), or the index and its json
disagree, the index is rebuilt from scratch. Queries are embedded with the CapFilt ranker
(``capfilt.ranker``: the CLIP text tower for text, the image tower for an image file).
"""
from __future__ import annotations

import bisect
import json
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from capfilt.curate_config import SearchConfig
from capfilt.embeddings import has_embeddings, read_embeddings, read_metadata
from capfilt.semdedup import normalized
from pipelines.shardio import ShardSet, shard_index

INDEX_DIR = "_index"
INDEX_FILE, STATE_FILE = "index.faiss", "index.json"


@dataclass
class Hit:
    rank: int
    score: float
    key: str
    caption: str
    shard: str
    row: int
    image: bytes | None = None


def index_uri(set_uri: str, cfg: SearchConfig) -> str:
    return cfg.index or f"{set_uri.rstrip('/')}/{INDEX_DIR}"


def _load(loc: ShardSet):
    import faiss

    if not (loc.fs.exists(loc.path(STATE_FILE)) and loc.fs.exists(loc.path(INDEX_FILE))):
        return None, None
    state = json.loads(loc.fs.cat(loc.path(STATE_FILE)))
    if loc.is_local:
        return faiss.read_index(loc.path(INDEX_FILE)), state
    with tempfile.TemporaryDirectory() as tmp:   # faiss reads files: one streamed copy, not bytes in memory
        loc.fs.get_file(loc.path(INDEX_FILE), f"{tmp}/{INDEX_FILE}")
        return faiss.read_index(f"{tmp}/{INDEX_FILE}"), state


def _save(loc: ShardSet, index, state: dict) -> None:
    """The index first, its description last (a crash in between is seen as a mismatch and rebuilt)."""
    import faiss

    with tempfile.TemporaryDirectory() as tmp:
        faiss.write_index(index, f"{tmp}/{INDEX_FILE}")
        loc.put_file(INDEX_FILE, f"{tmp}/{INDEX_FILE}")
    loc.put(STATE_FILE, json.dumps(state, indent=1).encode())


def _stale(index, state: dict, src: ShardSet, cfg: SearchConfig, committed: set[str]) -> str | None:
    """Why the stored index cannot be extended (None: it can)."""
    if state.get("factory") != cfg.factory:
        return f"it was built with factory {state.get('factory')!r}, not {cfg.factory!r}"
    if index.ntotal != sum(s["rows"] for s in state["shards"]):
        return "index.faiss and index.json disagree (an interrupted update)"
    for s in state["shards"]:
        if s["name"] not in committed:
            return f"{s['name']} is no longer in the set"
        if src.shard_info(s["name"]).sha256 != s["sha256"]:
            return f"{s['name']} changed since it was indexed"
    return None


def update_index(set_uri: str, cfg: SearchConfig, log=print):
    """(faiss index, state, stats): the stored index extended with the shards it does not hold yet."""
    import faiss

    src, loc = ShardSet(set_uri), ShardSet(index_uri(set_uri, cfg))
    started = time.time()
    names = src.committed()
    if not names:
        raise FileNotFoundError(f"{src.uri} holds no committed shards (part-NNNNN.parquet)")
    index, state = _load(loc)
    if index is not None:
        why = _stale(index, state, src, cfg, set(names))
        if why:
            log(f"search: rebuilding the index ({why})")
            index, state = None, None
    state = state or {"factory": cfg.factory, "dim": None, "shards": []}
    held = {s["name"] for s in state["shards"]}
    new = [n for n in names if n not in held]
    stats = {"shards_added": 0, "rows_added": 0, "shards_without_embeddings": 0}
    todo = []
    for name in new:
        rows = pq.read_metadata(src.fs.open(src.path(name), "rb")).num_rows
        if rows and not has_embeddings(src, shard_index(name)):
            stats["shards_without_embeddings"] += 1   # counted, and tried again next time
            continue
        todo.append((name, rows))
    if index is None and any(rows for _, rows in todo):
        first = next(n for n, rows in todo if rows)
        dim = read_embeddings(src, shard_index(first)).shape[1]
        index = faiss.index_factory(dim, cfg.factory, faiss.METRIC_INNER_PRODUCT)
        state["dim"] = dim
        if not index.is_trained:
            sample, got = [], 0
            for name, rows in todo:
                if got >= cfg.train_rows:
                    break
                if rows:
                    sample.append(normalized(read_embeddings(src, shard_index(name)))[:cfg.train_rows - got])
                    got += len(sample[-1])
            log(f"search: training {cfg.factory} on {got} vectors")
            index.train(np.concatenate(sample))
    for name, rows in todo:
        emb = normalized(read_embeddings(src, shard_index(name))) if rows else None
        if emb is not None:
            if len(emb) != rows:
                raise ValueError(f"{src.url(name)}: {rows} rows but {len(emb)} image embeddings (misaligned)")
            index.add(emb)
        state["shards"].append({"name": name, "rows": rows, "sha256": src.shard_info(name).sha256,
                                "offset": sum(s["rows"] for s in state["shards"])})
        stats["shards_added"] += 1
        stats["rows_added"] += rows
    if stats["shards_added"] and index is not None:
        _save(loc, index, state)
    stats.update(rows=0 if index is None else int(index.ntotal), shards=len(state["shards"]),
                 seconds=round(time.time() - started, 3), index=loc.uri)
    return index, state, stats


class QueryEncoder:
    """Text or image -> the CLIP embedding the index is searched with (the CapFilt ranker, float32)."""

    def __init__(self, ranker_uri: str, max_pixels: int = 40_000_000):
        from capfilt.preprocess import HFTransform, ImageTransform, load_image_processor
        from capfilt.ranker import Ranker
        from pipelines.storage import local_dir

        self.ranker = Ranker(local_dir(ranker_uri), dtype="float32")
        proc = load_image_processor(ranker_uri)
        self.transform = ImageTransform.from_processor(proc) or HFTransform(proc)
        self.max_pixels = max_pixels

    def text(self, query: str) -> np.ndarray:
        out = self.ranker.embed_texts([query])
        if bool(out.empty[0]):
            raise ValueError(f"the query {query!r} has no tokens the CLIP tokenizer keeps")
        return out.emb[0].numpy()

    def image(self, data: bytes) -> np.ndarray:
        from capfilt.preprocess import decode_image

        img, outcome = decode_image(data, self.max_pixels)
        if img is None:
            raise ValueError(f"the query image cannot be used ({outcome})")
        return self.ranker.embed_images(self.transform(img)[None])[0].cpu().numpy()


def search(index, state: dict, query: np.ndarray, k: int, nprobe: int = 32) -> list[tuple[int, float]]:
    """(vector id, cosine) of the top ``k``, best first."""
    import faiss

    if index is None or index.ntotal == 0:
        return []
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = nprobe
    scores, ids = index.search(normalized(query[None]), min(k, index.ntotal))
    return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]


def resolve(set_uri: str, state: dict, found: list[tuple[int, float]], images: bool = True) -> list[Hit]:
    """Each id's shard and row, key and best caption (from the embeddings' metadata) and image bytes."""
    src = ShardSet(set_uri)
    offsets = [s["offset"] for s in state["shards"]]
    hits = []
    for rank, (vid, score) in enumerate(found, 1):
        s = state["shards"][bisect.bisect_right(offsets, vid) - 1]   # empty shards never hold the last offset <= id
        row = vid - s["offset"]
        meta = read_metadata(src, shard_index(s["name"])).slice(row, 1).to_pylist()[0]
        image = None
        if images:
            pf = src.open_parquet(s["name"])
            starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
            g = int(np.searchsorted(starts, row, side="right")) - 1   # only the row group that holds the row
            group = pf.read_row_group(g, columns=["key", "image"])
            image = group.column("image")[row - starts[g]].as_py()
            if group.column("key")[row - starts[g]].as_py() != meta["key"]:
                raise ValueError(f"{src.url(s['name'])}: row {row} is not {meta['key']!r} (embeddings misaligned)")
        hits.append(Hit(rank, score, meta["key"], meta["caption"] or "", s["name"], row, image))
    return hits


def run_search(set_uri: str, cfg: SearchConfig, ranker_uri: str, text: str | None = None,
               image_path: str | None = None, k: int | None = None, log=print) -> dict:
    """Update the index, embed the query, return {"query", "hits", "index"} (hits with image bytes)."""
    if (text is None) == (image_path is None):
        raise ValueError("give a text query or an image file, not both and not neither")
    index, state, stats = update_index(set_uri, cfg, log=log)
    encoder = QueryEncoder(ranker_uri)
    if text is not None:
        query, label = encoder.text(text), f"text: {text}"
    else:
        import fsspec

        with fsspec.open(image_path, "rb") as f:
            query, label = encoder.image(f.read()), f"image: {image_path}"
    started = time.time()
    found = search(index, state, query, k or cfg.k, cfg.nprobe)
    stats["query_ms"] = round(1000 * (time.time() - started), 2)
    return {"query": label, "hits": resolve(set_uri, state, found), "index": stats}


def write_search_page(set_uri: str, result: dict, out: str) -> str:
    """The hits as an HTML page of thumbnails (pipelines.report's page and thumbnails)."""
    from pipelines.inspect import Thumbnail, make_thumbnail
    from pipelines.report import render_search_html, write_page

    thumbs = []
    for h in result["hits"]:
        try:
            jpeg = make_thumbnail(h.image)[0] if h.image else b""
        except Exception:  # noqa: BLE001 - an undecodable stored image still gets its line
            jpeg = b""
        thumbs.append(Thumbnail(h.key, jpeg, [h.caption], [h.score], note=f"#{h.rank}  {h.shard} row {h.row}"))
    info = {"index": result["index"]["index"], "vectors": result["index"]["rows"],
            "shards": result["index"]["shards"], "query time": f"{result['index']['query_ms']} ms"}
    return str(write_page(render_search_html(set_uri, result["query"], thumbs, info), out))


def format_hits(result: dict) -> str:
    s = result["index"]
    lines = [f"search {result['query']!r} over {s['rows']} vectors in {s['shards']} shards "
             f"({s['shards_added']} shards added to {s['index']}; query {s['query_ms']} ms)",
             f"  {'#':>3}  {'score':>7}  {'shard':<18} {'row':>5}  key / caption"]
    for h in result["hits"]:
        lines.append(f"  {h.rank:>3}  {h.score:7.4f}  {h.shard:<18} {h.row:>5}  {h.key}  {h.caption[:60]!r}")
    return "\n".join(lines)
