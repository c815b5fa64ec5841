import pyarrow as pa
import pytest

from pipelines.schema import CAPFILT, DOWNLOAD, SchemaError, conform, contract_of, validate


def download_row(**kw):
    row = dict(key="laion/0", source="laion", url="http://x/0.jpg", caption="a red circle", image=b"\xff\xd8",
               width=4, height=4, original_width=8, original_height=8, status="ok", error=None, sha256="ab")
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


def test_validate_refuses_a_file_declaring_another_contract():
    table = pa.Table.from_pylist([download_row()], schema=DOWNLOAD.arrow_schema())
    fake = table.schema.with_metadata({b"blip2.schema": b"download/999"})
    with pytest.raises(SchemaError, match="download/999"):
        validate(fake, DOWNLOAD)
