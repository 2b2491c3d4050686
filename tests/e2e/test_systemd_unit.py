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

UNIT = os.path.join(os.path.dirname(__file__), "..", "..", "contrib", "systemd", "vdifs-mount.service")


def unit_service():
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str
    with open(UNIT) as f:
        cp.read_string(f.read())
    return cp["Service"]


def expand(cmd: str, env: dict[str, str]) -> list[str]:
    cmd = cmd.lstrip("-")
    cmd = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], cmd)
    argv = shlex.split(cmd)
    if argv[0] == "/usr/local/bin/vdifs":
        argv = [sys.executable, "-m", "vdifs", *argv[1:]]
    return argv


def test_unit_mounts_and_unmounts(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    svc = unit_service()
    assert "--foreground" in svc["ExecStart"]
    env = dict(os.environ, VDIFS_MOUNTPOINT=str(tmp_path / "mnt"), VDIFS_STORE=str(tmp_path / "store"))
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
