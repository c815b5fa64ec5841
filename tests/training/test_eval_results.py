"""The printed results table: retrieval shows the ITM re-rank next to ITC alone and chance."""
from __future__ import annotations

from training.evaluate.results import results_table

KEYS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10")


def _recall(base: float) -> dict:
    return {k: base + i for i, k in enumerate(KEYS)}


def test_retrieval_table_has_itc_and_chance_columns():
    metrics = {**_recall(40.0), "r_mean": 42.5, "k_test": 16, "itc": {**_recall(30.0), "r_mean": 32.5},
               "chance": _recall(1.0)}
    lines = results_table("retrieval", metrics).splitlines()
    assert lines[0].split()[:4] == ["metric", "re-ranked", "ITC", "only"]
    r1 = next(line for line in lines if line.startswith("image→text R@1"))
    assert r1.split()[2:6] == ["40.00", "30.00", "1.00", "85.4"]   # re-ranked, ITC only, chance, model page
    mean = next(line for line in lines if line.startswith("mean recall"))
    assert mean.split()[2:] == ["42.50", "32.50"]                   # chance has no mean: blank
    assert any("top 16" in line for line in lines)


def test_other_tasks_keep_one_column():
    lines = results_table("caption", {"bleu4": 3.0, "cider": 4.0, "itc": {"bleu4": 1.0}}).splitlines()
    assert lines[0].split() == ["metric", "this", "run", "model", "page", "Δ"]
    assert lines[1].split()[:2] == ["BLEU-4", "3.00"] and len(lines[1].split()) == 4


def test_benchmark_tables_show_the_paper_row(tmp_path):
    import json

    from training.evaluate.results import PAPER, write_results

    lines = results_table("vqa", {"accuracy": 40.0}, "okvqa", "BLIP-2 ViT-g FlanT5-XXL").splitlines()
    assert lines[0].split()[-2:] == ["paper", "Δ"]
    assert lines[1].split() == ["VQA", "accuracy", "40.00", "45.9", "-5.9"]   # Table 2, OK-VQA column
    assert lines[-1] == "paper: Table 2 (zero-shot VQA), OK-VQA test, row 'BLIP-2 ViT-g FlanT5-XXL'"
    # every benchmark has a row per paper model, with the metrics its table reports
    assert set(PAPER["nocaps"][1]["BLIP-2 ViT-g OPT-2.7B"]) >= {"in-domain_cider", "out-domain_spice", "cider"}
    assert PAPER["coco_retrieval"][1]["BLIP-2 ViT-g"]["txt_r1"] == 85.4                # = the model page
    assert PAPER["vqav2"][1]["BLIP-2 ViT-g OPT-2.7B"]["accuracy"] == 53.5
    unknown = results_table("retrieval", {"txt_r1": 1.0}, "flickr30k", "BLIP-2 ViT-H")
    assert "is not a row of it" in unknown and "BLIP-2 ViT-g 97.6/100/100/89.7/98.1/98.9" in unknown
    res = write_results(str(tmp_path / "r.json"), "caption", {"bleu4": 40.0}, {}, "coco_caption", "BLIP-2 ViT-g OPT-6.7B")
    assert res["reference"]["cider"]["value"] == 145.2 and "Table 3" in res["reference"]["cider"]["source"]
    assert json.loads((tmp_path / "r.json").read_text())["paper_model"] == "BLIP-2 ViT-g OPT-6.7B"
