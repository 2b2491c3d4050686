import os

from .conftest import OBJ, need, run


def qemu_io(path: str, *cmds: str, fmt: str = "raw") -> str:
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    res = run(*args, path)
    assert "Pattern verification failed" not in res.stdout + res.stderr, res.stdout + res.stderr
    assert "failed" not in res.stdout + res.stderr, res.stdout + res.stderr
    return res.stdout


def test_qemu_img_raw_and_qcow2(mount, tmp_path):
    need("qemu-img", "qemu-io")
    run("qemu-img", "create", "-f", "raw", mount.path("db01"), "10G")
    run("qemu-img", "create", "-f", "qcow2", mount.path("web01"), "20G")
    assert os.stat(mount.path("db01")).st_size == 10 << 30
    assert os.stat(mount.path("db01")).st_blocks == 0
    run("qemu-img", "check", "-f", "qcow2", mount.path("web01"))
    info = run("qemu-img", "info", mount.path("web01")).stdout
    assert "file format: qcow2" in info and "virtual size: 20 GiB" in info
    # guest-level data inside the qcow2, then qemu-img check again
    qemu_io(mount.path("web01"), "write -P 0x5a 0 1M", "write -P 0x6b 4190208 8192", fmt="qcow2")
    qemu_io(mount.path("web01"), "read -P 0x5a 0 1M", "read -P 0x6b 4190208 8192", fmt="qcow2")
    run("qemu-img", "check", "-f", "qcow2", mount.path("web01"))


def test_qemu_io_patterns_across_object_boundaries(mount):
    need("qemu-img", "qemu-io")
    size = 3 * OBJ
    run("qemu-img", "create", "-f", "raw", mount.path("disk"), str(size))
    writes = [
        ("0x11", 0, 512),  # first byte
        ("0xab", OBJ - 4096, 8192),  # straddles the 0/1 boundary
        ("0xef", OBJ + 65536, OBJ),  # a whole object's worth, unaligned, over 1/2
        ("0xcd", 2 * OBJ - 1, 2),  # one byte either side of 1/2, over the 0xef run
        ("0x77", size - 512, 512),  # last byte
    ]
    qemu_io(mount.path("disk"), *[f"write -P {p} {o} {n}" for p, o, n in writes])
    # a fresh process reads everything back (no page cache of the writer)
    qemu_io(mount.path("disk"), *[f"read -P {p} {o} {n}" for p, o, n in writes[:2]],
            f"read -P 0xcd {2 * OBJ - 1} 2", f"read -P 0xef {OBJ + 65536} {OBJ - 65537}",
            f"read -P 0xef {2 * OBJ + 1} 65535", f"read -P 0x77 {size - 512} 512",
            f"read -P 0 512 {OBJ - 4096 - 512}")
    assert os.stat(mount.path("disk")).st_size == size
    # beyond EOF: qemu refuses, and a plain read returns nothing
    res = run("qemu-io", "-f", "raw", "-c", f"read {size} 512", mount.path("disk"), check=False)
    assert "out of range" in (res.stdout + res.stderr).lower() or res.returncode != 0
    with open(mount.path("disk"), "rb") as f:
        f.seek(size)
        assert f.read(100) == b""
    mount.restart()
    qemu_io(mount.path("disk"), "read -P 0xab 4190208 8192", f"read -P 0x77 {size - 512} 512")


def test_qemu_img_convert_in_and_out(mount, tmp_path):
    need("qemu-img", "qemu-io")
    src = str(tmp_path / "src.qcow2")
    run("qemu-img", "create", "-f", "qcow2", src, "64M")
    qemu_io(src, "write -P 0x42 0 3M", "write -P 0x99 20M 5M", "write -P 0x01 63M 1M", fmt="qcow2")
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", src, mount.path("imported"))
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", src, mount.path("imported"))
    # only the objects with data were allocated: 0, 5, 6 and 15
    assert len(mount.data_objects(mount.vid("imported"))) == 4
    out = str(tmp_path / "out.qcow2")
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", mount.path("imported"), out)
    run("qemu-img", "compare", src, out)
    run("qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", src, mount.path("imported.qcow2"))
    run("qemu-img", "check", mount.path("imported.qcow2"))
    run("qemu-img", "compare", src, mount.path("imported.qcow2"))
