import hashlib
import json

import pyarrow as pa
import pytest

from pipelines.schema import DOWNLOAD, SchemaError
from pipelines.shardio import ShardSet, redact, shard_name
from tests.helpers.shards import download_row


def table(n, start=0):
    return pa.Table.from_pylist([download_row(f"s/{i}", f"c{i}", None, "http_error", source="s", error="404")
                                 for i in range(start, start + n)], schema=DOWNLOAD.schema)


@pytest.fixture(params=["local", "s3"])
def shard_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "set")
    return request.getfixturevalue("s3_bucket") + "/prefix/set"


def test_write_commit_and_manifest(shard_uri):
    shards = ShardSet(shard_uri)
    assert shards.committed() == []
    info0 = shards.write_shard(0, table(3), DOWNLOAD)
    shards.write_shard(2, table(5, 3), DOWNLOAD)
    assert shards.committed() == [shard_name(0), shard_name(2)]
    assert shards.committed_indices() == {0, 2}
    data = shards.fs.cat(shards.path(shard_name(0)))
    assert info0.sha256 == hashlib.sha256(data).hexdigest() and info0.rows == 3
    manifest = shards.write_manifest(DOWNLOAD, config={"output": shard_uri, "aws_secret_access_key": "x"})
    assert manifest["num_rows"] == 8 and manifest["schema"] == DOWNLOAD.tag
    assert manifest["config"]["aws_secret_access_key"] == "<redacted>"
    assert json.loads(shards.fs.cat(shards.path("_manifest.json")))["num_shards"] == 2
    keys = [r["key"] for _, b in shards.iter_batches(DOWNLOAD) for r in b.to_pylist()]
    assert keys == [f"s/{i}" for i in range(8)]


def test_committed_sizes_lists_only_shards_with_their_sizes(shard_uri):
    shards = ShardSet(shard_uri)
    assert shards.committed_sizes() == {}
    shards.write_shard(1, table(2), DOWNLOAD)
    shards.write_shard(0, table(4), DOWNLOAD)
    shards.put("notes.txt", b"not a shard")
    sizes = shards.committed_sizes()
    assert list(sizes) == [shard_name(0), shard_name(1)] == shards.committed()
    assert sizes == {n: shards.fs.size(shards.path(n)) for n in sizes}


def test_no_temporary_files_left_behind(tmp_path):
    shards = ShardSet(str(tmp_path / "set"))
    shards.write_shard(1, table(2), DOWNLOAD)
    names = sorted(p.name for p in (tmp_path / "set").iterdir())
    assert names == ["_commits", "part-00001.parquet"]


def test_check_schema_refuses_wrong_input(tmp_path):
    import pyarrow.parquet as pq

    (tmp_path / "bad").mkdir()
    pq.write_table(pa.table({"url": ["u"]}), tmp_path / "bad" / "part-00000.parquet")
    with pytest.raises(SchemaError, match="missing column 'key'"):
        ShardSet(str(tmp_path / "bad")).check_schema(DOWNLOAD)
    with pytest.raises(SchemaError, match="no committed shards"):
        ShardSet(str(tmp_path / "empty")).check_schema(DOWNLOAD)


def test_redact_nested():
    assert redact({"a": {"AWS_SECRET_ACCESS_KEY": "s", "x": [{"token": 1}]}}) == {
        "a": {"AWS_SECRET_ACCESS_KEY": "<redacted>", "x": [{"token": "<redacted>"}]}}


def test_redact_matches_whole_secret_names_and_no_config_key():
    """Every key of every preset's config is printed as it is (num_query_tokens, max_new_tokens,
    tokenizer, ... were ``<redacted>`` under a substring rule); credential names are redacted."""
    from orchestration.config import available_presets, load_config, to_dict

    def keys(d, prefix=""):
        for k, v in d.items():
            yield f"{prefix}{k}"
            if isinstance(v, dict):
                yield from keys(v, f"{prefix}{k}.")

    for preset in available_presets():
        cfg = to_dict(load_config(preset))
        all_keys = sorted(keys(cfg))
        assert {"model.num_query_tokens", "eval.max_new_tokens", "eval.tokenizer"} <= set(all_keys)
        out = redact(cfg)

        def redacted(d, prefix=""):
            for k, v in d.items():
                if v == "<redacted>":
                    yield f"{prefix}{k}"
                elif isinstance(v, dict):
                    yield from redacted(v, f"{prefix}{k}.")

        assert list(redacted(out)) == [], preset
    secrets = {"password": 1, "Token": 2, "AWS_SECRET_ACCESS_KEY": 3, "hf-token": 4, "wandb_api_key": 5,
               "not_a_token_count": 6, "tokens": 7, "secretary": 8}
    assert redact({"eval": {"extra": secrets}}) == {"eval": {"extra": {
        "password": "<redacted>", "Token": "<redacted>", "AWS_SECRET_ACCESS_KEY": "<redacted>", "hf-token": "<redacted>",
        "wandb_api_key": "<redacted>", "not_a_token_count": 6, "tokens": 7, "secretary": 8}}}


def test_redact_strips_passwords_from_url_values():
    got = redact({"mlflow_tracking_uri": "http://u:auditPass@h:5000/x", "list": ["s3://key:secret@bucket/p"],
                  "plain": "http://h/path?q=a:b@c", "email": "someone@example.org"})
    assert got == {"mlflow_tracking_uri": "http://u:<redacted>@h:5000/x", "list": ["s3://key:<redacted>@bucket/p"],
                   "plain": "http://h/path?q=a:b@c", "email": "someone@example.org"}


def test_blip2_config_prints_no_password(capsys):
    from orchestration.cli import main

    assert main(["config", "--config", "tiny", "tracking.wandb_project=", "download.url_prefix=http://u:SENTINEL@h/"]) == 0
    out = capsys.readouterr().out
    assert "SENTINEL" not in out and "http://u:<redacted>@h/" in out
    assert main(["config", "--config", "tiny", "tracking.mlflow_tracking_uri=http://u:SENTINEL@127.0.0.1:9/"]) == 2
    assert "MLFLOW_TRACKING_PASSWORD" in capsys.readouterr().err
