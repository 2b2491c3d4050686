"""What handing a message to another process costs on this machine.

    .venv/bin/python bench/wakeup_cost.py [--rounds N]

Two processes pass a 16-byte message back and forth over a unix socket
pair, N round trips (default 50,000), in three ways: each on its own CPU,
both pinned to one CPU, and on their own CPUs with the answering side
polling its socket instead of sleeping. Prints the round trip's time and
the CPU each side spent per round trip (getrusage).

Every request of vdifs crosses processes several times (client -> mount,
mount -> peers and back, mount -> client); on a VM, waking a process
asleep on another virtual CPU costs an interprocessor interrupt and a
halt exit, which this isolates from vdifs's own work
(docs/benchmarks.md, "Where a small request's CPU goes").
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import time


def _cpu(usage: resource.struct_rusage) -> tuple[float, float]:
    return usage.ru_utime + usage.ru_stime, usage.ru_stime


def round_trips(rounds: int, *, cpu: int | None, poll: bool) -> tuple[float, float, float, float]:
    """(round trip us, caller CPU us, caller system us, answerer CPU us), per round trip."""
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the answerer
        try:
            a.close()
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})
            b.setblocking(not poll)
            for _ in range(rounds):
                msg = b""
                while not msg:
                    try:
                        msg = b.recv(64)
                    except BlockingIOError:
                        continue
                b.sendall(msg)
        finally:
            os._exit(0)
    b.close()
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    msg = b"x" * 16
    start, (cpu0, sys0) = time.perf_counter(), _cpu(resource.getrusage(resource.RUSAGE_SELF))
    for _ in range(rounds):
        a.sendall(msg)
        a.recv(64)
    elapsed, (cpu1, sys1) = time.perf_counter() - start, _cpu(resource.getrusage(resource.RUSAGE_SELF))
    os.waitpid(pid, 0)
    child, _ = _cpu(resource.getrusage(resource.RUSAGE_CHILDREN))  # only this child has ended so far
    if cpu is not None:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    a.close()
    per = 1e6 / rounds
    return elapsed * per, (cpu1 - cpu0) * per, (sys1 - sys0) * per, child * per


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50_000, help="round trips per way (default 50,000)")
    args = parser.parse_args()
    print(f"{'way':<34} {'round trip':>11} {'caller CPU':>11} {'of it system':>13} {'answerer CPU':>13}")
    done = 0.0
    for name, cpu, poll in (("own CPUs, both sleep", None, False), ("one CPU for both", 0, False),
                            ("own CPUs, the answerer polls", None, True)):
        rtt, caller, system, answerer = round_trips(args.rounds, cpu=cpu, poll=poll)
        answerer -= done  # RUSAGE_CHILDREN accumulates over the ways
        done += answerer
        print(f"{name:<34} {rtt:9.1f} us {caller:8.1f} us {system:10.1f} us {answerer:10.1f} us")


if __name__ == "__main__":
    main()
