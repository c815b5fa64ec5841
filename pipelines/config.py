"""Config section of the data layer (``download.*`` keys)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipelines.images import RESIZE_MODES
from pipelines.schema import POLICIES


@dataclass
class DownloadConfig:
    input: str = ""                    # URL list: file, glob or folder (local or s3://)
    source: str = "auto"               # a name from pipelines.sources, or auto (by file name / columns)
    policy: str = "auto"               # captions: auto (the source's own), web or human (see pipelines.sources)
    output: str = "runs/download"      # shard set: local folder or s3://bucket/prefix
    image_size: int = 256              # resize target (img2dataset's meaning)
    resize_mode: str = "keep_ratio"    # no, keep_ratio, center_crop, border, keep_ratio_largest
    resize_only_if_bigger: bool = True # never upscale; an RGB JPEG that already fits is stored as sent
    min_image_size: int = 64           # a smaller side is too_small (tracking pixels, icons)
    rows_per_shard: int = 1000         # one shard per rows_per_shard rows of each input file
    threads: int = 16                  # download threads per task
    timeout: float = 10.0              # seconds per socket operation (connect, each read)
    deadline: float = 30.0             # seconds per URL attempt: connect + headers + body + redirects
    max_bytes: int = 32 << 20          # response body cap; a larger Content-Length is refused unread
    retries: int = 0                   # extra attempts after a timeout, network error or 5xx
    rate_limit_retries: int = 2        # extra attempts after a 429/503, each after its Retry-After
    max_retry_after: float = 30.0      # a longer Retry-After is not waited for (rate_limited)
    max_per_host: int = 4              # fetches in flight per host, per task
    user_agent_token: str = "blip2-pipeline"   # in the User-Agent and matched in X-Robots-Tag
    max_pixels: int = 40_000_000       # larger originals are refused as decompression bombs
    max_redirects: int = 5
    max_url_bytes: int = 8192          # longer URLs are invalid_url
    max_caption_bytes: int = 4096      # longer captions are bad_caption
    allow_hosts: list[str] = field(default_factory=list)  # hosts/CIDRs exempt from the address guard
    concurrency: int | None = None     # download tasks in flight (None: 2 per CPU slot of the cluster)
    url_prefix: str = ""               # base URL for lists of relative image paths (COCO/VG); "" = the source's own
    encode_quality: int = 95           # JPEG quality of the stored images (img2dataset's default)
    task_cpus: float = 1.0             # CPUs reserved per download task (downloads are I/O bound)
    task_retries: int = 2              # a task that dies (OOM, node loss) is run again this often, then task_failed
    partition_timeout: float | None = None  # wall clock per partition task; None: derived (see download_worker)
    partitions_per_wave: int = 256     # partitions whose duplicate marks the driver reads at a time

    def validate(self) -> None:
        if self.image_size <= 0 or self.rows_per_shard <= 0 or self.threads <= 0:
            raise ValueError("image_size, rows_per_shard and threads must be positive")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {self.resize_mode!r} is not one of {', '.join(RESIZE_MODES)}")
        if self.policy != "auto" and self.policy not in POLICIES:
            raise ValueError(f"policy {self.policy!r} is not one of auto, {', '.join(POLICIES)}")
        if not all(0 < v < math.inf for v in (self.max_pixels, self.timeout, self.deadline, self.max_bytes,
                                              self.max_per_host, self.max_url_bytes, self.max_caption_bytes)):
            raise ValueError("max_pixels, timeout, deadline, max_bytes, max_per_host, max_url_bytes and "
                             "max_caption_bytes must be positive and finite")
        if not all(0 <= v < math.inf for v in (self.max_redirects, self.retries, self.rate_limit_retries,
                                               self.max_retry_after, self.task_retries, self.min_image_size)):
            raise ValueError("max_redirects, retries, rate_limit_retries, max_retry_after, task_retries and "
                             "min_image_size must be >= 0 and finite")
        if not 0 < self.task_cpus or self.partitions_per_wave <= 0:
            raise ValueError("task_cpus and partitions_per_wave must be positive")
        if self.partition_timeout is not None and not 0 < self.partition_timeout < math.inf:
            raise ValueError("partition_timeout must be positive (or null for the derived bound)")
        if not self.user_agent_token.strip() or any(c in self.user_agent_token for c in ";()\r\n"):
            raise ValueError("user_agent_token must be a plain product token (no ; ( ) or newlines)")
