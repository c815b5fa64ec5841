"""Config section of the data layer (``download.*`` keys)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DownloadConfig:
    input: str = ""                    # URL list: file, glob or folder (local or s3://)
    source: str = "auto"               # a name from pipelines.sources, or auto (by file name / columns)
    output: str = "runs/download"      # shard set: local folder or s3://bucket/prefix
    image_size: int = 256              # img2dataset resize target
    resize_mode: str = "keep_ratio"    # img2dataset resize_mode: no, keep_ratio, center_crop, border
    rows_per_shard: int = 1000         # one input partition -> one output shard
    threads: int = 16                  # download threads per task
    timeout: float = 10.0              # seconds per request
    retries: int = 0
    max_pixels: int = 40_000_000       # larger originals are refused as decompression bombs
    max_redirects: int = 5
    allow_hosts: list[str] = field(default_factory=list)  # hosts/CIDRs exempt from the address guard
    concurrency: int | None = None     # Ray tasks in flight (None: Ray decides)
    url_prefix: str = ""               # base URL for lists of relative image paths (COCO/VG); "" = the source's own
    encode_quality: int = 95           # JPEG quality of the stored images (img2dataset's default)
    task_cpus: float = 1.0             # CPUs reserved per download task (downloads are I/O bound)
    partitions_per_wave: int = 256     # partitions handed to one Ray Data job at a time (bounds memory)

    def validate(self) -> None:
        if self.image_size <= 0 or self.rows_per_shard <= 0 or self.threads <= 0:
            raise ValueError("image_size, rows_per_shard and threads must be positive")
        if self.resize_mode not in ("no", "keep_ratio", "center_crop", "border", "keep_ratio_largest"):
            raise ValueError(f"resize_mode {self.resize_mode!r} is not one of no, keep_ratio, center_crop, "
                             "border, keep_ratio_largest")
        if self.max_pixels <= 0 or self.timeout <= 0 or self.max_redirects < 0 or self.retries < 0:
            raise ValueError("max_pixels and timeout must be positive, max_redirects and retries >= 0")
        if not 0 < self.task_cpus or self.partitions_per_wave <= 0:
            raise ValueError("task_cpus and partitions_per_wave must be positive")
