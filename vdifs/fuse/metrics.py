"""What a mount reports: each loaded VDI's requests, bytes and latency (the
iostat a hypervisor's operator wants), its lease and write-behind window,
the pool's size, the local cache, the cluster map and each peer's round
trips. Labels are VDI names (those loaded here) and peer addresses: never
an object."""

from __future__ import annotations

import math

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from vdifs.client.catalog import Catalog
from vdifs.client.pool import PoolSpace
from vdifs.errors import VdifsError
from vdifs.metrics.families import cluster, counter, gauge, latency, round_trips

SPACE_TIMEOUT = 5.0  # seconds a scrape waits for the pool's size
SPACE_MAX_AGE = 60.0  # seconds a pool size is reported again before it is asked for anew


class PoolSpaceCache:
    """The pool's size as last asked. A cluster pool's `space` asks every
    peer (`peer.info`, which lists the store): once per scrape of every
    mount would be peers x mounts requests each scrape interval."""

    def __init__(self) -> None:
        self.value: PoolSpace | None = None
        self.asked = -math.inf

    async def get(self, catalog: Catalog) -> PoolSpace | None:
        if trio.current_time() - self.asked >= SPACE_MAX_AGE:
            self.asked = trio.current_time()
            with trio.move_on_after(SPACE_TIMEOUT):
                try:
                    self.value = await catalog.pool.space()
                except VdifsError:
                    pass
        return self.value


async def mount_metrics(catalog: Catalog, fuse_stats: dict[str, int], space_cache: PoolSpaceCache) -> list[Metric]:
    out: list[Metric] = []
    requests = CounterMetricFamily("vdifs_vdi_requests", "Requests of a VDI's clients (file and NBD), by kind",
                                   labels=["vdi", "kind"])
    nbytes = CounterMetricFamily("vdifs_vdi_bytes", "Bytes read, written and discarded, by kind",
                                 labels=["vdi", "kind"])
    seconds = HistogramMetricFamily("vdifs_vdi_request_seconds", "Time to serve a request, by kind",
                                    labels=["vdi", "kind"])
    window = GaugeMetricFamily("vdifs_vdi_write_behind_bytes", "Acknowledged writes not yet written back",
                               labels=["vdi"])
    in_flight = GaugeMetricFamily("vdifs_vdi_requests_in_flight", "Requests under way that had to wait",
                                  labels=["vdi"])
    lease = GaugeMetricFamily("vdifs_vdi_lease_held", "1 while this mount holds the VDI's write lease",
                              labels=["vdi"])
    for name, vid, io in catalog.io_by_vdi():
        for kind, stats in io.by_kind().items():
            requests.add_metric([name, kind], stats.count)
            nbytes.add_metric([name, kind], stats.bytes)
            latency(seconds, [name, kind], stats)
        vol = catalog.loaded(vid)
        window.add_metric([name], vol.window.bytes if vol is not None else 0)
        in_flight.add_metric([name], io.in_flight)
        if catalog.leases is not None:
            lease.add_metric([name], 1 if catalog.leases.holds(vid) else 0)
    out += [requests, nbytes, seconds, window, in_flight]
    if catalog.leases is not None:
        out.append(lease)
    out.append(gauge("vdifs_vdis", "VDIs in the directory", len(catalog.current.vdis)))
    space = await space_cache.get(catalog)
    if space is not None:
        out.append(gauge("vdifs_pool_size_bytes", "Usable size of the pool (after copies; at most a minute old)",
                         space.total))
        out.append(gauge("vdifs_pool_free_bytes", "Usable free space of the pool (after copies; at most a minute old)",
                         space.free))
    out += cluster(catalog.pool.cluster_map())
    peers = catalog.pool.round_trips()
    if peers:
        out.append(round_trips("vdifs", peers))
    cache = catalog.pool.cache_status()
    if cache is not None:
        out += [gauge("vdifs_cache_size_bytes", "Capacity of the local object cache", cache["size"]),
                gauge("vdifs_cache_used_bytes", "Bytes of ready cached objects", cache["used"]),
                gauge("vdifs_cache_reserved_bytes", "Bytes reserved by fills under way", cache["reserved"])]
        objects = GaugeMetricFamily("vdifs_cache_objects", "Cached objects by state", labels=["state"])
        for state, n in sorted(cache["objects"].items()):
            objects.add_metric([state], n)
        out.append(objects)
        for key in ("hits", "misses", "fills", "fill_refusals", "evictions", "expirations", "drops", "bytes_saved"):
            out.append(counter(f"vdifs_cache_{key}", f"Local cache: {key.replace('_', ' ')}", cache[key]))
    out.append(counter("vdifs_fuse_syncs", "Writes made durable at once (O_DSYNC, RWF_DSYNC)", fuse_stats["syncs"]))
    return out
