"""Plain NBD writes a client sends together go to each replica as one
request (obj.writev): every replica ends up with every byte, the writes
the batch cannot take (across objects, into holes) are made as before,
and a replica killed under them costs no write."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

from tests import nbd_client as nbd
from tests.e2e.conftest import read_at

from .conftest import wait_for

MiB = 1 << 20
OBJ = 4 * MiB
SLOT = 64 << 10  # writes in flight together never overlap: each keeps to its own slot


def sock(m) -> str:
    return os.path.join(m.store, "nbd.sock")


def random_writes(rng: random.Random, slots: list[int]) -> list[tuple[int, bytes]]:
    """One write inside each slot: 512 B to 64 KiB, sector aligned."""
    writes = []
    for slot in slots:
        inner = rng.randrange(0, SLOT // 512) * 512
        length = min(rng.choice([512, 4096, 4096, 4096, 16384, SLOT]), SLOT - inner)
        writes.append((slot * SLOT + inner, os.urandom(length)))
    return writes


def pipelined(c: nbd.Client, writes: list[tuple[int, bytes]]) -> list[int]:
    """Every write sent by a thread while this one reads the replies (as
    QEMU does); the error of each, in the order of `writes`."""
    cookies: dict[int, int] = {}
    sender = threading.Thread(target=lambda: cookies.update(
        {c.request(nbd.CMD_WRITE, offset, len(data), payload=data): i for i, (offset, data) in enumerate(writes)}))
    sender.start()
    replies = {}
    for _ in writes:
        cookie, error, _ = c.reply()
        assert cookie not in replies  # each answered once
        replies[cookie] = error
    sender.join()
    assert set(replies) == set(cookies)
    errors = [0] * len(writes)
    for cookie, error in replies.items():
        errors[cookies[cookie]] = error
    return errors


def io_stats(m) -> dict:
    return m.call("status")["io"]


def cache(m) -> dict:
    return m.call("status")["cache"]


def replica_bytes(peer, oid: int) -> bytes:
    from vdifs.model.ids import vid_of

    with open(os.path.join(peer.store, "obj", f"{vid_of(oid):06x}", f"{oid:016x}"), "rb") as f:
        return f.read()


def failover_report(cluster, m) -> str:
    """What the mount and the peers said of the failover, for a test that
    timed out waiting for it."""
    said = [f"mount io: {io_stats(m)}"]
    said += [f"mount: {line}" for line in open(m.log).read().splitlines()
             if any(w in line for w in ("epoch", "peer", "relay", "could not"))][-40:]
    for peer in cluster.peers:
        said += [f"{peer.name}: {line}" for line in peer.log_text().splitlines()
                 if any(w in line for w in ("mark", "down", "stopped answering", "epoch"))][-20:]
    return "the cluster did not leave the dead replica out:\n" + "\n".join(said)


def test_writes_sent_together_land_on_every_replica(cluster):
    """400 writes into a VDI of eight objects, six written and two holes,
    sent without waiting for replies, plus writes across object ends: all
    answered without error, the file holds every byte, and so does every
    replica's file of every object. Most went in obj.writev batches, several
    to a batch. The mount's cache, filled before, took every write too:
    nothing was dropped and it serves the new bytes."""
    from vdifs.model.ids import data_oid

    cluster.format(3, copies=3)
    m = cluster.mount("a", "--cache-size", "256M")
    model = bytearray(os.urandom(6 * OBJ) + bytes(2 * OBJ))
    with open(m.path("vm"), "wb") as f:
        f.write(model[:6 * OBJ])
        f.truncate(len(model))
    rng = random.Random(16)
    crossing = [(k * OBJ - 2048, os.urandom(8192)) for k in (1, 3, 6)]
    taken = {(k * OBJ) // SLOT + d for k in (1, 3, 6) for d in (-1, 0)}
    slots = rng.sample([s for s in range(len(model) // SLOT) if s not in taken], 400)
    writes = random_writes(rng, slots[:200]) + crossing + random_writes(rng, slots[200:])
    c = nbd.Client(sock(m))
    c.structured_replies()
    c.go("vm")  # the lease: from now on the mount caches what it reads
    for _ in range(2):  # (large reads fill the cache when they read the same bytes again)
        assert b"".join(c.read(at, MiB) for at in range(0, len(model), MiB)) == model
    wait_for(lambda: cache(m)["objects"]["ready"] >= 6, 30, "the six written objects in the cache")
    assert pipelined(c, writes) == [0] * len(writes)
    for offset, data in writes:
        model[offset:offset + len(data)] = data
    hits = cache(m)["hits"]
    assert b"".join(c.read(at, MiB) for at in range(0, len(model), MiB)) == model
    c.disconnect()
    assert cache(m)["drops"] == 0 and cache(m)["hits"] >= hits + 6 * 4, cache(m)

    stats = io_stats(m)
    assert stats["writes_together"] >= len(writes) // 4 and stats["write_batches"] < stats["writes_together"], stats
    assert read_at(m.path("vm"), 0, len(model)) == model
    vid = m.vid("vm")
    for index in range(8):
        oid = data_oid(vid, index)
        for peer in cluster.peers:
            assert replica_bytes(peer, oid) == model[index * OBJ:(index + 1) * OBJ], (peer.name, index)


def test_a_replica_killed_under_writes_sent_together_costs_no_write(cluster):
    """Rounds of 64 writes sent together (each round answered before the
    next), four peers and three copies; one replica is killed with -9
    mid-way. Every write is answered without error (the batches it was in
    are made again once the cluster has left it out) and the VDI holds
    every byte. The writes waiting for the new map share their reads of it,
    and those reads take no ballot: the peers mark the victim down at their
    first try (reads made as changes used to hold the change off for 30 s)."""
    cluster.format(4, copies=3)
    m = cluster.mount("a")
    model = bytearray(os.urandom(4 * OBJ))
    with open(m.path("vm"), "wb") as f:
        f.write(model)
    c = nbd.Client(sock(m))
    c.structured_replies()
    c.go("vm")
    rng = random.Random(4)
    victim = cluster.peers[2]
    started, killed, rounds_after = time.monotonic(), False, 0
    while rounds_after < 5:
        writes = random_writes(rng, rng.sample(range(len(model) // SLOT), 64))
        assert pipelined(c, writes) == [0] * len(writes)
        for offset, data in writes:
            model[offset:offset + len(data)] = data
        if not killed and time.monotonic() - started > 1.5:
            reads_before, killed_at = io_stats(m)["map_reads"], time.monotonic()
            os.kill(victim.proc.pid, signal.SIGKILL)
            victim.proc.wait()
            victim.proc = None
            killed = True
        elif killed and io_stats(m)["peers_up"] == len(cluster.peers) - 1:  # our map leaves it out
            rounds_after += 1
        assert time.monotonic() - started < 150, failover_report(cluster, m)
    for peer in cluster.peers:
        if peer is not victim:
            assert "could not mark" not in peer.log_text(), peer.name
    # the 64 writes waiting for the map that leaves the victim out share
    # their reads of it: one each would be 128 a second
    reads, waited = io_stats(m)["map_reads"] - reads_before, time.monotonic() - killed_at
    assert reads <= 32 * waited, (reads, waited)
    c.disconnect()
    assert io_stats(m)["writes_together"] > 0
    assert read_at(m.path("vm"), 0, len(model)) == model
