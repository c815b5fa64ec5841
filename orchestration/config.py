"""One config system: dataclasses, YAML presets, ``key=value`` overrides.

Each layer declares its own section dataclass next to the code that uses it
(``pipelines.config``, ``capfilt.config``, ``training.config``, ``training.ingest``, ``training.trackers``); this module composes
them into :class:`Config`, reads presets and overrides once, validates every key and
type with a message that names the bad key and the valid ones, and hands the typed
sections down. Nothing below this module reads YAML or the environment for settings.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from capfilt.config import CapFiltConfig
from capfilt.curate_config import CurateConfig, SearchConfig
from pipelines.config import DownloadConfig
from training.config import EvalConfig, ModelConfig, TrainConfig
from training.ingest import IngestConfig
from training.trackers import TrackingConfig

PRESET_DIR = Path(__file__).parent / "presets"
_PRESET_NAME = re.compile(r"[A-Za-z0-9_-]+")  # a name without a suffix; never a path into or out of PRESET_DIR


@dataclass
class RayConfig:
    address: str | None = None        # None: start local Ray; "auto" or ray://host:port to join
    num_cpus: int | None = None       # for a local start only
    log_to_driver: bool = True        # false: workers' logs stay in Ray's session folder (the demo's quiet screen)


@dataclass
class Config:
    seed: int = 0
    ray: RayConfig = field(default_factory=RayConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    capfilt: CapFiltConfig = field(default_factory=CapFiltConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


class ConfigError(ValueError):
    pass


# -- building typed configs from plain data -------------------------------------------------
def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return build(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        try:  # YAML 1.1 reads "3e-4" as a string
            number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else _fail()
        except (ValueError, OverflowError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(number):  # nan slips past every `<` check, inf disables a bound
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _fail():
    raise ValueError


def build(cls: type, data: dict, prefix: str = "") -> Any:
    """Construct dataclass ``cls`` from ``data``, validating every key and type."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys{' in ' + prefix.rstrip('.') if prefix else ''}: "
            + ", ".join(sorted(fields))
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None
    return obj


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# -- presets and overrides ----------------------------------------------------------------
def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def nest(pairs: dict) -> dict:
    """``{"train.lr": 1e-4}`` → ``{"train": {"lr": 1e-4}}``."""
    out: dict = {}
    for key, value in pairs.items():
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} sets a key inside {p!r}, which another override gives a value")
        node[parts[-1]] = value
    return out


def parse_overrides(items: list[str]) -> dict:
    """``["train.lr=1e-4", "capfilt.concurrency=[1,2]"]`` → nested dict (values parsed as YAML)."""
    pairs = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        pairs[key] = load_yaml(raw, f"override {item!r}") if raw != "" else ""
    return nest(pairs)


class _NoAliasLoader(yaml.SafeLoader):
    """Safe YAML without aliases: a few hundred bytes of nested aliases expand to gigabytes."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a config",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)


def load_yaml(text: str, where: str) -> Any:
    """YAML data (safe tags only, no aliases); a ConfigError naming ``where`` otherwise."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({' '.join(str(e).split())[:300]})") from None


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def read_preset(name_or_path: str, _inherited: tuple = ()) -> dict:
    """A preset name (``tiny``) or a YAML path; ``base: <preset>`` inherits."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml" if _PRESET_NAME.fullmatch(name_or_path) else None
    if path is None or not path.is_file():
        raise ConfigError(f"no config {name_or_path!r}; presets: {', '.join(available_presets())} or a .yaml path")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read ({e})") from None
    data = load_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = data.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a preset name or a .yaml path, got {base!r}")
    if str(path.resolve()) in _inherited:
        raise ConfigError(f"{path}: its base chain comes back to itself")
    return deep_merge(read_preset(base, (*_inherited, str(path.resolve()))), data) if base else data


# Local paths are made absolute when the config is read: Ray Train workers run in their run's
# artifacts folder (and other Ray workers need not share the driver's directory), so a relative
# path would point somewhere else there. Outputs always; inputs only when they exist here, so a
# Hugging Face Hub id such as "Salesforce/blip-image-captioning-large" is left as it is.
OUTPUT_PATHS = {"download": ("output",), "capfilt": ("output",), "curate": ("output",), "train": ("output",)}
INPUT_PATHS = {"download": ("input",), "capfilt": ("input", "captioner", "ranker"),
               "curate": ("input", "nsfw.head", "aesthetic.head"), "search": ("index",),
               "model": ("vision_path", "qformer_init", "stage1_checkpoint", "llm_path"), "train": ("input",)}


def absolute_local_paths(cfg: Config) -> Config:
    for keys, always in ((OUTPUT_PATHS, True), (INPUT_PATHS, False)):
        for section, names in keys.items():
            for name in names:
                *parents, leaf = name.split(".")  # "nsfw.head": a key of a sub-section
                sec = getattr(cfg, section)
                for p in parents:
                    sec = getattr(sec, p)
                value = getattr(sec, leaf)
                if value and "://" not in value and not os.path.isabs(value) and (always or os.path.exists(value)):
                    setattr(sec, leaf, os.path.abspath(value))
    return cfg


def load_config(preset: str | None = None, overrides: list[str] | dict | None = None) -> Config:
    data = read_preset(preset) if preset else {}
    if overrides:
        data = deep_merge(data, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    return absolute_local_paths(build(Config, data))
