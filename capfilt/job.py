"""CapFilt as one streaming Ray Data job (paper §3.4): caption, rank, keep the best two.

    pending input shards ─► read ok rows + decode once + preprocess (CPU task per shard)
        ─► captioner (actor pool: N nucleus captions per *web* image)
        ─► ranker (actor pool: CLIP cosine of the N synthetic + 1 original caption;
                   with ``colocate_ranker``, in the captioner actors instead)
        ─► driver groups rows by shard ─► writer task per complete shard:
           CAPFILT shard i (+ clip-retrieval embeddings, + per-shard stats), committed last

The paper applies CapFilt to the web images only: rows of a ``human`` policy (COCO, VG)
are not captioned; the ranker scores their human captions (and embeds the image for search
and curation) and they pass through with every caption, in input order.

Input shard i becomes output shard i, so a rerun skips committed shards (resume), and
per-image seeding makes the rewritten shards identical (determinism). Bad rows are never
dropped silently: each ok input row reaches the writer once with an ``outcome``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time

import numpy as np
import pyarrow as pa

from capfilt.config import CapFiltConfig
from capfilt.embeddings import write_embeddings
from capfilt.preprocess import OK, TOO_LARGE, UNDECODABLE, ZERO_SIZE, Preprocess
from pipelines.adapters import DownloadSource, InputLimits, open_download_source, read_error
from pipelines.storage import local_dir
from pipelines.schema import CAPFILT, HUMAN
from pipelines.shardio import ShardSet, shard_name

STATS_DIR = "_capfilt_stats"
TOO_FEW = "too_few_captions"
DECODE_FAILURES = (UNDECODABLE, ZERO_SIZE, TOO_LARGE)
# Per-shard counters; the run and set summaries are their sums.
COUNTERS = ("rows_in", "rows_not_ok", "images_in", "images_out", "undecodable", "zero_size", "too_large",
            TOO_FEW, "empty_captions", "truncated_captions", "captions_generated", "kept_score_sum",
            "kept_scores", "original_kept", "web_images_out", "human_images_out", "human_captions_out",
            "unreadable_shards")


# -- input ----------------------------------------------------------------------------------
def check_input(src: DownloadSource) -> list[int]:
    """Validate the input shards (footer reads) before any model loads; their indices."""
    return src.check()


def read_ok_rows(batch: dict, *, source: DownloadSource, chunk: int):
    """Ray Data UDF: shard indices -> that shard's ``status == ok`` rows, ``chunk`` rows at a time."""
    for index in batch["shard"]:
        table = source.read(int(index), ["key", "policy", "caption", "captions", "meta", "image", "status"])
        rows = np.flatnonzero(np.asarray(table.column("status").to_pylist(), dtype=object) == OK)
        ok = table.take(pa.array(rows, pa.int64()))
        keys, policies, captions, lists, metas, images = (
            ok.column(c).to_pylist() for c in ("key", "policy", "caption", "captions", "meta", "image"))
        for start in range(0, len(rows), chunk):
            sl = slice(start, start + chunk)
            # Ragged lists travel as JSON text: blocks then share one Arrow type whatever rows they hold.
            human = [json.dumps(list(c or ()) if p == HUMAN else []) for p, c in zip(policies[sl], lists[sl])]
            given = [json.dumps([m.get("synthetic_captions") or [], m.get("synthetic_scores") or []] if m else [[], []])
                     for m in metas[sl]]
            yield {"shard": np.full(len(rows[sl]), index, np.int64), "row": rows[sl].astype(np.int64),
                   "n_ok": np.full(len(rows[sl]), len(rows), np.int64),
                   "key": np.array(keys[sl], dtype=object),
                   "policy": np.array(policies[sl], dtype=object),
                   "caption": np.array([c or "" for c in captions[sl]], dtype=object),
                   "human_captions": np.array(human, dtype=object),
                   "precomputed": np.array(given, dtype=object),
                   "image": np.array(images[sl], dtype=object)}


def read_and_decode(batch: dict, *, source: DownloadSource, chunk: int, pre: Preprocess):
    """Ray Data UDF (CPU task, one input shard): its ok rows, decoded once into both models'
    pixel tensors, streamed out ``chunk`` rows at a time so the captioners start on the
    first chunk while the rest of the shard is still decoding."""
    for rows in read_ok_rows(batch, source=source, chunk=chunk):
        yield pre(rows)


# -- model stages (Ray Data actor pools) ------------------------------------------------------
class CaptionStage:
    """Adds ``synthetic``: N captions per web row (N empty strings for human rows and rows
    that failed to decode)."""

    def __init__(self, cfg: CapFiltConfig, seed: int):
        from capfilt.captioner import Captioner

        self.captioner = Captioner(local_dir(cfg.captioner), prompt=cfg.prompt, num_captions=cfg.num_captions,
                                   top_p=cfg.top_p, top_k=cfg.top_k, repetition_penalty=cfg.repetition_penalty,
                                   min_length=cfg.min_length, max_length=cfg.max_length,
                                   seed=seed, dtype=cfg.dtype)
        self.num_captions = cfg.num_captions

    def __call__(self, batch: dict) -> dict:
        pixels = batch.pop("caption_pixels")
        good = np.flatnonzero((batch["outcome"] == OK) & (batch["policy"] != HUMAN))
        synthetic = np.empty(len(pixels), dtype=object)
        synthetic[:] = [[""] * self.num_captions for _ in range(len(pixels))]  # same Arrow type in every block
        if good.size:
            for i, caps in zip(good, self.captioner(pixels[good], [batch["key"][i] for i in good])):
                synthetic[i] = caps
        batch["synthetic"] = synthetic
        return batch


class RankStage:
    """Scores each row's candidates with CLIP; adds the embeddings and which candidates are kept.

    Web rows: [original] + synthetic, the best ``keep`` kept. Human rows: their captions, all
    kept in input order. ``kept`` and ``cand_scores`` are JSON lists of each row's own length.
    With ``capfilt.precomputed`` the synthetic captions are the list's own (LAION-COCO) and are
    ranked by the list's scores (the original keeps its CLIP score but is not ranked)."""

    def __init__(self, cfg: CapFiltConfig):
        from capfilt.ranker import Ranker

        self.ranker = Ranker(local_dir(cfg.ranker), dtype=cfg.dtype)
        self.keep, self.keep_original = cfg.keep, cfg.keep_original
        self.precomputed = cfg.precomputed
        self.dim = self.ranker.model.config.projection_dim

    def _candidates(self, batch: dict, i: int) -> tuple[list[str], list[float] | None]:
        """A row's candidates and, for precomputed captions, the list's own scores."""
        if batch["policy"][i] == HUMAN:
            return json.loads(batch["human_captions"][i]), None
        if self.precomputed:
            captions, given = json.loads(batch["precomputed"][i])
            if len(given) != len(captions):
                given = [float("-inf")] * len(captions)
            return [batch["caption"][i], *captions], given
        return [batch["caption"][i], *batch["synthetic"][i]], None

    def __call__(self, batch: dict) -> dict:
        from capfilt.ranker import select

        pixels = batch.pop("rank_pixels")
        n = len(pixels)
        outcome = batch["outcome"].copy()
        good = np.flatnonzero(outcome == OK)
        kept = np.full(n, "[]", dtype=object)           # indices into the row's candidates, best first (web)
        cand_scores = np.full(n, "[]", dtype=object)
        n_empty = np.zeros(n, np.int64)
        n_truncated = np.zeros(n, np.int64)
        img_emb = np.zeros((n, self.dim), np.float32)
        text_emb = np.zeros((n, self.dim), np.float32)
        if good.size:
            human = [batch["policy"][i] == HUMAN for i in good]
            candidates, given = zip(*(self._candidates(batch, i) for i in good))
            scores, images, texts = self.ranker.score(pixels[good], list(candidates))
            start = 0
            for j, i in enumerate(good):
                count = len(candidates[j])
                row_scores = scores[j, :count].numpy()
                if given[j] is not None:  # the list's scores rank its captions; the original is not ranked
                    row_scores = np.array([row_scores[0], *given[j]], np.float32)
                    ranked = np.r_[-np.inf, row_scores[1:]]
                n_empty[i] = int(texts.empty[start:start + count].sum())
                n_truncated[i] = int(texts.truncated[start:start + count].sum())
                cand_scores[i] = json.dumps(row_scores.tolist())
                chosen = (list(range(count)) if human[j] else
                          select(candidates[j], ranked if given[j] is not None else row_scores, self.keep,
                                 self.keep_original))
                if not chosen:
                    outcome[i] = TOO_FEW
                else:
                    kept[i] = json.dumps(chosen)
                    img_emb[i] = images[j].numpy()
                    text_emb[i] = texts.emb[start + chosen[0]].numpy()
                start += count
        if "synthetic" in batch:  # captioned here (not precomputed)
            relisted = np.empty(n, dtype=object)  # Arrow cannot convert an object array of arrays
            relisted[:] = [list(x) for x in batch["synthetic"]]
            batch["synthetic"] = relisted
        batch.update(outcome=outcome, kept=kept, cand_scores=cand_scores, n_empty=n_empty,
                     n_truncated=n_truncated, img_emb=img_emb, text_emb=text_emb)
        return batch


class CaptionRankStage:
    """Both models in one actor (``capfilt.colocate_ranker``): ``RankStage(CaptionStage(batch))``."""

    def __init__(self, cfg: CapFiltConfig, seed: int):
        self.caption, self.rank = CaptionStage(cfg, seed), RankStage(cfg)

    def __call__(self, batch: dict) -> dict:
        return self.rank(self.caption(batch))


# -- output -----------------------------------------------------------------------------------
def write_output_shard(source: DownloadSource, output_uri: str, index: int, results: dict | None,
                       cfg: CapFiltConfig) -> dict:
    """Join one shard's results with its input rows and commit CAPFILT shard ``index``.

    Embeddings and stats are written first, the shard last: a shard that exists is complete.
    Returns the shard's counters (also kept in ``_capfilt_stats/part-NNNNN.json``).
    """
    dst = ShardSet(output_uri)
    table = source.read(index)
    stats = dict.fromkeys(COUNTERS, 0)
    stats["rows_in"] = table.num_rows
    stats["rows_not_ok"] = sum(s != OK for s in table.column("status").to_pylist())
    problem = read_error(table)  # an adapter shard read only in part: its rows commit, the problem is counted
    stats["unreadable_shards"] = int(problem is not None)
    if problem:
        stats["read_error"] = problem
    out, img_emb, text_emb = [], [], []
    if results is not None:
        columns = {c: table.column(c) for c in ("source", "url", "sha256", "meta", "image")}
        for j in np.argsort(results["row"], kind="stable"):
            stats["images_in"] += 1
            outcome = results["outcome"][j]
            if outcome in DECODE_FAILURES:
                stats[outcome] += 1  # never captioned
                continue
            human = results["policy"][j] == HUMAN
            candidates = (json.loads(results["human_captions"][j]) if human
                          else [str(results["caption"][j]), *json.loads(results["precomputed"][j])[0]] if cfg.precomputed
                          else [str(results["caption"][j]), *map(str, results["synthetic"][j])])
            scores = json.loads(results["cand_scores"][j])
            stats["captions_generated"] += 0 if human or cfg.precomputed else len(results["synthetic"][j])
            stats["empty_captions"] += int(results["n_empty"][j])
            stats["truncated_captions"] += int(results["n_truncated"][j])
            if outcome == TOO_FEW:
                stats[TOO_FEW] += 1
                continue
            kept = [int(k) for k in json.loads(results["kept"][j])]
            row = int(results["row"][j])
            stats["images_out"] += 1
            stats["human_images_out" if human else "web_images_out"] += 1
            if human:
                stats["human_captions_out"] += len(kept)
            else:
                stats["kept_score_sum"] += float(sum(scores[k] for k in kept))
                stats["kept_scores"] += len(kept)
                stats["original_kept"] += int(0 in kept)
            out.append({
                **{c: columns[c][row].as_py() for c in columns}, "key": str(results["key"][j]),
                "policy": HUMAN if human else "web",
                "captions": [candidates[k] for k in kept], "scores": [float(scores[k]) for k in kept],
                "candidates": [{"caption": c, "score": float(s), "synthetic": not human and k > 0}
                               for k, (c, s) in enumerate(zip(candidates, scores))] if cfg.write_candidates else None,
                "original_caption": str(results["caption"][j]),
            })
            img_emb.append(results["img_emb"][j])
            text_emb.append(results["text_emb"][j])
    shard = pa.Table.from_pylist(out, schema=CAPFILT.arrow_schema())
    if cfg.write_embeddings:
        write_embeddings(dst, index, shard, img_emb, text_emb)
    dst.makedirs(STATS_DIR)
    dst.fs.pipe(dst.path(f"{STATS_DIR}/{shard_name(index)}.json"), json.dumps(stats).encode())
    dst.write_shard(index, shard, CAPFILT)
    return stats


# -- the job ----------------------------------------------------------------------------------
def build_dataset(cfg: CapFiltConfig, seed: int, source: DownloadSource, pending: list[int], pre: Preprocess):
    """The lazy Ray Data pipeline over the pending input shards (nothing runs until iterated)."""
    import ray

    ds = ray.data.from_items([{"shard": i} for i in pending], override_num_blocks=len(pending))
    # Decoding stays in CPU tasks that overlap with the models as long as its resources differ
    # from the captioner's (Ray fuses a task map into the next actor map when they are equal).
    # batch_size=1: one task per input shard (a larger batch would make Ray bundle several
    # shards into one task and decode them all before the first image moves on).
    ds = ds.map_batches(read_and_decode, batch_size=1, num_cpus=cfg.decode_num_cpus,
                        compute=ray.data.TaskPoolStrategy(size=cfg.decode_concurrency),
                        fn_kwargs={"source": source, "chunk": cfg.batch_size, "pre": pre})
    rankers = dict(num_cpus=cfg.rank_num_cpus, num_gpus=cfg.rank_num_gpus,
                   compute=ray.data.ActorPoolStrategy(min_size=cfg.rank_concurrency[0],
                                                      max_size=cfg.rank_concurrency[1]))
    if cfg.precomputed:  # the list brings its captions: no captioner at all
        return ds.map_batches(RankStage, fn_constructor_kwargs={"cfg": cfg}, batch_size=cfg.rank_batch_size, **rankers)
    captioners = dict(num_cpus=cfg.caption_num_cpus, num_gpus=cfg.caption_num_gpus,
                      compute=ray.data.ActorPoolStrategy(min_size=cfg.caption_concurrency[0],
                                                         max_size=cfg.caption_concurrency[1]))
    if cfg.colocate_ranker:
        return ds.map_batches(CaptionRankStage, fn_constructor_kwargs={"cfg": cfg, "seed": seed},
                              batch_size=cfg.batch_size, **captioners)
    ds = ds.map_batches(CaptionStage, fn_constructor_kwargs={"cfg": cfg, "seed": seed}, batch_size=cfg.batch_size,
                        **captioners)
    return ds.map_batches(RankStage, fn_constructor_kwargs={"cfg": cfg}, batch_size=cfg.rank_batch_size, **rankers)


@contextlib.contextmanager
def small_blocks(max_bytes: int):
    """Ray Data blocks of about one captioner batch while the job runs.

    Decoded pixels are ~0.4-2.3 MB per image; with Ray's default 128 MiB target a block holds
    hundreds of images, each actor call then works through a whole block, and decoding,
    captioning and ranking hardly overlap. Restored afterwards (the context is per driver).
    """
    import ray

    ctx = ray.data.DataContext.get_current()
    saved = ctx.target_max_block_size
    ctx.target_max_block_size = max(int(max_bytes), 1 << 20)
    try:
        yield
    finally:
        ctx.target_max_block_size = saved


def _write_complete_shards(ds, cfg: CapFiltConfig, source: DownloadSource, pending: list[int], log) -> list[dict]:
    """Stream results, group rows by shard, and hand each complete shard to a writer task."""
    import ray

    write = ray.remote(num_cpus=cfg.write_num_cpus)(write_output_shard)
    source_ref = ray.put(source)
    parts: dict[int, list[dict]] = {}
    got: dict[int, int] = {}
    refs = []

    def submit(index: int, results: dict | None) -> None:
        refs.append(write.remote(source_ref, cfg.output, index, results, cfg))

    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for index in np.unique(batch["shard"]).tolist():
            mask = batch["shard"] == index
            parts.setdefault(index, []).append({k: v[mask] for k, v in batch.items()})
            got[index] = got.get(index, 0) + int(mask.sum())
            if got[index] == int(batch["n_ok"][mask][0]):
                rows = parts.pop(index)
                submit(index, {k: np.concatenate([r[k] for r in rows]) for k in rows[0]})
                log(f"capfilt: shard {index} complete ({got[index]} images), writing")
    if parts:
        raise RuntimeError(f"capfilt: shards {sorted(parts)} received only part of their rows")
    for index in pending:
        if index not in got:  # no ok rows: still an (empty) output shard, so the set is complete
            submit(index, None)
    stats = ray.get(refs)
    for s in stats:
        if s.get("read_error"):
            log(f"capfilt: input shard unreadable in part, its readable rows kept: {s['read_error']}")
    return stats


def summarize(stats: list[dict], seconds: float | None = None) -> dict:
    """Sum per-shard counters; add the rates and shares the summary reports (the kept-score
    mean and the original's share are over web images: human captions are not ranked)."""
    total = {k: sum(s.get(k, 0) for s in stats) for k in COUNTERS}
    total["mean_kept_score"] = total.pop("kept_score_sum") / max(total.pop("kept_scores"), 1)
    total["original_kept_share"] = total.pop("original_kept") / max(total["web_images_out"], 1)
    if seconds is not None:
        total["seconds"] = round(seconds, 3)
        total["images_per_s"] = total["images_in"] / seconds if seconds > 0 else 0.0
        total["captions_per_s"] = total["captions_generated"] / seconds if seconds > 0 else 0.0
    return total


def run_capfilt(cfg: CapFiltConfig, seed: int, log=print, limits: InputLimits | None = None) -> dict:
    """Run CapFilt from ``cfg.input`` (a DOWNLOAD shard set, or an img2dataset / WebDataset folder
    read through ``pipelines.adapters``) to ``cfg.output`` (CAPFILT shard set).

    Needs Ray initialised (``orchestration.ray_session.ensure_ray``). Raises SchemaError
    before any model loads when an input shard has the wrong schema. Returns the summary
    of this run, with the whole output set's totals under ``"set"``. ``limits``: the caps of a
    sample of an img2dataset / WebDataset input (the run's ``download.*``).
    """
    src, dst = open_download_source(cfg.input, policy=cfg.input_policy, limits=limits), ShardSet(cfg.output)
    shards = check_input(src)
    dst.check_writable()
    done = dst.committed_indices()
    pending = [i for i in shards if i not in done]
    log(f"capfilt: {len(shards)} input shards, {len(shards) - len(pending)} already done, {len(pending)} to run")
    started = time.time()
    stats = []
    if pending:
        pre = Preprocess.from_models(None if cfg.precomputed else cfg.captioner, cfg.ranker, cfg.max_pixels)
        with small_blocks(pre.row_bytes * cfg.batch_size):
            stats = _write_complete_shards(build_dataset(cfg, seed, src, pending, pre), cfg, src, pending, log)
    summary = {"keep": cfg.keep, "shards": len(shards), "shards_skipped": len(shards) - len(pending), "shards_written": len(pending),
               **summarize(stats, time.time() - started), "output": dst.uri}
    summary["set"] = summarize(dst.side_records(STATS_DIR))  # the whole set, across resumed runs
    dst.write_manifest(CAPFILT, config={"capfilt": dataclasses.asdict(cfg), "seed": seed}, summary=summary)
    return summary


def format_summary(summary: dict) -> str:
    """The one-screen summary printed at the end of the job."""
    s, t = summary, summary["set"]
    lines = [
        f"CapFilt -> {s['output']}",
        f"  shards        {s['shards_written']} written, {s['shards_skipped']} already committed, {s['shards']} in total",
        f"  images        {s['images_in']} in, {s['images_out']} out  ({s['rows_not_ok']} input rows not ok, skipped)",
        f"  policies      web {s['web_images_out']} images captioned and ranked; human {s['human_images_out']} "
        f"images passed through with {s['human_captions_out']} captions",
        f"  bad input     undecodable {s['undecodable']}, zero-size {s['zero_size']}, too large {s['too_large']}, "
        f"too few usable captions {s[TOO_FEW]}, unreadable input shards {s['unreadable_shards']}",
        f"  captions      {s['captions_generated']} generated, {s['captions_per_s']:.1f}/s "
        f"({s['images_per_s']:.2f} images/s, {s['seconds']:.1f} s); empty {s['empty_captions']}, "
        f"truncated {s['truncated_captions']}",
        f"  kept (web)    mean CLIP score {s['mean_kept_score']:.4f}; original caption in top {s['keep']}: "
        f"{100 * s['original_kept_share']:.1f}% of images",
        f"  whole set     {t['images_out']} images out of {t['images_in']}, mean kept score {t['mean_kept_score']:.4f}, "
        f"original kept {100 * t['original_kept_share']:.1f}%",
    ]
    return "\n".join(lines)
