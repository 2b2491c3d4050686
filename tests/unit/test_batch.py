import threading

import pytest
import trio
import trio.testing

from vdifs.store.batch import BatchRunner


async def test_results_errors_and_batching():
    runner = BatchRunner(lanes=1)
    gate = threading.Event()
    results = {}

    def blocker():
        gate.wait(5)
        return "first"

    def boom():
        raise ValueError("bad")

    async def call(i):
        results[i] = await runner.run(lambda: i * i)

    async with trio.open_nursery() as n:
        n.start_soon(lambda: runner.run(blocker))
        await trio.testing.wait_all_tasks_blocked()
        for i in range(20):  # queued behind the blocker: they go in one hop
            n.start_soon(call, i)
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert results == {i: i * i for i in range(20)}
    assert runner.calls == 21 and runner.hops == 2
    with pytest.raises(ValueError, match="bad"):
        await runner.run(boom)


async def test_queued_call_completes_even_if_caller_is_cancelled():
    runner = BatchRunner(lanes=1)
    done = []
    with trio.move_on_after(0.01):
        await runner.run(lambda: (threading.Event().wait(0.1), done.append(1)))
    assert done == [1]  # shielded like trio.to_thread.run_sync
