"""`blip2 config`: print the resolved config (preset + overrides) as YAML."""
from __future__ import annotations

import yaml

from orchestration.config import to_dict
from pipelines.shardio import redact

HELP = "print the resolved config (preset + key=value overrides) as YAML"


def add_arguments(parser) -> None:
    pass


def run(args, cfg) -> int:
    print(yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False), end="")
    return 0
