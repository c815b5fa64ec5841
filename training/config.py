"""Config sections of the training layer (``model.*``, ``train.*``, ``eval.*`` keys); the
``ingest.*`` and ``tracking.*`` sections are declared next to their code in :mod:`training.ingest` and
:mod:`training.trackers`."""
from __future__ import annotations

from dataclasses import dataclass, field



@dataclass
class ModelConfig:
    # frozen image encoder
    vision: str = "eva_vit_g"          # eva_vit_g (Blip2VisionModel) | clip_vit_l (CLIPVisionModel)
    vision_path: str = ""              # save_pretrained directory (local or s3://)
    frozen_dtype: str = "float16"      # float16 | bfloat16 | float32 (fp32 on CPU)
    frozen_weights: str = "linear"     # linear: only Linear/Conv weights in frozen_dtype (LAVIS) | all
    image_size: int = 224              # pixels, one key for training ingest, evaluation and preprocess
    # fresh: ln_vision starts at weight 1, bias 0 (LAVIS); copy: from the EVA tower's post_layernorm,
    # which in a BLIP-2 checkpoint is BLIP-2's trained ln_vision (to continue from that checkpoint)
    ln_vision_init: str = "fresh"
    # Q-Former
    qformer_init: str = ""             # bert-base-uncased layout directory (weights + tokenizer)
    num_query_tokens: int = 32
    cross_attention_frequency: int = 2
    embed_dim: int = 256               # ITC projection size
    max_text_len: int = 32
    # stage 2
    stage1_checkpoint: str = ""        # stage 2 starts from this stage-1 checkpoint directory
    llm_family: str = "opt"            # opt | t5
    llm_path: str = ""                 # save_pretrained directory of the frozen LLM (+ tokenizer)
    llm_dtype: str = "auto"            # auto: float16 for OPT, bfloat16 for FlanT5 (float32 on CPU)
    prompt: str = ""                   # stage-2 training prompt, joined to the caption as is (LAVIS: "a photo of ")
    # the frozen LLM's mode while stage 2 trains: true = train mode, its dropout on (LAVIS only pins the
    # ViT to eval); false = eval mode. Evaluation and generation always run it in eval mode.
    llm_train_mode: bool = True
    freeze_vision: bool = True         # fine-tuning may unfreeze the image encoder

    def validate(self) -> None:
        if self.vision not in ("eva_vit_g", "clip_vit_l"):
            raise ValueError(f"vision must be eva_vit_g or clip_vit_l, got {self.vision!r}")
        if self.llm_family not in ("opt", "t5"):
            raise ValueError(f"llm_family must be opt or t5, got {self.llm_family!r}")
        if self.frozen_weights not in ("linear", "all"):
            raise ValueError(f"frozen_weights must be linear or all, got {self.frozen_weights!r}")
        if self.ln_vision_init not in ("fresh", "copy"):
            raise ValueError(f"ln_vision_init must be fresh or copy, got {self.ln_vision_init!r}")
        if self.ln_vision_init == "copy" and self.vision != "eva_vit_g":
            raise ValueError("ln_vision_init=copy needs vision=eva_vit_g (a CLIP tower has no ln_vision to copy)")
        for name in ("frozen_dtype",):
            if getattr(self, name) not in ("float16", "bfloat16", "float32"):
                raise ValueError(f"{name} must be float16, bfloat16 or float32")


def saved_ln_vision_init(saved: dict, vision: str = "eva_vit_g") -> str:
    """The ``ln_vision_init`` a saved model config was built with: configs written before the
    key existed copied an EVA tower's LayerNorm (and its eps)."""
    if saved.get("ln_vision_init"):
        return saved["ln_vision_init"]
    return "copy" if saved.get("vision", vision) == "eva_vit_g" else "fresh"


@dataclass
class TrainConfig:
    stage: int = 1
    input: str = "runs/capfilt"        # CapFilt shard set (local or s3://)
    output: str = "runs/train"         # RunConfig storage_path (local or s3://)
    name: str = ""                     # run name (default: stage<k>)
    steps: int = 250_000
    batch_size: int = 32               # per-worker micro-batch
    global_batch: int = 0              # samples per optimizer step, kept when the world resizes;
                                       # 0: batch_size * workers (max workers when elastic)
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 2000
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 0.0             # 0: off
    precision: str = "fp32"            # fp32 | fp16 | bf16 (autocast for the trainable parts)
    num_workers: int | tuple[int, int] = 1   # n, or [min, max]: elastic (Ray Train resizes the group)
    use_gpu: bool = False
    cpus_per_worker: int = 1
    checkpoint_every: int = 1000
    max_failures: int = 0
    log_every: int = 10
    keep_checkpoints: int = 3          # newest checkpoints kept in storage (0: all)
    stop_after: int = 0                # end this invocation after this step (0: at `steps`); the
                                       # schedule still spans `steps`, a re-run resumes (preemptible slots)

    def worker_range(self) -> tuple[int, int]:
        n = self.num_workers
        return (n, n) if isinstance(n, int) else (int(n[0]), int(n[1]))

    def resolved_global_batch(self) -> int:
        """Samples per optimizer step at every world size (see ``training.ingest.step_split``)."""
        return self.global_batch or self.batch_size * self.worker_range()[1]

    def validate(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"precision must be fp32, fp16 or bf16, got {self.precision!r}")
        lo, hi = self.worker_range()
        if self.steps < 0 or self.batch_size < 1 or lo < 1 or hi < lo:
            raise ValueError("steps must be >= 0, batch_size >= 1, num_workers n >= 1 or [min, max] with 1 <= min <= max")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr and self.warmup_steps >= 0 and self.weight_decay >= 0
                and self.grad_clip >= 0 and all(0 <= b < 1 for b in self.betas)):
            raise ValueError("need lr > 0, 0 <= min_lr <= lr, warmup_steps >= 0, weight_decay >= 0, grad_clip >= 0 "
                             "and betas in [0, 1)")
        if min(self.checkpoint_every, self.log_every, self.cpus_per_worker) < 1 or min(
                self.max_failures, self.keep_checkpoints, self.stop_after) < 0:  # the loop divides by the first two
            raise ValueError("checkpoint_every, log_every and cpus_per_worker must be >= 1; max_failures, "
                             "keep_checkpoints and stop_after >= 0")
        if self.resolved_global_batch() < hi:
            raise ValueError(f"global_batch {self.resolved_global_batch()} cannot give one sample to each of {hi} workers")


@dataclass
class EvalConfig:
    k_test: int = 128                  # ITC shortlist re-ranked by ITM
    batch_size: int = 32
    num_beams: int = 5
    max_new_tokens: int = 30
    caption_prompt: str = "a photo of"
    extra: dict = field(default_factory=dict)
    # evaluation runner (training/evaluate/, `blip2 eval`)
    device: str = "auto"               # auto: cuda when available, else cpu
    runner: str = "auto"               # retrieval image features + ITM re-rank: ray (Ray Data jobs) | local | auto (ray from ray_min_images)
    ray_min_images: int = 256
    num_workers: int = 1               # actors holding the model in each Ray job
    gpus_per_worker: float = 0.0
    caption_min_new_tokens: int = 8    # LAVIS COCO captioning: beam 5, 8..30 new tokens
    caption_metrics: list[str] = field(default_factory=lambda: ["meteor", "spice"])  # run when Java allows
    tokenizer: str = "auto"            # PTB (Java) when available, else a documented simple fallback
    vqa_prompt: str = ""               # "": "Question: {} Answer:" (OPT) / "Question: {} Short answer:" (T5)
    vqa_num_beams: int = 5
    vqa_max_new_tokens: int = 10
    vqa_length_penalty: float = -1.0
    vqa_min_new_tokens: int = 1
    vqa_image_name: str = ""           # when a question names no image file; "": COCO_{data_subtype}_{id:012d}.jpg
    split: str = "test"                # the split read from a Karpathy dataset_*.json file
    paper_model: str = ""              # `--benchmark`: the paper row to compare with; "": worked out from the model
    limit: int = 0                     # evaluate only the first N images / questions (0: all)

    def validate(self) -> None:
        if self.runner not in ("auto", "ray", "local"):
            raise ValueError(f"runner must be auto, ray or local, got {self.runner!r}")
        if self.tokenizer not in ("auto", "ptb", "simple"):
            raise ValueError(f"tokenizer must be auto, ptb or simple, got {self.tokenizer!r}")
        if self.k_test < 1 or self.batch_size < 1 or self.num_workers < 1:
            raise ValueError("k_test, batch_size and num_workers must be >= 1")
