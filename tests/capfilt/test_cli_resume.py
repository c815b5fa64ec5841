"""`blip2 capfilt` as a subprocess: kill -9 mid-run, run the same command again (in this process,
on the session's Ray), every usable image exactly once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from orchestration.cli import main
from pipelines.schema import DOWNLOAD
from pipelines.shardio import ShardSet
from tests.helpers.shards import download_row, write_set

pytestmark = pytest.mark.slow


def _args(input_uri: str, output_uri: str, tiny_models) -> list[str]:
    return ["capfilt", "--config", "tiny", "--input", input_uri, "--output", output_uri, "--json",
            f"capfilt.captioner={tiny_models['captioner']}", f"capfilt.ranker={tiny_models['ranker']}",
            "capfilt.batch_size=2", "capfilt.rank_batch_size=2", "capfilt.min_length=12", "capfilt.max_length=12"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def _session_pids(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout.split("\n")
    return [int(p) for p, s in (line.split() for line in out if line.strip()) if int(s) == sid]


def test_kill_9_mid_run_then_resume(corpus, tiny_models, tmp_path, ray_local, capsys):
    corpus_dir, items = corpus
    shards = [[download_row(f"syn/{it.index:04d}", it.caption, (Path(corpus_dir) / it.file).read_bytes())
               for it in items[i * 4:(i + 1) * 4]] for i in range(8)]
    write_set(str(tmp_path / "in"), DOWNLOAD, shards)
    keys = sorted(r["key"] for s in shards for r in s)
    out = ShardSet(str(tmp_path / "out"))

    args = _args(str(tmp_path / "in"), out.uri, tiny_models)
    proc = subprocess.Popen([sys.executable, "-m", "orchestration.cli", *args], env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None and not out.committed():
        time.sleep(0.05)
    done_at_kill = len(out.committed())
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert 1 <= done_at_kill < len(shards), f"not killed mid-run ({done_at_kill} shards committed)"
    assert out.read_manifest() is None  # the manifest is written last
    for _ in range(300):  # the driver's Ray processes die with it (parent-death signal), nothing is left behind
        if not _session_pids(proc.pid):
            break
        time.sleep(0.2)
    leftovers = _session_pids(proc.pid)
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert not leftovers

    capsys.readouterr()
    rc = main(args)
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stderr[-3000:]
    summary = json.loads(stdout[stdout.index("{"):])
    assert summary["shards_skipped"] >= done_at_kill and summary["shards_written"] == len(shards) - summary["shards_skipped"]
    table = pa.concat_tables([out.read_shard(n) for n in out.committed()])
    assert sorted(table.column("key").to_pylist()) == keys  # every image exactly once
    assert out.read_manifest()["num_rows"] == len(keys) == summary["set"]["images_out"]
