import pyarrow as pa
import pytest

from pipelines.schema import CAPFILT, DOWNLOAD, SchemaError, conform, contract_of, validate
from tests.helpers.shards import download_row as _row


def download_row(**kw):
    row = _row("laion/0", "a red circle", b"\xff\xd8", source="laion", url="http://x/0.jpg", size=4)
    row.update(kw)
    return row


def test_conform_orders_columns_and_tags_contract():
    rows = [download_row()]
    table = pa.Table.from_pylist(rows, schema=DOWNLOAD.schema).select(list(reversed(DOWNLOAD.schema.names)))
    out = conform(table, DOWNLOAD)
    assert out.schema.names == DOWNLOAD.schema.names
    assert contract_of(out.schema) is DOWNLOAD
    assert out.to_pylist()[0]["caption"] == "a red circle"


def test_validate_names_missing_and_mistyped_columns():
    table = pa.table({"key": ["a"], "source": ["s"], "image": ["not-bytes"]})
    with pytest.raises(SchemaError) as e:
        validate(table.schema, CAPFILT, where="shard.parquet")
    msg = str(e.value)
    assert "shard.parquet" in msg and "missing column 'captions'" in msg
    assert "column 'image' is string, expected binary" in msg


def test_an_older_contract_version_is_refused_with_what_to_do():
    table = pa.Table.from_pylist([download_row()], schema=DOWNLOAD.arrow_schema())
    old = table.schema.with_metadata({b"blip2.schema": f"download/{DOWNLOAD.version - 1}".encode()})
    with pytest.raises(SchemaError, match=r"older download/\d+ format.*re-run the job"):
        validate(old, DOWNLOAD, where="part-00000.parquet")


def test_validate_refuses_a_file_declaring_another_contract():
    table = pa.Table.from_pylist([download_row()], schema=DOWNLOAD.arrow_schema())
    fake = table.schema.with_metadata({b"blip2.schema": b"download/999"})
    with pytest.raises(SchemaError, match="download/999"):
        validate(fake, DOWNLOAD)
