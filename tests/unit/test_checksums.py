import os
import struct
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdifs.store import checksums
from vdifs.store.checksums import BLOCK, CLEAN, DIRTY


@given(st.integers(0, 4 << 20), st.integers(1, 1 << 20))
def test_covering_is_the_smallest_aligned_range(offset, length):
    start, end = checksums.covering(offset, length)
    assert start % BLOCK == 0 and end % BLOCK == 0
    assert start <= offset < start + BLOCK
    assert offset + length <= end < offset + length + BLOCK


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 5 * BLOCK), st.data())
def test_a_flipped_byte_is_found_in_its_block(size, data):
    content = bytearray(os.urandom(size))
    table = checksums.table_of(content, size)
    assert len(table) == checksums.blocks_of(size)
    padded = content + bytes(-size % BLOCK)
    assert checksums.first_mismatch(table, 0, padded) is None
    pos = data.draw(st.integers(0, size - 1))
    padded[pos] ^= 1 << data.draw(st.integers(0, 7))
    assert checksums.first_mismatch(table, 0, padded) == pos // BLOCK
    # verifying only the block that holds it finds it too
    b = pos // BLOCK
    assert checksums.first_mismatch(table, b, padded[b * BLOCK:(b + 1) * BLOCK]) == b


def test_zero_blocks_and_short_tails_read_as_zero_padded():
    assert checksums.block_crc(bytes(BLOCK)) == checksums.ZERO_CRC
    assert checksums.block_crc(b"") == checksums.ZERO_CRC
    assert checksums.block_crc(b"ab") == checksums.block_crc(b"ab" + bytes(BLOCK - 2))
    table = checksums.table_of(b"", 3 * BLOCK)
    assert table.tolist() == [checksums.ZERO_CRC] * 3


@given(st.lists(st.integers(0, (1 << 32) - 1), max_size=256), st.sampled_from([CLEAN, DIRTY]))
def test_table_roundtrip(table, state):
    as_array = array("I", table)
    raw = checksums.encode(as_array, state)
    # The stored format is the one stores have always held: little-endian 32-bit CRCs.
    assert raw == checksums.MAGIC + bytes([state]) + struct.pack(f"<{len(table)}I", *table)
    assert checksums.encode(table, state) == raw  # a plain sequence encodes the same
    decoded, got_state = checksums.decode(raw, len(table))
    assert isinstance(decoded, array) and decoded.itemsize == 4
    assert decoded.tolist() == table and got_state == state


@pytest.mark.parametrize("raw", [b"", b"VC1", b"XX1\0", b"VC1\x07", b"VC1\0abc", b"VC1\0" + bytes(8)])
def test_bad_tables_are_refused(raw):
    with pytest.raises(checksums.BadTable):
        checksums.decode(raw, 1)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=3 * BLOCK + 7))
def test_tables_are_the_zlib_crc32_ones_stored_tables_always_held(content):
    """The CRC comes from ISA-L now; tables must be the zlib CRC-32 values every
    existing store holds (no format change)."""
    import zlib

    def zlib_block(chunk: bytes) -> int:
        return zlib.crc32(chunk + bytes(BLOCK - len(chunk)))

    expected = [zlib_block(content[i:i + BLOCK]) for i in range(0, len(content), BLOCK)]
    assert checksums.crcs_of(content).tolist() == expected
    assert checksums.ZERO_CRC == zlib.crc32(bytes(BLOCK))


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_pieces_give_the_crcs_a_read_around_would(data):
    """A model: an object's bytes, and what `Pieces` says of them. Whatever
    the order of learnt blocks and writes, a write it answers gets the very
    CRCs of the blocks as they now are, and it answers exactly the writes
    whose partly changed blocks it knows; blocks it was told it missed
    (`forget`: a whole-block write not learnt) are unknown again."""
    nblocks = 8
    P = checksums.PIECE
    content = bytearray(os.urandom(nblocks * BLOCK))
    pieces = checksums.Pieces(nblocks)
    known = set()
    for _ in range(data.draw(st.integers(1, 12))):
        if data.draw(st.booleans()):  # the store learns blocks it wrote or read whole
            first = data.draw(st.integers(0, nblocks - 1))
            n = data.draw(st.integers(1, nblocks - first))
            pieces.learn(first, content[first * BLOCK:(first + n) * BLOCK])
            known.update(range(first, first + n))
            continue
        if data.draw(st.booleans()):  # whole blocks written but not learnt
            first = data.draw(st.integers(0, nblocks - 1))
            n = data.draw(st.integers(1, nblocks - first))
            content[first * BLOCK:(first + n) * BLOCK] = os.urandom(n * BLOCK)
            pieces.forget(first, n)
            known.difference_update(range(first, first + n))
            continue
        first_piece = data.draw(st.integers(0, nblocks * BLOCK // P - 1))
        npieces = data.draw(st.integers(1, min(9, nblocks * BLOCK // P - first_piece)))
        offset, new = first_piece * P, os.urandom(npieces * P)
        b0, b1 = offset // BLOCK, (offset + len(new) - 1) // BLOCK
        partial = {b for b in (b0, b1) if (b == b0 and offset % BLOCK) or (b == b1 and (offset + len(new)) % BLOCK)}
        crcs = pieces.write(offset, new)
        content[offset:offset + len(new)] = new  # the store writes it either way (read around if not known)
        if not partial <= known:
            assert crcs is None
            pieces.learn(b0, content[b0 * BLOCK:(b1 + 1) * BLOCK])  # as the read-around does
        else:
            assert list(crcs) == list(checksums.crcs_of(content[b0 * BLOCK:(b1 + 1) * BLOCK]))
        known.update(range(b0, b1 + 1))
    assert pieces.write(1, b"x" * P) is None and pieces.write(0, b"x" * (P - 1)) is None  # not whole pieces


def test_a_new_object_s_pieces_are_all_zeros_and_known():
    pieces = checksums.Pieces.of_zeros(4)
    new = os.urandom(checksums.PIECE)
    crcs = pieces.write(BLOCK + checksums.PIECE, new)
    expect = bytearray(BLOCK)
    expect[checksums.PIECE:2 * checksums.PIECE] = new
    assert list(crcs) == [checksums.block_crc(expect)]
