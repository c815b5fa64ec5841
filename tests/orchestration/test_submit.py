"""`blip2 submit`: any command as a Ray job, shipped with the repo as working_dir."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from orchestration.cli import main
from orchestration.ray_session import WORKER_ENV
from orchestration.submit import build_submission, repo_root


def test_submission_ships_the_repo_and_runs_the_cli():
    sub = build_submission("capfilt", ["--input", "s3://b/in dir", "capfilt.keep=2"], python="python3")
    assert shlex.split(sub["entrypoint"]) == ["python3", "-m", "orchestration.cli", "capfilt", "--input",
                                              "s3://b/in dir", "capfilt.keep=2"]
    env = sub["runtime_env"]
    assert Path(env["working_dir"]) == repo_root() and (repo_root() / "orchestration" / "cli.py").exists()
    assert {".venv", "runs", ".git"} <= set(env["excludes"])
    assert env["env_vars"] == WORKER_ENV
    extra = build_submission("config", [], env_vars={"HF_HUB_OFFLINE": "1"})["runtime_env"]["env_vars"]
    assert extra == {**WORKER_ENV, "HF_HUB_OFFLINE": "1"}


def test_submit_without_an_address_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["submit", "config"]) == 2
    assert "--address" in capsys.readouterr().err


@pytest.mark.slow
def test_a_failing_job_streams_its_error_and_returns_its_exit_status(ray_head, tmp_path, capsys):
    """The job's own output streams back and its exit status is the submit's (a job that succeeds,
    `blip2 submit train --stage 2`: tests/orchestration/test_train_cmd.py)."""
    assert main(["submit", "--address", ray_head.dashboard_url, "--python", sys.executable, "--timeout", "120",
                 "capfilt", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "never")]) == 2
    out = capsys.readouterr().out
    assert "submitted" in out and "missing does not exist" in out
    assert not (tmp_path / "never").exists()
