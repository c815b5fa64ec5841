"""``blip2 curate``: filter a CapFilt shard set with the CLIP ViT-L/14 embeddings CapFilt computed.

    score    Ray Data actor pool, one input shard per call: CLIP score of the kept caption(s),
             NSFW / aesthetic heads over the image embedding, LAION's punsafe / pwatermark where
             the shard has them, sha256 -> _curate/scores/part-NNNNN.parquet (kept: the record)
    plan     driver: the CLIP-score threshold (absolute and/or a quantile over the whole input)
    exact    Ray tasks, sha256 hash-partitioned (map over runs of shards, reduce per partition):
             identical images, the best-scoring row stays
    semdedup capfilt.semdedup (k-means, clusters deduplicated in parallel tasks)
    write    Ray task per input shard: curated shard i (same CAPFILT contract, with its
             embeddings) and _removed/part-i (every removed row, whole, with reasons and scores)

Filters run in that order and each sees the rows the earlier ones kept, so a duplicate of an
image removed as unsafe is not lost with it. Input shard i becomes output shard i: a rerun skips
committed shards and, the passes being deterministic, rewrites a lost one identically.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from capfilt.curate_config import CurateConfig
from capfilt.embeddings import has_embeddings, read_embeddings, write_embeddings
from capfilt.semdedup import Candidates, Removed, semdedup
from pipelines.curation import (AESTHETIC, BAD_EMBEDDING, CLIP_SCORE, EXACT_DUPLICATE, NEAR_DUPLICATE, NO_IMAGE, NSFW,
                                REASONS, REMOVED_DIR, SCORES_DIR, STATS_DIR, WATERMARK, WORK_DIR)
from pipelines.inspect import Distribution
from pipelines.schema import CAPFILT, CURATE_SCORES, REMOVED, SchemaError, validate
from pipelines.shardio import ShardSet, column_stats, shard_index, shard_name

CONFIG_FILE = "_curate/config.json"
QUANTILE_RESOLUTION = 1e-5   # the quantile pass keeps a histogram of scores at this resolution


# -- input ----------------------------------------------------------------------------------
def check_input(src: ShardSet, needs_embeddings: bool) -> dict[int, int]:
    """shard index -> rows, after validating every shard's schema and (when needed) its embeddings."""
    names = src.committed()
    if not names:
        src.check_schema(CAPFILT)  # raises the "no committed shards" SchemaError

    def one(name: str) -> tuple[int, int]:
        pf = src.open_parquet(name)
        validate(pf.schema_arrow, CAPFILT, where=src.url(name))
        index, rows = shard_index(name), pf.metadata.num_rows
        if needs_embeddings and rows and not has_embeddings(src, index):
            raise SchemaError(f"{src.url(name)} has no image embeddings (embeddings/img_emb/...); curate's "
                              "semdedup and heads need them: run capfilt with capfilt.write_embeddings=true")
        return index, rows

    with ThreadPoolExecutor(16) as pool:
        return dict(sorted(pool.map(one, names)))


def kept_score(scores: list, use: str) -> float:
    finite = [s for s in (scores or []) if s is not None and np.isfinite(s)]
    if not finite:
        return float("nan")
    return {"best": finite[0], "mean": float(np.mean(finite)), "min": min(finite)}[use]


def _may_hold_null_images(pf) -> bool:
    """From the footer's statistics (no image read): whether any row's image is null."""
    return any(st is None or not st.has_null_count or st.null_count > 0 for _, st in column_stats(pf, "image"))


# -- score pass (Ray Data actors) -----------------------------------------------------------
class ScoreStage:
    """Writes ``_curate/scores/part-i`` for each shard index it is given (heads loaded once per actor)."""

    def __init__(self, cfg: CurateConfig, input_uri: str, output_uri: str):
        import torch

        from capfilt.heads import load_head

        self.cfg, self.src, self.scores = cfg, ShardSet(input_uri), ShardSet(f"{output_uri}/{SCORES_DIR}")
        self.device = "cuda" if cfg.score_num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.heads = {}
        if cfg.nsfw.enabled and cfg.nsfw.head:
            self.heads["nsfw"] = load_head(cfg.nsfw.head)[1]
        if cfg.aesthetic.enabled and cfg.aesthetic.head:
            self.heads["aesthetic"] = load_head(cfg.aesthetic.head)[1]

    def __call__(self, batch: dict) -> dict:
        rows = [self.score_shard(int(i)) for i in batch["shard"]]
        return {"shard": batch["shard"], "rows": np.array(rows, np.int64)}

    def score_shard(self, index: int) -> int:
        from capfilt.heads import score

        name = shard_name(index)
        pf = self.src.open_parquet(name)
        table = pf.read(columns=["key", "source", "sha256", "scores", "policy", "meta"])
        n = table.num_rows
        sha = table.column("sha256").to_pylist()
        no_image = np.zeros(n, bool)
        if any(s is None for s in sha) or _may_hold_null_images(pf):   # older shards: hash the image bytes
            images = pf.read(columns=["image"]).column("image").to_pylist()
            no_image = np.array([img is None for img in images], bool)
            sha = [s or (hashlib.sha256(img).hexdigest() if img is not None else None) for s, img in zip(sha, images)]
        emb = read_embeddings(self.src, index) if n and has_embeddings(self.src, index) else None
        if emb is not None and len(emb) != n:
            raise SchemaError(f"{self.src.url(name)}: {n} rows but {len(emb)} image embeddings (misaligned)")
        bad_emb = ~np.isfinite(emb).all(axis=1) if emb is not None else np.zeros(n, bool)
        cols = {"row": pa.array(np.arange(n, dtype=np.int32)), "key": table.column("key"),
                "source": table.column("source"), "sha256": pa.array(sha, pa.string()),
                "policy": table.column("policy"),
                "clip_score": pa.array([kept_score(s, self.cfg.clip_score.use)
                                        for s in table.column("scores").to_pylist()], pa.float32())}
        cols["defect"] = pa.array(np.where(no_image, NO_IMAGE, np.where(bad_emb, BAD_EMBEDDING, None)).tolist(),
                                  pa.string())
        for head in ("aesthetic", "nsfw"):
            cols[head] = pa.array(score(self.heads[head], emb, self.device), pa.float32()) \
                if head in self.heads and n else pa.nulls(n, pa.float32())
        for col in ("punsafe", "pwatermark"):  # LAION's own, where the list carried them (meta)
            cols[col] = pc.struct_field(table.column("meta"), col).cast(pa.float32())
        self.scores.write_shard(index, pa.table(cols), CURATE_SCORES)
        return n


def run_score_pass(cfg: CurateConfig, src: ShardSet, dst: ShardSet, shards: list[int], log) -> None:
    import ray

    done = ShardSet(dst.url(SCORES_DIR)).committed_indices()
    pending = [i for i in shards if i not in done]
    log(f"curate: scoring {len(pending)} shards ({len(shards) - len(pending)} already scored)")
    if not pending:
        return
    ds = ray.data.from_items([{"shard": i} for i in pending], override_num_blocks=len(pending))
    ds = ds.map_batches(ScoreStage, batch_size=1, num_cpus=cfg.score_num_cpus, num_gpus=cfg.score_num_gpus,
                        compute=ray.data.ActorPoolStrategy(size=cfg.score_concurrency),
                        fn_constructor_kwargs={"cfg": cfg, "input_uri": src.uri, "output_uri": dst.uri})
    for _ in ds.iter_batches(batch_size=None):
        pass


# -- the plan: thresholds and per-row decisions ---------------------------------------------
@dataclasses.dataclass
class Plan:
    """Everything a task needs to decide a row's fate (picklable)."""
    cfg: CurateConfig
    clip_threshold: float | None        # rows scoring below it are removed (None: no CLIP-score filter)
    scores_uri: str

    def read_scores(self, index: int) -> pa.Table:
        return ShardSet(self.scores_uri).read_shard(shard_name(index), CURATE_SCORES)

    def row_reasons(self, scores: pa.Table) -> dict[str, np.ndarray]:
        """reason -> bool mask of the rows the per-row filters remove."""
        c = self.cfg

        def col(name: str, fill: float) -> np.ndarray:
            return pc.fill_null(scores.column(name), fill).to_numpy(zero_copy_only=False).astype(np.float64)

        defect = scores.column("defect")   # rows nothing downstream can use: always removed
        out = {r: np.asarray(pc.fill_null(pc.equal(defect, r), False)) for r in (NO_IMAGE, BAD_EMBEDDING)}
        if c.clip_score.enabled and self.clip_threshold is not None:
            human = np.asarray(pc.fill_null(pc.equal(scores.column("policy"), "human"), False))
            out[CLIP_SCORE] = (col("clip_score", np.inf) < self.clip_threshold) & ~human
        if c.nsfw.enabled:
            out[NSFW] = (col("nsfw", -np.inf) > c.nsfw.threshold) | (col("punsafe", -np.inf) > c.nsfw.threshold)
        if c.watermark.enabled:
            out[WATERMARK] = col("pwatermark", -np.inf) > c.watermark.threshold
        if c.aesthetic.enabled and c.aesthetic.min_score is not None:
            out[AESTHETIC] = col("aesthetic", np.inf) < c.aesthetic.min_score
        return out

    def survivors(self, scores: pa.Table) -> np.ndarray:
        keep = np.ones(scores.num_rows, bool)
        for mask in self.row_reasons(scores).values():
            keep &= ~mask
        return keep


def clip_threshold(cfg: CurateConfig, scores: ShardSet, shards: list[int]) -> tuple[float | None, dict]:
    """max(min_score, the quantile's score) over the rows the CLIP filter applies to (not human ones)."""
    f = cfg.clip_score
    if not f.enabled or (f.min_score is None and not f.quantile):
        return None, {}
    info = {"min_score": f.min_score, "quantile": f.quantile}
    candidates = [x for x in (f.min_score,) if x is not None]
    if f.quantile:
        dist = Distribution(resolution=QUANTILE_RESOLUTION)
        for i in shards:
            t = scores.open_parquet(shard_name(i)).read(columns=["clip_score", "policy"])
            human = pc.fill_null(pc.equal(t.column("policy"), "human"), False)
            dist.add(pc.drop_null(pc.filter(t.column("clip_score"), pc.invert(human))).to_numpy(zero_copy_only=False))
        if dist.n:  # the lower edge of the quantile's bin: rows in lower bins go
            info["quantile_score"] = dist.quantile(f.quantile) - QUANTILE_RESOLUTION / 2
            candidates.append(info["quantile_score"])
    return (max(candidates) if candidates else None), info


# -- exact duplicates (sha256) ----------------------------------------------------------------
# As the download plan dedups URLs: map tasks over runs of shards hash each live row's sha256 into
# one of P partitions (object refs, no task reads every score table); one reduce task per partition
# finds the duplicates and writes them, sorted by shard, to _curate/work/exact/part-PPPPP.parquet;
# a shard's marks are then one filtered read per partition file. Memory per task: ~rows_per_task rows.
EXACT_DIR = f"{WORK_DIR}/exact"
EXACT_SCHEMA = pa.schema([("shard", pa.int32()), ("row", pa.int32()), ("dup_key", pa.string())])
_CANDIDATE_SCHEMA = pa.schema([("sha", pa.string()), ("score", pa.float64()), ("key", pa.string()),
                               ("shard", pa.int32()), ("row", pa.int32())])


def _exact_map(plan: Plan, shards: list[int], parts: int) -> list[pa.Table]:
    """The live rows of ``shards`` with a sha256, split into ``parts`` tables by hash."""
    tables = []
    for i in shards:
        t = plan.read_scores(i)
        sha = t.column("sha256")
        idx = np.flatnonzero(plan.survivors(t) & np.asarray(pc.is_valid(sha)))
        if not idx.size:
            continue
        take = pa.array(idx, pa.int64())
        score = np.nan_to_num(pc.fill_null(t.column("clip_score"), np.nan).to_numpy(zero_copy_only=False)
                              .astype(np.float64), nan=-np.inf)[idx]
        tables.append(pa.table({"sha": sha.take(take), "score": score, "key": t.column("key").take(take),
                                "shard": np.full(idx.size, i, np.int32), "row": idx.astype(np.int32)},
                               schema=_CANDIDATE_SCHEMA))
    table = pa.concat_tables(tables) if tables else _CANDIDATE_SCHEMA.empty_table()
    which = np.array([int(s[:15], 16) % parts for s in table.column("sha").to_pylist()], np.int64)
    out = [table.filter(pa.array(which == p)) for p in range(parts)]
    return out if parts > 1 else out[0]


def _exact_reduce(output_uri: str, part: int, *tables: pa.Table) -> int:
    """Rows of one partition whose image an earlier (better) row already has: write their marks."""
    t = pa.concat_tables(tables) if tables else _CANDIDATE_SCHEMA.empty_table()
    d = {f: t.column(f).to_numpy(zero_copy_only=False) for f in ("score", "shard", "row")}
    d.update({f: np.asarray(t.column(f).to_pylist(), dtype=str) for f in ("sha", "key")})
    order = np.lexsort((d["row"], d["shard"], d["key"], -d["score"], d["sha"]))
    d = {k: v[order] for k, v in d.items()}
    first = np.ones(len(order), bool)
    first[1:] = d["sha"][1:] != d["sha"][:-1]
    head = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))  # index of each run's best row
    dup = np.flatnonzero(~first)
    marks = pa.table({"shard": d["shard"][dup], "row": d["row"][dup], "dup_key": d["key"][head[dup]]},
                     schema=EXACT_SCHEMA)
    marks = marks.take(pc.sort_indices(marks, [("shard", "ascending"), ("row", "ascending")]))
    ss = ShardSet(output_uri)
    ss.makedirs(EXACT_DIR)
    buf = io.BytesIO()
    pq.write_table(marks, buf, row_group_size=1 << 16)
    ss.put(f"{EXACT_DIR}/part-{part:05d}.parquet", buf.getvalue())
    return marks.num_rows


@dataclasses.dataclass
class ExactMarks:
    """Where the exact duplicates are (picklable): shard -> (rows, key of the row kept in their place)."""
    output_uri: str
    parts: int

    def get(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        ss = ShardSet(self.output_uri)
        tables = [pq.read_table(ss.path(f"{EXACT_DIR}/part-{p:05d}.parquet"), filesystem=ss.fs,
                                filters=[("shard", "=", shard)], schema=EXACT_SCHEMA) for p in range(self.parts)]
        t = pa.concat_tables(tables)
        t = t.take(pc.sort_indices(t, [("row", "ascending")]))
        return (t.column("row").to_numpy(zero_copy_only=False).astype(np.int64),
                np.asarray(t.column("dup_key").to_pylist(), dtype=str))


@dataclasses.dataclass
class NoMarks:
    def get(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        return np.empty(0, np.int64), np.empty(0, str)


def exact_duplicates(plan: Plan, shards: dict[int, int], output_uri: str) -> tuple[ExactMarks, int]:
    """Find every exact duplicate among ``shards`` (index -> rows); returns (their marks, how many)."""
    import ray

    per_task = plan.cfg.exact_rows_per_task
    parts = max(1, -(-sum(shards.values()) // per_task))
    runs, cur, rows = [], [], 0
    for i, n in shards.items():      # map tasks over runs of ~per_task rows
        cur.append(i)
        rows += n
        if rows >= per_task:
            runs.append(cur)
            cur, rows = [], 0
    runs += [cur] if cur else []
    dst = ShardSet(output_uri)
    if dst.fs.exists(dst.path(EXACT_DIR)):   # a crashed run's marks: never mixed into this one
        dst.fs.rm(dst.path(EXACT_DIR), recursive=True)
    plan_ref = ray.put(plan)
    mapper = ray.remote(_exact_map).options(num_cpus=plan.cfg.write_num_cpus, num_returns=parts)
    maps = [mapper.remote(plan_ref, run, parts) for run in runs]
    maps = [m if parts > 1 else [m] for m in maps]
    reducer = ray.remote(_exact_reduce).options(num_cpus=plan.cfg.write_num_cpus)
    found = ray.get([reducer.remote(output_uri, p, *[m[p] for m in maps]) for p in range(parts)])
    return ExactMarks(output_uri, parts), sum(found)


# -- semantic duplicates ----------------------------------------------------------------------
@dataclasses.dataclass
class CurateCandidates:
    """semdedup's loader: a shard's rows that survived the earlier filters, with their embeddings."""
    plan: Plan
    input_uri: str
    exact: ExactMarks | NoMarks         # rows removed as exact duplicates

    def mask(self, index: int, scores: pa.Table) -> np.ndarray:
        keep = self.plan.survivors(scores)
        keep[self.exact.get(index)[0]] = False
        return keep

    def __call__(self, index: int) -> Candidates:
        scores = self.plan.read_scores(index)
        rows = np.flatnonzero(self.mask(index, scores)).astype(np.int32)
        emb = read_embeddings(ShardSet(self.input_uri), index) if rows.size else np.zeros((0, 1), np.float16)
        score = pc.fill_null(scores.column("clip_score"), np.nan).to_numpy(zero_copy_only=False)
        return Candidates(rows=rows, emb=emb[rows], score=np.nan_to_num(score[rows], nan=-np.inf),
                          key=np.asarray(scores.column("key").to_pylist(), dtype=str)[rows])


# -- write pass -------------------------------------------------------------------------------
def write_curated_shard(plan: Plan, input_uri: str, output_uri: str, index: int,
                        exact: ExactMarks | NoMarks, near: Removed | None) -> dict:
    """Commit curated shard ``index`` (+ embeddings) and its side-table shard; returns its counts."""
    src, dst = ShardSet(input_uri), ShardSet(output_uri)
    name = shard_name(index)
    table = src.read_shard(name, CAPFILT)
    scores = plan.read_scores(index)
    n = table.num_rows
    if scores.num_rows != n or scores.column("key").to_pylist() != table.column("key").to_pylist():
        raise RuntimeError(f"{name}: the scores in {plan.scores_uri} do not match the input shard (input changed?)")
    reasons = plan.row_reasons(scores)
    dup_of = np.full(n, None, dtype=object)
    similarity = np.full(n, np.nan, np.float32)
    for reason, rows, keys, sims in (
            (EXACT_DUPLICATE, *exact.get(index), None),
            (NEAR_DUPLICATE, *((near.rows, near.dup_key) if near else (np.empty(0, np.int64), np.empty(0, str))),
             near.similarity if near else None)):
        mask = np.zeros(n, bool)
        mask[rows] = True
        reasons[reason] = mask
        dup_of[rows] = keys
        similarity[rows] = 1.0 if sims is None else sims
    order = [r for r in REASONS if r in reasons]
    removed = np.zeros(n, bool)
    for r in order:
        removed |= reasons[r]
    idx = np.flatnonzero(removed)
    side = table.take(pa.array(idx, pa.int64()))
    extra = {"row": pa.array(idx.astype(np.int32)),
             "reasons": pa.array([[r for r in order if reasons[r][i]] for i in idx], pa.list_(pa.string())),
             "duplicate_of": pa.array(dup_of[idx].tolist(), pa.string()),
             "similarity": pa.array(np.where(np.isnan(similarity[idx]), None, similarity[idx]).tolist(), pa.float32())}
    for col in ("clip_score", "aesthetic", "nsfw", "punsafe", "pwatermark"):
        extra[col] = scores.column(col).take(pa.array(idx, pa.int64()))
    # REMOVED keeps CAPFILT's non-null image: a foreign shard's null image is recorded as b"" (reason no_image)
    side = side.set_column(side.schema.get_field_index("image"), "image",
                           pc.fill_null(side.column("image"), pa.scalar(b"", pa.binary())))
    side = pa.Table.from_arrays([*(side.column(f.name) for f in CAPFILT.schema), *extra.values()],
                                names=[*CAPFILT.schema.names, *extra])
    kept_idx = np.flatnonzero(~removed)
    kept = table.take(pa.array(kept_idx, pa.int64()))
    stats = {"rows_in": n, "kept": int(kept_idx.size), "removed": int(idx.size),
             "by_reason": {r: int(reasons[r].sum()) for r in order}}
    if stats["kept"] + stats["removed"] != n:  # cannot happen; a curated set never loses a row silently
        raise AssertionError(f"{name}: {n} rows in, {stats['kept']} kept + {stats['removed']} removed")
    ShardSet(dst.url(REMOVED_DIR)).write_shard(index, side, REMOVED)
    if has_embeddings(src, index):
        write_embeddings(dst, index, kept, read_embeddings(src, index)[kept_idx],
                         read_embeddings(src, index, "text_emb")[kept_idx])
    dst.put(f"{STATS_DIR}/{name}.json", json.dumps(stats).encode())
    dst.write_shard(index, kept, CAPFILT)   # last: a committed shard is complete
    return stats


# -- the job ----------------------------------------------------------------------------------
def _fingerprint(cfg: CurateConfig, seed: int, src: ShardSet) -> dict:
    """What the output depends on: the filters, the seed and the input's shards."""
    filters = {f.name: dataclasses.asdict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
               if dataclasses.is_dataclass(getattr(cfg, f.name))}
    shards = [dataclasses.asdict(i) for i in src.map_members(src.shard_info, src.committed())]   # many at a time
    return {"filters": filters, "seed": seed, "input": src.uri,
            "input_shards": hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()}


def _check_same_curation(dst: ShardSet, fingerprint: dict) -> None:
    path = dst.path(CONFIG_FILE)
    if dst.fs.exists(path):
        before = json.loads(dst.fs.cat(path))
        if before != fingerprint:
            diff = sorted(k for k in fingerprint if before.get(k) != fingerprint[k])
            raise SchemaError(f"{dst.uri} holds a curation with other {', '.join(diff)}; "
                              "resume with the same settings or write to a new output")
    else:
        dst.put(CONFIG_FILE, json.dumps(fingerprint, indent=1).encode())


def summarize(stats: list[dict]) -> dict:
    total = {k: sum(s[k] for s in stats) for k in ("rows_in", "kept", "removed")}
    total["by_reason"] = {r: sum(s["by_reason"].get(r, 0) for s in stats) for r in REASONS}
    total["accounted"] = total["rows_in"] == total["kept"] + total["removed"]
    return total


def run_curate(cfg: CurateConfig, seed: int, log=print) -> dict:
    """Curate ``cfg.input`` (a CAPFILT set) into ``cfg.output``. Needs Ray initialised."""
    src, dst = ShardSet(cfg.input), ShardSet(cfg.output)
    heads = (cfg.nsfw.enabled and cfg.nsfw.head) or (cfg.aesthetic.enabled and cfg.aesthetic.head)
    shards = check_input(src, needs_embeddings=bool(cfg.semdedup.enabled or heads))
    _check_same_curation(dst, _fingerprint(cfg, seed, src))
    done = dst.committed_indices()
    pending = [i for i in shards if i not in done]
    log(f"curate: {len(shards)} input shards ({sum(shards.values())} rows), {len(shards) - len(pending)} already "
        f"curated, {len(pending)} to write")
    started, seconds = time.time(), {}
    stats, thresholds, dedup_info = [], {}, {}
    if pending:
        t = time.time()
        run_score_pass(cfg, src, dst, list(shards), log)
        seconds["score"] = round(time.time() - t, 2)
        threshold, thresholds = clip_threshold(cfg, ShardSet(dst.url(SCORES_DIR)), list(shards))
        plan = Plan(cfg, threshold, dst.url(SCORES_DIR))
        t = time.time()
        exact = exact_duplicates(plan, shards, dst.uri)[0] if cfg.exact_dedup.enabled else NoMarks()
        seconds["exact_dedup"] = round(time.time() - t, 2)
        near: dict[int, Removed] = {}
        if cfg.semdedup.enabled:
            t = time.time()
            loader = CurateCandidates(plan, src.uri, exact)
            # many score tables at a time: at 12.9k shards one after the other took minutes on object stores
            counts = dict(zip(shards, src.map_members(lambda i: int(loader.mask(i, plan.read_scores(i)).sum()),
                                                      list(shards))))
            near, dedup_info = semdedup(loader, counts, dst.url(WORK_DIR), cfg.semdedup, seed, log=log)
            seconds["semdedup"] = round(time.time() - t, 2)
        import ray

        t = time.time()
        write = ray.remote(num_cpus=cfg.write_num_cpus)(write_curated_shard)
        plan_ref = ray.put(plan)
        stats = ray.get([write.remote(plan_ref, src.uri, dst.uri, i, exact, near.get(i)) for i in pending])
        seconds["write"] = round(time.time() - t, 2)
    summary = {"shards": len(shards), "shards_skipped": len(shards) - len(pending), "shards_written": len(pending),
               **summarize(stats), "thresholds": thresholds, "semdedup": dedup_info, "seconds": seconds,
               "output": dst.uri, "removed_table": dst.url(REMOVED_DIR)}
    summary["seconds"]["total"] = round(time.time() - started, 2)
    summary["set"] = summarize(dst.side_records(STATS_DIR))
    if summary["set"]["rows_in"] != sum(shards[i] for i in dst.committed_indices() if i in shards):
        raise AssertionError("curate: the curated set's counts do not add up to its input rows")
    removed = ShardSet(dst.url(REMOVED_DIR))
    removed.write_manifest(REMOVED, config={"curate": dataclasses.asdict(cfg), "seed": seed},
                           summary=summary["set"])
    dst.write_manifest(CAPFILT, config={"curate": dataclasses.asdict(cfg), "seed": seed, "input": src.uri},
                       summary=summary)
    if dst.fs.exists(dst.path(WORK_DIR)):
        dst.fs.rm(dst.path(WORK_DIR), recursive=True)
    return summary


def format_summary(summary: dict) -> str:
    s, t = summary, summary["set"]
    reasons = ", ".join(f"{r.replace('_', ' ')} {t['by_reason'][r]}" for r in REASONS if t["by_reason"][r])
    th = s.get("thresholds") or {}
    lines = [
        f"curate -> {s['output']}",
        f"  shards        {s['shards_written']} written, {s['shards_skipped']} already committed, {s['shards']} in total",
        f"  rows          {t['rows_in']} in = {t['kept']} kept + {t['removed']} removed"
        f"  ({'accounted for' if t['accounted'] else 'DO NOT ADD UP'})",
        f"  removed by    {reasons or 'nothing'}  (a row counts once per reason)",
        f"  side table    {s['removed_table']}  (every removed row, whole, with its reasons and scores)",
    ]
    if th.get("quantile_score") is not None or th.get("min_score") is not None:
        lines.append(f"  CLIP score    threshold {max(x for x in (th.get('min_score'), th.get('quantile_score')) if x is not None):.4f}"
                     + (f" (lowest {100 * th['quantile']:.0f}% of the input)" if th.get("quantile") else ""))
    if s.get("semdedup", {}).get("clusters"):
        d = s["semdedup"]
        lines.append(f"  semdedup      {d['rows']} rows, {d['clusters']} clusters x {d['probes']} probes, "
                     f"{d['groups']} dedup tasks, {d['removed']} near duplicates")
    if s.get("seconds"):
        lines.append("  seconds       " + ", ".join(f"{k} {v:.1f}" for k, v in s["seconds"].items()))
    return "\n".join(lines)
