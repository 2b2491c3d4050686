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


def test_an_answer_at_once_counts_in_the_lowest_bucket_without_time():
    stats = OpStats()
    stats.add_at_once(4096)
    stats.add(8192, 0.003)
    assert (stats.count, stats.bytes, stats.seconds) == (2, 12288, 0.003)
    assert stats.cumulative()[0] == (LATENCY_BOUNDS[0], 1) and stats.cumulative()[-1][1] == 2
