"""A download-contract shard set built from the synthetic corpus, with the web's bad rows mixed in."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.schema import DOWNLOAD
from tests.helpers.shards import hostile_shards, write_set


@pytest.fixture(scope="session")
def hostile_input(tmp_path_factory, corpus):
    """(uri, expected): a local download shard set with the bad rows of :func:`hostile_shards`."""
    corpus_dir, items = corpus
    shards, expected = hostile_shards(Path(corpus_dir), items)
    uri = str(tmp_path_factory.mktemp("download") / "set")
    write_set(uri, DOWNLOAD, shards)
    return uri, expected
