"""Real QEMU guests for the tests: a Debian cloud kernel and a tiny initramfs
(busybox, the virtio modules, an /init that runs the workload named on the
kernel command line), run under TCG and driven over QMP.

The initramfs is built once per kernel and cached (GUEST_CACHE). Workloads:

- `counter`: write "vdifs NNNNNNNN" to sector N % 20000 of /dev/vda with
  O_DIRECT, N = 1, 2, ... forever, printing "wrote N" to the serial console
  every 50 writes and "ERR N" when a write fails.
- `fill`: write MiB i of /dev/vda (O_DIRECT) with "block NNNNNNNN" and
  zeros, i = 0 .. vdifs.blocks - 1, printing "filled i" after each and
  "ERR i" on a failure (then stopping), "done N" at the end, then power off.
- `trim`: mkfs.ext4 on /dev/vda (the host's mke2fs), vdifs.files files of
  8 MiB of random bytes with their md5sums, "written N"; four seconds
  later three quarters of them removed and `fstrim -v` (its report goes
  to the console), then the file system mounted again and the rest
  checked: "verified K of M", "done", power off.

The cached initramfs is named by the kernel and a hash of /init, so a
changed workload is never run from an old image.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from typing import Any

import pytest

GUEST_CACHE = os.environ.get("VDIFS_GUEST_CACHE", "/var/cache/vdifs-test-guest")
MODULES = ["virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "virtio_blk"]
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in MODULES; do insmod /lib/$m.ko; done
w=$(sed -n 's/.*vdifs.workload=\([a-z]*\).*/\1/p' /proc/cmdline)
echo "workload $w" > /dev/ttyS0
if [ "$w" = counter ]; then
    i=0
    while true; do
        i=$((i + 1))
        if ! printf 'vdifs %08d\n' $i | dd of=/dev/vda bs=512 seek=$((i % 20000)) count=1 conv=sync,notrunc \
                oflag=direct 2>/tmp/dd.err; then
            [ $i -le 3 ] && cat /tmp/dd.err > /dev/ttyS0
            echo "ERR $i" > /dev/ttyS0
        fi
        [ $((i % 50)) = 0 ] && echo "wrote $i" > /dev/ttyS0
    done
fi
if [ "$w" = fill ]; then
    n=$(sed -n 's/.*vdifs.blocks=\([0-9]*\).*/\1/p' /proc/cmdline)
    i=0
    while [ $i -lt $n ]; do
        if ! printf 'block %08d\n' $i | dd of=/dev/vda bs=1M seek=$i count=1 conv=sync,notrunc oflag=direct \
                2>/tmp/dd.err; then
            cat /tmp/dd.err > /dev/ttyS0
            echo "ERR $i" > /dev/ttyS0
            break
        fi
        echo "filled $i" > /dev/ttyS0
        i=$((i + 1))
    done
    echo "done $i" > /dev/ttyS0
fi
if [ "$w" = trim ]; then
    n=$(sed -n 's/.*vdifs.files=\([0-9]*\).*/\1/p' /proc/cmdline)
    mkdir -p /mnt
    if /sbin/mke2fs -q -F -t ext4 -b 4096 -E nodiscard /dev/vda > /tmp/mkfs.out 2>&1 && mount -t ext4 /dev/vda /mnt; then
        i=0
        while [ $i -lt $n ]; do
            dd if=/dev/urandom of=/mnt/f$i bs=1M count=8 2>/dev/null || echo "ERR write $i" > /dev/ttyS0
            i=$((i + 1))
        done
        sync
        (cd /mnt && md5sum f* > /tmp/sums)
        echo "written $n" > /dev/ttyS0
        sleep 4
        i=0
        while [ $i -lt $((n * 3 / 4)) ]; do rm /mnt/f$i; i=$((i + 1)); done
        sync
        fstrim -v /mnt > /dev/ttyS0 2>&1 || echo "ERR fstrim" > /dev/ttyS0
        umount /mnt && mount -t ext4 /dev/vda /mnt || echo "ERR remount" > /dev/ttyS0
        (cd /mnt && md5sum f* > /tmp/sums2)
        echo "verified $(grep -F -x -f /tmp/sums2 /tmp/sums | wc -l) of $(wc -l < /tmp/sums2)" > /dev/ttyS0
        umount /mnt
    else
        cat /tmp/mkfs.out > /dev/ttyS0
        echo "ERR mkfs" > /dev/ttyS0
    fi
    echo "done" > /dev/ttyS0
fi
poweroff -f
"""
#: Host programs the guest runs, copied in with the libraries they load.
HOST_PROGRAMS = ["/usr/sbin/mke2fs"]


def kernel() -> tuple[str, str]:
    """(vmlinuz, module directory) of the newest installed cloud kernel."""
    found = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))
    if not found or shutil.which("qemu-system-x86_64") is None or not os.path.exists("/bin/busybox"):
        pytest.fail("missing qemu-system-x86, linux-image-cloud-amd64 or busybox-static: run 'make deps'")
    version = found[-1].removeprefix("/boot/vmlinuz-")
    return found[-1], f"/lib/modules/{version}"


def initramfs() -> str:
    """Build (once, cached) and return the guest's initramfs."""
    vmlinuz, moddir = kernel()
    init = INIT.replace("MODULES", " ".join(MODULES))
    tag = hashlib.sha256((init + " ".join(HOST_PROGRAMS)).encode()).hexdigest()[:12]
    out = os.path.join(GUEST_CACHE, f"{os.path.basename(moddir)}-{tag}.cpio.gz")
    if os.path.exists(out):
        return out
    os.makedirs(GUEST_CACHE, exist_ok=True)
    root = out + ".d"
    shutil.rmtree(root, ignore_errors=True)
    for d in ("bin", "lib", "proc", "sys", "dev", "tmp"):
        os.makedirs(os.path.join(root, d))
    shutil.copy("/bin/busybox", os.path.join(root, "bin", "busybox"))
    for m in MODULES:
        src = glob.glob(os.path.join(moddir, "kernel", "drivers", "**", f"{m}.ko*"), recursive=True)
        assert src, f"module {m} not found under {moddir}"
        dst = os.path.join(root, "lib", f"{m}.ko")
        if src[0].endswith(".ko"):
            shutil.copy(src[0], dst)
        else:  # compressed: xz or zst
            tool = "xz" if src[0].endswith(".xz") else "zstd"
            with open(dst, "wb") as f:
                subprocess.run([tool, "-dc", src[0]], stdout=f, check=True)
    for program in HOST_PROGRAMS:
        copy_with_libraries(program, root)
    if os.path.exists("/etc/mke2fs.conf"):
        os.makedirs(os.path.join(root, "etc"), exist_ok=True)
        shutil.copy("/etc/mke2fs.conf", os.path.join(root, "etc", "mke2fs.conf"))
    with open(os.path.join(root, "init"), "w") as f:
        f.write(init)
    os.chmod(os.path.join(root, "init"), 0o755)
    tmp = out + ".tmp"
    subprocess.run(f"cd {root} && find . | cpio -o -H newc --quiet | gzip -1 > {tmp}", shell=True, check=True)
    os.rename(tmp, out)
    shutil.rmtree(root)
    return out


def copy_with_libraries(program: str, root: str) -> None:
    """`program` into `root` at its own path (as /sbin for /usr/sbin), with
    every shared library `ldd` names and the dynamic loader."""
    if not os.path.exists(program):
        pytest.fail(f"missing {program}: run 'make deps'")
    dst = os.path.join(root, "sbin", os.path.basename(program))
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copy(program, dst)
    out = subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        lib = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if lib.startswith("/"):
            target = os.path.join(root, lib.lstrip("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy(lib, target)


class Qmp:
    """A QMP connection: commands and their answers, events kept aside."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        self._line()  # the greeting
        self.cmd("qmp_capabilities")

    def _line(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name: str, **args: Any) -> Any:
        self.sock.sendall(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        while True:
            msg = self._line()
            if "event" in msg:
                self.events.append(msg)
                continue
            if "error" in msg:
                raise RuntimeError(f"QMP {name}: {msg['error']}")
            return msg["return"]

    def close(self) -> None:
        self.sock.close()


class Guest:
    """One QEMU process running the test guest; killed by pid on stop()."""

    def __init__(self, workdir: str, name: str, disk_args: list[str], workload: str,
                 extra: list[str] | None = None, cmdline: str = "") -> None:
        self.qmp_path = os.path.join(workdir, f"{name}.qmp")
        self.serial = os.path.join(workdir, f"{name}.serial")
        self.stderr = os.path.join(workdir, f"{name}.stderr")
        vmlinuz, _ = kernel()
        argv = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", "192", "-smp", "1",
                "-kernel", vmlinuz, "-initrd", initramfs(),
                "-append", f"console=ttyS0 quiet panic=-1 vdifs.workload={workload} {cmdline}".strip(),
                "-display", "none", "-no-reboot", "-serial", f"file:{self.serial}",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off", *disk_args, *(extra or [])]
        with open(self.stderr, "w") as err:
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        self.qmp = Qmp(self.qmp_path)

    def console(self) -> str:
        try:
            with open(self.serial, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def last_written(self) -> int:
        lines = [ln for ln in self.console().splitlines() if ln.startswith("wrote ")]
        return int(lines[-1].split()[1]) if lines else 0

    def errors(self) -> list[str]:
        return [ln for ln in self.console().splitlines() if ln.startswith("ERR")]

    def diagnosis(self) -> str:
        """What QEMU and the guest say, for a failed test's message: run
        state, block errors (a paused VM is often an I/O error), the QMP
        events seen, QEMU's stderr and the console's tail."""
        parts = [f"{os.path.basename(self.serial)[:-7]}: "]
        if self.proc.poll() is not None:
            parts.append(f"QEMU exited with {self.proc.returncode}")
        else:
            try:
                parts.append(f"status {self.qmp.cmd('query-status')}")
                blocks = [(b.get("qdev"), b.get("io-status")) for b in self.qmp.cmd("query-block")]
                parts.append(f"block {blocks}")
            except (OSError, RuntimeError, ConnectionError) as e:
                parts.append(f"QMP: {e}")
        parts.append(f"events {self.qmp.events[-10:]}")
        with open(self.stderr, errors="replace") as f:
            parts.append(f"stderr: {f.read()[-2000:]}")
        parts.append(f"console tail: {self.console()[-1500:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.qmp.cmd("quit")
            except (OSError, RuntimeError, ConnectionError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.qmp.close()
