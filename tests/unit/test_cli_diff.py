"""`vdifs vdi import-diff`'s undo: what it waits for, and what it does not."""

from __future__ import annotations

import errno

import pytest

from vdifs.cli import diff
from vdifs.errors import StoreBusy, VdifsError


def test_an_undo_waits_while_the_mount_still_counts_our_closed_handle():
    """EBUSY ("open for writing") right after our own close is the kernel's
    RELEASE still on its way: the undo is tried again until it lands."""
    tries = []

    def undo():
        tries.append(1)
        if len(tries) < 3:
            raise StoreBusy("VDI 'dst' is open for writing: stop its VM before a rollback")
        return "rolled back"

    assert diff.while_our_close_lands(undo) == "rolled back" and len(tries) == 3


def test_an_undo_gives_up_on_other_errors_at_once_and_on_ebusy_after_a_while(monkeypatch):
    def refused():
        raise VdifsError("no such snapshot", code=errno.ENOENT)

    with pytest.raises(VdifsError, match="no such snapshot"):
        diff.while_our_close_lands(refused)
    monkeypatch.setattr(diff, "RELEASE_WAIT", 0.3)
    tries = []

    def busy():
        tries.append(1)
        raise StoreBusy("VDI 'dst' is open for writing")

    with pytest.raises(StoreBusy):
        diff.while_our_close_lands(busy)
    assert 2 <= len(tries) <= 6  # tried again every 0.1 s, then gave up
