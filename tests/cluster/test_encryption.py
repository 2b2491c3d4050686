"""Encrypted cluster traffic end to end: peers that demand it (`vdifs peer
--encrypt`) and a mount that asks for it (`vdifs mount --encrypt`). What an
encrypted frame looks like on the wire is tested in tests/unit/test_rpc.py."""

from __future__ import annotations

import hashlib
import os

import trio

from tests.cluster.conftest import vdifs, wait_for
from tests.e2e.conftest import FioVerify, read_at
from tests.old_clients import deaf_to_encryption
from vdifs.errors import VdifsError
from vdifs.meta.credentials import read_credentials
from vdifs.wire.rpc import RpcClient


def ask_without_encryption(address: str, secret: bytes) -> object:
    """peer.info from a client that hides the peer's demand for encryption
    from itself (as a client of before encryption would): the answer, or the error."""
    async def main() -> object:
        async with trio.open_nursery() as nursery:
            client = RpcClient(address, secret, nursery)
            deaf_to_encryption(client)
            try:
                return await client.call("peer.info", {}, timeout=10)
            except VdifsError as e:
                return e
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()
    return trio.run(main)


def test_peers_that_demand_encryption_serve_mounts_admins_and_each_other(cluster):
    cluster.format(3, copies=3, peer_options=("--encrypt",))
    a = cluster.mount("a")  # asks for nothing: the peers' hello demands it
    with FioVerify(a.path("vm.img"), 16) as fio:
        fio.finish(300)
    b = cluster.mount("b", "--encrypt")
    data = os.urandom(1 << 20)
    with open(b.path("blob"), "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    wait_for(lambda: os.path.exists(a.path("blob")) and os.path.getsize(a.path("blob")) == 1 << 20, 10,
             "blob on a")  # the other mount learns of it from the directory
    assert hashlib.sha256(read_at(a.path("blob"), 0, 1 << 20)).digest() == hashlib.sha256(data).digest()
    info = cluster.info()  # an admin command over encrypted connections
    assert [p["state"] for p in info["peers"]] == ["up"] * 3 and all(p["reachable"] for p in info["peers"])
    check = vdifs("cluster", "check", "--cluster", cluster.addresses, "--secret-file", cluster.secret).stdout
    assert "of 2 VDIs" in check and "0 with missing or differing replicas" in check, check
    for p in cluster.peers:
        assert "did not ask for encryption" not in p.log_text()
    # the demand is real: a client that does not encrypt is turned away
    refused = ask_without_encryption(cluster.peers[0].address, read_credentials(cluster.secret).secret)
    assert isinstance(refused, VdifsError) and "requires encrypted connections" in str(refused), refused
    assert "did not ask for encryption" in cluster.peers[0].log_text()
