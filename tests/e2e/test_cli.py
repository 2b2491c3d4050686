import json
import os

import pytest

from vdifs import __version__
from vdifs.cli.common import running_mounts
from vdifs.cli.main import process_alive

from .conftest import OBJ, MountProc, run, vdifs, write_at


def vdi(mount, *args, check=True):
    return vdifs("vdi", "--store", mount.store, *args, check=check)


def one_line_error(res, text):
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vdifs: ") and text in lines[0], res.stderr


def test_vdi_commands(mount):
    out = vdi(mount, "create", "db01", "10G").stdout
    assert "created db01" in out
    assert os.stat(mount.path("db01")).st_size == 10 << 30
    write_at(mount.path("db01"), 0, b"x" * 4096)
    listed = json.loads(vdi(mount, "list", "--json").stdout)
    assert [(v["name"], v["size"], v["allocated"]) for v in listed] == [("db01", 10 << 30, OBJ)]
    table = vdi(mount, "list").stdout
    assert table.splitlines()[0].split()[:4] == ["NAME", "VID", "SIZE", "ALLOCATED"]
    assert "10.0 GiB" in table
    info = json.loads(vdi(mount, "info", "db01", "--json").stdout)
    assert info["objects"] == 1 and info["copies"] == 1
    vdi(mount, "resize", "db01", "20G")
    assert os.stat(mount.path("db01")).st_size == 20 << 30  # the kernel's cache was invalidated
    vdi(mount, "resize", "db01", "4K")
    assert os.stat(mount.path("db01")).st_size == 4096
    with open(mount.path("db01"), "rb") as f:
        assert f.read() == b"x" * 4096
    vdi(mount, "rename", "db01", "db02")
    assert os.listdir(mount.mp) == ["db02"]
    vdifs("vdi", "--mount", mount.mp, "delete", "db02")
    assert os.listdir(mount.mp) == []
    assert "no VDIs" in vdi(mount, "list").stdout


def test_cli_errors_are_one_line(mount, tmp_path):
    vdi(mount, "create", "a", "1M")
    one_line_error(vdi(mount, "create", "a", "1M", check=False), "already exists")
    one_line_error(vdi(mount, "info", "missing", check=False), "no VDI named 'missing'")
    one_line_error(vdi(mount, "delete", "missing", check=False), "no VDI named")
    one_line_error(vdi(mount, "create", "huge", "17P", check=False), "16 PiB")
    one_line_error(vdi(mount, "create", "bad@name", "1M", check=False), "'@'")
    one_line_error(vdi(mount, "create", "c", "1M", "--copies", "2", check=False), "copies")
    res = vdi(mount, "create", "neg", "-5G", check=False)
    assert res.returncode == 2 and "invalid size" in res.stderr and "Traceback" not in res.stderr
    res = vdi(mount, "create", "neg", "12Q", check=False)
    assert res.returncode == 2 and "invalid size" in res.stderr
    one_line_error(vdifs("vdi", "--store", str(tmp_path / "nowhere"), "list", check=False),
                   "no running vdifs mount")
    one_line_error(vdifs("vdi", "--mount", str(tmp_path), "list", check=False), "not a vdifs mount")
    one_line_error(vdifs("umount", str(tmp_path), check=False), "not a vdifs mount")
    one_line_error(vdifs("cache", "--mount", mount.mp, check=False), "has no cache (embedded pools are local)")
    # the store is locked by the running mount
    one_line_error(vdifs("mount", str(tmp_path / "mnt2"), "--store", mount.store, check=False), "in use")
    one_line_error(vdifs("mount", mount.mp, "--store", str(tmp_path / "s2"), check=False), "already a mount point")
    assert sorted(os.listdir(mount.mp)) == ["a"]


def test_version_and_help():
    assert vdifs("--version").stdout.strip() == f"vdifs {__version__}"
    for cmd in ([], ["mount"], ["umount"], ["vdi"], ["vdi", "create"]):
        res = vdifs(*cmd, "--help")
        assert res.stdout.startswith("usage: vdifs")


def test_background_mount_and_umount(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    mp, store = str(tmp_path / "mnt"), str(tmp_path / "store")
    vdifs("mount", mp, "--store", store)  # returns once the mount is up
    try:
        assert os.path.ismount(mp)
        pid = MountProc(mp, store, "").call("status")["pid"]
        vdifs("vdi", "--mount", mp, "create", "bg", "1M")
        write_at(os.path.join(mp, "bg"), 0, b"background")
        vdifs("umount", mp)
        assert not os.path.ismount(mp)
        assert not process_alive(pid)  # exited (a zombie until its new parent reaps it)
        vdifs("mount", mp, "--store", store)
        with open(os.path.join(mp, "bg"), "rb") as f:
            assert f.read(10) == b"background"
        vdifs("umount", mp)
    finally:
        if os.path.ismount(mp):
            run("fusermount3", "-u", "-z", mp, check=False)
    assert "mounted" in open(os.path.join(store, "mount.log")).read()


def test_mount_or_store_before_or_after_the_action(mount):
    vdifs("vdi", "create", "--store", mount.store, "a", "1M")
    for where in (["-m", mount.mp], ["--mount", mount.mp], ["--store", mount.store]):
        after = vdifs("vdi", "list", *where).stdout
        before = vdifs("vdi", *where, "list").stdout
        assert after == before and after.splitlines()[1].split()[0] == "a"
    listed = json.loads(vdifs("vdi", "list", "--store", mount.store, "--json").stdout)
    assert [v["name"] for v in listed] == ["a"]
    listed = json.loads(vdifs("vdi", "--store", mount.store, "list", "--json").stdout)
    assert [v["name"] for v in listed] == ["a"]
    one_line_error(vdifs("vdi", "-m", mount.mp, "list", "--store", mount.store, check=False), "not both")
    # the option after the action is really used (not the one running mount found by itself)
    for where in (["--store", mount.store + "-elsewhere"], ["-m", "/nonexistent-mount"]):
        res = vdifs("vdi", "list", *where, check=False)
        assert res.returncode != 0 and "a" not in res.stdout.split(), where


def own_mount(tmp_path, name):
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("FUSE tests need root and /dev/fuse")
    m = MountProc(str(tmp_path / name), str(tmp_path / f"store-{name}"), str(tmp_path / f"{name}.log"))
    m.start()
    return m


def test_the_one_running_mount_is_found(tmp_path):
    m = own_mount(tmp_path, "my vdis")  # a space: /proc/mounts writes it as \040
    try:
        others = [mp for mp in running_mounts() if mp != m.mp]
        if others:
            pytest.skip(f"other vdifs mounts are running: {others}")
        res = vdifs("vdi", "create", "found", "1M", check=False)
        if "mounts are running" in res.stderr:
            pytest.skip("another vdifs mount came up meanwhile")
        assert res.returncode == 0, res.stderr
        assert os.listdir(m.mp) == ["found"]
        assert "found" in vdifs("vdi", "list").stdout
    finally:
        m.stop()


def test_several_mounts_need_a_choice(tmp_path):
    a = own_mount(tmp_path, "a")
    try:
        b = own_mount(tmp_path, "b b")
        try:
            res = vdifs("vdi", "list", check=False)
            one_line_error(res, "pick one with -m")
            assert a.mp in res.stderr and b.mp in res.stderr
            vdifs("vdi", "create", "-m", b.mp, "x", "1M")  # naming one works
            assert os.listdir(b.mp) == ["x"] and os.listdir(a.mp) == []
        finally:
            b.stop()
    finally:
        a.stop()


def test_status_and_top_show_each_vdis_io(mount):
    """`vdifs status` (table and --json) counts what a client did to each VDI;
    `vdifs top` shows it as rates while it happens."""
    import subprocess
    import sys
    import time

    vdi(mount, "create", "db01", "64M")
    fd = os.open(mount.path("db01"), os.O_RDWR | os.O_DIRECT)
    try:
        import mmap

        buf = mmap.mmap(-1, 65536)
        buf.write(b"s" * 65536)
        for i in range(32):
            os.pwrite(fd, buf, i * 65536)
        os.fsync(fd)
        for i in range(16):
            os.preadv(fd, [buf], i * 65536)
        st = json.loads(vdifs("status", "--store", mount.store, "--json").stdout)
        [v] = [v for v in st["open"] if v["name"] == "db01"]
        assert v["write"]["count"] == 32 and v["write"]["bytes"] == 32 * 65536
        assert v["read"]["count"] == 16 and v["read"]["bytes"] == 16 * 65536
        assert v["flush"]["count"] >= 1 and v["handles"] == 1 and v["lease"] is None  # embedded: no leases
        assert st["vdis"] == 1 and st["total"] >= st["free"] > 0 and st["epoch"] is None
        table = vdifs("status", "--store", mount.store).stdout
        assert f"embedded pool in {mount.store}" in table
        header, row = [line for line in table.splitlines() if line.startswith(("VDI ", "db01"))]
        assert row[header.index("READS"):].split()[0] == "16" and row[header.index("WRITES"):].split()[0] == "32"

        top = subprocess.Popen([sys.executable, "-m", "vdifs", "top", "--store", mount.store, "--interval", "0.3"],
                               stdout=subprocess.PIPE, text=True)
        try:
            end = time.monotonic() + 1.5
            while time.monotonic() < end:  # writes while it watches
                os.pwrite(fd, buf, 0)
        finally:
            time.sleep(0.4)
            top.terminate()
            out = top.communicate(timeout=10)[0]
        assert "w/s" in out and "r_await ms" in out
        lines = out.splitlines()
        rates = [(h, r) for h, r in zip(lines, lines[1:]) if h.startswith("VDI ") and r.startswith("db01")]
        assert rates and any(float(r[h.index("w/s"):].split()[0]) > 0 for h, r in rates)
    finally:
        os.close(fd)
    one_line_error(vdifs("top", "--store", mount.store, "--interval", "0", check=False), "--interval")


def test_a_metrics_address_in_use_is_a_one_line_error(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = "127.0.0.1:%d" % taken.getsockname()[1]
        mp = tmp_path / "mnt"
        mp.mkdir()
        res = vdifs("mount", str(mp), "--store", str(tmp_path / "store"), "--foreground", "--log-level", "warning",
                    "--metrics", address, check=False)
        one_line_error(res, f"cannot serve metrics on {address}")
        assert not os.path.ismount(mp)
        res = vdifs("peer", "--store", str(tmp_path / "peer"), "--listen", "127.0.0.1:0", "--log-level", "warning",
                    "--metrics", address, check=False)
        one_line_error(res, "Address already in use")
    one_line_error(vdifs("peer", "--store", str(tmp_path / "peer"), "--listen", "127.0.0.1:0",
                         "--metrics", "nowhere", check=False), "is not HOST:PORT")
