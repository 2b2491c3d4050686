"""Whom a peer pings next: the failure detector's schedule, pure logic.

Pinging every other peer every second costs each peer work in proportion
to the cluster (issue 17: 0.6% of a core per idle peer with 3 peers, 1.6%
with 24). Instead each peer pings a constant number of peers per round
(`FANOUT`), taken SWIM-style from its own shuffled list of the others,
round-robin: every peer is pinged by about FANOUT others per round
whatever the cluster's size, and by every other peer at least once every
(n - 1) / FANOUT rounds, so a dead peer is noticed within about a round
and never goes unnoticed by chance. A peer that joins is put at a random
place in the list, one that leaves is skipped; the list is shuffled again
at each pass's end.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping, Sequence

FANOUT = 2  # peers each peer pings per round
HELPERS = 3  # peers asked to ping a silent one before it is suspected


class ProbeOrder:
    """A peer's round-robin through the others, reshuffled at every pass."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.order: list[str] = []
        self.position = 0
        self.known: set[str] = set()
        self.version: object = None

    def _learn(self, members: Collection[str]) -> None:
        """Fold a changed membership in: newcomers at random places still
        ahead in this pass, so they are pinged within it."""
        newcomers = [peer for peer in members if peer not in self.known]
        if newcomers:
            rest = self.order[self.position:] + newcomers
            self.rng.shuffle(rest)
            self.order[self.position:] = rest
        self.known = set(members)

    def next(self, members: Collection[str], k: int = FANOUT, version: object = None) -> list[str]:
        """The next `k` of `members` (all of them if fewer), no one twice.

        `version` names the membership (a map epoch): while it is unchanged
        the members are not compared again, so a round costs O(k), not O(n)."""
        if version is None or version != self.version:
            self._learn(members)
            self.version = version
        out: list[str] = []
        want = min(k, len(self.known))
        passes = 0
        while len(out) < want and passes < 2:
            if self.position >= len(self.order):
                self.order = [p for p in self.order if p in self.known]
                self.rng.shuffle(self.order)
                self.position = 0
                passes += 1
                if not self.order:
                    break
            peer = self.order[self.position]
            self.position += 1
            if peer in self.known and peer not in out:
                out.append(peer)
        return out


def pick_helpers(members: Sequence[str], exclude: Collection[str], k: int, rng: random.Random) -> list[str]:
    """Up to `k` random members not in `exclude` (to ping a silent peer for us)."""
    pool = [m for m in members if m not in exclude] if len(members) <= 4 * k + len(exclude) else None
    if pool is not None:
        return rng.sample(pool, min(k, len(pool)))
    out: list[str] = []  # a large cluster: draw until k distinct (no O(n) copy)
    while len(out) < k:
        m = members[rng.randrange(len(members))]
        if m not in exclude and m not in out:
            out.append(m)
    return out


#: A mount pings a peer while it has sent it a request within this long
#: (seconds), and always while it has the peer cut off.
MOUNT_ACTIVE_WINDOW = 30.0


def mount_probe_targets(up: Sequence[str], last_sent: Mapping[str, float], cut: Collection[str],
                        now: float, window: float = MOUNT_ACTIVE_WINDOW) -> list[str]:
    """The up peers a mount pings this round: those it has sent requests to
    lately, whose reachability its I/O depends on, and those it has cut off,
    to see them answer again. Pinging every up peer cost each mount a ping
    (and a connection) per peer per second, and each peer one per mount:
    O(peers x mounts) for a cluster at rest (issue 17)."""
    return [a for a in up if a in cut or now - last_sent.get(a, float("-inf")) < window]
