"""The mount's NBD server with real clients (qemu-img, qemu-io) and a
hand-made one for what they never send."""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import nbd_client as nbd
from tests.e2e.conftest import OBJ, need, read_at, run, vdifs, write_at

MiB = 1 << 20


def sock(m) -> str:
    return os.path.join(m.store, "nbd.sock")


def url(m, export: str) -> str:
    return f"nbd+unix:///{export}?socket={sock(m)}"


def qemu_io(m, export: str, *cmds: str, check: bool = True, read_only: bool = False):
    argv = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
    for c in cmds:
        argv += ["-c", c]
    res = run(*argv, url(m, export), check=check)
    if check:
        assert "error" not in res.stdout.lower() and "fail" not in res.stdout.lower(), res.stdout
    return res


def qemu_map(m, export: str) -> list[dict]:
    return json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", url(m, export)).stdout)


def data_ranges(extents: list[dict]) -> list[tuple[int, int]]:
    """(start, end) of the extents qemu-img map calls data, merged."""
    out: list[tuple[int, int]] = []
    for e in extents:
        if e["data"]:
            if out and out[-1][1] == e["start"]:
                out[-1] = (out[-1][0], e["start"] + e["length"])
            else:
                out.append((e["start"], e["start"] + e["length"]))
    return out


def make_vdi(m, name: str, size: int) -> None:
    vdifs("vdi", "--mount", m.mp, "create", name, str(size))


def test_qemu_img_and_qemu_io_over_nbd_see_the_file_byte_for_byte(mount):
    need("qemu-img", "qemu-io")
    make_vdi(mount, "vm", 24 * MiB)
    info = json.loads(run("qemu-img", "info", "--output=json", "-f", "raw", url(mount, "vm")).stdout)
    assert info["virtual-size"] == 24 * MiB
    # patterns across object boundaries, written over NBD, read through the file
    qemu_io(mount, "vm", f"write -P 0xa5 {OBJ - 4096} 8192", f"write -P 0x3c {2 * OBJ - 1} 3",
            f"write -P 0x11 {3 * OBJ} {2 * OBJ}")
    f = mount.path("vm")
    assert read_at(f, OBJ - 4096, 8192) == b"\xa5" * 8192
    assert read_at(f, 2 * OBJ - 1, 3) == b"\x3c" * 3
    assert read_at(f, 3 * OBJ, 2 * OBJ) == b"\x11" * (2 * OBJ)
    assert read_at(f, OBJ - 8192, 4096) == bytes(4096)
    # written through the file, read over NBD (qemu-io checks the pattern)
    write_at(f, 5 * OBJ + 100, b"\x77" * 5000, fsync=True)
    qemu_io(mount, "vm", f"read -P 0x77 {5 * OBJ + 100} 5000", f"read -P 0 {5 * OBJ} 100",
            f"read -P 0xa5 {OBJ - 4096} 8192")
    # a whole copy through qemu-img convert equals the file
    out = os.path.join(os.path.dirname(mount.mp), "copy.raw")
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", url(mount, "vm"), out)
    assert open(out, "rb").read() == open(f, "rb").read()
    # the export list holds the VDI
    assert "vm" in run("qemu-nbd", "--list", "-k", sock(mount)).stdout


def test_pages_the_file_cached_are_dropped_before_nbd_answers_a_change(mount):
    """The kernel keeps a file's pages (across opens, on an embedded pool)
    and, since design change 61, does not ask before reading them: a write,
    TRIM or WRITE_ZEROES through the export must drop them before its reply,
    or the file goes on showing the bytes the export replaced."""
    need("qemu-io")
    make_vdi(mount, "vm", 8 * MiB)
    f = mount.path("vm")
    write_at(f, 0, b"\x11" * 65536, fsync=True)
    fd = os.open(f, os.O_RDONLY)  # buffered, held open: its pages stay cached
    try:
        assert os.pread(fd, 65536, 0) == b"\x11" * 65536
        qemu_io(mount, "vm", "write -P 0x22 0 65536")
        assert os.pread(fd, 65536, 0) == b"\x22" * 65536
        assert read_at(f, 0, 65536) == b"\x22" * 65536  # and through a new open
        qemu_io(mount, "vm", "write -z 0 4096", "discard 4096 4096")
        assert os.pread(fd, 65536, 0) == bytes(8192) + b"\x22" * (65536 - 8192)
    finally:
        os.close(fd)


def test_holes_and_data_as_the_object_map_has_them_and_convert_stays_sparse(mount):
    need("qemu-img", "qemu-io")
    make_vdi(mount, "sparse", 40 * MiB)
    f = mount.path("sparse")
    for index in (0, 2, 3, 7):
        write_at(f, index * OBJ + 12345, os.urandom(1000))
    extents = qemu_map(mount, "sparse")
    assert data_ranges(extents) == [(0, OBJ), (2 * OBJ, 4 * OBJ), (7 * OBJ, 8 * OBJ)]
    assert all(e["zero"] for e in extents if not e["data"])
    assert mount.info("sparse")["allocated"] == 4 * OBJ
    out = os.path.join(os.path.dirname(mount.mp), "sparse.raw")
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", url(mount, "sparse"), out)
    assert os.path.getsize(out) == 40 * MiB
    assert os.stat(out).st_blocks * 512 <= 4 * OBJ  # the holes stayed holes
    assert open(out, "rb").read() == open(f, "rb").read()


def test_trim_and_write_zeroes_free_objects_and_read_back_zeros(mount):
    need("qemu-io")
    make_vdi(mount, "t", 48 * MiB)
    qemu_io(mount, "t", f"write -P 0x5a 0 {8 * OBJ}")
    assert mount.info("t")["allocated"] == 8 * OBJ
    vid = mount.vid("t")
    # TRIM of objects 1-2 whole and half of 3: two freed, the half reads zeros
    qemu_io(mount, "t", f"discard {OBJ} {2 * OBJ + OBJ // 2}", "flush")
    assert mount.info("t")["allocated"] == 6 * OBJ
    assert len(mount.data_objects(vid)) == 6
    qemu_io(mount, "t", f"read -P 0 {OBJ} {2 * OBJ + OBJ // 2}", f"read -P 0x5a {3 * OBJ + OBJ // 2} {OBJ // 2}",
            f"read -P 0x5a 0 {OBJ}")
    # WRITE_ZEROES that may unmap frees; with NO_HOLE (qemu-io's plain -z) it keeps the object
    qemu_io(mount, "t", f"write -z -u {4 * OBJ} {OBJ}")
    assert mount.info("t")["allocated"] == 5 * OBJ
    qemu_io(mount, "t", f"write -z {5 * OBJ} {OBJ}", f"write -z {9 * OBJ} {OBJ}")
    assert mount.info("t")["allocated"] == 6 * OBJ  # object 5 kept, object 9 provisioned
    qemu_io(mount, "t", f"read -P 0 {4 * OBJ} {2 * OBJ}", f"read -P 0 {9 * OBJ} {OBJ}", f"read -P 0x5a {6 * OBJ} {2 * OBJ}")
    assert read_at(mount.path("t"), 4 * OBJ, 2 * OBJ) == bytes(2 * OBJ)
    assert data_ranges(qemu_map(mount, "t")) == [(0, OBJ), (3 * OBJ, 4 * OBJ), (5 * OBJ, 8 * OBJ),
                                                 (9 * OBJ, 10 * OBJ)]
    # what was trimmed stays trimmed after a remount
    mount.restart()
    assert mount.info("t")["allocated"] == 6 * OBJ
    assert read_at(mount.path("t"), OBJ, 2 * OBJ) == bytes(2 * OBJ)


def test_a_snapshot_export_is_read_only_and_holds_the_snapshots_bytes(mount):
    need("qemu-io")
    make_vdi(mount, "base", 8 * MiB)
    write_at(mount.path("base"), 0, b"\x42" * MiB, fsync=True)
    vdifs("vdi", "--mount", mount.mp, "snapshot", "base", "s1")
    write_at(mount.path("base"), 0, b"\x43" * MiB, fsync=True)
    qemu_io(mount, "base@s1", f"read -P 0x42 0 {MiB}", f"read -P 0 {MiB} {MiB}", read_only=True)
    refused = qemu_io(mount, "base@s1", "read 0 512", check=False)  # read-write: refused at open
    assert refused.returncode != 0 and "denied" in refused.stderr
    qemu_io(mount, "base", f"read -P 0x43 0 {MiB}")
    c = nbd.Client(sock(mount))
    c.structured_replies()
    c.go("base@s1")
    assert c.tflags & nbd.T_READ_ONLY and c.size == 8 * MiB
    assert c.write(0, b"x" * 512) == 1  # EPERM
    assert c.command(nbd.CMD_TRIM, 0, OBJ)[0] == 1
    assert c.read(0, 4096) == b"\x42" * 4096
    c.disconnect()
    assert read_at(mount.path(".snapshots/base@s1"), 0, MiB) == b"\x42" * MiB


def test_handshake_variants_every_command_and_both_reply_kinds(mount):
    make_vdi(mount, "p", 16 * MiB)
    path = sock(mount)
    # the old way in, with and without the 124 zero bytes; simple replies
    for no_zeroes in (True, False):
        c = nbd.Client(path, no_zeroes=no_zeroes)
        c.export_name("p")
        assert c.size == 16 * MiB and not c.tflags & nbd.T_READ_ONLY
        assert c.write(4096, b"\x01" * 8192) == 0
        assert c.read(4096, 8192) == b"\x01" * 8192
        assert c.command(nbd.CMD_FLUSH) == (0, b"")
        assert c.command(nbd.CMD_BLOCK_STATUS, 0, OBJ)[0] == 22  # no structured replies: EINVAL
        c.disconnect()
    # options: list, info, unknown ones, meta contexts, structured replies
    c = nbd.Client(path)
    assert c.list_exports() == ["p"]
    replies = c.go("p", infos=(1, 2, 3), opt=nbd.OPT_INFO)
    kinds = sorted(struct.unpack(">H", d[:2])[0] for rep, d in replies if rep == nbd.REP_INFO)
    assert kinds == [0, 1, 2, 3] and replies[-1][0] == nbd.REP_ACK and c.size == 16 * MiB
    assert c.go("nope")[-1][0] == nbd.REP_ERR_UNKNOWN
    c.option(99)
    assert c.replies_until_ack(99)[-1][0] == nbd.REP_ERR_UNSUP
    c.option(nbd.OPT_STARTTLS)
    assert c.replies_until_ack(nbd.OPT_STARTTLS)[-1][0] == nbd.REP_ERR_UNSUP
    assert c.meta("p", ["base:allocation"])[-1][0] == nbd.REP_ERR_INVALID  # structured replies first
    listed = c.meta("p", [], opt=nbd.OPT_LIST_META_CONTEXT)
    assert [d[4:] for rep, d in listed if rep == nbd.REP_META_CONTEXT] == [b"base:allocation"]
    c.structured_replies()
    chosen = c.meta("p", ["base:allocation", "qemu:dirty-bitmap:x"])
    assert [d[4:] for rep, d in chosen if rep == nbd.REP_META_CONTEXT] == [b"base:allocation"]
    c.go("p")
    # every command, structured
    assert c.write(OBJ - 100, b"\x02" * 200, flags=nbd.FLAG_FUA) == 0
    assert c.read(OBJ - 100, 200) == b"\x02" * 200
    assert c.command(nbd.CMD_CACHE, 0, OBJ)[0] == 0
    assert c.block_status(0, 4 * OBJ) == [(2 * OBJ, 0), (2 * OBJ, 3)]
    assert c.block_status(0, 4 * OBJ, nbd.FLAG_REQ_ONE) == [(2 * OBJ, 0)]
    assert c.command(nbd.CMD_WRITE_ZEROES, OBJ, OBJ)[0] == 0  # object 1 freed
    assert c.block_status(0, 4 * OBJ) == [(OBJ, 0), (3 * OBJ, 3)]
    assert c.command(nbd.CMD_WRITE_ZEROES, 0, OBJ, nbd.FLAG_NO_HOLE | nbd.FLAG_FAST_ZERO)[0] == 95  # ENOTSUP
    assert c.command(nbd.CMD_TRIM, 0, OBJ, nbd.FLAG_FUA)[0] == 0
    assert c.read(0, 8192) == bytes(8192)
    assert c.block_status(0, 16 * MiB) == [(16 * MiB, 3)]
    # out of range, bad flags, unknown commands: an error, the connection goes on
    assert c.command(nbd.CMD_READ, 16 * MiB - 10, 20)[0] == 22
    assert c.write(16 * MiB - 10, b"x" * 20) == 28  # ENOSPC
    assert c.command(nbd.CMD_READ, 0, 64 << 20)[0] == 75  # EOVERFLOW
    assert c.command(nbd.CMD_FLUSH, 0, 0, nbd.FLAG_NO_HOLE)[0] == 22  # a flag FLUSH does not take
    assert c.command(nbd.CMD_FLUSH, 0, 0, nbd.FLAG_FUA)[0] == 0  # FUA is taken everywhere
    assert c.command(42, 0, 512)[0] == 22
    assert c.read(0, 512) == bytes(512)
    # shrunk through the file while attached: writes past the new end are refused, never grow it back
    os.truncate(mount.path("p"), 8 * MiB)
    assert c.write(12 * MiB, b"x" * 512) == 28
    assert mount.info("p")["size"] == 8 * MiB
    c.disconnect()


def test_many_requests_in_flight_are_answered_each_once(mount):
    make_vdi(mount, "q", 16 * MiB)
    c = nbd.Client(sock(mount))
    c.structured_replies()
    c.go("q")
    blocks = {i: os.urandom(4096) for i in range(200)}

    def pipelined(cmd: int) -> dict[int, tuple[int, bytes]]:
        """Every block's request sent by a thread while this one reads the
        replies (as QEMU does): cookie -> (error, data)."""
        sent: dict[int, int] = {}
        sender = threading.Thread(target=lambda: sent.update(
            {c.request(cmd, i * 65536, 4096, payload=d if cmd == nbd.CMD_WRITE else b""): i
             for i, d in blocks.items()}))
        sender.start()
        replies = {}
        for _ in blocks:
            cookie, error, data = c.reply()
            assert cookie not in replies  # each answered once
            replies[cookie] = (error, data)
        sender.join()
        assert set(replies) == set(sent)
        return {sent[cookie]: r for cookie, r in replies.items()}

    assert all(error == 0 for error, _ in pipelined(nbd.CMD_WRITE).values())
    assert pipelined(nbd.CMD_READ) == {i: (0, d) for i, d in blocks.items()}
    c.disconnect()
    for i, d in blocks.items():
        assert read_at(mount.path("q"), i * 65536, 4096) == d


def test_flushes_sent_together_cost_one_sync(mount):
    """A write, then sixteen flushes sent without waiting: each is
    answered, once, without error, and `vdifs status` counts one sync for
    them all (group commit), then one more for a flush after a new write.
    (Flushes that come while a sync runs: tests/pool/test_volume.py.)"""
    make_vdi(mount, "f", 16 * MiB)
    c = nbd.Client(sock(mount))
    c.structured_replies()
    c.go("f")

    def syncs() -> int:
        return next(v["syncs"] for v in mount.call("status")["open"] if v["name"] == "f")

    def write(offset: int, data: bytes) -> int:
        cookie = c.request(nbd.CMD_WRITE, offset, len(data), payload=data)
        got, error, _ = c.reply()
        assert got == cookie
        return error

    assert write(0, b"a" * 4096) == 0
    before = syncs()
    cookies = {c.request(nbd.CMD_FLUSH, 0, 0) for _ in range(16)}
    replies = dict(c.reply()[:2] for _ in cookies)
    assert replies == {cookie: 0 for cookie in cookies}
    assert syncs() == before + 1
    assert write(MiB, b"b" * 4096) == 0
    assert c.command(nbd.CMD_FLUSH)[0] == 0
    assert syncs() == before + 2
    c.disconnect()
    assert read_at(mount.path("f"), 0, 4096) == b"a" * 4096 and read_at(mount.path("f"), MiB, 4096) == b"b" * 4096


def test_broken_frames_close_only_their_connection(mount):
    need("qemu-io")
    make_vdi(mount, "b", 8 * MiB)
    path = sock(mount)
    bystander = nbd.Client(path)
    bystander.structured_replies()
    bystander.go("b")
    cases = [
        lambda c: c.sock.sendall(b"\xff\xff\xff\xff"),  # unknown client flags
        lambda c: (c.sock.sendall(b""), c.option(nbd.OPT_GO, b"\x00\x00\x00\xffab")),  # name longer than its option
        lambda c: c.sock.sendall(struct.pack(">QII", 0x1234, 7, 0)),  # bad option magic
        lambda c: c.sock.sendall(struct.pack(">QII", nbd.IHAVEOPT, 7, 1 << 30)),  # huge option
    ]
    for i, case in enumerate(cases):
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.settimeout(10)
        raw.connect(path)
        raw.recv(18)
        if i:
            raw.sendall(struct.pack(">I", 3))
        c = nbd.Client.__new__(nbd.Client)
        c.sock = raw
        case(c)
        if i == 1:  # a malformed GO is refused, the handshake goes on
            assert c.replies_until_ack(nbd.OPT_GO)[-1][0] == nbd.REP_ERR_INVALID
            continue
        assert c.closed_by_server()
        raw.close()
    for bad in (lambda c: c.request(nbd.CMD_READ, 0, 512, magic=0xDEADBEEF),
                lambda c: c.request(nbd.CMD_WRITE, 0, 64 << 20)):  # bad magic, write too large
        c = nbd.Client(path)
        c.go("b")
        bad(c)
        assert c.closed_by_server()
    # a client that goes away mid-write: nothing written, the server goes on
    c = nbd.Client(path)
    c.go("b")
    c.sock.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, 1, 0, 4096) + b"\x99" * 100)
    c.close()
    assert bystander.write(0, b"\x07" * 4096) == 0 and bystander.read(0, 4096) == b"\x07" * 4096
    bystander.disconnect()
    qemu_io(mount, "b", "read -P 0x07 0 4096")
    log = open(mount.log).read()
    assert "bad request magic" in log and "unknown client flags" in log


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(headers=st.lists(st.binary(min_size=28, max_size=28), min_size=1, max_size=5),
       valid_magic=st.booleans())
def test_fuzzed_request_headers_never_take_the_server_down(mount, headers, valid_magic):
    path = sock(mount)
    if not os.path.exists(mount.path("f")):
        make_vdi(mount, "f", 8 * MiB)
    c = nbd.Client(path, timeout=5)
    c.structured_replies()
    c.go("f")
    for h in headers:
        if valid_magic:
            h = struct.pack(">I", nbd.REQUEST_MAGIC) + h[4:]
            flags, cmd, cookie, offset, length = struct.unpack(">HHQQI", h[4:])
            if cmd == nbd.CMD_WRITE:
                h = h[:24] + struct.pack(">I", length % 4096)  # a payload we can send
                h += b"\x00" * (length % 4096)
        try:
            c.sock.sendall(h)
        except OSError:
            break
    c.close()
    # the server still serves: a fresh connection reads and writes
    d = nbd.Client(path)
    d.structured_replies()
    d.go("f")
    assert d.write(OBJ, b"\x5e" * 512) == 0 and d.read(OBJ, 512) == b"\x5e" * 512
    d.disconnect()


def test_socket_path_group_and_no_socket(tmp_path):
    """--nbd PATH puts the socket there, mode 0660, owned by --nbd-group;
    --no-nbd serves none; an unknown group is a one-line error at start."""
    import grp
    import stat

    from tests.e2e.conftest import MountProc

    path = str(tmp_path / "run" / "vdis.sock")
    m = MountProc(str(tmp_path / "mnt"), str(tmp_path / "store"), str(tmp_path / "mount.log"),
                  ("--nbd", path, "--nbd-group", "daemon"))
    m.start()
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == grp.getgrnam("daemon").gr_gid
        make_vdi(m, "x", MiB)
        c = nbd.Client(path)
        assert c.list_exports() == ["x"]
        c.close()
    finally:
        m.stop()
    assert not os.path.exists(path)  # removed at the stop
    m = MountProc(str(tmp_path / "mnt"), str(tmp_path / "store"), str(tmp_path / "mount.log"), ("--no-nbd",))
    m.start()
    try:
        assert not os.path.exists(os.path.join(m.store, "nbd.sock"))
    finally:
        m.stop()
    bad = run(sys.executable, "-m", "vdifs", "mount", str(tmp_path / "mnt"), "--store", str(tmp_path / "store"),
              "--foreground", "--nbd-group", "no-such-group-here", check=False)
    assert bad.returncode != 0 and "no group 'no-such-group-here'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_a_socket_another_mount_serves_is_not_taken_over(mount, tmp_path):
    """A second mount told to serve NBD where a live one does refuses to
    start, in one line, and the first keeps serving; a socket file left by
    a process that is gone is replaced."""
    path = sock(mount)
    other = run(sys.executable, "-m", "vdifs", "mount", str(tmp_path / "mnt2"), "--store", str(tmp_path / "store2"),
                "--foreground", "--nbd", path, check=False, timeout=60)
    assert other.returncode != 0 and f"another process serves NBD at {path}" in other.stderr, other.stderr
    make_vdi(mount, "still", MiB)
    c = nbd.Client(path)
    assert "still" in c.list_exports()
    c.close()
    stale = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)
    s.close()  # a socket file nobody listens on
    from tests.e2e.conftest import MountProc

    m2 = MountProc(str(tmp_path / "mnt3"), str(tmp_path / "store3"), str(tmp_path / "m3.log"), ("--nbd", stale))
    m2.start()
    try:
        c = nbd.Client(stale)
        assert c.list_exports() == []  # served: this mount's own (empty) pool
    finally:
        c.close()
        m2.stop()
