from hypothesis import given
from hypothesis import strategies as st

from vdifs.model.objmap import (
    CHUNK_ENTRIES, NON_EXISTENT, PAGE_BYTES, PAGE_ENTRIES, PENDING_DELETE, ObjectMap, decode_entry, entry_location,
    page_location,
)

entries = st.dictionaries(st.integers(0, 3 * CHUNK_ENTRIES), st.sampled_from([0, 7, 9, PENDING_DELETE]),
                          max_size=60)


@given(entries)
def test_set_get_and_allocated_count(values):
    m = ObjectMap()
    for i, v in values.items():
        m.set(i, v)
    for i, v in values.items():
        assert m.get(i) == v
    assert m.allocated == sum(1 for v in values.values() if v not in (NON_EXISTENT, PENDING_DELETE))
    assert list(m.entries()) == sorted((i, v) for i, v in values.items() if v)


@given(entries)
def test_pages_roundtrip_through_chunks(values):
    m = ObjectMap()
    for i, v in values.items():
        m.set(i, v)
    # Serialise every dirty page into chunk buffers, as the volume does, and load them back.
    chunks: dict[int, bytearray] = {}
    for pno in m.take_dirty():
        chunk, offset = page_location(pno)
        buf = chunks.setdefault(chunk, bytearray(CHUNK_ENTRIES * 4))
        buf[offset:offset + PAGE_BYTES] = m.page_bytes(pno)
    loaded = ObjectMap()
    for chunk, buf in chunks.items():
        loaded.load_chunk(chunk, bytes(buf))
    assert list(loaded.entries()) == list(m.entries())
    assert loaded.allocated == m.allocated
    assert not loaded.dirty


def test_little_endian_on_disk():
    m = ObjectMap()
    m.set(1, 0x01020304)
    assert m.page_bytes(0)[4:8] == bytes([4, 3, 2, 1])


def test_sparse_memory_and_dirty_tracking():
    m = ObjectMap()
    m.set(5 * CHUNK_ENTRIES + 3, 2)  # far into a huge VDI: one page, not gigabytes
    assert m.page_count == 1
    assert m.take_dirty() == [(5 * CHUNK_ENTRIES + 3) // PAGE_ENTRIES]
    assert not m.dirty
    assert m.set(17, NON_EXISTENT) == NON_EXISTENT and not m.dirty  # clearing a hole is a no-op
    m.set(5 * CHUNK_ENTRIES + 3, NON_EXISTENT)
    m.take_dirty()
    m.drop_empty_pages()
    assert m.page_count == 0 and m.allocated == 0


def test_short_chunk_loads():
    m = ObjectMap()
    raw = bytearray(12)
    raw[8:12] = (5).to_bytes(4, "little")
    m.load_chunk(0, bytes(raw))
    assert m.get(2) == 5 and m.allocated == 1


def test_chunk_bytes_match_what_load_chunk_reads():
    from vdifs.model.objmap import CHUNK_ENTRIES, ObjectMap

    m = ObjectMap()
    for index, value in ((0, 7), (1023, 8), (5000, 9), (CHUNK_ENTRIES + 3, 10)):
        m.set(index, value)
    raw = m.chunk_bytes(0, 6000 * 4)
    assert len(raw) == 24000
    copy = ObjectMap()
    copy.load_chunk(0, raw)
    copy.load_chunk(1, m.chunk_bytes(1, 16))
    assert list(copy.entries()) == list(m.entries()) and copy.allocated == 4


@given(st.integers(0, 1 << 45), st.sampled_from([1 << 20, 4 << 20]))
def test_map_chunks_cover_every_entry_once(size, object_size):
    from vdifs.model.extents import objects_for_size
    from vdifs.model.objmap import CHUNK_BYTES, ENTRY_BYTES, map_chunks

    chunks = map_chunks(size, object_size)
    assert [c for c, _ in chunks] == list(range(len(chunks)))
    assert all(0 < n <= CHUNK_BYTES for _, n in chunks)
    assert all(n == CHUNK_BYTES for _, n in chunks[:-1])
    assert sum(n for _, n in chunks) == objects_for_size(size, object_size) * ENTRY_BYTES


@given(entries)
def test_one_entry_reads_back_from_where_the_chunks_store_it(values):
    """What a peer reads of one entry (`entry_location`, `decode_entry`) is
    what the map stores; past a short chunk's end an entry is a hole."""
    m = ObjectMap()
    for i, v in values.items():
        m.set(i, v)
    for i, v in values.items():
        chunk, offset = entry_location(i)
        page_chunk, page_offset = page_location(i // PAGE_ENTRIES)
        assert chunk == page_chunk
        raw = m.page_bytes(i // PAGE_ENTRIES)[offset - page_offset:offset - page_offset + 4]
        assert decode_entry(raw) == m.get(i)
    assert decode_entry(b"") == decode_entry(b"\x01\x02") == NON_EXISTENT
