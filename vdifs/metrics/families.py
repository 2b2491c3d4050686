"""Building blocks shared by the mount's and the peer's metrics."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from vdifs.model.cluster import ClusterMap
from vdifs.model.iostats import OpStats


def gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=list(labels or {}))
    g.add_metric(list((labels or {}).values()), value)
    return g


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def latency(family: HistogramMetricFamily, labels: list[str], stats: OpStats) -> None:
    """One labelled histogram of `family` from an OpStats."""
    family.add_metric(labels, [(_le(bound), n) for bound, n in stats.cumulative()], stats.seconds)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def round_trips(prefix: str, by_peer: dict[str, OpStats]) -> Metric:
    h = HistogramMetricFamily(f"{prefix}_peer_round_trip_seconds",
                              "Request-to-reply time of calls to each peer", labels=["peer"])
    for address, stats in sorted(by_peer.items()):
        latency(h, [address], stats)
    return h


def cluster(cmap: ClusterMap | None) -> Iterable[Metric]:
    """The map as this process knows it: epoch, peers up and down."""
    if cmap is None:
        return []
    peers = GaugeMetricFamily("vdifs_cluster_peers", "Peers in the cluster map, by state", labels=["state"])
    up = len(cmap.up_peers())
    peers.add_metric(["up"], up)
    peers.add_metric(["down"], len(cmap.peers) - up)
    return [gauge("vdifs_cluster_epoch", "Epoch of the cluster map this process uses", cmap.epoch), peers]
