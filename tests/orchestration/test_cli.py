import subprocess
import sys

import yaml

from orchestration.cli import main, split_overrides


def test_split_overrides():
    assert split_overrides(["download", "--input", "a.csv", "train.lr=1", "x.y=[1,2]"]) == (
        ["download", "--input", "a.csv"], ["train.lr=1", "x.y=[1,2]"])


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "orchestration.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "config" in out.stdout


def test_config_command_prints_resolved_yaml(capsys):
    assert main(["config", "--config", "tiny", "train.steps=5"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["steps"] == 5 and cfg["download"]["image_size"] == 64


def test_bad_override_exits_2_with_message(capsys):
    assert main(["config", "nope.key=1"]) == 2
    assert "unknown config key 'nope'" in capsys.readouterr().err


def test_command_flags_are_config_overrides():
    """A command's flags reach the config through the same merge as key=value (one path), and
    caption / vqa flags land on their own eval keys."""
    from orchestration.cli import build_parser, flag_overrides

    parse = build_parser().parse_args
    args = parse(["vqa", "x.jpg", "--question", "q", "--model", "m", "--num-beams", "3", "--prompt", "Q: {} A:"])
    assert flag_overrides(args) == {"eval": {"vqa_num_beams": 3, "vqa_prompt": "Q: {} A:"}}
    args = parse(["caption", "x.jpg", "--model", "m", "--max-new-tokens", "12", "--prompt", ""])
    assert flag_overrides(args) == {"eval": {"max_new_tokens": 12, "caption_prompt": ""}}
    assert flag_overrides(parse(["download", "--input", "l.csv", "--policy", "human"])) == {
        "download": {"input": "l.csv", "policy": "human"}}
    assert flag_overrides(parse(["train", "--stage", "2"])) == {"train": {"stage": 2}}
    assert flag_overrides(parse(["capfilt"])) == {}
