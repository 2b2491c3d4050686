"""The systemd unit's own command lines mount and unmount cleanly.

There is no systemd here, so the test reads ExecStart/ExecStartPost/ExecStop
from the unit file and runs them as systemd would, with its Environment.
"""

import configparser
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

UNITS = os.path.join(os.path.dirname(__file__), "..", "..", "contrib", "systemd")
UNIT = os.path.join(UNITS, "vdifs-mount.service")


def unit_service(path: str = UNIT):
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str
    with open(path) as f:
        cp.read_string(f.read())
    return cp["Service"]


def expand(cmd: str, env: dict[str, str]) -> list[str]:
    """systemd's expansion: $$ is a literal $, ${VAR} one word, $VAR split on whitespace."""
    cmd = cmd.lstrip("-")

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        if m.group(1):
            return shlex.quote(env.get(m.group(1), ""))
        return env.get(m.group(2), "")

    argv = shlex.split(re.sub(r"\$\$|\$\{(\w+)\}|\$(\w+)", sub, cmd))
    if argv[0] == "/usr/local/bin/vdifs":
        argv = [sys.executable, "-m", "vdifs", *argv[1:]]
    return argv


class NotifySocket:
    """What systemd listens on for a Type=notify unit: datagrams of KEY=value lines."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def receive(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(timeout)
        try:
            raw = self.sock.recv(4096)
        except socket.timeout:
            return None
        fields = dict(line.split("=", 1) for line in raw.decode().splitlines())
        self.messages.append((time.monotonic(), fields))
        return fields

    def wait_for(self, key: str, timeout: float, proc: subprocess.Popen | None = None) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc is None or proc.poll() is None, "the process exited"
            fields = self.receive(0.5)
            if fields is not None and key in fields:
                return fields
        raise AssertionError(f"no {key} within {timeout} s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


def test_unit_mounts_tells_systemd_and_unmounts(tmp_path):
    """ExecStart as systemd runs it (NOTIFY_SOCKET, WATCHDOG_USEC): READY=1
    comes once the mount answers on its root, WATCHDOG=1 keeps coming,
    ExecStop unmounts and STOPPING=1 is said."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    svc = unit_service()
    assert svc["Type"] == "notify" and "--foreground" in svc["ExecStart"] and int(svc["WatchdogSec"]) > 0
    notify = NotifySocket(str(tmp_path / "notify"))
    env = dict(os.environ, VDIFS_MOUNTPOINT=str(tmp_path / "mnt"), VDIFS_STORE=str(tmp_path / "store"),
               VDIFS_MOUNT_ARGS="", NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="400000")
    main = subprocess.Popen(expand(svc["ExecStart"], env), env=env, stderr=subprocess.PIPE)
    try:
        ready = notify.wait_for("READY", 90, main)
        # said only once the mount answers: the root is the mounted file system's now
        assert os.path.ismount(env["VDIFS_MOUNTPOINT"])
        assert os.stat(env["VDIFS_MOUNTPOINT"]).st_ino == 1
        assert "serving" in ready.get("STATUS", "")
        pings = [notify.wait_for("WATCHDOG", 5, main) for _ in range(3)]  # every 0.2 s
        assert all(p == {"WATCHDOG": "1"} for p in pings)
        with open(os.path.join(env["VDIFS_MOUNTPOINT"], "vm"), "wb") as f:
            f.write(b"unit")
        subprocess.run(expand(svc["ExecStop"], env), env=env, check=True, timeout=90)
        assert main.wait(timeout=30) == 0
        assert not os.path.ismount(env["VDIFS_MOUNTPOINT"])
        while notify.receive(0.1) is not None:
            pass
        assert any("STOPPING" in m for _, m in notify.messages)
    finally:
        notify.close()
        if main.poll() is None:
            main.kill()
            main.wait()
        subprocess.run(["fusermount3", "-u", "-z", env["VDIFS_MOUNTPOINT"]], capture_output=True)
    assert os.listdir(os.path.join(env["VDIFS_STORE"], "obj"))  # the data reached the store


def test_watchdog_pings_come_from_the_event_loop(tmp_path):
    """A loop that is blocked sends no WATCHDOG=1 (so systemd restarts it)."""
    import trio

    from vdifs.notify import Notifier

    notify = NotifySocket(str(tmp_path / "notify"))
    notifier = Notifier({"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "100000"})  # a ping every 50 ms
    done = threading.Event()

    def listen() -> None:  # as systemd: reading all the while (its queue holds few datagrams)
        while not done.is_set():
            notify.receive(0.05)

    listener = threading.Thread(target=listen)
    listener.start()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(notifier.keep_alive)
            await trio.sleep(0.3)
            time.sleep(1.0)  # the loop blocked, as by a stuck call
            await trio.sleep(0.3)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        done.set()
        listener.join()
    notify.close()
    times = [t for t, m in notify.messages if m == {"WATCHDOG": "1"}]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(times) >= 8
    assert max(gaps) >= 0.9  # none while blocked
    assert sorted(gaps)[len(gaps) // 2] < 0.2  # every 50 ms otherwise


def test_units_parse(tmp_path):
    """systemd reads the units without a complaint (offline, in a root of its own)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("no systemd-analyze here")
    root = tmp_path / "root"
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "usr/local/bin/vdifs").write_text("#!/bin/sh\n")
    (root / "usr/local/bin/vdifs").chmod(0o755)
    shutil.copytree(UNITS, root / "etc/systemd/system")
    out = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "--man=no", "vdifs-mount.service",
                          "vdifs-peer@a.service", "vdifs-peers.target"], capture_output=True, text=True)
    complaints = [line for line in (out.stdout + out.stderr).splitlines()
                  if "sysinit.target not found" not in line]  # the empty root has no system units
    assert not complaints, complaints


def test_sigterm_flushes_and_unmounts(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    mp, store = str(tmp_path / "mnt"), str(tmp_path / "store")
    proc = subprocess.Popen([sys.executable, "-m", "vdifs", "mount", mp, "--store", store, "--foreground"],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mp):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        f = open(os.path.join(mp, "held"), "wb")  # an open file must not block the stop
        f.write(b"x" * 10000)
        f.flush()
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        assert "SIGTERM: flushing and unmounting" in proc.stderr.read()
        assert not os.path.ismount(mp)
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)


def test_peer_unit_runs_a_peer(tmp_path):
    """ExecStart as systemd runs it: READY=1 while it waits for a format,
    then the status line follows the cluster; STOPPING=1 on SIGTERM."""
    svc = unit_service(os.path.join(UNITS, "vdifs-peer@.service"))
    assert svc["Type"] == "notify"
    notify = NotifySocket(str(tmp_path / "notify"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, VDIFS_STORE_ROOT=str(tmp_path), VDIFS_LISTEN=f"127.0.0.1:{port}",
               VDIFS_PEER_ARGS="--zone rack1 --log-level debug", NOTIFY_SOCKET=notify.path)
    argv = [a.replace("%i", "a") for a in expand(svc["ExecStart"], env)]
    assert argv[-4:] == ["--zone", "rack1", "--log-level", "debug"]  # $VDIFS_PEER_ARGS split into words
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        assert os.path.exists(tmp_path / "a" / "peer.id")
        assert "waiting for 'vdifs cluster format'" in notify.wait_for("READY", 20, proc)["STATUS"]
        secret = str(tmp_path / "secret")
        subprocess.run([sys.executable, "-m", "vdifs", "cluster", "format", "--copies", "1", "--secret-file",
                        secret, f"127.0.0.1:{port}"], check=True, capture_output=True, timeout=60)
        status = notify.wait_for("STATUS", 20, proc)["STATUS"]
        assert "epoch" in status and "1 peers up" in status, status
        proc.terminate()  # systemd's KillSignal
        assert proc.wait(timeout=20) == 0
        while notify.receive(0.1) is not None:
            pass
        assert any("STOPPING" in m for _, m in notify.messages)
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
