"""The type hints are checked, not just written."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def test_mypy_is_clean():
    pytest.importorskip("mypy")
    res = subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports", "vdifs"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
