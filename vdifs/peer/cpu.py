"""The peer's CPU scheduling policy (design change 25).

On a hypervisor that also runs a peer, the mount sends each write to three
peers; with the default policy each peer woken by a request may preempt the
mount in the middle of that burst (a wakeup preemption per send), so the
mount's sends and the guests' I/O wait behind peers that have nothing to do
until the burst is out. SCHED_BATCH keeps the peer's fair share of the CPU
but never lets its wakeups preempt: the peers run when the mount waits.
Measured here (3 peers and a mount on 2 cores, 4 KiB at qd 16): random
writes +50%, random reads +18%, qd 1 latency no worse.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("vdifs.peer")

CPU_POLICIES = {"batch": os.SCHED_BATCH, "normal": os.SCHED_OTHER}


def set_cpu_policy(name: str) -> None:
    """Set the policy of the calling thread; threads started later inherit it.
    No privilege is needed for either policy."""
    os.sched_setscheduler(0, CPU_POLICIES[name], os.sched_param(0))
    log.debug("CPU scheduling policy: %s", name)
