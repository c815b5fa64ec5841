"""Config section of CapFilt (``capfilt.*`` keys).

Each model stage runs on a Ray Data actor pool whose size (``*_concurrency`` = (min, max)
actors, autoscaled between the two), CPUs and GPUs per actor come from here, so the same
job fills a one-laptop run and an autoscaling GPU cluster. GPU clusters set
``capfilt.caption_num_gpus=1 capfilt.rank_num_gpus=1`` (fp16 on GPU is automatic); small
machines set ``capfilt.colocate_ranker=true`` to run both models in one actor.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CapFiltConfig:
    input: str = "runs/download"
    output: str = "runs/capfilt"
    captioner: str = "Salesforce/blip-image-captioning-large"  # local dir / s3:// in save_pretrained layout
    ranker: str = "openai/clip-vit-large-patch14"
    prompt: str = "a picture of "
    num_captions: int = 10
    # BLIP's generate(sample=True): top-p 0.9, HF generate's default top-k 50, penalty 1.1.
    top_p: float = 0.9
    top_k: int = 50                     # 0: no top-k
    repetition_penalty: float = 1.1     # 1.0: none; the prompt ids are penalised too, as in BLIP
    # Lengths as BLIP / HF generate count them: total decoder ids, the prompt's included
    # ([DEC] a picture of = 4 ids: at least 6, at most 26 generated tokens, [SEP] included).
    min_length: int = 10
    max_length: int = 30
    keep: int = 2
    batch_size: int = 16                # images per captioner call
    # Keep the original caption first and the best synthetic one second (not the paper's
    # ranking; for captioners known to be worse than the list's own captions).
    keep_original: bool = False
    # Use the list's own synthetic captions and their scores (LAION-COCO's all_captions and
    # all_similarities, carried in the download rows' meta) instead of running the captioner:
    # the top `keep` by those scores are kept; the ranker still embeds every image.
    precomputed: bool = False
    input_policy: str = "web"           # policy of rows read from img2dataset / WebDataset folders
    write_candidates: bool = True       # all 10 + 1 captions with scores, for inspection
    write_embeddings: bool = True       # clip-retrieval layout under <output>/embeddings
    max_pixels: int = 40_000_000        # decoded images above this are refused (decompression bombs)
    # Resources per stage. CPU defaults add up to 2 CPUs so the job runs on a 2-core machine.
    # num_cpus are Ray's logical reservations, not limits: model actors that reserve nearly
    # every CPU leave the decode and writer tasks waiting for a slot and then themselves
    # waiting for input (2-core benchmark: 2 colocated actors at 0.5 CPU run 25 % faster
    # than at 0.875).
    decode_num_cpus: float = 0.25
    decode_concurrency: int | None = None     # decode tasks in flight (None: Ray Data decides)
    caption_num_cpus: float = 1.0
    caption_num_gpus: float = 0.0
    caption_concurrency: tuple[int, int] = (1, 1)
    rank_batch_size: int = 32           # images per ranker call (x 11 captions)
    rank_num_cpus: float = 0.5
    rank_num_gpus: float = 0.0
    rank_concurrency: tuple[int, int] = (1, 1)
    # The ranker inside the captioner actors (caption_* resources and concurrency then hold
    # both models): one process per pair and no hand-over between pools. For CPU machines,
    # where every extra process competes for the same cores, and for GPUs that fit both.
    colocate_ranker: bool = False
    write_num_cpus: float = 0.25
    dtype: str = "auto"                 # auto: float16 on GPU, float32 on CPU; or float32/float16/bfloat16

    def validate(self) -> None:
        if self.keep < 1 or self.num_captions < 1 or self.batch_size < 1 or self.rank_batch_size < 1:
            raise ValueError("keep, num_captions, batch_size and rank_batch_size must be >= 1")
        if self.keep > self.num_captions + 1:
            raise ValueError(f"keep={self.keep} exceeds the {self.num_captions + 1} candidates")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or not self.repetition_penalty > 0:
            raise ValueError(f"need top_k >= 0 and repetition_penalty > 0, got {self.top_k}, {self.repetition_penalty}")
        if not 0 <= self.min_length <= self.max_length:
            raise ValueError("need 0 <= min_length <= max_length (both count the prompt ids)")
        for name in ("caption_concurrency", "rank_concurrency"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be (min, max) with 1 <= min <= max, got {(lo, hi)}")
        if not (self.decode_num_cpus > 0 and self.write_num_cpus > 0 and min(
                self.caption_num_cpus, self.caption_num_gpus, self.rank_num_cpus, self.rank_num_gpus) >= 0):
            raise ValueError("decode_num_cpus and write_num_cpus must be > 0, the caption/rank CPUs and GPUs >= 0")
        if self.max_pixels < 1 or (self.decode_concurrency is not None and self.decode_concurrency < 1):
            raise ValueError("max_pixels and decode_concurrency must be >= 1")
        if self.input_policy not in ("web", "human"):
            raise ValueError(f"input_policy must be web or human, got {self.input_policy!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
