"""Markers by directory.

Every test under tests/e2e and tests/cluster needs /dev/fuse, root and the
real clients, so each gets the `fuse` marker here: a `pytestmark` in a
conftest.py marks nothing (pytest reads it only from test modules), and
`-m "not fuse"` would otherwise select them all.
"""

from __future__ import annotations

from pathlib import Path

import pytest

FUSE_DIRS = tuple(Path(__file__).parent / d for d in ("e2e", "cluster"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(d in item.path.parents for d in FUSE_DIRS):
            item.add_marker(pytest.mark.fuse)
