"""Run blocking calls in worker threads, many calls per thread hop.

A hop into a worker thread (`trio.to_thread.run_sync`) costs about 100 µs
on a small VM, far more than the pwrite it carries into the page cache. When
many requests are in flight, the calls queued while a batch runs go
together in the next hop, so the hop is paid once per batch instead of once
per call. With nothing else queued, a call costs one hop as before.

Up to `lanes` batches run at once. The task that finds a free lane runs the
batch; the others wait for their result. Waiting is shielded from
cancellation, like `trio.to_thread.run_sync`: a call that has been queued
always completes before its caller moves on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import trio


class _Call:
    __slots__ = ("fn", "args", "result", "error", "done", "taken", "event")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = False
        self.taken = False
        self.event = trio.Event()


def _run_batch(batch: list[_Call]) -> None:
    for call in batch:
        try:
            call.result = call.fn(*call.args)
        except BaseException as e:  # delivered to the caller, in its own task
            call.error = e


class BatchRunner:
    def __init__(self, lanes: int = 2, max_batch: int = 64) -> None:
        self.lanes = lanes
        self.max_batch = max_batch
        self._pending: deque[_Call] = deque()
        self._active = 0
        self.hops = 0
        self.calls = 0

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        call = _Call(fn, args)
        self._pending.append(call)
        self.calls += 1
        with trio.CancelScope(shield=True):
            while not call.done:
                if not call.taken and self._active < self.lanes:
                    await self._run_lane()
                    continue
                await call.event.wait()
                if not call.done:
                    call.event = trio.Event()  # nudged to run a lane: loop and take it
        if call.error is not None:
            raise call.error
        return call.result

    async def _run_lane(self) -> None:
        batch: list[_Call] = []
        while self._pending and len(batch) < self.max_batch:
            c = self._pending.popleft()
            c.taken = True
            batch.append(c)
        self._active += 1
        self.hops += 1
        try:
            await trio.to_thread.run_sync(_run_batch, batch)
        finally:
            self._active -= 1
            for c in batch:
                c.done = True
                c.event.set()
            if self._pending:
                self._pending[0].event.set()  # let the next waiter run a lane
