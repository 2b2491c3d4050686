"""Placement at scale (issue 17): PYTHONPATH=TREE bench/placement_scale.py [PEERS] [ZONES]

Builds the ring of PEERS peers (default 1,000, weight 1, ids like a
cluster's, ZONES zones, default 5) the way every peer and mount does once
per map change, and prints the build time (best of three), each peer's
exact replica share against the mean (copies 3, from the ring's arcs when
the tree has `Ring.shares`), and the time of one lookup.
"""

from __future__ import annotations

import hashlib
import sys
import time

from vdifs.model.placement import Ring

COPIES = 3


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    zones = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    peers = tuple(sorted((hashlib.sha1(b"peer %d" % i).hexdigest()[:16], f"zone{i % zones}", 1.0)
                         for i in range(n)))
    builds = []
    for _ in range(3):
        t = time.perf_counter()
        ring = Ring(peers)
        builds.append(time.perf_counter() - t)
    print(f"{n} peers, {zones} zones: ring built in {min(builds):.2f} s (best of 3: "
          f"{', '.join(f'{b:.2f}' for b in builds)})")
    if hasattr(ring, "shares"):
        shares = ring.shares(COPIES)
        mean = COPIES / n
        print(f"replica shares (exact): {min(shares.values()) / mean - 1:+.1%} .. "
              f"{max(shares.values()) / mean - 1:+.1%} of the mean")
    t = time.perf_counter()
    for oid in range(100_000):
        ring.lookup(oid, COPIES)
    print(f"lookup: {(time.perf_counter() - t) / 100_000 * 1e6:.1f} us")


if __name__ == "__main__":
    main()
