"""`blip2 submit`: any command as a Ray job, shipped with the repo as working_dir."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pyarrow as pa
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


@pytest.fixture(scope="module")
def hostile_input(tmp_path_factory, corpus):
    from pipelines.schema import DOWNLOAD
    from tests.helpers.shards import hostile_shards, write_set

    shards, expected = hostile_shards(Path(corpus[0]), corpus[1])
    uri = str(tmp_path_factory.mktemp("download") / "set")
    write_set(uri, DOWNLOAD, shards)
    return uri, expected


@pytest.mark.slow
def test_capfilt_through_ray_job_submit(ray_head, tiny_models, hostile_input, tmp_path, capsys):
    from pipelines.shardio import ShardSet

    input_uri, expected = hostile_input
    out = tmp_path / "out"
    rc = main(["submit", "--address", ray_head.dashboard_url, "--python", sys.executable, "--timeout", "500",
               "capfilt", "--input", input_uri, "--output", str(out), "--config", "tiny",
               f"capfilt.captioner={tiny_models['captioner']}", f"capfilt.ranker={tiny_models['ranker']}",
               "capfilt.max_length=10", "capfilt.batch_size=4"])
    logs = capsys.readouterr().out
    assert rc == 0, logs[-3000:]
    assert "CapFilt ->" in logs and "submitted" in logs  # the job's own summary, streamed back
    ss = ShardSet(str(out))
    keys = pa.concat_tables([ss.read_shard(n) for n in ss.committed()]).column("key").to_pylist()
    assert sorted(keys) == expected["out"]
    # A failing command's exit status comes back as the submit's exit status.
    assert main(["submit", "--address", ray_head.dashboard_url, "--python", sys.executable, "capfilt",
                 "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "never")]) == 2
    assert "missing does not exist" in capsys.readouterr().out
