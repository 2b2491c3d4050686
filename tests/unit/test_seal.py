"""Frame tags: a blob tagged beside its head, joined or streamed, gives the
tag of the whole frame, and any changed byte fails the check."""

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from vdifs.wire.seal import JOIN_MAX, FrameSeal

KEY = bytes(range(32))
SIZES = st.sampled_from([0, 1, 4096, JOIN_MAX - 1, JOIN_MAX, JOIN_MAX + 1, 3 * JOIN_MAX])


def pair() -> tuple[FrameSeal, FrameSeal]:
    return FrameSeal(KEY, server=False), FrameSeal(KEY, server=True)


@settings(max_examples=60, deadline=None)
@given(head_size=st.integers(1, 300), blob_size=SIZES, flip=st.one_of(st.none(), st.floats(0, 1)))
def test_a_blob_beside_its_head_is_tagged_as_the_whole_frame(head_size, blob_size, flip):
    head, blob = os.urandom(head_size), os.urandom(blob_size)
    client, server = pair()
    whole_client, _ = pair()
    tag = client.tag(head, blob)
    assert tag == whole_client.tag(head + blob)  # joined or streamed: the same tag
    if flip is None:
        assert server.check(head, tag, blob)
        return
    frame = bytearray(head + blob)
    frame[min(len(frame) - 1, int(flip * len(frame)))] ^= 0x01
    assert not server.check(bytes(frame[:head_size]), tag, bytes(frame[head_size:]))


def test_tags_follow_the_sequence_of_frames():
    """The same frame sent twice carries two tags: a replayed frame fails."""
    client, server = pair()
    head, blob = b"h" * 40, b"b" * 4096
    first, second = client.tag(head, blob), client.tag(head, blob)
    assert first != second
    assert server.check(head, first, blob)
    assert not server.check(head, first, blob)  # the second frame expected, the first replayed
