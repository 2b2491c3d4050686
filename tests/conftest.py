"""Markers by directory, and the names of failed tests last.

Every test under tests/e2e and tests/cluster needs /dev/fuse, root and the
real clients, so each gets the `fuse` marker here: a `pytestmark` in a
conftest.py marks nothing (pytest reads it only from test modules), and
`-m "not fuse"` would otherwise select them all.

On CI pytest prints each failure's whole message in its short summary (a
bytes diff can run to hundreds of lines), and CI may keep only the tail
of the output: the names of the failed tests are printed once more, one
short line each, after everything else.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

FUSE_DIRS = tuple(Path(__file__).parent / d for d in ("e2e", "cluster"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(d in item.path.parents for d in FUSE_DIRS):
            item.add_marker(pytest.mark.fuse)


_failed: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed:
        _failed.append(report.nodeid if report.when == "call" else f"{report.nodeid} (in its {report.when})")


def pytest_unconfigure(config: pytest.Config) -> None:
    for name in _failed:
        print(f"failed: {name}", file=sys.__stdout__, flush=True)
