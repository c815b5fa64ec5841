"""Config sections of ``blip2 curate`` (``curate.*``) and ``blip2 shards search`` (``search.*``).

Every filter has its own sub-section with an ``enabled`` switch, e.g.
``curate.semdedup.threshold=0.9 curate.clip_score.quantile=0.3 curate.nsfw.enabled=false``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


def _probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} is a probability in [0, 1], got {value}")


@dataclass
class ClipScoreFilter:
    """DataComp-style: drop rows whose kept caption(s) CLIP ViT-L/14 scores low."""
    enabled: bool = True
    use: str = "best"                   # best | mean | min of the kept captions' scores
    min_score: float | None = None      # absolute cosine (None: no absolute threshold)
    quantile: float | None = 0.1        # drop the lowest-scoring share of the input (None: none)

    def validate(self) -> None:
        if self.use not in ("best", "mean", "min"):
            raise ValueError(f"use must be best, mean or min, got {self.use!r}")
        if self.quantile is not None and not 0.0 <= self.quantile < 1.0:
            raise ValueError(f"quantile must be in [0, 1), got {self.quantile}")


@dataclass
class ExactDedupFilter:
    """Identical image bytes (sha256) across sources: the best-scoring row stays."""
    enabled: bool = True


@dataclass
class SemDedupFilter:
    """SemDeDup: spherical k-means on the image embeddings; within a cluster, a row whose cosine
    to a better row (higher CLIP score, then smaller key) is above ``threshold`` is removed."""
    enabled: bool = True
    threshold: float = 0.95             # cosine (SemDeDup's epsilon = 1 - threshold)
    clusters: int | None = None         # None: about sqrt(rows * probes)
    probes: int = 2                     # clusters each row joins: pairs split by a boundary still meet
    sample: int = 100_000               # rows k-means trains on (memory: sample x dim x 4 bytes)
    iterations: int = 20
    rows_per_task: int = 250_000        # bounds one dedup task's memory (rows x dim x 2 bytes + one cluster)
    num_cpus: float = 1.0               # per k-means / assignment / dedup task

    def validate(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is a cosine in [-1, 1], got {self.threshold}")
        if self.probes < 1 or self.sample < 1 or self.iterations < 1 or self.rows_per_task < 1 or not self.num_cpus > 0:
            raise ValueError("probes, sample, iterations and rows_per_task must be >= 1, num_cpus > 0")
        if self.clusters is not None and self.clusters < 1:
            raise ValueError(f"clusters must be >= 1, got {self.clusters}")


@dataclass
class NsfwFilter:
    """LAION's CLIP-based NSFW detector (``head``), and LAION's ``punsafe`` column where a shard has it."""
    enabled: bool = True
    head: str = ""                      # local dir / s3:// written by capfilt.heads.save_head ("" : none)
    threshold: float = 0.5              # removed when the head's score or punsafe is above

    def validate(self) -> None:
        _probability("threshold", self.threshold)


@dataclass
class WatermarkFilter:
    """LAION's ``pwatermark`` column where a shard has it."""
    enabled: bool = True
    threshold: float = 0.8

    def validate(self) -> None:
        _probability("threshold", self.threshold)


@dataclass
class AestheticFilter:
    """LAION's aesthetic predictor over the image embedding (``head``)."""
    enabled: bool = True
    head: str = ""                      # "" : not scored
    min_score: float | None = None      # None: score only, remove nothing (LAION-Aesthetics used 5, 6, 6.5)


@dataclass
class CurateConfig:
    input: str = "runs/capfilt"         # CAPFILT shard set with its embeddings
    output: str = "runs/curated"        # curated CAPFILT shard set (+ _removed/ side table)
    clip_score: ClipScoreFilter = field(default_factory=ClipScoreFilter)
    exact_dedup: ExactDedupFilter = field(default_factory=ExactDedupFilter)
    semdedup: SemDedupFilter = field(default_factory=SemDedupFilter)
    nsfw: NsfwFilter = field(default_factory=NsfwFilter)
    watermark: WatermarkFilter = field(default_factory=WatermarkFilter)
    aesthetic: AestheticFilter = field(default_factory=AestheticFilter)
    # The scoring pass (heads over the embeddings): a Ray Data actor pool.
    score_num_cpus: float = 0.5
    score_num_gpus: float = 0.0
    score_concurrency: int = 1
    write_num_cpus: float = 0.5
    exact_rows_per_task: int = 5_000_000    # sha256 partitions: bounds one exact-dedup task's memory

    def validate(self) -> None:
        if self.score_concurrency < 1 or self.exact_rows_per_task < 1:
            raise ValueError("score_concurrency and exact_rows_per_task must be >= 1")
        if not (self.score_num_cpus > 0 and self.write_num_cpus > 0 and self.score_num_gpus >= 0):
            raise ValueError("score_num_cpus and write_num_cpus must be > 0, score_num_gpus >= 0")


@dataclass
class SearchConfig:
    """``blip2 shards search``: a faiss index over the image embeddings, queried with CLIP (capfilt.ranker)."""
    index: str = ""                     # where the index lives ("" : <shard set>/_index)
    # "auto": chosen for the set's size within memory_gb (capfilt.search.choose_index); else any
    # faiss index_factory string, inner product (e.g. Flat, IVF4096,SQ8, IVF16384_HNSW32,PQ96)
    factory: str = "auto"
    memory_gb: float = 16.0             # auto: the most RAM the index may take when it is searched
    exact_rows: int = 100_000           # auto: up to this many vectors, exact search (Flat)
    train_rows: int | None = None       # vectors a trainable index trains on (None: 64 per IVF list, >= 20k)
    nprobe: int = 32                    # IVF lists searched per query
    k: int = 10
    rerank: int = 4                     # quantised indexes: rerank x k candidates re-scored exactly (1: none)
    rows_per_task: int = 1_000_000      # vectors one fill task adds (its memory: rows x code bytes)
    num_cpus: float = 1.0               # per train / fill / merge task (also its faiss threads)

    def validate(self) -> None:
        if not self.factory.strip():
            raise ValueError("factory must be 'auto' or a faiss index_factory string")
        if self.k < 1 or self.nprobe < 1 or self.rows_per_task < 1 or self.rerank < 1:
            raise ValueError(f"k, nprobe, rows_per_task and rerank must be >= 1, got {self.k}, {self.nprobe}, "
                             f"{self.rows_per_task}, {self.rerank}")
        if self.train_rows is not None and self.train_rows < 1:
            raise ValueError(f"train_rows must be >= 1 (or null), got {self.train_rows}")
        if not (math.isfinite(self.memory_gb) and self.memory_gb > 0) or self.exact_rows < 0:
            raise ValueError(f"need memory_gb > 0 (finite) and exact_rows >= 0, got {self.memory_gb}, {self.exact_rows}")
        if not (math.isfinite(self.num_cpus) and self.num_cpus > 0):
            raise ValueError(f"num_cpus must be > 0, got {self.num_cpus}")
