"""The edge: the `blip2` CLI, configs and presets, job submission, the demo."""
