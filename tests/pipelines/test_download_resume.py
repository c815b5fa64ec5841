"""Resume after `kill -9` of the `blip2 download` driver: every URL ends up exactly once."""
from __future__ import annotations

import hashlib
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

REPO = Path(__file__).resolve().parents[2]
N_URLS, ROWS_PER_SHARD = 48, 6


def download_args(list_path: Path, out: Path) -> list[str]:
    return ["download", "--config", "tiny", "--input", str(list_path), "--source", "cc12m", "--output", str(out),
            "--no-progress", f"download.rows_per_shard={ROWS_PER_SHARD}", "download.threads=2", "ray.num_cpus=2"]


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own fresh local Ray
    env["PYTHONPATH"] = str(REPO)
    return env


@pytest.mark.slow
def test_kill_9_mid_run_then_resume(tmp_path, http_server, corpus, ray_local, capsys):
    """The driver is killed between shards; the same command run again (in this process, on the
    session's Ray) commits the rest."""
    items = corpus[1]
    # Slow responses keep the job running long enough to be killed between shards.
    lines = [f"{http_server.base_url}/sleep/0.4/{items[i % len(items)].file}?copy={i}\t{items[i % len(items)].caption}"
             for i in range(N_URLS)]
    (tmp_path / "list.tsv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"

    args = download_args(tmp_path / "list.tsv", out)
    proc = subprocess.Popen([sys.executable, "-m", "orchestration.cli", *args], cwd=REPO, env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list(out.glob("part-*.parquet")):
            assert proc.poll() is None, "download exited before the first shard was committed"
            time.sleep(0.1)
        committed_at_kill = len(list(out.glob("part-*.parquet")))
        proc.send_signal(signal.SIGKILL)  # kill -9 of the driver
        proc.wait(30)
    finally:
        try:  # anything the driver left in its session (Ray fate-shares, this is belt and braces)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    total_shards = N_URLS // ROWS_PER_SHARD
    assert 1 <= committed_at_kill < total_shards
    assert not (out / "_manifest.json").exists()

    capsys.readouterr()
    rc = main(args)
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stderr[-3000:]
    assert "complete" in stdout and "ok" in stdout

    shards = ShardSet(str(out))
    table = pa.concat_tables([shards.read_shard(n, DOWNLOAD) for n in shards.committed()])
    keys = table.column("key").to_pylist()
    assert sorted(keys) == sorted(f"cc12m/{i}" for i in range(N_URLS)) and len(set(keys)) == N_URLS
    urls = table.column("url").to_pylist()
    assert len(set(urls)) == N_URLS
    assert set(table.column("status").to_pylist()) == {"ok"}

    manifest = shards.read_manifest()
    assert manifest["num_rows"] == N_URLS and manifest["num_shards"] == total_shards
    for entry in manifest["shards"]:
        data = (out / entry["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
    summary = manifest["summary"]
    assert summary["resumed_rows"] >= committed_at_kill * ROWS_PER_SHARD
    assert summary["resumed_rows"] + summary["this_run_rows"] == N_URLS
