"""The FUSE codec (vdifs/fuse/abi.py): layouts, negotiation, refusal of
malformed requests."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vdifs.fuse import abi
from vdifs.fuse.abi import EntryAttributes, ProtocolError

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
ns = st.integers(0, 2**40 * 1_000_000_000)


def test_negotiation_asks_7_31_and_only_what_vdifs_wants():
    reply, agreed = abi.negotiate(abi.INIT_IN.pack(7, 45, 131072, 0xFFFFFFFF))
    major, minor, readahead, flags, background, congestion, max_write, gran, pages, _, _, _ = \
        abi.INIT_OUT.unpack(reply)
    assert (major, minor, readahead, flags) == (7, 31, 131072, abi.WANTED)
    assert agreed == abi.WANTED
    assert (background, congestion, max_write, pages) == (64, 48, 1 << 20, 256)
    assert len(reply) == 64  # fuse_init_out
    _, agreed = abi.negotiate(abi.INIT_IN.pack(7, 31, 0, abi.ASYNC_READ | (1 << 3)))
    assert agreed == abi.ASYNC_READ  # nothing the kernel did not offer, nothing vdifs did not ask


@pytest.mark.parametrize("body", [abi.INIT_IN.pack(7, 30, 0, 0), abi.INIT_IN.pack(8, 0, 0, 0), b"\x07\0\0\0"])
def test_negotiation_refuses_old_or_foreign_kernels_and_short_bodies(body):
    with pytest.raises(ProtocolError):
        abi.negotiate(body)


@given(ino=u64, size=u64, blocks=u64, mode=u32, nlink=u32, uid=u32, gid=u32, a=ns, m=ns, c=ns,
       entry=st.floats(0, 1e6), attr=st.floats(0, 1e6))
def test_entry_and_attr_replies_carry_every_field(ino, size, blocks, mode, nlink, uid, gid, a, m, c, entry, attr):
    e = EntryAttributes(st_ino=ino, st_size=size, st_blocks=blocks, st_mode=mode, st_nlink=nlink, st_uid=uid,
                        st_gid=gid, st_atime_ns=a, st_mtime_ns=m, st_ctime_ns=c, entry_timeout=entry,
                        attr_timeout=attr)
    out = abi.entry_out(e)
    assert len(out) == 128
    nodeid, _, ev, av, evn, avn = abi.ENTRY_OUT.unpack_from(out)
    assert nodeid == ino and ev + evn / 1e9 == pytest.approx(entry, abs=1e-6)
    assert av + avn / 1e9 == pytest.approx(attr, abs=1e-6)
    fields = abi.ATTR.unpack_from(out, abi.ENTRY_OUT.size)
    assert fields[:3] == (ino, size, blocks)
    assert fields[3] * 10**9 + fields[6] == a and fields[4] * 10**9 + fields[7] == m
    assert fields[5] * 10**9 + fields[8] == c
    assert fields[9:13] == (mode, nlink, uid, gid)
    assert abi.attr_out(e)[abi.ATTR_OUT.size:] == out[abi.ENTRY_OUT.size:]


@given(st.lists(st.binary(min_size=1, max_size=300).filter(lambda b: b"\0" not in b), min_size=1, max_size=3))
def test_names_round_trip_and_a_missing_nul_is_refused(names):
    body = b"".join(n + b"\0" for n in names)
    assert abi.names(body, len(names)) == names
    with pytest.raises(ProtocolError):
        abi.names(body[:-1], len(names))


def test_setattr_maps_the_valid_bits():
    body = abi.SETATTR_IN.pack(abi.FATTR_SIZE | abi.FATTR_MTIME | abi.FATTR_FH, 0, 7, 4096, 0, 0, 12, 0, 0, 5,
                               0, 0o600, 0, 0, 0, 0)
    attrs, fields, fh = abi.setattr_request(body)
    assert fields.update_size and fields.update_mtime and not fields.update_mode and not fields.update_atime
    assert attrs.st_size == 4096 and attrs.st_mtime_ns == 12_000_000_005 and fh == 7
    _, fields, fh = abi.setattr_request(abi.SETATTR_IN.pack(abi.FATTR_ATIME_NOW, *[0] * 15))
    assert fields.update_atime and fh is None
    with pytest.raises(ProtocolError):
        abi.setattr_request(body[:40])


@given(st.lists(st.binary(min_size=1, max_size=255).filter(lambda b: b"\0" not in b and b"/" not in b),
                max_size=40), st.integers(0, 8192), st.booleans())
def test_a_directory_reply_never_overflows_and_parses_back(names, size, plus):
    reply = abi.DirectoryReply(size, plus)
    added = []
    for i, name in enumerate(names):
        if not reply.add(name, EntryAttributes(st_ino=i + 2, st_mode=0o100644), i + 1):
            break
        added.append(name)
    data = b"".join(reply.parts)
    assert len(data) == reply.used <= size
    pos, seen = 0, []
    while pos < len(data):
        if plus:
            pos += abi.ENTRY_OUT.size + abi.ATTR.size
        ino, off, namelen, kind = abi.DIRENT.unpack_from(data, pos)
        seen.append(data[pos + abi.DIRENT.size:pos + abi.DIRENT.size + namelen])
        assert off == len(seen) and kind == 8  # DT_REG
        pos += abi.DIRENT.size + namelen + (-(abi.DIRENT.size + namelen) % 8)
    assert seen == added


def test_notifications():
    msg = abi.inval_entry(1, b"disk.img")
    length, code, unique = abi.OUT_HEADER.unpack_from(msg)
    assert (length, code, unique) == (len(msg), abi.NOTIFY_INVAL_ENTRY, 0)
    assert msg.endswith(b"disk.img\0") and struct.unpack_from("<QI", msg, 16) == (1, 8)
    msg = abi.inval_inode(5, -1, 0)
    assert abi.OUT_HEADER.unpack_from(msg)[1] == abi.NOTIFY_INVAL_INODE
    assert abi.INVAL_INODE.unpack_from(msg, 16) == (5, -1, 0)
