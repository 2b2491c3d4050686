"""What a peer reports: its store's size and use, recovery (running, what
is left, what was copied), the cluster map, requests it served without
waiting, what it relayed, checksum failures and refusals for space, and
each other peer's round trips."""

from __future__ import annotations

import trio
from prometheus_client.core import Metric

from vdifs.metrics.families import cluster, counter, gauge, round_trips
from vdifs.peer.dataplane import DataPlane
from vdifs.peer.recovery import Recovery
from vdifs.peer.relay import Relay
from vdifs.peer.state import PeerState
from vdifs.peer.sweep import Sweeper


async def peer_metrics(st: PeerState, recovery: Recovery, data: DataPlane, relay: Relay,
                       sweeper: Sweeper) -> list[Metric]:
    total, free = await st.store.space()
    r = recovery.state
    out: list[Metric] = [
        gauge("vdifs_store_size_bytes", "Size of the file system holding the store", total),
        gauge("vdifs_store_free_bytes", "Free space VDI data may still take (the reserve left out)", free),
        gauge("vdifs_store_open_objects", "Object files whose descriptors are cached", len(st.store.cached_objects())),
        gauge("vdifs_recovery_running", "1 while a recovery pass runs", 1 if r.running else 0),
        gauge("vdifs_recovery_pending_objects", "Objects the running pass has still to copy here (degraded)",
              r.total - r.done if r.running else 0),
        gauge("vdifs_recovery_pass_bytes", "Bytes the running (or last) pass copied", r.bytes),
        gauge("vdifs_recovery_pass_seconds", "How long the running pass has run",
              trio.current_time() - r.started if r.running else 0.0),
        counter("vdifs_recovery_objects_recovered", "Objects copied here from other peers", recovery.recovered),
        counter("vdifs_checksum_errors", "Blocks that failed their checksums when read or written",
                st.store.checksum_errors),
        counter("vdifs_space_refusals", "Writes refused because the store is at its reserve", st.store.space_refusals),
        counter("vdifs_bytes_served", "Object bytes served to reads", data.bytes_read),
        counter("vdifs_requests_answered_at_once", "Requests answered without a task",
                st.server.fast_answers if st.server is not None else 0),
        counter("vdifs_requests_relayed", "Requests relayed for mounts cut off from a peer", relay.relayed),
        counter("vdifs_leaks_collected", "Leaked objects deleted by the leak sweeper", sweeper.collected),
    ]
    out += cluster(st.cmap)
    if st.rpc is not None:
        out.append(round_trips("vdifs", st.rpc.round_trips()))
    return out
