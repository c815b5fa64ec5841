"""``blip2 shards search``: a faiss index over a shard set's CLIP image embeddings, queried by text or image.

The index lives beside the set (``<set>/_index/``) or where ``search.index`` says, local or ``s3://``:

    index.faiss    the faiss index (inner product over L2-normalised vectors)
    trained.faiss  the same index trained but empty: what each fill task starts from
    index.json     the factory it was built with, and the shards it holds in the order added:
                   name, rows, offset (= first id), rows skipped, sha256

Vector id = offset of its shard + row in the shard, so a hit maps back to (shard, row) without
a per-row table. A row whose embedding is NaN or inf is skipped (counted, never returned).

The build, on Ray, never holds the set's vectors in one process:

    choose   driver: ``search.factory=auto`` picks the index for the set's size and ``search.memory_gb``
             (:func:`choose_index`), as autofaiss does: exact (Flat) up to ``exact_rows``, then IVF
             over about sqrt(n) lists (an HNSW graph as the coarse quantiser from 1024 lists) with
             SQ8 codes, or PQ codes as small as the memory budget needs
    train    one task: the empty index trained on a sample spread over the set (``train_rows``)
    fill     tasks in parallel, each on a run of shards (~``rows_per_task`` vectors): a copy of the
             trained index, its shards added, written to ``_parts/``
    merge    one task: the parts merged (``merge_from``) into the stored index (an update) or the
             trained one (a build), written as index.faiss; the driver writes index.json last

Updating only adds committed shards the index does not hold yet. It is rebuilt from scratch when a
held shard changed or vanished (its commit record's sha256 differs), the index and its json
disagree, the factory changed, or (auto) the set grew past what its index was chosen for: nlist
follows sqrt(n) in powers of two, so rebuilds come at every ~4x growth and cost O(final size) in
all. Queries are embedded with the CapFilt ranker (``capfilt.ranker``: the CLIP text tower for
text, the image tower for an image file).
"""
from __future__ import annotations

import bisect
import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from capfilt.curate_config import SearchConfig
from capfilt.embeddings import has_embeddings, read_embedding_rows, read_embeddings, read_metadata
from capfilt.semdedup import normalized
from pipelines.shardio import ShardSet, shard_index

INDEX_DIR = "_index"
INDEX_FILE, TRAINED_FILE, STATE_FILE, PARTS_DIR = "index.faiss", "trained.faiss", "index.json", "_parts"
STATE_VERSION = 2           # 2: ids given explicitly (rows skipped), trained.faiss kept
AUTO = "auto"
HNSW_COARSE_FROM = 1024     # lists from which assigning a vector to its list goes through an HNSW graph:
                            # a flat quantiser costs n x nlist dot products at fill time
TRAIN_PER_LIST, MIN_TRAIN = 64, 20_000
MIN_PER_LIST = 39           # faiss warns below 39 training vectors per list
ID_BYTES = 8                # an IVF list stores an int64 id beside each code
PQ_TRAIN = 256              # PQ's 8-bit codebooks need at least 256 training vectors


@dataclass
class Hit:
    rank: int
    score: float
    key: str
    caption: str
    shard: str
    row: int
    image: bytes | None = None


@dataclass(frozen=True)
class Choice:
    factory: str
    train_rows: int         # 0: the index needs no training
    bytes: int              # its estimated size in memory once filled


def index_uri(set_uri: str, cfg: SearchConfig) -> str:
    return cfg.index or f"{set_uri.rstrip('/')}/{INDEX_DIR}"


def train_rows(cfg: SearchConfig, rows: int, nlist: int) -> int:
    return min(rows, cfg.train_rows or max(TRAIN_PER_LIST * nlist, MIN_TRAIN))


def choose_index(rows: int, dim: int, cfg: SearchConfig) -> Choice:
    """The index ``search.factory=auto`` builds over ``rows`` vectors of ``dim`` within ``memory_gb``."""
    budget = cfg.memory_gb * 2**30
    flat = rows * (4 * dim + ID_BYTES)
    if rows <= cfg.exact_rows and flat <= budget:
        return Choice("Flat", 0, flat)
    nlist = 2 ** max(0, round(math.log2(max(1.0, math.sqrt(rows)))))
    train = train_rows(cfg, rows, nlist)
    nlist = max(1, min(nlist, train // MIN_PER_LIST))
    coarse = f"IVF{nlist}_HNSW32" if nlist >= HNSW_COARSE_FROM else f"IVF{nlist}"
    fixed = nlist * dim * 4 + (nlist * 64 * 4 if nlist >= HNSW_COARSE_FROM else 0)   # centroids (+ graph)
    codes = [("SQ8", dim)] + [(f"PQ{m}", m) for m in (dim // 4, dim // 8, dim // 16, dim // 32)
                              if m >= 2 and dim % m == 0 and train >= PQ_TRAIN]
    for enc, code in codes:
        size = fixed + rows * (code + ID_BYTES)
        if size <= budget:
            return Choice(f"{coarse},{enc}", train, size)
    enc, code = codes[-1]
    raise ValueError(f"no index over {rows} vectors of dim {dim} fits search.memory_gb={cfg.memory_gb}: the smallest, "
                     f"{coarse},{enc}, needs {(fixed + rows * (code + ID_BYTES)) / 2**30:.2f} GB")


def empty_index(factory: str, dim: int):
    """A new index from a factory string; non-IVF ones are wrapped to take explicit ids."""
    import faiss

    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"search.factory={factory!r} is not a faiss index_factory string for dim {dim} "
                         f"({_faiss_message(e)})") from None
    return index if faiss.try_extract_index_ivf(index) is not None else faiss.IndexIDMap2(index)


def _faiss_message(e: Exception) -> str:
    """faiss' error without its C++ location ("Error in ... at file.cpp:123: ...")."""
    return re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", str(e).strip().splitlines()[0])


def _needs_train(index) -> tuple[bool, int]:
    """(whether it trains, the fewest training vectors it accepts)."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    return (not index.is_trained), (ivf.nlist if ivf is not None else 1)


def _mergeable(index) -> bool:
    import faiss

    base = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    return faiss.try_extract_index_ivf(index) is not None or isinstance(base, faiss.IndexFlatCodes)


# -- index files ------------------------------------------------------------------------------
def _read_index(loc: ShardSet, name: str):
    import faiss

    if loc.is_local:
        return faiss.read_index(loc.path(name))
    with tempfile.TemporaryDirectory() as tmp:   # faiss reads files: one streamed copy, not bytes in memory
        loc.fs.get_file(loc.path(name), f"{tmp}/x.faiss")
        return faiss.read_index(f"{tmp}/x.faiss")


def _write_index(loc: ShardSet, name: str, index) -> int:
    """Write all or nothing; returns its size in bytes."""
    import faiss

    with tempfile.TemporaryDirectory() as tmp:
        faiss.write_index(index, f"{tmp}/x.faiss")
        loc.put_file(name, f"{tmp}/x.faiss")
        return int(os.path.getsize(f"{tmp}/x.faiss"))


def _read_state(loc: ShardSet) -> dict | None:
    if not (loc.fs.exists(loc.path(STATE_FILE)) and loc.fs.exists(loc.path(INDEX_FILE))):
        return None
    return json.loads(loc.fs.cat(loc.path(STATE_FILE)))


def load_index(loc: ShardSet):
    """(index, state) as stored, or (None, None)."""
    state = _read_state(loc)
    return (None, None) if state is None else (_read_index(loc, INDEX_FILE), state)


# -- the tasks --------------------------------------------------------------------------------
def finite_rows(emb: np.ndarray) -> np.ndarray:
    """Rows whose embedding can be indexed (NaN or inf rows cannot: faiss refuses them)."""
    return np.isfinite(emb).all(axis=1) if emb.size else np.ones(len(emb), bool)


def _threads(cfg: SearchConfig) -> int:
    import faiss

    faiss.omp_set_num_threads(max(1, int(cfg.num_cpus)))
    return max(1, int(cfg.num_cpus))


def _train(cfg: SearchConfig, factory: str, dim: int, set_uri: str, sample: list[tuple[str, int]],
           want: int, loc_uri: str) -> str | None:
    """Train the empty index on up to ``want`` finite vectors of the ``sample`` shards (seeded rows);
    write trained.faiss. Returns an error message for the user, or None."""
    _threads(cfg)
    src = ShardSet(set_uri)
    index = empty_index(factory, dim)
    rows, got = [], 0
    for name, take in sample:
        emb = read_embeddings(src, shard_index(name))
        emb = emb[finite_rows(emb)]
        pick = np.random.default_rng([0, shard_index(name)]).permutation(len(emb))[:min(take, want - got)]
        rows.append(normalized(emb[np.sort(pick)]))
        got += len(pick)
    x = np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)
    least = _needs_train(index)[1]
    if len(x) < least:
        return (f"search.factory={factory!r} needs at least {least} training vectors, the set has {len(x)} "
                "finite ones: use search.factory=auto or a smaller IVF")
    try:
        index.train(x)
    except RuntimeError as e:
        return f"search.factory={factory!r} could not be trained on {len(x)} vectors: {_faiss_message(e)}"
    _write_index(ShardSet(loc_uri), TRAINED_FILE, index)
    return None


def _fill(cfg: SearchConfig, set_uri: str, loc_uri: str, base: str, part: int,
          shards: list[tuple[str, int, int]]) -> dict:
    """Add ``shards`` ((name, rows, first id)) to a copy of ``base`` (the trained index); write it to
    _parts/. Returns {name: rows skipped} or {"error": message}."""
    _threads(cfg)
    src, loc = ShardSet(set_uri), ShardSet(loc_uri)
    index = _read_index(loc, base)
    skipped = {}
    for name, rows, offset in shards:
        if not rows:
            skipped[name] = 0
            continue
        emb = read_embeddings(src, shard_index(name))
        if len(emb) != rows:
            return {"error": f"{src.url(name)}: {rows} rows but {len(emb)} image embeddings (misaligned)"}
        ok = finite_rows(emb)
        if ok.any():
            index.add_with_ids(normalized(emb[ok]), (offset + np.flatnonzero(ok)).astype(np.int64))
        skipped[name] = int((~ok).sum())
    _write_index(loc, f"{PARTS_DIR}/part-{part:05d}.faiss", index)
    return skipped


def _merge(cfg: SearchConfig, loc_uri: str, base: str, parts: int) -> int:
    """Merge the parts into ``base`` (index.faiss or trained.faiss), one part in memory at a time;
    write index.faiss. Returns its size in bytes."""
    _threads(cfg)
    loc = ShardSet(loc_uri)
    index = _read_index(loc, base)
    for p in range(parts):
        index.merge_from(_read_index(loc, f"{PARTS_DIR}/part-{p:05d}.faiss"), 0)
    return _write_index(loc, INDEX_FILE, index)


# -- the driver -------------------------------------------------------------------------------
def _stale(state: dict, loc: ShardSet, src: ShardSet, cfg: SearchConfig, committed: set[str]) -> str | None:
    """Why the stored index cannot be extended (None: it can)."""
    if state.get("version") != STATE_VERSION:
        return "it was written by an earlier version"
    if state.get("factory") != cfg.factory:
        return f"it was built with factory {state.get('factory')!r}, not {cfg.factory!r}"
    if loc.fs.size(loc.path(INDEX_FILE)) != state.get("index_bytes") or not loc.fs.exists(loc.path(TRAINED_FILE)):
        return "index.faiss and index.json disagree (an interrupted update)"
    for s in state["shards"]:
        if s["name"] not in committed:
            return f"{s['name']} is no longer in the set"
        if src.shard_info(s["name"]).sha256 != s["sha256"]:
            return f"{s['name']} changed since it was indexed"
    return None


def _sample(todo: list[tuple[str, int]], want: int) -> list[tuple[str, int]]:
    """Evenly spaced shards holding about ``want`` rows (with 2x slack for skipped rows), and a quota each."""
    full = [(n, r) for n, r in todo if r]
    if not full or not want:
        return []
    per = sum(r for _, r in full) / len(full)
    count = min(len(full), max(1, math.ceil(2 * want / per)))
    picks = [full[round(i * (len(full) - 1) / max(1, count - 1))] for i in range(count)] if count > 1 else full[:1]
    quota = math.ceil(2 * want / count)
    return [(n, min(r, quota)) for n, r in dict(picks).items()]


def _runs(todo: list[tuple[str, int, int]], rows_per_task: int, tasks_at_least: int) -> list[list]:
    """Consecutive runs of shards, about ``rows_per_task`` rows each, at least ``tasks_at_least`` runs."""
    total = sum(r for _, r, _ in todo)
    target = max(1, min(rows_per_task, math.ceil(total / max(1, tasks_at_least))))
    runs, cur, rows = [], [], 0
    for item in todo:
        cur.append(item)
        rows += item[1]
        if rows >= target:
            runs.append(cur)
            cur, rows = [], 0
    return runs + ([cur] if cur else [])


def update_index(set_uri: str, cfg: SearchConfig, log=print):
    """(faiss index, state, stats): the stored index extended with the shards it does not hold yet.

    Needs Ray initialised when there are shards to add."""
    src, loc = ShardSet(set_uri), ShardSet(index_uri(set_uri, cfg))
    started = time.time()
    names = src.committed()
    if not names:
        raise FileNotFoundError(f"{src.uri} holds no committed shards (part-NNNNN.parquet)")
    state = _read_state(loc)
    if state is not None:
        why = _stale(state, loc, src, cfg, set(names))
        if why:
            log(f"search: rebuilding the index ({why})")
            state = None
    held = {s["name"] for s in state["shards"]} if state else set()
    infos = src.map_members(src.shard_info, [n for n in names if n not in held])
    stats = {"shards_added": 0, "rows_added": 0, "rows_skipped_added": 0, "shards_without_embeddings": 0}
    todo = []
    for info in infos:
        if info.rows and not has_embeddings(src, shard_index(info.name)):
            stats["shards_without_embeddings"] += 1   # counted, and tried again next time
            continue
        todo.append((info.name, info.rows))
    if state and cfg.factory == AUTO:
        rows = sum(s["rows"] for s in state["shards"]) + sum(r for _, r in todo)
        choice = choose_index(rows, state["dim"], cfg)
        if choice.factory != state["built"]:
            log(f"search: rebuilding the index (at {rows} rows auto picks {choice.factory}, not {state['built']})")
            state = None
            todo = [(i.name, i.rows) for i in src.map_members(src.shard_info, names)
                    if not (i.rows and not has_embeddings(src, shard_index(i.name)))]
    if todo and any(r for _, r in todo):
        state = _build(src, loc, cfg, state, todo, stats, log)
    stats.update(rows=0 if state is None else sum(s["rows"] - s["skipped"] for s in state["shards"]),
                 rows_skipped=0 if state is None else sum(s["skipped"] for s in state["shards"]),
                 shards=0 if state is None else len(state["shards"]), factory=state and state["built"],
                 seconds=round(time.time() - started, 3), index=loc.uri)
    if stats["rows_skipped_added"]:
        log(f"search: skipped {stats['rows_skipped_added']} rows whose image embedding is NaN or inf "
            "(they are never returned)")
    index, state = load_index(loc) if state else (None, state)
    return index, state, stats


def _build(src: ShardSet, loc: ShardSet, cfg: SearchConfig, state: dict | None, todo: list[tuple[str, int]],
           stats: dict, log) -> dict:
    """Train (a new index), fill and merge; write index.json last. Returns the new state."""
    import ray

    if state is None:
        first = next(n for n, r in todo if r)
        dim = int(read_embeddings(src, shard_index(first)).shape[1])
        rows = sum(r for _, r in todo)
        if cfg.factory == AUTO:
            choice = choose_index(rows, dim, cfg)
        else:
            probe = empty_index(cfg.factory, dim)
            trains, least = _needs_train(probe)
            choice = Choice(cfg.factory, max(least, train_rows(cfg, rows, least)) if trains else 0, 0)
        state = {"version": STATE_VERSION, "factory": cfg.factory, "built": choice.factory, "dim": dim, "shards": []}
        log(f"search: building {choice.factory} over {rows} vectors of dim {dim}"
            + (f" (trained on {choice.train_rows})" if choice.train_rows else ""))
        if loc.fs.exists(loc.path(INDEX_FILE)):
            loc.fs.rm(loc.path(INDEX_FILE))            # a crash from here on leaves no index to extend
        if choice.train_rows:
            task = ray.remote(num_cpus=cfg.num_cpus)(_train)
            error = ray.get(task.remote(cfg, choice.factory, dim, src.uri, _sample(todo, choice.train_rows),
                                        choice.train_rows, loc.uri))
            if error:
                raise ValueError(error)
        else:
            _write_index(loc, TRAINED_FILE, empty_index(choice.factory, dim))
        base = TRAINED_FILE
    else:
        base = INDEX_FILE
    offset = sum(s["rows"] for s in state["shards"])
    items = []
    for name, rows in todo:
        items.append((name, rows, offset))
        offset += rows
    if loc.fs.exists(loc.path(PARTS_DIR)):   # a crashed build's parts: never mixed into this one
        loc.fs.rm(loc.path(PARTS_DIR), recursive=True)
    loc.makedirs(PARTS_DIR)
    # Parallel runs merged into the base, or (an index faiss cannot merge, e.g. HNSW) one run over it.
    mergeable = _mergeable(empty_index(state["built"], state["dim"]))
    slots = max(1, int(ray.cluster_resources().get("CPU", 1) // cfg.num_cpus))
    runs = _runs(items, cfg.rows_per_task, slots) if mergeable else [items]
    start = TRAINED_FILE if mergeable else base
    fill = ray.remote(num_cpus=cfg.num_cpus)(_fill)
    results = ray.get([fill.remote(cfg, src.uri, loc.uri, start, p, run) for p, run in enumerate(runs)])
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise ValueError(errors[0])
    if len(runs) == 1 and (start == base):   # one part over the base: it is the index
        loc.fs.mv(loc.path(f"{PARTS_DIR}/part-00000.faiss"), loc.path(INDEX_FILE))
        size = loc.fs.size(loc.path(INDEX_FILE))
    else:
        size = ray.get(ray.remote(num_cpus=cfg.num_cpus)(_merge).remote(cfg, loc.uri, base, len(runs)))
    loc.fs.rm(loc.path(PARTS_DIR), recursive=True)
    skipped = {k: v for r in results for k, v in r.items()}
    for name, rows, off in items:
        state["shards"].append({"name": name, "rows": rows, "offset": off, "skipped": skipped.get(name, 0),
                                "sha256": src.shard_info(name).sha256})
    stats["shards_added"] += len(items)
    stats["rows_added"] += sum(r for _, r, _ in items)
    stats["rows_skipped_added"] += sum(skipped.values())
    state["index_bytes"] = int(size)
    stats["parts"] = len(runs)
    loc.put(STATE_FILE, json.dumps(state, indent=1).encode())
    return state


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


def search(index, state: dict, query: np.ndarray, k: int, nprobe: int = 32, set_uri: str | None = None,
           rerank: int = 1) -> list[tuple[int, float]]:
    """(vector id, cosine) of the top ``k``, best first. With ``set_uri`` and ``rerank`` > 1, a
    quantised index returns ``rerank`` x k candidates, re-scored exactly with their stored embeddings
    (SQ8/PQ codes reorder neighbours of near-equal score; the stored float16 rows do not)."""
    import faiss

    check_k(k)
    if index is None or index.ntotal == 0:
        return []
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = nprobe
    exact = isinstance(index, faiss.IndexIDMap2) and isinstance(faiss.downcast_index(index.index), faiss.IndexFlat)
    wide = k if exact or set_uri is None or rerank <= 1 else k * rerank
    q = normalized(query[None])
    scores, ids = index.search(q, min(wide, index.ntotal))
    found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
    if wide == k:
        return found
    src = ShardSet(set_uri)
    vecs = np.zeros((len(found), q.shape[1]), np.float32)
    by_shard: dict[str, list[tuple[int, int]]] = {}
    for pos, (vid, _) in enumerate(found):
        s, row = locate(state, vid)
        by_shard.setdefault(s["name"], []).append((pos, row))
    for name, items in by_shard.items():
        vecs[[p for p, _ in items]] = read_embedding_rows(src, shard_index(name), [r for _, r in items])
    exact_scores = normalized(vecs) @ q[0]
    order = np.argsort(-exact_scores, kind="stable")[:k]
    return [(found[i][0], float(exact_scores[i])) for i in order]


def locate(state: dict, vid: int) -> tuple[dict, int]:
    """The shard entry of vector ``vid`` and its row in the shard."""
    offsets = [s["offset"] for s in state["shards"]]
    s = state["shards"][bisect.bisect_right(offsets, vid) - 1]   # empty shards never hold the last offset <= id
    return s, vid - s["offset"]


def check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k (hits to return) must be >= 1, got {k!r}")


def resolve(set_uri: str, state: dict, found: list[tuple[int, float]], images: bool = True) -> list[Hit]:
    """Each id's shard and row, key and best caption (from the embeddings' metadata) and image bytes."""
    src = ShardSet(set_uri)
    hits = []
    for rank, (vid, score) in enumerate(found, 1):
        s, row = locate(state, vid)
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
    k = cfg.k if k is None else k
    check_k(k)
    index, state, stats = update_index(set_uri, cfg, log=log)
    encoder = QueryEncoder(ranker_uri)
    if text is not None:
        query, label = encoder.text(text), f"text: {text}"
    else:
        import fsspec

        with fsspec.open(image_path, "rb") as f:
            query, label = encoder.image(f.read()), f"image: {image_path}"
    started = time.time()
    found = search(index, state, query, k, cfg.nprobe, set_uri=set_uri, rerank=cfg.rerank)
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
             f"({s['shards_added']} shards added to {s['index']}; query {s['query_ms']} ms)"
             + (f"; {s['rows_skipped']} rows skipped: NaN/inf embeddings" if s.get("rows_skipped") else ""),
             f"  {'#':>3}  {'score':>7}  {'shard':<18} {'row':>5}  key / caption"]
    for h in result["hits"]:
        lines.append(f"  {h.rank:>3}  {h.score:7.4f}  {h.shard:<18} {h.row:>5}  {h.key}  {h.caption[:60]!r}")
    return "\n".join(lines)
