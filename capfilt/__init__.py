"""CapFilt: BLIP-large captioner + CLIP ranker as a Ray Data job (reads pipelines' shards)."""
