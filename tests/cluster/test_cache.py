"""The local object cache of a cluster mount, with real peers and a real mount."""

from __future__ import annotations

import glob
import hashlib
import json
import mmap
import os
import subprocess

from tests.cluster.conftest import vdifs, wait_for
from tests.e2e.conftest import need, run

MiB = 1 << 20
OBJ = 4 * MiB


def write_direct(path: str, data: bytes, offset: int = 0) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        m = mmap.mmap(-1, len(data))  # O_DIRECT wants an aligned buffer
        m.write(data)
        assert os.pwritev(fd, [m], offset) == len(data)
        m.close()
    finally:
        os.close(fd)


def read_direct(path: str, size: int) -> bytes:
    """The file's bytes, read past the kernel's page cache (every read reaches the mount)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    out = []
    try:
        m = mmap.mmap(-1, MiB)
        for off in range(0, size, MiB):
            n = os.preadv(fd, [m], off)
            out.append(bytes(m[:n]))
        m.close()
    finally:
        os.close(fd)
    return b"".join(out)


def read_direct_range(path: str, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        m = mmap.mmap(-1, length)
        n = os.preadv(fd, [m], offset)
        out = bytes(m[:n])
        m.close()
    finally:
        os.close(fd)
    return out


def cache_status(mount) -> dict:
    return json.loads(vdifs("cache", "--mount", mount.mp, "--json").stdout)


def bytes_read_by_peers(cluster) -> int:
    return sum(p["bytes_read"] for p in cluster.info()["peers"])


def cached_files(mount) -> list[str]:
    return glob.glob(os.path.join(mount.store, "cache", "objects", "obj", "*", "*"))


def make_template(cluster, m, name: str, size: int) -> bytes:
    with open(m.path(name), "wb") as f:
        f.truncate(size)
    data = os.urandom(size)
    write_direct(m.path(name), data)
    vdifs("vdi", "--mount", m.mp, "snapshot", name, "base")
    return data


def written_vdi(m, size: int, piece: int) -> tuple[int, mmap.mmap]:
    """A new VDI "vm" held open for writing (the lease stays this mount's)
    and filled with random bytes in `piece`-sized O_DIRECT writes: its fd,
    and a buffer holding what it now contains."""
    vdifs("vdi", "--mount", m.mp, "create", "vm", str(size))
    fd = os.open(m.path("vm"), os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, size)
    buf.write(os.urandom(size))
    for off in range(0, size, piece):
        assert os.pwritev(fd, [memoryview(buf)[off:off + piece]], off) == piece
    return fd, buf


def test_template_objects_are_fetched_once_for_twenty_clones(cluster):
    cluster.format(3, copies=2)
    w = cluster.mount("w", "--cache-size", "0")  # where the template was made
    data = make_template(cluster, w, "tmpl", 8 * OBJ)
    want = hashlib.sha256(data).hexdigest()
    m = cluster.mount("a", "--cache-size", "256M")  # the host the clones boot on
    for i in range(20):
        vdifs("vdi", "--mount", m.mp, "clone", "tmpl@base", f"c{i}")
    before = bytes_read_by_peers(cluster)
    for i in range(20):
        got = read_direct(m.path(f"c{i}"), 8 * OBJ)
        assert hashlib.sha256(got).hexdigest() == want, f"clone c{i} reads wrong bytes"
    fetched = bytes_read_by_peers(cluster) - before
    # Each of the 8 template objects came over the network once, whole (the
    # clones' maps are a few bytes each); without the cache: 20 x 32 MiB.
    assert 8 * OBJ <= fetched <= 8 * OBJ + 64 * 1024, fetched
    c = cache_status(m)
    assert c["fills"] == 8 and c["objects"]["ready"] == 8 and c["hits"] >= 20 * 32
    assert len(cached_files(m)) == 8
    table = vdifs("cache", "--mount", m.mp).stdout  # the same, for people
    assert "8 ready, 0 filling, 0 evicting" in table and f"{c['hits']} (" in table and "32.0 MiB" in table


def test_a_vdi_written_here_is_read_back_from_the_cache_and_its_snapshot_too(cluster):
    cluster.format(3, copies=2)
    m = cluster.mount("a", "--cache-size", "64M")
    fd, buf = written_vdi(m, 16 * MiB, 64 * 1024)  # as a guest writes: small pieces
    try:
        c = cache_status(m)
        assert c["fills"] == 4 and c["objects"]["ready"] == 4  # written objects went into the cache
        # Overwrites of every size reach the copies (write-through; the mount
        # takes 1 MiB at most, so the larger one comes in 1 MiB pieces).
        for start, end in [(OBJ + MiB, 2 * OBJ), (4096, 8192), (2 * OBJ + 512 * 1024, 3 * OBJ)]:
            buf[start:end] = os.urandom(end - start)
            assert os.pwritev(fd, [memoryview(buf)[start:end]], start) == end - start
        data = bytes(buf)
        before = bytes_read_by_peers(cluster)
        got = mmap.mmap(-1, 16 * MiB)
        assert os.preadv(fd, [got], 0) == 16 * MiB and got[:] == data
        c = cache_status(m)
        assert c["objects"]["ready"] == 4 and c["drops"] == 0, c
        vdifs("vdi", "--mount", m.mp, "snapshot", "vm", "s1")
        assert bytes_read_by_peers(cluster) - before == 0  # every read was local
        assert os.pwritev(fd, [memoryview(buf)[:4096]], 0) == 4096  # a copy-up into the VDI's new objects
        assert os.preadv(fd, [got], 0) == 16 * MiB and got[:] == data
    finally:
        os.close(fd)
    assert read_direct(m.path(".snapshots/vm@s1"), 16 * MiB) == data
    # The copy-up read its object from the cache; only the copied-up object
    # (created whole: the cache takes no large creates) and the snapshot's
    # map (4 entries) came from the peers.
    assert bytes_read_by_peers(cluster) - before == OBJ + 16


def test_a_stream_read_again_is_cached_and_one_read_once_is_not(cluster):
    cluster.format(3, copies=2)
    m = cluster.mount("a", "--cache-size", "64M")
    fd, buf = written_vdi(m, 16 * MiB, MiB)  # a disk filled in large pieces: nothing cached
    data = bytes(buf)
    try:
        assert cache_status(m)["fills"] == 0

        def stream() -> bytes:  # the whole VDI in 1 MiB reads, in order
            got = mmap.mmap(-1, MiB)
            out = []
            for off in range(0, 16 * MiB, MiB):
                assert os.preadv(fd, [got], off) == MiB
                out.append(bytes(got))
            return b"".join(out)

        before = bytes_read_by_peers(cluster)
        assert stream() == data  # read once: from the peers, nothing brought in
        assert bytes_read_by_peers(cluster) - before >= 16 * MiB
        c = cache_status(m)
        assert c["fills"] == 0 and c["objects"]["ready"] == 0, c
        assert stream() == data  # read again: each object is fetched into the cache
        wait_for(lambda: cache_status(m)["objects"]["ready"] == 4, 20, "the four objects cached")
        before = bytes_read_by_peers(cluster)
        assert stream() == data  # and from then on read here
        assert bytes_read_by_peers(cluster) - before == 0
        assert cache_status(m)["fills"] == 4
    finally:
        os.close(fd)


def test_lease_hand_over_never_serves_what_another_mount_overwrote(cluster):
    need("qemu-io")
    cluster.format(3, copies=2)
    a = cluster.mount("a", "--cache-size", "64M")
    b = cluster.mount("b", "--cache-size", "64M")

    def qemu_io(m, *cmds: str) -> str:
        args = ["qemu-io", "-f", "raw", "-t", "none"]
        for cmd in cmds:
            args += ["-c", cmd]
        res = run(*args, m.path("vm"))
        assert "failed" not in res.stdout + res.stderr, res.stdout + res.stderr
        return res.stdout

    vdifs("vdi", "--mount", a.mp, "create", "vm", "16M")
    def reads(pattern: str, start: int, length: int) -> list[str]:  # as a guest reads: 64 KiB at a time
        return [f"read -P {pattern} {off} 64k" for off in range(start, start + length, 64 * 1024)]

    # A writes and reads back with the lease held: its cache takes the objects.
    qemu_io(a, "write -P 0xaa 0 8M", *reads("0xaa", 0, 8 * MiB), "sleep 1500", *reads("0xaa", 0, 8 * MiB))
    first = cache_status(a)
    assert first["hits"] > 0 and first["fills"] == 2  # the second read came from the cache
    # Closed and opened again by A alone: the lease went from g to g + 1 with
    # nobody in between, so the copies are still good and nothing is fetched.
    qemu_io(a, *reads("0xaa", 0, 8 * MiB))
    again = cache_status(a)
    assert again["fills"] == 2 and again["hits"] >= first["hits"] + 128 and again["objects"]["ready"] == 2
    wait_for(lambda: b.path("vm") and os.path.exists(b.path("vm")), 10, "vm seen by b")
    qemu_io(b, "write -P 0xbb 4M 4M", "read -P 0xbb 4M 4M")  # B takes the lease and overwrites half
    # A again: a new lease generation; nothing it cached before B wrote is served.
    hits = cache_status(a)["hits"]
    qemu_io(a, *reads("0xaa", 0, 4 * MiB), *reads("0xbb", 4 * MiB, 4 * MiB), "sleep 1500",  # misses that fill
            "write -P 0xcc 0 64k", "read -P 0xcc 0 64k", *reads("0xaa", 64 * 1024, 4 * MiB - 64 * 1024),
            *reads("0xbb", 4 * MiB, 4 * MiB))
    assert cache_status(a)["hits"] > hits  # served from copies made under the new lease, written through
    qemu_io(b, "read -P 0xcc 0 64k", "read -P 0xbb 4M 4M")


def test_kill9_during_fills_damage_and_a_small_cache(cluster):
    cluster.format(3, copies=2)
    m = cluster.mount("a", "--cache-size", "12M")  # three objects of a 32 MiB snapshot
    data = make_template(cluster, m, "tmpl", 8 * OBJ)
    snap = m.path(".snapshots/tmpl@base")
    # Reading the whole snapshot through a cache of three objects: evictions, right bytes.
    assert read_direct(snap, 8 * OBJ) == data
    c = cache_status(m)
    assert c["evictions"] >= 5 and c["objects"]["ready"] <= 3 and c["used"] <= 12 * MiB
    # kill -9 while fills run (a reader in the background keeps them coming).
    reader = subprocess.Popen(["dd", f"if={snap}", "of=/dev/null", "bs=1M", "iflag=direct"])
    try:
        wait_for(lambda: cache_status(m)["fills"] > c["fills"], 20, "fills under way")
        m.kill9()
    finally:
        reader.kill()
        reader.wait()
    m.start()
    c = cache_status(m)
    assert c["objects"]["filling"] == 0 and c["objects"]["evicting"] == 0
    assert len(cached_files(m)) == c["objects"]["ready"] <= 3
    # Flip bytes in every cached file: none is served, each is dropped and read from the peers.
    damaged = cached_files(m)
    assert damaged
    for path in damaged:
        with open(path, "r+b") as f:
            f.seek(MiB + 7)
            f.write(b"\x5a\xa5\x5a")
    for path in damaged:
        index = int(os.path.basename(path), 16) & 0xFFFFFFFF
        got = read_direct_range(snap, index * OBJ + MiB, MiB)
        assert got == data[index * OBJ + MiB:index * OBJ + 2 * MiB]
    assert cache_status(m)["drops"] == len(damaged)
    assert read_direct(snap, 8 * OBJ) == data


def test_deleting_a_snapshot_retires_its_cached_objects(cluster):
    cluster.format(3, copies=2)
    m = cluster.mount("a", "--cache-size", "64M")
    data = make_template(cluster, m, "tmpl", 4 * OBJ)
    write_direct(m.path("tmpl"), b"\x11" * OBJ, 3 * OBJ)  # the VDI's own object 3 from now on
    assert read_direct(m.path(".snapshots/tmpl@base"), 4 * OBJ) == data
    assert cache_status(m)["objects"]["ready"] == 4 and len(cached_files(m)) == 4  # the snapshot's
    vdifs("vdi", "--mount", m.mp, "snapshot-delete", "tmpl@base")
    # The snapshot's objects 0-2 are still the VDI's (its data vid is retired,
    # not gone): they stay; its object 3 was its alone and is freed.
    wait_for(lambda: cache_status(m)["objects"]["ready"] == 3 and len(cached_files(m)) == 3, 20,
             "the deleted snapshot's own object gone from the cache")
    assert read_direct(m.path("tmpl"), 4 * OBJ) == data[:3 * OBJ] + b"\x11" * OBJ
    vdifs("vdi", "--mount", m.mp, "delete", "tmpl")
    wait_for(lambda: cache_status(m)["objects"]["ready"] == 0 and not cached_files(m), 20,
             "the deleted VDI's objects gone from the cache")
