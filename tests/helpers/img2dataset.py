"""Folders written by the real img2dataset CLI, as users hold them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

FORMATS = ("webdataset", "parquet", "files")


def start_img2dataset(url_list: Path, out: Path, fmt: str, per_shard: int = 5) -> subprocess.Popen:
    exe = str(Path(sys.executable).with_name("img2dataset"))
    cmd = [exe, "--url_list", str(url_list), "--input_format", "parquet", "--url_col", "url", "--caption_col", "caption",
           "--output_format", fmt, "--output_folder", str(out), "--processes_count", "1", "--thread_count", "4",
           "--image_size", "64", "--number_sample_per_shard", str(per_shard), "--distributor", "multiprocessing",
           "--save_additional_columns", "['punsafe', 'similarity']"]
    return subprocess.Popen(cmd, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"img2dataset exited {proc.returncode}: {err[-2000:]}")


def img2dataset_folders(root: Path, base_url: str, items) -> tuple[dict[str, Path], dict[str, str]]:
    """({format: folder}, {url: caption}) for 12 loopback images and 2 broken URLs, in each format."""
    urls = [f"{base_url}/{it.file}" for it in items[:12]] + [f"{base_url}/status/404", "http://127.0.0.1:1/refused.jpg"]
    captions = [it.caption for it in items[:12]] + ["gone", "refused"]
    pq.write_table(pa.table({"url": urls, "caption": captions, "punsafe": [i / 100 for i in range(len(urls))],
                             "similarity": [0.3] * len(urls)}), root / "list.parquet")
    folders = {fmt: root / fmt for fmt in FORMATS}
    runs = [start_img2dataset(root / "list.parquet", folder, fmt) for fmt, folder in folders.items()]
    try:
        for proc in runs:  # side by side: each mostly waits on its own start-up and the loopback server
            finish(proc)
    finally:
        for proc in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return folders, dict(zip(urls[:12], captions[:12]))
