"""Where files live: the one place that knows local paths from object stores.

* :func:`is_local` — is this filesystem (or URI) the local disk?
* :func:`staged_output` — write a folder for a URI locally; it is uploaded when the body ends
  cleanly (local URIs are written in place). :class:`Staging` is the same for writers that
  upload again and again (metrics, tracker files).
* :func:`local_dir` — a local copy of a remote folder, downloaded once (``from_pretrained``
  readers need paths); a Hugging Face Hub id (``facebook/opt-2.7b``) resolves to its snapshot
  in the HF cache (:func:`hub_snapshot`).

Storage options come from the environment only (``AWS_ENDPOINT_URL``, the standard AWS
credential chain), as in :mod:`pipelines.shardio`.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import fsspec

_LOCAL_PROTOCOLS = ("file", "local")


def is_local(fs_or_uri) -> bool:
    """True for the local disk: a local path, a ``file://`` URI or a local fsspec filesystem."""
    fs = fs_or_uri
    if isinstance(fs, (str, os.PathLike)):
        fs = fsspec.core.url_to_fs(os.fspath(fs))[0]
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return any(p in _LOCAL_PROTOCOLS for p in protocols)


class Staging:
    """A local folder standing for ``uri``: the folder itself when ``uri`` is local, else a
    temporary one whose files :meth:`upload` copies to ``uri``."""

    def __init__(self, uri: str | os.PathLike, prefix: str = "blip2-staging-"):
        self.fs, root = fsspec.core.url_to_fs(os.fspath(uri))
        self.root = root.rstrip("/")
        self.local = is_local(self.fs)
        self.path = Path(self.root) if self.local else Path(tempfile.mkdtemp(prefix=prefix))
        self.path.mkdir(parents=True, exist_ok=True)

    def upload(self, *names: str) -> None:
        """Copy the regular files at or under each named member (all of them when none is named)
        to ``uri``; nothing to do when it is local. Links are skipped (W&B's ``latest-run``)."""
        if self.local:
            return
        files = [f for name in names or (".",) for f in _regular_files(self.path / name)]
        if files:  # lists: fsspec copies them concurrently and makes no remote "folders"
            self.fs.put([str(f) for f in files],
                        [f"{self.root}/{f.relative_to(self.path).as_posix()}" for f in files])

    def discard(self) -> None:
        """Remove the temporary folder (a local ``uri`` is left as it is)."""
        if not self.local:
            shutil.rmtree(self.path, ignore_errors=True)


def _regular_files(path: Path) -> list[Path]:
    if path.is_symlink():
        return []
    if path.is_file():
        return [path]
    out = []
    for dirpath, _dirs, files in os.walk(path):  # does not descend into linked folders
        out += [p for n in sorted(files) if (p := Path(dirpath) / n).is_file() and not p.is_symlink()]
    return out


@contextmanager
def staged_output(uri: str | os.PathLike, prefix: str = "blip2-out-") -> Iterator[Path]:
    """A local folder to write ``uri``'s files into. When the body returns they are uploaded
    before the context exits, so whatever the caller does next (a manifest, a reported
    checkpoint) follows them; when it raises nothing is uploaded. A local ``uri`` is the folder."""
    out = Staging(uri, prefix)
    try:
        yield out.path
        out.upload()
    finally:
        out.discard()


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def is_hub_id(uri: str) -> bool:
    """``org/name`` or ``name`` that is no URI and no existing local path: a Hub model id."""
    return "://" not in uri and bool(_HUB_ID.match(uri)) and not os.path.exists(uri)


def hub_snapshot(repo_id: str, allow_patterns: list[str] | None = None, revision: str | None = None,
                 cache_dir: str | None = None) -> str:
    """The local snapshot folder of a Hub model, downloaded into the HF cache unless it is there
    (``HF_HUB_OFFLINE=1``: the cache only; ``HF_HOME`` / ``HF_HUB_CACHE`` say where it is)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return snapshot_download(repo_id, allow_patterns=allow_patterns, revision=revision, cache_dir=cache_dir)
    except (LocalEntryNotFoundError, RepositoryNotFoundError) as e:
        where = cache_dir or constants.HF_HUB_CACHE
        how = ("HF_HUB_OFFLINE=1 allows the cache only: unset it on a machine that reaches the Hub, or copy "
               "the model's cache folder there" if constants.HF_HUB_OFFLINE else "check the id and the network")
        raise FileNotFoundError(f"{repo_id!r} is no local folder or URI, and as a Hugging Face Hub model it is "
                                f"not in the HF cache {where} ({type(e).__name__}); {how}; or stage it with "
                                f"`blip2 stage-models` and name the staged folder") from None


def local_dir(uri: str, cache_root: str | os.PathLike | None = None) -> str:
    """A local directory with the contents of ``uri`` (returned as is when already local; a Hub
    id: its snapshot in the HF cache).

    Remote copies land in ``cache_root`` (default ``~/.cache/blip2-pipeline/models``) under a
    hash of the URI and are marked complete only after every file arrived.
    """
    if is_hub_id(uri):
        return hub_snapshot(uri)
    fs, root = fsspec.core.url_to_fs(uri)
    if is_local(fs):
        return root
    cache = Path(cache_root or Path.home() / ".cache" / "blip2-pipeline" / "models")
    dest = cache / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not (dest / ".complete").exists():
        dest.mkdir(parents=True, exist_ok=True)
        fs.get(root.rstrip("/") + "/", str(dest) + "/", recursive=True)
        (dest / ".complete").write_text(uri)
    return str(dest)
