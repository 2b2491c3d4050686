"""The systemd unit's own command lines mount and unmount cleanly.

There is no systemd here, so the test reads ExecStart/ExecStartPost/ExecStop
from the unit file and runs them as systemd would, with its Environment.
"""

import configparser
import os
import re
import shlex
import subprocess
import sys
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


def test_unit_mounts_and_unmounts(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    svc = unit_service()
    assert "--foreground" in svc["ExecStart"]
    env = dict(os.environ, VDIFS_MOUNTPOINT=str(tmp_path / "mnt"), VDIFS_STORE=str(tmp_path / "store"),
               VDIFS_MOUNT_ARGS="")
    main = subprocess.Popen(expand(svc["ExecStart"], env), env=env, stderr=subprocess.PIPE)
    try:
        subprocess.run(expand(svc["ExecStartPost"], env), env=env, check=True, timeout=90)
        assert os.path.ismount(env["VDIFS_MOUNTPOINT"])
        with open(os.path.join(env["VDIFS_MOUNTPOINT"], "vm"), "wb") as f:
            f.write(b"unit")
        subprocess.run(expand(svc["ExecStop"], env), env=env, check=True, timeout=90)
        assert main.wait(timeout=30) == 0
        assert not os.path.ismount(env["VDIFS_MOUNTPOINT"])
    finally:
        if main.poll() is None:
            main.kill()
            main.wait()
        subprocess.run(["fusermount3", "-u", "-z", env["VDIFS_MOUNTPOINT"]], capture_output=True)
    assert os.listdir(os.path.join(env["VDIFS_STORE"], "obj"))  # the data reached the store


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
    import socket

    svc = unit_service(os.path.join(UNITS, "vdifs-peer@.service"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, VDIFS_STORE_ROOT=str(tmp_path), VDIFS_LISTEN=f"127.0.0.1:{port}",
               VDIFS_PEER_ARGS="--zone rack1 --log-level debug")
    argv = [a.replace("%i", "a") for a in expand(svc["ExecStart"], env)]
    assert argv[-4:] == ["--zone", "rack1", "--log-level", "debug"]  # $VDIFS_PEER_ARGS split into words
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        assert os.path.exists(tmp_path / "a" / "peer.id")
        proc.terminate()  # systemd's KillSignal
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
