"""The directory service never builds a CAS on a peeked (maybe unchosen) value."""

from vdifs.meta.directory_service import DirectoryService
from vdifs.model.directory import Directory


class TwoFacedRegister:
    """A register whose peek can show a value that was never chosen."""

    def __init__(self) -> None:
        self.version, self.value = 0, b""
        self.peeked: tuple[int, bytes] | None = None

    async def get(self):
        return self.version, self.value

    async def peek(self):
        return self.peeked or (self.version, self.value)

    async def cas(self, version, value):
        if version != self.version:
            return False
        self.version, self.value = version + 1, value
        return True


async def test_update_after_an_unchosen_peek_keeps_every_change():
    reg = TwoFacedRegister()
    svc = DirectoryService(reg)
    await svc.update(lambda d: d.create("a", 1))  # chosen v1
    # another proposer's value was accepted by one acceptor but never chosen ...
    ghost = Directory.decode(reg.value)
    ghost.create("ghost", 1)
    reg.peeked = (2, ghost.encode())
    # ... while a different value became the chosen v2
    chosen = Directory.decode(reg.value)
    chosen.create("b", 1)
    reg.version, reg.value = 2, chosen.encode()
    assert await svc.refresh_hint()
    assert "ghost" in svc.current.vdis  # shown, as a hint
    await svc.update(lambda d: d.create("c", 1))
    final = Directory.decode(reg.value)
    assert sorted(final.vdis) == ["a", "b", "c"]  # b kept, ghost never written
    vids = [r.vid for r in final.vdis.values()]
    assert len(vids) == len(set(vids))
