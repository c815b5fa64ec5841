"""One module per `blip2` command (see orchestration.cli)."""
