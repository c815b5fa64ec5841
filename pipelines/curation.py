"""Where a curated shard set keeps its record of the curation (written by ``capfilt.curate``).

A curated set is a CAPFILT shard set (the kept rows, with their embeddings) plus:

    _removed/part-NNNNN.parquet     a REMOVED shard set: every removed row of input shard N,
                                    whole, with its reasons and scores (curated ∪ removed = input)
    _curate/scores/part-NNNNN.parquet   CURATE_SCORES: every input row's scores
    _curate_stats/part-NNNNN.json   per-shard counts (rows_in = kept + removed)

The data layer only reads these (``pipelines.inspect``); nothing here needs torch.
"""
from __future__ import annotations

REMOVED_DIR = "_removed"
SCORES_DIR = "_curate/scores"
STATS_DIR = "_curate_stats"
WORK_DIR = "_curate/work"          # scratch of the dedup passes, removed when the job ends

# Removal reasons, in the order filters run: unusable rows (a null image, a NaN/inf embedding) and
# per-row filters first, then exact, then near duplicates.
NO_IMAGE, BAD_EMBEDDING = "no_image", "bad_embedding"
CLIP_SCORE, NSFW, WATERMARK, AESTHETIC = "clip_score", "nsfw", "watermark", "aesthetic"
EXACT_DUPLICATE, NEAR_DUPLICATE = "exact_duplicate", "near_duplicate"
ROW_REASONS = (NO_IMAGE, BAD_EMBEDDING, CLIP_SCORE, NSFW, WATERMARK, AESTHETIC)
REASONS = (*ROW_REASONS, EXACT_DUPLICATE, NEAR_DUPLICATE)


def is_curated(manifest: dict | None) -> bool:
    """A manifest written by ``blip2 curate``."""
    return bool(manifest) and "curate" in (manifest.get("config") or {})
