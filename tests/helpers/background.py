"""Tests whose slow part mostly waits (a fake cluster's deadlines, health checks and restarts)
start that part when the session starts, so the waiting overlaps the tests run before them.

``@pytest.mark.background(start=f)``: once the session is collected (and only for selected
tests), ``f(workdir)`` is called with a fresh directory and returns a handle with
``result()`` and ``stop()``; the test takes it with :func:`handle` and asks for ``result()``.
Handles still running when the session ends are stopped (tests/conftest.py). A start that
raises fails its test, not the session."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

HANDLE = pytest.StashKey[object]()


def start_marked(items, root: Path) -> list:
    """Start the background part of every item marked ``background``; their handles."""
    handles = []
    for item in items:
        mark = item.get_closest_marker("background")
        if mark is not None:
            workdir = Path(root) / re.sub(r"\W+", "_", item.name)[:80]
            workdir.mkdir(parents=True)
            try:
                item.stash[HANDLE] = mark.kwargs["start"](workdir)
            except Exception as e:  # noqa: BLE001 - raised again by the test's result()
                item.stash[HANDLE] = _FailedStart(e)
            handles.append(item.stash[HANDLE])
    return handles


class _FailedStart:
    def __init__(self, error: Exception):
        self.error = error

    def result(self):
        raise self.error

    def stop(self) -> None:
        pass


def handle(request):
    """The running background part of the requesting test."""
    return request.node.stash[HANDLE]
