"""Snapshots, clones and rollback through a real mount (embedded pool)."""

import errno
import hashlib
import itertools
import json
import mmap
import os
import sys
import threading

import pytest

from vdifs.model.ids import ObjectKind, unpack_oid

from .conftest import OBJ, FioVerify, need, read_at, run, vdifs, write_at

MiB = 1 << 20


def vdi(mount, *args, check=True):
    return vdifs("vdi", "--mount", mount.mp, *args, check=check)


def sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MiB), b""):
            h.update(chunk)
    return h.hexdigest()


def tree(mount) -> dict:
    return {v["name"]: v for v in json.loads(vdi(mount, "tree", "--json").stdout)}


def data_vid(mount, name: str, snap: str | None = None) -> int:
    v = tree(mount)[name]
    if snap is None:
        return v["data_vid"]
    return next(s["data_vid"] for s in v["snapshots"] if s["name"] == snap)


def objects(mount) -> set[tuple[int, int]]:
    """(data vid, index) of every data object in the store."""
    out = set()
    root = os.path.join(mount.store, "obj")
    for d in os.listdir(root):
        for f in os.listdir(os.path.join(root, d)):
            if f.endswith(".part"):
                continue
            kind, vid, index = unpack_oid(int(f, 16))
            if kind == ObjectKind.DATA:
                out.add((vid, index))
    return out


def snap_path(mount, name: str, snap: str) -> str:
    return mount.path(f".snapshots/{name}@{snap}")


def wait_until(pred, timeout: float = 30.0) -> None:
    import time
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


class SequentialWriter(threading.Thread):
    """Writes 4 KiB blocks with O_DIRECT, one at a time, round-robin over
    `slots` slots from `base`, block k holding k; `acked` counts the writes
    that returned (acknowledged from the write-behind window: the handle
    sends an fsync first). One write in flight at a time, so the state of the region
    at any instant is "the first K writes" for some K."""

    def __init__(self, path: str, base: int, slots: int) -> None:
        super().__init__(daemon=True)
        self.path, self.base, self.slots = path, base, slots
        self.acked = 0
        self.stop = threading.Event()

    def run(self) -> None:
        buf = mmap.mmap(-1, 4096)
        fd = os.open(self.path, os.O_WRONLY | os.O_DIRECT)
        try:
            os.fsync(fd)  # as a guest's first flush: from now on the mount writes behind
            k = 0
            while not self.stop.is_set():
                buf.seek(0)
                buf.write(k.to_bytes(8, "little") * 512)
                assert os.pwrite(fd, buf, self.base + (k % self.slots) * 4096) == 4096
                k += 1
                self.acked = k
        finally:
            os.close(fd)

    def state_after(self, n: int) -> bytes:
        """The region's bytes once the first n writes landed."""
        slots = [bytes(4096)] * self.slots
        for k in range(max(0, n - self.slots), n):
            slots[k % self.slots] = k.to_bytes(8, "little") * 512
        return b"".join(slots)


def test_a_snapshot_taken_while_fio_writes_is_the_data_as_of_the_cut(mount):
    need("fio")
    run("truncate", "-s", "64M", mount.path("vm"))
    base, slots = 48 * MiB, 512  # the writer's 2 MiB region, after fio's 32 MiB
    writer = SequentialWriter(mount.path("vm"), base, slots)
    with FioVerify(mount.path("vm"), 32, rate="8m", fsync=16) as fio:
        writer.start()
        wait_until(lambda: writer.acked > 2 * slots)
        before = writer.acked
        vdi(mount, "snapshot", "vm", "s1")
        after = writer.acked
        first = sha(snap_path(mount, "vm", "s1"))
        region = read_at(snap_path(mount, "vm", "s1"), base, slots * 4096)
        wait_until(lambda: writer.acked > after + 2 * slots)  # overwrite every slot again
        writer.stop.set()
        writer.join()
        fio.finish(timeout=300)  # the live VDI verifies: writes went on through the cut
    # Crash-consistent: every write that returned before the cut began is in
    # the snapshot, none that started after it returned; at most the one in
    # flight at the cut may go either way.
    assert any(region == writer.state_after(n) for n in range(before, after + 2)), (before, after)
    assert sha(snap_path(mount, "vm", "s1")) == first  # later writes did not change it
    assert os.stat(snap_path(mount, "vm", "s1")).st_size == 64 * MiB
    assert read_at(mount.path("vm"), base, slots * 4096) == writer.state_after(writer.acked)
    # after a restart the snapshot is still the same bytes
    mount.restart()
    assert sha(snap_path(mount, "vm", "s1")) == first


def test_snapshots_are_read_only_files_under_dot_snapshots(mount):
    run("truncate", "-s", "8M", mount.path("a"))
    write_at(mount.path("a"), 0, b"A" * 4096)
    vdi(mount, "snapshot", "a", "monday")
    assert os.listdir(mount.path(".snapshots")) == ["a@monday"]
    assert ".snapshots" not in os.listdir(mount.mp)  # hidden from ls, like ZFS's .zfs
    p = snap_path(mount, "a", "monday")
    assert read_at(p, 0, 4096) == b"A" * 4096
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(OSError) as e:
            os.open(p, flags)
        assert e.value.errno == errno.EROFS
    for op in (lambda: os.truncate(p, 0), lambda: os.unlink(p), lambda: os.rename(p, mount.path("b")),
               lambda: open(mount.path(".snapshots/new"), "w"), lambda: os.chmod(p, 0o600)):
        with pytest.raises(OSError) as e:
            op()
        assert e.value.errno == errno.EROFS
    # qemu-img convert from the snapshot is a backup
    need("qemu-img")
    backup = os.path.join(os.path.dirname(mount.store), "backup.qcow2")
    write_at(mount.path("a"), 0, b"B" * 4096)
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", p, backup)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", p, backup)
    assert read_at(p, 0, 4096) == b"A" * 4096 and read_at(mount.path("a"), 0, 4096) == b"B" * 4096
    res = vdi(mount, "snapshot", "a", "monday", check=False)
    assert res.returncode == 1 and "already has a snapshot" in res.stderr
    res = vdi(mount, "delete", "a", check=False)
    assert res.returncode == 1 and "snapshot" in res.stderr and os.path.exists(mount.path("a"))
    with pytest.raises(OSError) as e:
        os.unlink(mount.path("a"))  # rm keeps the backups too
    assert e.value.errno == errno.EBUSY and os.path.exists(mount.path("a"))
    vdi(mount, "delete", "a", "--snapshots")
    wait_until(lambda: not objects(mount))
    assert os.listdir(mount.path(".snapshots")) == []


def test_a_clone_chain_three_deep_reads_through_and_copies_up_only_what_it_writes(mount):
    run("truncate", "-s", "16M", mount.path("gold"))
    for i in range(4):  # four objects, each a different byte
        write_at(mount.path("gold"), i * OBJ, bytes([0x10 + i]) * OBJ)
    vdi(mount, "snapshot", "gold", "v1")
    expect = bytearray(b"".join(bytes([0x10 + i]) * OBJ for i in range(4)))
    parent = ("gold", "v1")
    for depth, name in enumerate(["c1", "c2", "c3"], start=1):
        vdi(mount, "clone", f"{parent[0]}@{parent[1]}", name)
        assert sha(mount.path(name)) == hashlib.sha256(expect).hexdigest()  # all inherited
        assert data_vid(mount, name) not in {v for v, _ in objects(mount)}  # nothing copied yet
        # one small write into object `depth`: copy-up of that object only
        off = depth * OBJ + 4096 * depth
        write_at(mount.path(name), off, bytes([depth]) * 512, fsync=True)
        expect[off:off + 512] = bytes([depth]) * 512
        assert {i for v, i in objects(mount) if v == data_vid(mount, name)} == {depth}
        assert sha(mount.path(name)) == hashlib.sha256(expect).hexdigest()
        vdi(mount, "snapshot", name, "v1")
        parent = (name, "v1")
    # every ancestor is unchanged
    gold = b"".join(bytes([0x10 + i]) * OBJ for i in range(4))
    assert sha(mount.path("gold")) == sha(snap_path(mount, "gold", "v1")) == hashlib.sha256(gold).hexdigest()
    assert read_at(mount.path("c1"), 2 * OBJ + 8192, 512) == bytes([0x12]) * 512  # c2's write is not c1's
    assert len(objects(mount)) == 4 + 3  # gold's four, one per clone
    lines = vdi(mount, "tree").stdout.splitlines()
    assert [ln.strip().split()[0] for ln in lines] == ["gold", "@v1", "c1", "@v1", "c2", "@v1", "c3", "@v1"]
    assert lines[2].startswith("        c1") and "from gold@v1" in lines[2]
    mount.restart()  # all of it survives a remount
    assert sha(mount.path("c3")) == hashlib.sha256(expect).hexdigest()


def test_rollback_restores_the_exact_bytes(mount):
    need("qemu-io")
    run("truncate", "-s", "24M", mount.path("db"))
    pattern = [("0xab", OBJ - 4096, 8192), ("0x11", 0, 512), ("0x77", 20 * MiB, 65536)]
    run("qemu-io", "-f", "raw", *sum([["-c", f"write -P {p} {o} {n}"] for p, o, n in pattern], []),
        mount.path("db"))
    vdi(mount, "snapshot", "db", "good")
    good = sha(mount.path("db"))
    run("qemu-io", "-f", "raw", "-c", f"write -P 0xee 0 {OBJ + 8192}", "-c", "write -z 20M 64k",
        mount.path("db"))
    os.truncate(mount.path("db"), 32 * MiB)
    assert sha(mount.path("db")) != good
    with open(mount.path("db"), "rb") as held:  # open for reading only: allowed
        vdi(mount, "rollback", "db@good")
        assert held.read(512) == b"\x11" * 512
    assert os.stat(mount.path("db")).st_size == 24 * MiB and sha(mount.path("db")) == good
    out = run("qemu-io", "-f", "raw", *sum([["-c", f"read -P {p} {o} {n}"] for p, o, n in pattern], []),
              mount.path("db")).stdout
    assert "verification failed" not in out
    wait_until(lambda: {v for v, _ in objects(mount)} == {data_vid(mount, "db", "good")})  # the undone writes are freed
    with open(mount.path("db"), "r+b"):
        res = vdi(mount, "rollback", "db@good", check=False)
    assert res.returncode == 1 and "open for writing" in res.stderr


@pytest.mark.parametrize("order", list(itertools.permutations(["snapshot", "clone", "vdi"])),
                         ids=lambda o: "-".join(o))
def test_deleting_in_any_order_frees_exactly_what_nothing_references(mount, order):
    run("truncate", "-s", "16M", mount.path("base"))
    for i in range(4):
        write_at(mount.path("base"), i * OBJ, bytes([0x20 + i]) * OBJ)
    vdi(mount, "snapshot", "base", "s")
    vdi(mount, "clone", "base@s", "c")
    write_at(mount.path("base"), OBJ, b"b" * 4096, fsync=True)  # base copies up object 1
    write_at(mount.path("c"), 2 * OBJ, b"c" * 4096, fsync=True)  # the clone copies up object 2
    frozen, own_base, own_c = data_vid(mount, "base", "s"), data_vid(mount, "base"), data_vid(mount, "c")
    maps = {  # what each map points at, index -> data vid
        "snapshot": {0: frozen, 1: frozen, 2: frozen, 3: frozen},
        "vdi": {0: frozen, 1: own_base, 2: frozen, 3: frozen},
        "clone": {0: frozen, 1: frozen, 2: own_c, 3: frozen},
    }
    contents = {"snapshot": snap_path(mount, "base", "s"), "vdi": mount.path("base"), "clone": mount.path("c")}
    digests = {k: sha(p) for k, p in contents.items()}
    alive = set(maps)
    assert objects(mount) == {(v, i) for m in maps.values() for i, v in m.items()}
    for what in order:
        if what == "snapshot":
            if "snapshot" in alive:
                vdi(mount, "snapshot-delete", "base@s")
        elif what == "vdi":
            vdi(mount, "delete", "base", "--snapshots")
            alive.discard("snapshot")  # it went with its VDI
        else:
            vdi(mount, "delete", "c")
        alive.discard(what)
        want = {(v, i) for k in alive for i, v in maps[k].items()}
        wait_until(lambda: objects(mount) == want)  # freed: everything nothing points at
        for k in alive:  # and nothing shared was freed early
            assert sha(contents[k]) == digests[k], k
    assert objects(mount) == set()
    assert json.loads(vdi(mount, "tree", "--json").stdout) == []


def test_info_counts_shared_objects_and_names_snapshots(mount):
    run("truncate", "-s", "12M", mount.path("v"))
    for i in range(3):
        write_at(mount.path("v"), i * OBJ, b"v" * 4096)
    vdi(mount, "snapshot", "v", "a")
    write_at(mount.path("v"), 0, b"w" * 4096, fsync=True)
    vdi(mount, "snapshot", "v", "b")
    info = json.loads(vdi(mount, "info", "v", "--json").stdout)
    assert info["snapshots"] == ["a", "b"] and info["objects"] == 3 and info["own_objects"] == 0
    write_at(mount.path("v"), OBJ, b"x" * 4096, fsync=True)
    info = json.loads(vdi(mount, "info", "v", "--json").stdout)
    assert info["own_objects"] == 1 and info["data_vid"] == data_vid(mount, "v")
    assert "shared with snapshots" in vdi(mount, "info", "v").stdout
    res = vdi(mount, "clone", "v@nope", "w", check=False)
    assert res.returncode == 1 and "no snapshot 'nope'" in res.stderr and "Traceback" not in res.stderr
    res = vdi(mount, "clone", "v", "w", check=False)
    assert res.returncode == 1 and "is not NAME@SNAP" in res.stderr
    res = vdi(mount, "clone", "v@a", "bad@name", check=False)
    assert res.returncode == 1 and "'@'" in res.stderr and not os.path.exists(mount.path("bad@name"))
    assert tree(mount).keys() == {"v"}  # refused operations left nothing behind


def test_flatten_copies_what_a_clone_shares_while_it_is_written(mount):
    need("qemu-io")
    run("truncate", "-s", "24M", mount.path("gold"))
    pattern = [("0xab", OBJ - 4096, 8192), ("0x11", 0, 512), ("0x77", 5 * OBJ + 4096, 65536)]
    run("qemu-io", "-f", "raw", *sum([["-c", f"write -P {p} {o} {n}"] for p, o, n in pattern], []),
        mount.path("gold"))
    vdi(mount, "snapshot", "gold", "base")
    vdi(mount, "clone", "gold@base", "vm")
    base, slots = 3 * OBJ, 256  # a VM keeps writing object 3 of the clone meanwhile
    writer = SequentialWriter(mount.path("vm"), base, slots)
    writer.start()
    try:
        wait_until(lambda: writer.acked > 10)
        out = vdi(mount, "flatten", "vm", "--rate", "8M").stdout  # 3 objects to copy: about 1.5 s
    finally:
        writer.stop.set()
        writer.join()
    assert "flattened vm: 3 objects copied" in out  # 0, 1 and 5; the VM allocated 3 itself
    own = data_vid(mount, "vm")
    assert {i for v, i in objects(mount) if v == own} == {0, 1, 3, 5}  # everything allocated, own now
    assert tree(mount)["vm"]["parent"] is None
    out = run("qemu-io", "-r", "-f", "raw", *sum([["-c", f"read -P {p} {o} {n}"] for p, o, n in pattern], []),
              mount.path("vm")).stdout
    assert "verification failed" not in out
    assert read_at(mount.path("vm"), base, slots * 4096) == writer.state_after(writer.acked)
    vdi(mount, "delete", "gold", "--snapshots")  # nothing of gold is needed any more
    wait_until(lambda: {v for v, _ in objects(mount)} == {own})
    out = run("qemu-io", "-r", "-f", "raw", *sum([["-c", f"read -P {p} {o} {n}"] for p, o, n in pattern], []),
              mount.path("vm")).stdout
    assert "verification failed" not in out


def test_diff_and_du_come_from_the_object_maps(mount):
    run("truncate", "-s", "16M", mount.path("v"))
    for i in range(3):
        write_at(mount.path("v"), i * OBJ, b"a" * 4096)
    vdi(mount, "snapshot", "v", "s1")
    write_at(mount.path("v"), OBJ + 8192, b"b" * 4096)  # copy-up of object 1
    write_at(mount.path("v"), 3 * OBJ, b"c" * 4096)  # a new object 3
    write_at(mount.path("v"), 2 * OBJ, bytes(OBJ), fsync=True)  # object 2 zeroed whole
    vdi(mount, "snapshot", "v", "s2")

    def diff(*args):
        return json.loads(vdi(mount, "diff", *args, "--json").stdout)["extents"]

    assert diff("v@s2", "--from", "s1") == [[OBJ, OBJ, "data"], [2 * OBJ, OBJ, "zero"], [3 * OBJ, OBJ, "data"]]
    assert diff("v@s1") == [[0, 3 * OBJ, "data"]]
    assert diff("v", "--from", "s2") == []  # nothing since
    write_at(mount.path("v"), 0, b"d" * 512, fsync=True)
    assert diff("v", "--from", "s2") == [[0, OBJ, "data"]]
    assert "4.0 MiB changed" in vdi(mount, "diff", "v", "--from", "s2").stdout
    rows = {r["name"]: r for r in json.loads(vdi(mount, "du", "v", "--json").stdout)}
    assert list(rows) == ["v@s1", "v@s2", "v"]
    assert (rows["v@s1"]["allocated"], rows["v@s1"]["exclusive"]) == (3 * OBJ, 2 * OBJ)  # objects 1 and 2
    assert (rows["v@s2"]["allocated"], rows["v@s2"]["exclusive"]) == (3 * OBJ, 0)  # all shared (s1, v)
    assert (rows["v"]["allocated"], rows["v"]["exclusive"]) == (3 * OBJ, OBJ)  # its new object 0
    # deleting s1 frees exactly what du said it holds alone
    before = len(objects(mount))
    vdi(mount, "snapshot-delete", "v@s1")
    wait_until(lambda: len(objects(mount)) == before - 2)
    res = vdi(mount, "diff", "v", "--from", "s1", check=False)
    assert res.returncode == 1 and "no snapshot 's1'" in res.stderr


def test_export_diff_and_import_diff_carry_snapshots_between_vdis(mount, tmp_path):
    rnd = os.urandom
    run("truncate", "-s", "64M", mount.path("src"))
    for i in range(10):
        write_at(mount.path("src"), i * OBJ + 4096 * i, rnd(OBJ // 2))
    vdi(mount, "snapshot", "src", "s1")
    write_at(mount.path("src"), 2 * OBJ + 123, rnd(5000))  # two objects change a little
    write_at(mount.path("src"), 7 * OBJ + 9999, rnd(100))
    write_at(mount.path("src"), 4 * OBJ, bytes(OBJ))  # one is zeroed whole
    write_at(mount.path("src"), 7 * OBJ + (128 << 10), bytes(256 << 10))  # zeros inside a changed one
    os.truncate(mount.path("src"), 72 * MiB)  # and the VDI grows
    write_at(mount.path("src"), 70 * MiB, rnd(4096), fsync=True)  # into a new object
    vdi(mount, "snapshot", "src", "s2")
    full, inc = str(tmp_path / "s1.diff"), str(tmp_path / "s1-s2.diff")
    vdi(mount, "export-diff", "src@s1", full)
    vdi(mount, "export-diff", "src@s2", inc, "--from", "s1")
    assert 10 * (OBJ // 2) < os.path.getsize(full) < 10 * OBJ  # the data, not the 64 MiB
    assert os.path.getsize(inc) < 3 * OBJ + 4096  # only the three changed objects' data
    vdi(mount, "import-diff", full, "dst")
    assert sha(mount.path("dst")) == sha(snap_path(mount, "src", "s1"))
    vdi(mount, "import-diff", inc, "dst")
    assert sha(mount.path("dst")) == sha(snap_path(mount, "src", "s2")) == sha(snap_path(mount, "dst", "s2"))
    assert os.stat(mount.path("dst")).st_size == 72 * MiB
    ids = {s["name"]: s["id"] for s in tree(mount)["dst"]["snapshots"]}
    assert ids == {s["name"]: s["id"] for s in tree(mount)["src"]["snapshots"]}
    # through a pipe, as to an object store's CLI
    piped = run("sh", "-c", f"{sys.executable} -m vdifs vdi --mount {mount.mp} export-diff src@s2 - "
                            f"| {sys.executable} -m vdifs vdi --mount {mount.mp} import-diff - copy")
    assert "imported src@s2" in piped.stdout and sha(mount.path("copy")) == sha(mount.path("dst"))

    # bad streams: refused with one line, the target unchanged
    write_at(mount.path("src"), 0, rnd(OBJ), fsync=True)
    vdi(mount, "snapshot", "src", "s3")
    nxt = str(tmp_path / "s2-s3.diff")
    vdi(mount, "export-diff", "src@s3", nxt, "--from", "s2")
    raw = open(nxt, "rb").read()
    before = sha(mount.path("dst"))
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x40
    for label, bad in (("flipped", bytes(flipped)), ("truncated", raw[:len(raw) // 2]),
                       ("extended", raw + b"more")):
        p = tmp_path / f"{label}.diff"
        p.write_bytes(bad)
        res = vdi(mount, "import-diff", str(p), "dst", check=False)
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and "unchanged" in res.stderr, res.stderr
        assert sha(mount.path("dst")) == before, label
        assert [s["name"] for s in tree(mount)["dst"]["snapshots"]] == ["s1", "s2"]
    res = vdi(mount, "import-diff", full, "dst", check=False)  # a full stream never overwrites a VDI
    assert res.returncode == 1 and "exists" in res.stderr
    res = vdi(mount, "import-diff", inc, "dst", check=False)  # already applied
    assert res.returncode == 1 and "already has a snapshot 's2'" in res.stderr
    # a base with the right name but another history is refused
    run("truncate", "-s", "64M", mount.path("other"))
    vdi(mount, "snapshot", "other", "s1")
    res = vdi(mount, "import-diff", inc, "other", check=False)
    assert res.returncode == 1 and "not the snapshot this diff was made from" in res.stderr
    # the target changed since its base: refused before anything is written
    write_at(mount.path("dst"), 0, b"local change", fsync=True)
    res = vdi(mount, "import-diff", nxt, "dst", check=False)
    assert res.returncode == 1 and "changed since snapshot 's2'" in res.stderr
    vdi(mount, "rollback", "dst@s2")
    vdi(mount, "import-diff", nxt, "dst")
    assert sha(mount.path("dst")) == sha(snap_path(mount, "src", "s3"))


def test_resizing_a_vdi_leaves_its_snapshots_alone(mount):
    run("truncate", "-s", "12M", mount.path("r"))
    data = os.urandom(12 * MiB)
    write_at(mount.path("r"), 0, data, fsync=True)
    vdi(mount, "snapshot", "r", "full")
    digest = sha(snap_path(mount, "r", "full"))
    vdi(mount, "resize", "r", "6M")  # drops object 2, zeroes the tail of object 1
    assert read_at(mount.path("r"), 0, 6 * MiB) == data[:6 * MiB]
    vdi(mount, "resize", "r", "16M")
    assert read_at(mount.path("r"), 6 * MiB, 10 * MiB) == bytes(10 * MiB)  # growing reads zeros
    assert os.stat(snap_path(mount, "r", "full")).st_size == 12 * MiB
    assert sha(snap_path(mount, "r", "full")) == digest  # the shrink freed nothing it needs
    frozen = data_vid(mount, "r", "full")
    assert {i for v, i in objects(mount) if v == frozen} == {0, 1, 2}
    vdi(mount, "rollback", "r@full")
    assert os.stat(mount.path("r")).st_size == 12 * MiB and sha(mount.path("r")) == digest


def test_fifty_clones_of_a_template_copy_nothing(mount):
    import trio

    from vdifs.control import caller

    run("truncate", "-s", "32M", mount.path("template"))
    image = os.urandom(16 * MiB)
    write_at(mount.path("template"), 0, image, fsync=True)
    vdi(mount, "snapshot", "template", "golden")
    before = objects(mount)
    sock = os.path.join(mount.store, "control.sock")

    async def clone_all():
        for i in range(50):
            await caller.call(sock, "vdi.clone", {"name": "template", "snapshot": "golden", "new": f"vm{i:02d}"})

    trio.run(clone_all)
    assert objects(mount) == before  # no data object was copied
    for i in (0, 17, 49):
        assert read_at(mount.path(f"vm{i:02d}"), 0, 16 * MiB) == image
    write_at(mount.path("vm17"), 0, b"mine", fsync=True)
    assert len(objects(mount)) == len(before) + 1 and read_at(mount.path("vm18"), 0, 4) == image[:4]
    assert len(tree(mount)) == 51
