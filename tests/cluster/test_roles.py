"""Credentials with roles against live peers: mount, peer and admin
credentials issued by `vdifs cluster credential`, each refused outside its
role; the cluster secret acts as admin until `vdifs cluster rotate-secret`."""

from __future__ import annotations

import errno
import os

import trio

from tests.cluster.conftest import Cluster, current_map, vdifs, wait_for
from tests.cluster.test_leases import Holder, open_errno
from tests.e2e.conftest import read_at
from vdifs.errors import VdifsError
from vdifs.meta.consensus import DIRECTORY_KEY, MetaClient
from vdifs.meta.credentials import Credentials, read_credentials
from vdifs.meta.lease import lease_key
from vdifs.model.cluster import ClusterMap
from vdifs.model.ids import data_oid
from vdifs.wire.rpc import RpcPool


def issue(cluster: Cluster, role: str, name: str) -> str:
    path = os.path.join(cluster.root, f"{role}.{name}.cred")
    vdifs("cluster", "credential", role, name, "-o", path, "--secret-file", cluster.secret)
    return path


def as_credential(cluster: Cluster, path: str, fn) -> object:
    """`fn(pool, cmap)` with a pool that authenticates with the credential in
    `path`; what it returns, or the VdifsError it raised."""
    creds = read_credentials(path)

    async def main() -> object:
        async with trio.open_nursery() as nursery:
            pool = RpcPool(creds.client_key(), nursery, cluster_id=creds.cluster_id)
            try:
                cmap = ClusterMap.from_dict(await pool.call(cluster.peers[0].address, "cluster.map"))
                return await fn(pool, cmap)
            except VdifsError as e:
                return e
            finally:
                await pool.aclose()
                nursery.cancel_scope.cancel()

    return trio.run(main)


def assert_refused(result: object, code: int = errno.EACCES) -> str:
    assert isinstance(result, VdifsError), f"expected a refusal, got {result!r}"[:300]
    assert result.errno == code, f"expected errno {code}, got {result.errno}: {result}"
    return str(result)


def peers_in_map(cluster: Cluster) -> int:
    return len(cluster.info()["peers"])


def test_a_mount_credential_serves_vdis_but_cannot_administer(cluster):
    cluster.format(4, copies=2)
    hv1, hv2 = issue(cluster, "mount", "hv1"), issue(cluster, "mount", "hv2")
    assert "role=mount" in open(hv1).read() and oct(os.stat(hv1).st_mode & 0o777) == "0o600"
    a = cluster.mount("a", "--secret-file", hv1, "--lease-term", "3")
    b = cluster.mount("b", "--secret-file", hv2, "--lease-term", "3")
    with open(a.path("vm"), "wb") as f:
        f.truncate(8 << 20)
    wait_for(lambda: os.path.exists(b.path("vm")), 10, "vm on b")
    holder = Holder(a.path("vm"))
    try:
        assert holder.write(4096, 0x5A, 4096, sync=True) == "ok"
        assert read_at(b.path("vm"), 4096, 4096) == b"\x5a" * 4096  # data and directory: served

        # administration: refused, with the credential named, and nothing changes
        cmap = current_map(cluster.peers[0])
        victim = next(pid for pid in cmap.peers if pid not in cmap.meta)  # meta peers cannot leave
        res = vdifs("cluster", "leave", victim, "--cluster", cluster.addresses, "--secret-file", hv1, check=False)
        assert res.returncode != 0 and "mount.hv1" in res.stderr and "admin" in res.stderr, res.stderr
        assert peers_in_map(cluster) == 4
        assert any("cluster.remove_peer is refused to mount.hv1" in p.log_text() for p in cluster.peers)

        # ... also when it writes the cluster register itself
        async def drop_a_peer(pool: RpcPool, cmap: ClusterMap) -> object:
            meta = MetaClient("rogue", pool, cmap.meta_addresses())
            def without_victim(m: ClusterMap) -> ClusterMap:
                d = m.to_dict()
                d["peers"] = {k: v for k, v in d["peers"].items() if k != victim}
                return ClusterMap.from_dict({**d, "epoch": m.epoch + 1})
            return await meta.change_map(without_victim)
        assert "cluster map is changed by peers and admins" in assert_refused(as_credential(cluster, hv1, drop_a_peer))
        assert peers_in_map(cluster) == 4

        # another mount's lock: not through b's mount, not through the register
        res = vdifs("vdi", "--mount", b.mp, "break-lock", "vm", check=False)
        assert res.returncode != 0 and "needs an admin credential" in res.stderr, res.stderr
        res = vdifs("cluster", "break-lock", "vm", "--cluster", cluster.addresses, "--secret-file", hv2,
                    check=False)
        assert res.returncode != 0 and "needs an admin credential" in res.stderr, res.stderr
        assert holder.write(8192, 0x5B, 4096, sync=True) == "ok"  # the holder never noticed
        assert open_errno(b.path("vm"), os.O_RDWR) == errno.EBUSY

        # an admin credential can do both
        alice = issue(cluster, "admin", "alice")
        out = vdifs("cluster", "break-lock", "vm", "--cluster", cluster.addresses, "--secret-file", alice).stdout
        assert "broken" in out and a.mp in out
        assert holder.write(0, 0x66, 4096, sync=True).startswith("err")  # fenced: nothing more lands
        assert open_errno(b.path("vm"), os.O_RDWR) == 0
        assert read_at(b.path("vm"), 0, 4096) == b"\0" * 4096
        vdifs("cluster", "leave", victim, "--cluster", cluster.addresses, "--secret-file", alice)
        assert peers_in_map(cluster) == 3
    finally:
        holder.proc.kill()


def test_a_peer_credential_cannot_open_vdis(cluster):
    cluster.format(3, copies=3)
    m = cluster.mount("a")  # the cluster secret: an admin, as before roles existed
    with open(m.path("vm"), "wb") as f:
        f.write(b"\x11" * 65536)
    tool = issue(cluster, "peer", "scrubber")
    # a mount refuses it at once
    os.makedirs(os.path.join(cluster.root, "mnt-p"))
    res = vdifs("mount", os.path.join(cluster.root, "mnt-p"), "--foreground", "--cluster", cluster.addresses,
                "--secret-file", tool, "--store", os.path.join(cluster.root, "ms-p"), check=False)
    assert res.returncode != 0 and "peer credential" in res.stderr and "cannot open VDIs" in res.stderr
    # and the peers refuse every step of opening or changing one
    vid = 1 << 20  # no VDI has it: nothing of the test's is at risk if a refusal failed

    async def steps(pool: RpcPool, cmap: ClusterMap) -> list[object]:
        address, out = cmap.up_peers()[0].address, []
        for op, args in [("lease.fence", {"vid": vid, "gen": 1}),
                         ("obj.create", {"oid": data_oid(vid, 0), "offset": 0, "data": b"x", "size": 8,
                                         "epoch": cmap.epoch}),
                         ("obj.write", {"oid": data_oid(vid, 0), "offset": 0, "data": b"x", "epoch": cmap.epoch}),
                         ("obj.writev", {"oids": [data_oid(vid, 0)], "offsets": [0], "lengths": [1], "data": b"x",
                                         "epoch": cmap.epoch})]:
            try:
                out.append(await pool.call(address, op, args))
            except VdifsError as e:
                out.append(e)
        meta = MetaClient("tool", pool, cmap.meta_addresses())
        for key in (lease_key(vid), DIRECTORY_KEY):
            try:
                version, _raw = await meta.register(key).get()  # reading is allowed
                out.append(await meta.register(key).cas(version, b"taken"))
            except VdifsError as e:
                out.append(e)
        out.append(await pool.call(address, "peer.info"))  # what peers ask each other: allowed
        return out

    results = as_credential(cluster, tool, steps)
    assert isinstance(results, list), results
    for r in results[:6]:
        assert_refused(r)
    assert "peer.scrubber" in str(results[0]) and isinstance(results[6], dict)
    assert read_at(m.path("vm"), 0, 65536) == b"\x11" * 65536
    assert os.listdir(m.mp) == ["vm"]


def test_rotating_the_secret_revokes_the_old_one_and_its_credentials(cluster):
    cluster.format(3, copies=3)
    hv1 = issue(cluster, "mount", "hv1")
    a = cluster.mount("a", "--secret-file", hv1)
    with open(a.path("vm"), "wb") as f:
        f.write(b"\x42" * 65536)
        os.fsync(f.fileno())
    a.stop()
    old = read_credentials(cluster.secret)
    out = vdifs("cluster", "rotate-secret", "--grace", "0", "--cluster", cluster.addresses,
                "--secret-file", cluster.secret).stdout
    assert "new cluster secret written" in out
    new = read_credentials(cluster.secret)
    assert new.secret != old.secret and new.cluster_id == old.cluster_id
    assert read_credentials(cluster.secret + ".old") == old
    for p in cluster.peers:  # every peer took it, and keeps it
        assert Credentials.decode(open(os.path.join(p.store, "secret"), "rb").read()) == new
    # the old secret and what was derived from it: refused
    res = vdifs("cluster", "info", "--cluster", cluster.addresses, "--secret-file", cluster.secret + ".old",
                check=False)
    assert res.returncode != 0 and "authentication failed" in res.stderr, res.stderr

    async def info(pool: RpcPool, cmap: ClusterMap) -> object:
        return cmap

    assert "authentication failed" in assert_refused(as_credential(cluster, hv1, info))
    # the new secret administers; a credential issued from it mounts, the data is whole
    assert len(cluster.info()["peers"]) == 3
    hv1 = issue(cluster, "mount", "hv1-2")
    b = cluster.mount("b", "--secret-file", hv1)
    assert read_at(b.path("vm"), 0, 65536) == b"\x42" * 65536
    with open(b.path("vm"), "r+b") as f:  # peers talk to each other with the new secret too
        f.write(b"\x43" * 4096)
        os.fsync(f.fileno())
    wait_for(lambda: all(p["state"] == "up" for p in cluster.info()["peers"]), 20, "all peers up")
