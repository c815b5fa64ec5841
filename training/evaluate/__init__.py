"""Evaluation: retrieval (ITC shortlist + ITM re-rank), captioning (BLEU-4/CIDEr), VQAv2 accuracy."""
