"""Lists of buffers on their way out of a socket (gathered writes)."""

from __future__ import annotations


def drop_sent(views: list[memoryview], sent: int) -> None:
    """Remove the first `sent` bytes from a list of buffers, in place: what
    a short writev/sendmsg left is what remains."""
    while sent and views:
        if sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        else:
            views[0] = views[0][sent:]
            sent = 0
