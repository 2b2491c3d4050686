"""The write-behind window against a plain model: a bytearray of everything
acknowledged, and a bytearray of what drain rounds have written."""

from hypothesis import given, settings
from hypothesis import strategies as st

from vdifs.model.window import WriteWindow, coalesce, lay_over

OBJ = 64  # small objects, so writes cross boundaries often
SPAN = 4 * OBJ

writes = st.tuples(st.integers(0, SPAN - 1), st.integers(1, 80), st.integers(1, 255)).map(
    lambda t: (t[0], bytes([t[2]]) * min(t[1], SPAN - t[0])))


@given(st.lists(st.tuples(st.integers(0, OBJ - 1), st.binary(min_size=1, max_size=40)), min_size=1, max_size=12))
def test_coalesce_keeps_the_newest_bytes_in_disjoint_runs(entries):
    entries = [(off, data[:OBJ - off]) for off, data in entries]
    model = bytearray(OBJ)
    written = [False] * OBJ
    for off, data in entries:
        model[off:off + len(data)] = data
        written[off:off + len(data)] = [True] * len(data)
    runs = coalesce(entries)
    got = bytearray(OBJ)
    covered = [False] * OBJ
    last_end = -1
    for off, data in runs:
        assert off > last_end, "runs overlap, touch or are out of order"
        last_end = off + len(data)
        got[off:off + len(data)] = data
        covered[off:off + len(data)] = [True] * len(data)
    assert covered == written
    assert bytes(got) == bytes(model)


ops = st.one_of(
    st.tuples(st.just("put"), writes),
    st.tuples(st.just("take"), st.none()),  # a round starts (if none is under way)
    st.tuples(st.just("end"), st.lists(st.booleans(), min_size=4, max_size=4)),  # per object: written or failed
    st.tuples(st.just("read"), st.tuples(st.integers(0, SPAN - 1), st.integers(1, SPAN))),
)


@settings(max_examples=500)
@given(st.lists(ops, max_size=40))
def test_reads_through_the_window_always_see_every_acknowledged_write(script):
    """Writes go on while a round is under way, rounds fail for some
    objects; a read of the pool with the window laid over it is always
    what was acknowledged, and the pool is once everything is written."""
    window = WriteWindow(OBJ)
    acked = bytearray(SPAN)  # the content a client must read
    pool = bytearray(SPAN)  # what drain rounds have written
    sending: dict = {}

    def end(outcome):
        for index, runs in sending.items():
            if outcome[index]:
                for off, data in runs:
                    pool[index * OBJ + off:index * OBJ + off + len(data)] = data
                window.done(index)
            else:
                window.restore(index)
        sending.clear()

    for op, arg in script:
        if op == "put":
            off, data = arg
            window.put(off, data)
            acked[off:off + len(data)] = data
        elif op == "take":
            if not sending:
                sending.update(window.take())
        elif op == "end":
            end(arg)
        else:
            off, length = arg
            length = min(length, SPAN - off)
            buf = bytearray(pool[off:off + length])
            lay_over(buf, off, window.layers(off, length))
            assert buf == acked[off:off + length]
        assert window.bytes == sum(len(d) for i in range(4) for _, d in window.layers(i * OBJ, OBJ))
    end([True] * 4)
    while window:
        sending.update(window.take())
        end([True] * 4)
    assert pool == acked
    assert window.bytes == 0


def test_a_write_covering_older_pending_ones_replaces_them():
    window = WriteWindow(OBJ)
    for i in range(10):
        window.put(8, bytes([i]) * 8)
    assert window.bytes == 8
    assert window.layers(0, OBJ) == [(8, bytes([9]) * 8)]
    window.take()
    window.put(8, b"\xff" * 8)  # the one being sent stays until its round ends
    assert window.bytes == 16
    assert [d for _, d in window.layers(0, OBJ)] == [bytes([9]) * 8, b"\xff" * 8]


def test_a_write_across_objects_is_split_without_copying():
    window = WriteWindow(OBJ)
    data = bytes(range(50))
    window.put(OBJ - 10, data)
    batch = window.take()
    assert sorted(batch) == [0, 1]
    assert bytes(batch[0][0][1]) == data[:10] and bytes(batch[1][0][1]) == data[10:]
    assert batch[1][0][1].obj is data  # a view of the caller's bytes


def test_drop_forgets_everything():
    window = WriteWindow(OBJ)
    window.put(0, b"a" * 10)
    window.take()
    window.put(100, b"b" * 10)
    assert window.drop() == 20
    assert not window and window.bytes == 0
    window.done(0)  # a round ending after the drop changes nothing
    window.restore(0)
    assert not window
