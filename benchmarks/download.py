"""`blip2 download` vs the raw img2dataset CLI, side by side on one loopback URL list.

    .venv/bin/python benchmarks/download.py [--n 2000] [--processes 2] [--threads 16]

Both tools get the same URL list (parquet, url/caption), the same server (Python's
ThreadingHTTPServer in its own process on 127.0.0.1), the same process and thread counts
and the same resize settings (256 px, keep_ratio, JPEG q95; img2dataset's EXIF extraction
is off since we do not extract EXIF). Wall-clock time covers each whole command, start-up
included. Then the peak RSS (VmHWM) of our driver process for N and 10×N URLs, where the
extra 9×N URLs are fast 404s so the comparison measures the driver's per-URL cost.
Traffic stays on 127.0.0.1; img2dataset has no address guard, ours allows 127.0.0.1 explicitly.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.synthetic import make_corpus  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import urllib.request

    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}"


def write_list(path: Path, base: str, items, n_ok: int, n_missing: int = 0) -> None:
    urls = [f"{base}/{items[i % len(items)].file}?i={i}" for i in range(n_ok)]
    caps = [items[i % len(items)].caption for i in range(n_ok)]
    urls += [f"{base}/missing/{i}.jpg" for i in range(n_missing)]
    caps += ["missing"] * n_missing
    pq.write_table(pa.table({"url": urls, "caption": caps}), path)


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def timed(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB of the command's own process, stdout)."""
    start = time.time()
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
    peak = 0.0
    out_chunks = []
    import threading

    reader = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        peak = max(peak, peak_rss_mb(proc.pid) or 0.0)
        time.sleep(0.05)
    reader.join()
    wall = time.time() - start
    if proc.returncode != 0:
        err.seek(0)
        raise RuntimeError(f"{cmd[:4]}... exited {proc.returncode}:\n{err.read().decode()[-2000:]}")
    return wall, peak, "".join(out_chunks)


def img2dataset_cmd(url_list: Path, out: Path, a, distributor: str) -> list[str]:
    exe = str(Path(sys.executable).with_name("img2dataset"))
    return [exe, "--url_list", str(url_list), "--input_format", "parquet", "--url_col", "url",
            "--caption_col", "caption", "--output_format", "parquet", "--output_folder", str(out),
            "--processes_count", str(a.processes), "--thread_count", str(a.threads),
            "--image_size", str(a.image_size), "--resize_mode", "keep_ratio", "--encode_quality", "95",
            "--timeout", "10", "--number_sample_per_shard", str(a.rows_per_shard), "--extract_exif", "False",
            "--distributor", distributor]


def img2dataset_ok(out: Path) -> int:
    return sum(json.loads(Path(p).read_text())["successes"] for p in glob.glob(f"{out}/*_stats.json"))


def ours_cmd(url_list: Path, out: Path, a) -> list[str]:
    return [sys.executable, "-m", "orchestration.cli", "download", "--input", str(url_list),
            "--source", "generic", "--output", str(out), "--no-progress",
            f"download.image_size={a.image_size}", "download.resize_mode=keep_ratio",
            f"download.threads={a.threads}", f"download.rows_per_shard={a.rows_per_shard}",
            f"download.concurrency={a.processes}", f"ray.num_cpus={a.processes}",
            "download.allow_hosts=[127.0.0.1]"]


def ours_ok(out: Path) -> int:
    manifest = json.loads((out / "_manifest.json").read_text())
    return manifest["summary"]["by_status"]["ok"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000, help="URLs in the throughput list (>= 2000)")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--rows-per-shard", type=int, default=500)
    p.add_argument("--distinct-images", type=int, default=400)
    p.add_argument("--skip-ray-distributor", action="store_true")
    p.add_argument("--repeats", type=int, default=1, help="interleaved runs per tool; the best is reported")
    a = p.parse_args()

    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)  # `blip2` starts a fresh local Ray (ensure_ray)
    with tempfile.TemporaryDirectory(prefix="bench-download-") as tmp:
        tmp = Path(tmp)
        items = make_corpus(tmp / "corpus", n=a.distinct_images, seed=0, size=320)
        server, base = start_server(tmp / "corpus")
        try:
            write_list(tmp / "n.parquet", base, items, a.n)
            write_list(tmp / "10n.parquet", base, items, a.n, n_missing=9 * a.n)
            print(f"{a.n} URLs over loopback ({a.distinct_images} distinct 320px JPEGs), "
                  f"{a.processes} processes x {a.threads} threads, resize {a.image_size} keep_ratio, "
                  f"{os.cpu_count()} CPUs", flush=True)

            # Interleaved repeats, best wall time per tool: the machine may be shared and noisy.
            tools = [("img2dataset CLI (multiprocessing)",
                      lambda out: img2dataset_cmd(tmp / "n.parquet", out, a, "multiprocessing"), img2dataset_ok, env),
                     ("blip2 download (Ray Data)", lambda out: ours_cmd(tmp / "n.parquet", out, a), ours_ok, env)]
            if not a.skip_ray_distributor:
                # img2dataset's ray distributor auto-inits Ray: make that a fresh local one too
                tools.append(("img2dataset CLI (--distributor ray)",
                              lambda out: img2dataset_cmd(tmp / "n.parquet", out, a, "ray"), img2dataset_ok,
                              {**env, "RAY_ADDRESS": "local"}))
            best: dict[str, tuple] = {}
            for rep in range(a.repeats):
                for t, (name, cmd, count_ok, tool_env) in enumerate(tools):
                    out = tmp / f"out-{t}-{rep}"
                    wall, rss, _ = timed(cmd(out), tool_env)
                    ok = count_ok(out)
                    print(f"  run {rep + 1}: {name}: {ok} ok in {wall:.1f}s", flush=True)
                    if name not in best or wall < best[name][1]:
                        best[name] = (ok, wall, rss)
            rows = [(name, *best[name]) for name, *_ in tools]
            rss_n = rows[1][3]

            print(f"\n{'tool':<38}{'ok':>7}{'wall s':>9}{'images/s':>10}{'peak RSS MB':>13}")
            for name, ok, wall, rss in rows:
                print(f"{name:<38}{ok:>7}{wall:>9.1f}{ok / wall:>10.1f}{rss:>13.0f}")
            ratio = (rows[1][1] / rows[1][2]) / (rows[0][1] / rows[0][2])
            print(f"\nthroughput ratio blip2/img2dataset: {ratio:.3f} (target >= 0.95)")

            wall10, rss_10n, _ = timed(ours_cmd(tmp / "10n.parquet", tmp / "ours10", a), env)
            print(f"driver peak RSS: N={a.n}: {rss_n:.0f} MB, 10xN={10 * a.n} (9N fast 404s): {rss_10n:.0f} MB "
                  f"({100 * (rss_10n / rss_n - 1):+.1f}%, target within +-20%); 10xN wall {wall10:.1f}s, "
                  f"{ours_ok(tmp / 'ours10')} ok")
        finally:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    main()
