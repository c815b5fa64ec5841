"""The storage seam on the local disk and on S3 (a real moto server on 127.0.0.1)."""
from pathlib import Path

import fsspec
import pytest

from pipelines.storage import Staging, is_local, local_dir, staged_output


def remote_files(uri: str) -> dict[str, bytes]:
    fs, root = fsspec.core.url_to_fs(uri)
    fs.invalidate_cache()
    return {p.removeprefix(root + "/"): fs.cat(p) for p in fs.find(root)}


def write_tree(d: Path) -> dict[str, bytes]:
    files = {"model.safetensors": b"\x00" * 1000, "config.json": b"{}", "tokenizer/vocab.txt": b"a\nb\n",
             "tokenizer/deep/er.bin": b"x"}
    for name, data in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    return files


def test_is_local(tmp_path, s3_server):
    assert is_local(str(tmp_path)) and is_local(tmp_path) and is_local(f"file://{tmp_path}")
    assert is_local("runs/relative") and is_local(fsspec.filesystem("file"))
    assert not is_local("s3://bucket/run") and not is_local("memory://run")
    assert not is_local(fsspec.filesystem("s3")) and not is_local(fsspec.filesystem("memory"))


def test_staged_output_uploads_every_file_and_cleans_up(s3_bucket):
    uri = f"{s3_bucket}/runs/a/final"
    with staged_output(uri) as d:
        files = write_tree(d)
        (d / "latest-run").symlink_to(d / "tokenizer")  # links are not copied (W&B's latest-run)
        (d / "link.json").symlink_to(d / "config.json")
        assert remote_files(uri) == {}  # nothing lands before the body is done
    assert remote_files(uri) == files
    assert not d.exists()


def test_nothing_is_uploaded_when_the_body_raises(s3_bucket):
    uri = f"{s3_bucket}/runs/b/final"
    with pytest.raises(RuntimeError, match="half-written"):
        with staged_output(uri) as d:
            write_tree(d)
            raise RuntimeError("half-written")
    assert remote_files(f"{s3_bucket}/runs") == {}
    assert not d.exists()


def test_local_uris_are_written_in_place(tmp_path):
    for uri in (str(tmp_path / "plain"), f"file://{tmp_path}/url"):
        with staged_output(uri) as d:
            assert d == Path(uri.removeprefix("file://"))
            files = write_tree(d)
        assert {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()} == files
    with pytest.raises(RuntimeError):
        with staged_output(tmp_path / "partial") as d:
            (d / "a.txt").write_text("kept")  # written in place: no copy to skip
            raise RuntimeError
    assert (tmp_path / "partial" / "a.txt").read_text() == "kept"


def test_staging_uploads_the_named_members_again_and_again(s3_bucket, tmp_path):
    uri = f"{s3_bucket}/runs/c"
    staging = Staging(uri)
    (staging.path / "metrics.jsonl").write_text("1\n")
    (staging.path / "tensorboard").mkdir()
    (staging.path / "tensorboard" / "events").write_text("e1")
    (staging.path / "private.tmp").write_text("not asked for")
    staging.upload("metrics.jsonl", "tensorboard", "wandb")  # a missing member is no error
    assert remote_files(uri) == {"metrics.jsonl": b"1\n", "tensorboard/events": b"e1"}
    (staging.path / "metrics.jsonl").write_text("1\n2\n")
    staging.upload("metrics.jsonl")
    assert remote_files(uri)["metrics.jsonl"] == b"1\n2\n"
    staging.discard()
    assert not staging.path.exists()

    local = Staging(tmp_path / "run")
    assert local.local and local.path == tmp_path / "run" and local.path.is_dir()
    local.upload()
    local.discard()
    assert local.path.is_dir()


def test_local_dir_downloads_once_and_returns_local_paths_as_they_are(s3_bucket, tmp_path):
    uri = f"{s3_bucket}/models/tiny"
    with staged_output(uri) as d:
        files = write_tree(d)
    cache = tmp_path / "cache"
    got = Path(local_dir(uri, cache_root=cache))
    assert got.parent == cache and (got / ".complete").read_text() == uri
    assert {p.relative_to(got).as_posix(): p.read_bytes() for p in got.rglob("*")
            if p.is_file() and p.name != ".complete"} == files
    fsspec.filesystem("s3").pipe(f"{uri.removeprefix('s3://')}/config.json", b"changed")
    assert Path(local_dir(uri, cache_root=cache)) == got and (got / "config.json").read_bytes() == b"{}"
    assert local_dir(str(tmp_path), cache_root=cache) == str(tmp_path)
