"""Which register changes each role may make (meta.register_rules), as pure
functions over the values an acceptor holds."""

import errno

import msgpack
import pytest
from hypothesis import given, strategies as st

from vdifs.errors import VdifsError
from vdifs.meta.consensus import CLUSTER_KEY, DIRECTORY_KEY
from vdifs.meta.lease import Lease, lease_key
from vdifs.meta.register_rules import check_change
from vdifs.wire.rpc import ADMIN, MOUNT, PEER

KEY = lease_key(5)


def value(version: int, data: bytes, tokens: tuple = ()) -> bytes:
    return msgpack.packb({"v": version, "d": data, "w": list(tokens)})


def lease(credential: str | None, gen: int = 1, term: float = 10.0, **extra) -> bytes:
    holder = None if credential is None else {"mount": "m", "term": term, "credential": credential,
                                              "host": "h", "pid": 1, "mountpoint": "/mnt"}
    return Lease(holder, gen, **extra).encode()


def refused(role, credential, key, current, new, unchanged_for=0.0) -> int | None:
    try:
        check_change(role, credential, key, current, new, unchanged_for)
    except VdifsError as e:
        return e.errno
    return None


def test_a_mount_takes_a_free_lease_and_changes_only_its_own():
    free, mine = value(1, lease(None)), value(2, lease("mount.a"))
    assert refused(MOUNT, "mount.a", KEY, free, mine) is None
    assert refused(MOUNT, "mount.a", KEY, None, mine) is None  # never written
    renewed = value(3, lease("mount.a", beat=1))
    assert refused(MOUNT, "mount.a", KEY, mine, renewed) is None
    assert refused(MOUNT, "mount.a", KEY, mine, value(3, lease(None, 1))) is None  # release
    # for someone else: never
    assert refused(MOUNT, "mount.b", KEY, free, value(2, lease("mount.a"))) == errno.EACCES


def test_breaking_another_mounts_lease_needs_an_admin():
    held = value(2, lease("mount.a"))
    broken = value(3, lease(None, 2))
    assert refused(MOUNT, "mount.b", KEY, held, broken, unchanged_for=1e6) == errno.EACCES
    assert refused(ADMIN, "admin.alice", KEY, held, broken) is None
    assert refused(PEER, "peer.x", KEY, held, broken, unchanged_for=1e6) == errno.EACCES


def test_a_takeover_waits_for_the_holders_term_on_this_acceptor():
    held = value(2, lease("mount.a", term=10.0))
    taken = value(3, lease("mount.b", gen=2))
    assert refused(MOUNT, "mount.b", KEY, held, taken, unchanged_for=9.5) == errno.EBUSY
    assert refused(MOUNT, "mount.b", KEY, held, taken, unchanged_for=10.0) is None
    # a claimed term beyond reason counts as the default
    absurd = value(2, lease("mount.a", term=1e9))
    assert refused(MOUNT, "mount.b", KEY, absurd, taken, unchanged_for=16.0) is None


@given(st.integers(0, 10), st.binary(max_size=64), st.lists(st.binary(max_size=16), max_size=3))
def test_writing_back_what_is_there_is_a_read_for_every_role(version, data, tokens):
    for key in (CLUSTER_KEY, DIRECTORY_KEY, KEY, "other"):
        current = value(version, data)
        again = value(version, data, tuple(tokens))  # a read may carry other writer tokens
        for role in (ADMIN, MOUNT, PEER):
            assert refused(role, "x.y", key, current, again) is None


def test_the_map_is_changed_by_peers_and_the_directory_by_mounts():
    before, after = value(1, b"map1"), value(2, b"map2")
    assert refused(MOUNT, "mount.a", CLUSTER_KEY, before, after) == errno.EACCES
    assert refused(PEER, "peer.p", CLUSTER_KEY, before, after) is None
    assert refused(MOUNT, "mount.a", DIRECTORY_KEY, before, after) is None
    assert refused(PEER, "peer.p", DIRECTORY_KEY, before, after) == errno.EACCES
    assert refused(MOUNT, "mount.a", "some/other", before, after) == errno.EACCES
    for part in ("directory/0", "directory/63"):  # a split directory's parts
        assert refused(MOUNT, "mount.a", part, before, after) is None
        assert refused(PEER, "peer.p", part, before, after) == errno.EACCES
    for not_a_part in ("directory/", "directory/x", "directory/01", "directory/1/2"):
        assert refused(MOUNT, "mount.a", not_a_part, before, after) == errno.EACCES


@pytest.mark.parametrize("new", [b"\xc1", msgpack.packb([1]), value(2, b"\xc1"), value(2, msgpack.packb(7))])
def test_malformed_values_are_refused_not_crashed_on(new):
    assert refused(MOUNT, "mount.a", KEY, value(1, lease(None)), new) in (errno.EINVAL, errno.EACCES)
