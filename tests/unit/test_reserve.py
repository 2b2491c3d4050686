"""The store's space reserve: pure logic with a fake file system and clock."""

from __future__ import annotations

import os

from vdifs.store.reserve import RECHECK, REFRESH, SpaceReserve, default_reserve

MiB = 1 << 20


class FakeFs:
    def __init__(self, total: int, free: int) -> None:
        self.total, self.free, self.calls = total, free, 0

    def statvfs(self, path: str) -> os.statvfs_result:
        self.calls += 1
        return os.statvfs_result((4096, 4096, self.total // 4096, self.free // 4096, self.free // 4096,
                                  0, 0, 0, 0, 255))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_default_reserve_is_two_percent_within_bounds():
    assert default_reserve(10 * MiB) == MiB
    assert default_reserve(1000 * MiB) == 20 * MiB
    assert default_reserve(10 << 40) == 1 << 30


def test_admits_down_to_the_reserve_without_measuring_each_write():
    fs, clock = FakeFs(100 * MiB, 20 * MiB), Clock()
    r = SpaceReserve("/x", 8 * MiB, statvfs=fs.statvfs, clock=clock)
    calls = fs.calls
    assert all(r.admit(MiB) for _ in range(12))  # 20 - 12 = 8: exactly at the line
    assert fs.calls == calls  # counted, not measured
    assert r.available == 0
    assert not r.admit(4096)  # within RECHECK of the last measurement: refused outright
    assert fs.calls == calls


def test_measures_again_before_refusing_what_overwrites_may_have_left():
    fs, clock = FakeFs(100 * MiB, 20 * MiB), Clock()
    r = SpaceReserve("/x", 8 * MiB, statvfs=fs.statvfs, clock=clock)
    assert all(r.admit(MiB) for _ in range(12))
    clock.now += 2 * RECHECK  # the 12 MiB were overwrites: the file system is still at 20 free
    assert r.admit(MiB) and r.free == 19 * MiB
    fs.free = 8 * MiB  # now really full
    clock.now += REFRESH
    assert not r.admit(4096)
    fs.free = 30 * MiB  # something was deleted
    clock.now += 2 * RECHECK
    assert r.admit(MiB)


def test_a_write_given_back_is_not_counted():
    """The inline path admits, then falls back to the task path, which
    admits again: the first count must be given back, or near the line the
    store would refuse writes that fit."""
    fs, clock = FakeFs(100 * MiB, 20 * MiB), Clock()
    r = SpaceReserve("/x", 8 * MiB, statvfs=fs.statvfs, clock=clock)
    assert r.admit(4 * MiB)
    r.give_back(4 * MiB)
    assert r.free == 20 * MiB and r.available == 12 * MiB
