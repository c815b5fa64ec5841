"""`blip2 <command>`: every command takes ``--config PRESET|FILE`` and trailing ``key=value`` overrides.

Commands live in ``orchestration/commands/<name>.py`` and expose ``HELP``, ``add_arguments``
and ``run(args, cfg)``; their heavy imports (torch, ray) happen inside ``run`` so that
``blip2 --help`` is instant.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

from orchestration.config import ConfigError, available_presets, deep_merge, load_config, nest, parse_overrides

# command name -> module under orchestration.commands
COMMANDS = {
    "config": "show_config",
    "tiny-models": "tiny_models",
    "stage-models": "stage_models",
    "download": "download",
    "capfilt": "capfilt",
    "curate": "curate",
    "train": "train",
    "eval": "eval",
    "export-hf": "export_hf",
    "shards": "shards",
    "caption": "caption",
    "vqa": "vqa",
    "submit": "submit",
    "demo": "demo",
    "rehearse": "rehearse",
}
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``key=value`` overrides from the arguments argparse should see."""
    rest, overrides = [], []
    for a in argv:
        (overrides if _OVERRIDE.match(a) else rest).append(a)
    return rest, overrides


def _load_command(name: str):
    return importlib.import_module(f"orchestration.commands.{COMMANDS[name]}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blip2",
        description="BLIP-2 pre-training pipeline: download -> capfilt -> train -> eval/export.",
        epilog=f"Config: --config PRESET|FILE.yaml plus key=value overrides. Presets: {', '.join(available_presets())}",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        mod = _load_command(name)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        p.add_argument("--config", default=getattr(mod, "DEFAULT_PRESET", None),
                       help="preset name or YAML file (overrides: key=value after the command)")
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def flag_overrides(args) -> dict:
    """A command's convenience flags as config overrides (its ``FLAGS``: flag dest → config key), so
    flags and ``key=value`` reach the config through one merge; a flag given wins over ``key=value``."""
    flags = getattr(args._module, "FLAGS", {})
    return nest({key: getattr(args, dest) for dest, key in flags.items() if getattr(args, dest, None) is not None})


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset's albumentations phones home
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = split_overrides(argv)
    args = build_parser().parse_args(rest)
    args.overrides = overrides
    try:
        cfg = load_config(args.config, deep_merge(parse_overrides(overrides), flag_overrides(args)))
    except ConfigError as e:
        print(f"blip2 {args.command}: config error: {e}", file=sys.stderr)
        return 2
    rc = args._module.run(args, cfg)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
