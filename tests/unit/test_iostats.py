from hypothesis import given
from hypothesis import strategies as st

from vdifs.model.iostats import LATENCY_BOUNDS, OpStats


@given(st.lists(st.tuples(st.integers(0, 1 << 20), st.floats(0, 100, allow_nan=False)), max_size=200))
def test_buckets_are_cumulative_and_count_every_request(requests):
    stats = OpStats()
    for nbytes, seconds in requests:
        stats.add(nbytes, seconds)
    cumulative = stats.cumulative()
    assert [b for b, _ in cumulative] == [*LATENCY_BOUNDS, float("inf")]
    assert cumulative[-1][1] == stats.count == len(requests)
    assert all(a[1] <= b[1] for a, b in zip(cumulative, cumulative[1:]))
    for bound, n in cumulative:
        assert n == sum(1 for _, s in requests if s <= bound)  # Prometheus's `le`
    assert stats.bytes == sum(n for n, _ in requests)
