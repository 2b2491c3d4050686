"""Peak memory of peers holding many objects: bench/peer_memory.py [N_OBJECTS]

Starts three peers on 127.0.0.1 (copies=3), stores N small objects (default
100k) through a RemotePool, lists them all (paged), and prints each peer's
peak RSS (VmHWM). Run from the repository with the venv's python, as root
or not; uses a temporary directory.
"""

import socket
import subprocess
import sys
import tempfile
import time

import trio

from vdifs.client.remote import RemotePool
from vdifs.meta.credentials import read_credentials
from vdifs.model.ids import data_oid


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    work = tempfile.mkdtemp(prefix="vdifs-peermem-")
    addrs = [f"127.0.0.1:{port()}" for _ in range(3)]
    procs = []
    try:
        for i, a in enumerate(addrs):
            join = ["--join", addrs[0]] if i else []
            procs.append(subprocess.Popen([sys.executable, "-m", "vdifs", "peer", "--store", f"{work}/p{i}",
                                           "--listen", a, *join, "--log-level", "warning"]))
            time.sleep(0.7)
        secret = f"{work}/secret"
        for _ in range(40):
            if subprocess.run([sys.executable, "-m", "vdifs", "cluster", "format", "--copies", "3",
                               "--secret-file", secret, addrs[0]], capture_output=True).returncode == 0:
                break
            time.sleep(0.5)
        creds = read_credentials(secret)

        async def fill() -> float:
            async with trio.open_nursery() as nursery:
                pool = RemotePool(addrs, creds, nursery, "bench")
                await pool.connect()
                pool.register_vdi(1, 3)
                limiter = trio.CapacityLimiter(32)

                async def one(i: int) -> None:
                    async with limiter:
                        await pool.create(data_oid(1, i), 0, b"x" * 512, 4 << 20)

                t = time.monotonic()
                async with trio.open_nursery() as inner:
                    for i in range(n):
                        inner.start_soon(one, i)
                rate = n / (time.monotonic() - t)
                listed = await pool.list_objects(1)
                assert len(listed) == n, len(listed)
                nursery.cancel_scope.cancel()
                return rate

        rate = trio.run(fill)
        print(f"stored and listed {n} objects (x3 replicas) at {rate:.0f} creates/s")
        for i, p in enumerate(procs):
            with open(f"/proc/{p.pid}/status") as f:
                hwm = [line.split()[1] for line in f if line.startswith("VmHWM")][0]
            print(f"peer{i}: peak RSS {int(hwm) // 1024} MiB holding {n} objects")
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
