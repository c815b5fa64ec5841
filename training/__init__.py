"""Training layer: frozen encoders, Q-Former, stage-1/2 models and losses, Ray Train loop."""
