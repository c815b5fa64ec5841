"""The `ray start --head` node the job-submission tests share; it stops after this package's
last test, so its processes do not idle through the rest of the session."""
from __future__ import annotations

import pytest

from tests.helpers.servers import RayHead


@pytest.fixture(scope="package")
def ray_head(s3_server):
    """A `ray start --head` node with the job server, for `ray job submit` tests."""
    head = RayHead(num_cpus=2)
    try:
        head.wait_ready()
        yield head
    finally:
        head.stop()
