"""The paper's benchmarks (``blip2 eval --benchmark NAME``): which task, reader and metric each
table row uses. Light on purpose (no torch): the CLI builds its ``--benchmark`` choices from it.
The paper's figures for each are in :mod:`training.evaluate.results`."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Benchmark:
    task: str          # retrieval (stage 1) | caption | vqa (stage 2)
    reader: str        # caption: load_caption_annotations | vqa: load_vqa | gqa: load_gqa
    metric: str        # retrieval | caption | nocaps | vqa | gqa
    inputs: str        # what --questions / --annotations take, for --help and errors


BENCHMARKS = {
    "vqav2": Benchmark("vqa", "vqa", "vqa", "--questions v2_OpenEnded_mscoco_{val2014|test-dev2015}_questions.json "
                       "[--annotations v2_mscoco_val2014_annotations.json]; test-dev: no annotations, --answers-out"),
    "vqav2_finetuned": Benchmark("vqa", "vqa", "vqa", "as vqav2 (a VQA-finetuned model; Table 4 is test-dev)"),
    "okvqa": Benchmark("vqa", "vqa", "vqa", "--questions OpenEnded_mscoco_val2014_questions.json "
                       "--annotations mscoco_val2014_annotations.json"),
    "gqa": Benchmark("vqa", "gqa", "gqa", "--questions testdev_balanced_questions.json"),
    "nocaps": Benchmark("caption", "caption", "nocaps", "--annotations nocaps_val_4500_captions.json"),
    "coco_caption": Benchmark("caption", "caption", "caption",
                              "--annotations coco_karpathy_test.json (LAVIS) or dataset_coco.json (Karpathy)"),
    "flickr30k": Benchmark("retrieval", "caption", "retrieval",
                           "--annotations flickr30k_test.json (LAVIS) or dataset_flickr30k.json (Karpathy)"),
    "coco_retrieval": Benchmark("retrieval", "caption", "retrieval",
                                "--annotations coco_karpathy_test.json (LAVIS) or dataset_coco.json (Karpathy)"),
}
# --task without --benchmark: the model page's COCO / VQAv2 comparison (results.REFERENCE)
TASK_DEFAULTS = {"retrieval": Benchmark("retrieval", "caption", "retrieval", "--annotations"),
                 "caption": Benchmark("caption", "caption", "caption", "--annotations"),
                 "vqa": Benchmark("vqa", "vqa", "vqa", "--questions + --annotations, or a LAVIS list")}
