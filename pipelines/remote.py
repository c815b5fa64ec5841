"""Model directories may live on S3: copy them to a local cache once so ``from_pretrained`` can read them."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import fsspec


def local_dir(uri: str, cache_root: str | os.PathLike | None = None) -> str:
    """A local directory with the contents of ``uri`` (returned as is when already local).

    Remote copies land in ``cache_root`` (default ``~/.cache/blip2-pipeline/models``) under a
    hash of the URI and are marked complete only after every file arrived.
    """
    fs, root = fsspec.core.url_to_fs(uri)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        return root
    cache = Path(cache_root or Path.home() / ".cache" / "blip2-pipeline" / "models")
    dest = cache / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not (dest / ".complete").exists():
        dest.mkdir(parents=True, exist_ok=True)
        fs.get(root.rstrip("/") + "/", str(dest) + "/", recursive=True)
        (dest / ".complete").write_text(uri)
    return str(dest)
