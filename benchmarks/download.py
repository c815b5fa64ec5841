"""`blip2 download` vs the raw img2dataset CLI, side by side on the same loopback URL lists.

    .venv/bin/python benchmarks/download.py [--cases small:2000,web:2000,web:8000] [--repeats 2]

Two image mixes, each served on 127.0.0.1 by nginx (one worker, sendfile) when it is installed,
else by Python's ``http.server`` (which then costs more CPU than either downloader):
  small  320 px JPEG squares (the synthetic corpus; cheap to decode);
  web    a web-like mix: widths 300-2000 px (log-uniform), aspect ratios 1:2-2:1, 80 % JPEG
         (quality 80-95), 20 % PNG, photo-like content (smooth gradients and sensor noise).
Both tools get the same list (parquet url/caption), the same process and thread counts and the
same resize settings (256 px keep_ratio, JPEG q95, no upscaling; img2dataset's EXIF extraction
off). Wall-clock time covers each whole command, start-up included; runs alternate between the
tools and the best of ``--repeats`` is kept per tool (the machine may be shared).

Then the driver's peak RSS (VmHWM): a full run of N URLs against N + 9N fast 404s, and
``--plan-only`` of 10x and 100x more rows, which is the driver's whole per-row cost.
Traffic stays on 127.0.0.1; img2dataset has no address guard, ours allows 127.0.0.1 explicitly.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestration.ray_session import free_port  # noqa: E402


def make_web_corpus(root: Path, n: int, seed: int = 0) -> list[str]:
    """``n`` web-like images (see the module docstring); returns their file names."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = []
    for i in range(n):
        w = int(round(300 * (2000 / 300) ** rng.random()))
        h = max(150, min(2000, int(round(w * 2 ** rng.uniform(-1, 1)))))
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        phase = rng.uniform(0, 6.28)
        base = np.stack([127 + 100 * np.sin(x / rng.uniform(40, 400) + phase),
                         127 + 100 * np.cos(y / rng.uniform(40, 400) - phase),
                         127 + 90 * np.sin((x + y) / rng.uniform(60, 600))], -1)
        noise = np.random.default_rng(seed * 100003 + i).normal(0, 6, base.shape)
        img = Image.fromarray((base + noise).clip(0, 255).astype(np.uint8))
        if rng.random() < 0.8:
            name = f"{i:05d}.jpg"
            img.save(root / name, format="JPEG", quality=rng.randint(80, 95))
        else:
            name = f"{i:05d}.png"
            img.save(root / name, format="PNG", compress_level=6)
        names.append(name)
    return names


def make_small_corpus(root: Path, n: int) -> list[str]:
    from pipelines.synthetic import make_corpus

    return [it.file for it in make_corpus(root, n=n, seed=0, size=320)]


def start_server(root: Path, kind: str) -> tuple[subprocess.Popen, str]:
    """nginx (sendfile, one worker) when it is installed, else Python's http.server. A Python
    server spends ~3-5 ms of CPU per 300 KB image: on 2 cores it, not the downloader, sets the pace."""
    if kind == "nginx":
        port = free_port()
        conf = root.parent / f"nginx-{root.name}.conf"
        conf.write_text(f"""daemon off; worker_processes 1; user root; pid {root.parent}/nginx-{root.name}.pid;
error_log {root.parent}/nginx-{root.name}.err;
events {{ worker_connections 4096; }}
http {{ access_log off; sendfile on; tcp_nopush on; keepalive_timeout 30;
  server {{ listen 127.0.0.1:{port}; root {root}; }} }}
""")
        proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(root.parent)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        import urllib.request

        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/missing", timeout=1)
            except OSError as e:
                if getattr(e, "code", None) == 404:
                    break
                time.sleep(0.1)
        return proc, f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
                             "--directory", str(root)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    port = int(re.search(r"port (\d+)", line).group(1))
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its pipe drained
    return proc, f"http://127.0.0.1:{port}"


def write_list(path: Path, base: str, files: list[str], n_ok: int, n_missing: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    urls = [f"{base}/{files[i % len(files)]}?i={i}" for i in range(n_ok)]
    urls += [f"{base}/missing/{i}.jpg" for i in range(n_missing)]
    pq.write_table(pa.table({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))]}), path)


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
    peak, out = 0.0, []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        peak = max(peak, peak_rss_mb(proc.pid) or 0.0)
        time.sleep(0.05)
    reader.join()
    if proc.returncode != 0:
        err.seek(0)
        raise RuntimeError(f"{cmd[:4]}... exited {proc.returncode}:\n{err.read().decode()[-2000:]}")
    return time.time() - start, peak, "".join(out)


def img2dataset_cmd(url_list: Path, out: Path, a) -> list[str]:
    exe = str(Path(sys.executable).with_name("img2dataset"))
    return [exe, "--url_list", str(url_list), "--input_format", "parquet", "--url_col", "url",
            "--caption_col", "caption", "--output_format", "parquet", "--output_folder", str(out),
            "--processes_count", str(a.processes), "--thread_count", str(a.threads),
            "--image_size", str(a.image_size), "--resize_mode", "keep_ratio", "--resize_only_if_bigger", "True",
            "--encode_quality", "95", "--timeout", "10", "--number_sample_per_shard", str(a.rows_per_shard),
            "--extract_exif", "False", "--distributor", "multiprocessing"]


def img2dataset_ok(out: Path) -> int:
    return sum(json.loads(Path(p).read_text())["successes"] for p in glob.glob(f"{out}/*_stats.json"))


def ours_cmd(url_list: Path, out: Path, a, *extra: str) -> list[str]:
    return [sys.executable, "-m", "orchestration.cli", "download", "--input", str(url_list),
            "--source", "generic", "--output", str(out), "--no-progress", *extra,
            f"download.image_size={a.image_size}", "download.resize_mode=keep_ratio",
            f"download.threads={a.threads}", f"download.rows_per_shard={a.rows_per_shard}",
            f"download.concurrency={a.processes}", f"ray.num_cpus={a.processes}",
            "download.max_per_host=1000", "download.allow_hosts=[127.0.0.1]"]


def ours_ok(out: Path) -> int:
    return json.loads((out / "_manifest.json").read_text())["summary"]["by_status"]["ok"]


def compare(tmp: Path, case: str, n: int, a, env: dict) -> tuple[float, dict]:
    """Best wall time per tool on one list; returns (ratio ours/img2dataset in images/s, figures)."""
    files = corpora(tmp, case, a)
    server, base = start_server(tmp / f"corpus-{case}", a.server)
    try:
        write_list(tmp / f"{case}-{n}.parquet", base, files, n)
        tools = [("img2dataset CLI", img2dataset_cmd, img2dataset_ok), ("blip2 download", ours_cmd, ours_ok)]
        best: dict[str, tuple] = {}
        for rep in range(a.repeats):
            for name, cmd, count_ok in tools:
                out = tmp / f"out-{case}-{n}-{name.split()[0]}-{rep}"
                wall, rss, _ = timed(cmd(tmp / f"{case}-{n}.parquet", out, a), env)
                ok = count_ok(out)
                print(f"    {case} {n}: run {rep + 1}: {name}: {ok} ok in {wall:.1f}s", flush=True)
                if name not in best or wall < best[name][1]:
                    best[name] = (ok, wall, rss)
    finally:
        server.terminate()
        server.wait(10)
    (ok_i, wall_i, _), (ok_o, wall_o, rss_o) = best["img2dataset CLI"], best["blip2 download"]
    return (ok_o / wall_o) / (ok_i / wall_i), {"img2dataset": (ok_i, wall_i), "ours": (ok_o, wall_o), "rss": rss_o}


_CORPORA: dict[str, list[str]] = {}


def corpora(tmp: Path, case: str, a) -> list[str]:
    if case not in _CORPORA:
        root = tmp / f"corpus-{case}"
        _CORPORA[case] = make_small_corpus(root, a.distinct) if case == "small" else make_web_corpus(root, a.distinct)
    return _CORPORA[case]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="small:2000,web:2000,web:8000", help="mix:URLs, comma separated")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--rows-per-shard", type=int, default=500)
    p.add_argument("--distinct", type=int, default=400, help="distinct images per mix (URLs repeat them)")
    p.add_argument("--repeats", type=int, default=1, help="alternating runs per tool; the best is kept")
    p.add_argument("--rss-n", type=int, default=2000, help="N of the driver-RSS runs")
    p.add_argument("--server", choices=["nginx", "python"], default="nginx" if shutil.which("nginx") else "python",
                   help="the loopback image server (default: nginx when installed: apt-get install nginx-light)")
    a = p.parse_args()
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)  # `blip2` starts a fresh local Ray (ensure_ray)
    print(f"{a.processes} processes x {a.threads} threads, resize {a.image_size} keep_ratio, {os.cpu_count()} CPUs, "
          f"{a.server} server, load average {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-download-") as tmp:
        tmp = Path(tmp)
        results = []
        for spec in a.cases.split(","):
            case, n = spec.split(":")
            results.append((case, int(n), *compare(tmp, case, int(n), a, env)))
        print(f"\n{'mix':<7}{'URLs':>7}{'img2dataset img/s':>19}{'blip2 img/s':>13}{'ratio':>8}")
        for case, n, ratio, f in results:
            (ok_i, wall_i), (ok_o, wall_o) = f["img2dataset"], f["ours"]
            print(f"{case:<7}{n:>7}{ok_i / wall_i:>19.1f}{ok_o / wall_o:>13.1f}{ratio:>7.2f}x"
                  f"   ({ok_i} ok in {wall_i:.1f}s vs {ok_o} ok in {wall_o:.1f}s)")

        # Driver memory: the whole job on N good + 9N fast-404 URLs, then plans of 10x and 100x more rows.
        files = corpora(tmp, "small", a)
        server, base = start_server(tmp / "corpus-small", a.server)
        try:
            n = a.rss_n
            write_list(tmp / "rss-n.parquet", base, files, n)
            write_list(tmp / "rss-10n.parquet", base, files, n, n_missing=9 * n)
            write_list(tmp / "rss-100n.parquet", base, files, n, n_missing=99 * n)
            _, rss_n, _ = timed(ours_cmd(tmp / "rss-n.parquet", tmp / "rss-out-n", a), env)
            wall10, rss_10n, _ = timed(ours_cmd(tmp / "rss-10n.parquet", tmp / "rss-out-10n", a), env)
            _, plan_10n, _ = timed(ours_cmd(tmp / "rss-10n.parquet", tmp / "plan-10n", a, "--plan-only"), env)
            wall100, plan_100n, _ = timed(ours_cmd(tmp / "rss-100n.parquet", tmp / "plan-100n", a, "--plan-only"), env)
        finally:
            server.terminate()
            server.wait(10)
        print(f"\ndriver peak RSS, whole job: N={n}: {rss_n:.0f} MB, 10N={10 * n} (9N fast 404s): {rss_10n:.0f} MB "
              f"({rss_10n / rss_n:.2f}x; target within +-20%), 10N wall {wall10:.1f}s")
        print(f"driver peak RSS, --plan-only: {10 * n} rows {plan_10n:.0f} MB, {100 * n} rows {plan_100n:.0f} MB "
              f"({plan_100n / plan_10n:.2f}x for 10x the rows; target <= 1.2x), {100 * n} rows planned in {wall100:.1f}s")


if __name__ == "__main__":
    main()
