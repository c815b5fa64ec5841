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
