"""One partition of the download job, run inside a Ray task.

What is img2dataset's and what is ours:
  * fetching is img2dataset's ``download_image_with_retry`` (its User-Agent, X-Robots-Tag
    opt-out, retries) on a thread pool fed the way its ``Downloader`` feeds it (a semaphore
    bounds decoded-but-unwritten images to 2 × threads);
  * resizing and encoding is img2dataset's ``Resizer`` (cv2 + albumentations);
  * ours: the address guard (installed as the process's urllib opener, so img2dataset's
    ``urlopen`` goes through it), a PIL pre-check that refuses decompression bombs from the
    header before any pixel is decoded and catches truncated files that cv2 decodes silently,
    conversion of CMYK/palette/16-bit/alpha images to 8-bit RGB, and the mapping of every
    outcome to one status of the download contract.
"""
from __future__ import annotations

import hashlib
import io
import string
import time
import urllib.parse
import warnings
from multiprocessing.pool import ThreadPool
from threading import Semaphore

import numpy as np
import pyarrow as pa

from pipelines.config import DownloadConfig
from pipelines.netguard import Policy, installed
from pipelines.schema import DOWNLOAD
from pipelines.shardio import ShardSet

USER_AGENT_TOKEN = "blip2-pipeline"
DISALLOWED_HEADER_DIRECTIVES = {"noai", "noimageai", "noindex", "noimageindex"}  # img2dataset's defaults


class Rejected(Exception):
    """An image that is not kept; ``status`` is a download-contract status."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def status_of_fetch_error(message: str) -> str:
    """Map img2dataset's download error string to a contract status.

    img2dataset returns ``str(exception)``; our guard's errors carry ``blocked:`` /
    ``redirect_error:`` prefixes so they survive that conversion."""
    low = message.lower()
    if "blocked:" in low or "x-robots-tag" in low:
        return "blocked"
    if "redirect_error:" in low or "infinite loop" in low:
        return "redirect_error"
    if message.startswith("HTTP Error"):
        return "http_error"
    if "timed out" in low or "timeout" in low:
        return "timeout"
    return "network_error"


def _to_rgb(img):
    """Any PIL image → 8-bit RGB. Alpha is composited on white (as img2dataset does)."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.uint32)
        if img.mode.startswith("I;16") or arr.max(initial=0) > 255:  # 16-bit data: keep the top 8 bits
            arr = arr >> 8
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    elif img.mode == "F":
        img = Image.fromarray(np.asarray(img).clip(0, 255).astype(np.uint8))
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def check_image(data: bytes, max_pixels: int) -> tuple[bytes, int, int]:
    """Validate downloaded bytes; return bytes the Resizer can decode as 8-bit colour.

    Raises :class:`Rejected` with ``too_large`` (over ``max_pixels`` from the header, or
    PIL's own DecompressionBombError) or ``decode_error`` (not an image, corrupt, truncated).
    """
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise Rejected("too_large", f"{width}x{height} = {width * height} pixels > max_pixels {max_pixels}")
            img.load()  # full decode: truncated files fail here
        except Image.DecompressionBombError as e:
            raise Rejected("too_large", str(e)) from None
        except UnidentifiedImageError:
            raise Rejected("decode_error", "not a recognised image") from None
        except Rejected:
            raise
        except Exception as e:  # noqa: BLE001 — PIL raises many types for corrupt files
            raise Rejected("decode_error", f"{type(e).__name__}: {e}") from None
    if img.format == "JPEG" and img.mode == "RGB":
        return data, width, height  # the common case: hand the original bytes to cv2
    buf = io.BytesIO()
    _to_rgb(img).save(buf, format="BMP")  # lossless and cheap for cv2 to read back
    return buf.getvalue(), width, height


def _ascii_url(url: str) -> str:
    """Percent-encode non-ASCII characters (as browsers do); http.client refuses them otherwise."""
    return url if url.isascii() else urllib.parse.quote(url, safe=string.punctuation)


def _empty_row(row: dict, status: str, error: str | None) -> dict:
    return {"key": row["key"], "source": row["source"], "url": row["url"], "caption": row["caption"],
            "image": None, "width": None, "height": None, "original_width": None,
            "original_height": None, "status": status, "error": error, "sha256": None}


class PartitionDownloader:
    """Turns one partition (URL table + ``duplicate_of``) into download-contract rows."""

    def __init__(self, cfg: DownloadConfig):
        from img2dataset.resizer import Resizer

        self.cfg = cfg
        self.policy = Policy(tuple(cfg.allow_hosts), cfg.max_redirects)
        self.resizer = Resizer(image_size=cfg.image_size, resize_mode=cfg.resize_mode,
                               resize_only_if_bigger=False, encode_format="jpg",
                               encode_quality=cfg.encode_quality)

    def _finish(self, row: dict, data: bytes) -> dict:
        sha = hashlib.sha256(data).hexdigest()
        try:
            decodable, _, _ = check_image(data, self.cfg.max_pixels)
        except Rejected as r:
            out = _empty_row(row, r.status, str(r))
            out["sha256"] = sha
            return out
        img, width, height, ow, oh, err = self.resizer(io.BytesIO(decodable))
        if err is not None:
            out = _empty_row(row, "decode_error", err)
            out["sha256"] = sha
            return out
        return {**_empty_row(row, "ok", None), "image": img, "width": width, "height": height,
                "original_width": ow, "original_height": oh, "sha256": sha}

    def __call__(self, part: pa.Table) -> pa.Table:
        from img2dataset.downloader import download_image_with_retry

        with installed(self.policy) as guard:  # this process's urlopen goes through the guard
            return self._download(part, guard, download_image_with_retry)

    def _download(self, part: pa.Table, guard, download_image_with_retry) -> pa.Table:
        rows = part.to_pylist()
        out: list[dict | None] = [None] * len(rows)
        to_fetch = []
        for i, row in enumerate(rows):
            if row.get("caption_error"):
                out[i] = _empty_row(row, "bad_caption", row["caption_error"])
            elif row.get("duplicate_of"):
                out[i] = _empty_row(row, "duplicate", f"duplicate of {row['duplicate_of']}")
            elif (reason := guard.check_url(row["url"])) is not None:
                out[i] = _empty_row(row, "blocked", f"blocked: {reason}")
            else:
                to_fetch.append((i, _ascii_url(row["url"])))

        semaphore = Semaphore(self.cfg.threads * 2)  # bounds images held in memory, as img2dataset does

        def feed():
            for item in to_fetch:
                semaphore.acquire()
                yield item

        def fetch(item):
            return download_image_with_retry(item, timeout=self.cfg.timeout, retries=self.cfg.retries,
                                             user_agent_token=USER_AGENT_TOKEN,
                                             disallowed_header_directives=DISALLOWED_HEADER_DIRECTIVES)

        with ThreadPool(self.cfg.threads) as pool:
            for i, stream, err in pool.imap_unordered(fetch, feed()):
                try:
                    if err is not None or stream is None:
                        err = err or "empty response"
                        out[i] = _empty_row(rows[i], status_of_fetch_error(err), err)
                    else:
                        out[i] = self._finish(rows[i], stream.getvalue())
                        stream.close()
                except Exception as e:  # noqa: BLE001 — one bad row never ends the partition
                    out[i] = _empty_row(rows[i], "decode_error", f"{type(e).__name__}: {e}")
                finally:
                    semaphore.release()
        return pa.Table.from_pylist(out, schema=DOWNLOAD.schema)


def download_partitions(batch: pa.Table, cfg: DownloadConfig, output: str) -> pa.Table:
    """Ray Data ``map_batches`` function: download and commit every partition in ``batch``.

    Each block carries whole partitions (a ``partition`` column); one partition → one shard.
    Returns one small stats row per partition for the driver's progress and summary.
    """
    import pyarrow.compute as pc

    shards = ShardSet(output)
    downloader = PartitionDownloader(cfg)
    stats = {"partition": [], "rows": [], "ok": [], "seconds": [], "statuses": []}
    for index in sorted(set(batch.column("partition").to_pylist())):
        part = batch.filter(pc.equal(batch.column("partition"), index))
        if part.num_rows != part.column("partition_rows")[0].as_py():
            # Never commit part of a partition as its shard: that would drop rows silently.
            raise RuntimeError(f"partition {index}: got {part.num_rows} of "
                               f"{part.column('partition_rows')[0].as_py()} rows in one batch")
        start = time.time()
        table = downloader(part)
        shards.write_shard(index, table, DOWNLOAD)
        counts = {}
        for s in table.column("status").to_pylist():
            counts[s] = counts.get(s, 0) + 1
        stats["partition"].append(index)
        stats["rows"].append(table.num_rows)
        stats["ok"].append(counts.get("ok", 0))
        stats["seconds"].append(time.time() - start)
        stats["statuses"].append(",".join(f"{k}={v}" for k, v in sorted(counts.items())))
    return pa.table(stats)
