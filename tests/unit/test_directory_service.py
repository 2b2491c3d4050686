"""The directory service never builds a CAS on a peeked (maybe unchosen)
value, whether the directory is one register or split into parts."""

import pytest

from vdifs.meta.directory_service import ROOT_KEY, DirectoryService, part_key
from vdifs.model.directory import Directory, part_of


class TwoFacedRegister:
    """A register whose peek can show a value that was never chosen."""

    def __init__(self) -> None:
        self.version, self.value = 0, b""
        self.peeked: tuple[int, bytes] | None = None

    async def get(self):
        return self.version, self.value

    async def read(self):
        return await self.get()

    async def peek(self):
        return self.peeked or (self.version, self.value)

    async def cas(self, version, value):
        if version != self.version:
            return False
        self.version, self.value = version + 1, value
        return True


def names_in_one_part(count: int, parts: int) -> list[str]:
    names = [f"n{i}" for i in range(10 * count * parts)]
    home = part_of(names[0], parts)
    return [n for n in names if part_of(n, parts) == home][:count]


@pytest.mark.parametrize("parts", [1, 8])
async def test_update_after_an_unchosen_peek_keeps_every_change(parts):
    registers: dict[str, TwoFacedRegister] = {}

    def open_register(key: str) -> TwoFacedRegister:
        return registers.setdefault(key, TwoFacedRegister())

    svc = DirectoryService(open_register, parts=parts)
    a, b, c, ghost_name = names_in_one_part(4, parts)
    await svc.update_name(a, lambda d: d.create(a, 1))  # chosen v1 of a's part
    k = part_of(a, parts)
    reg = registers[ROOT_KEY if parts == 1 else part_key(k)]
    # another proposer's value was accepted by one acceptor but never chosen ...
    ghost = Directory.decode(reg.value, part=k, parts=parts)
    ghost.create(ghost_name, 1)
    reg.peeked = (reg.version + 1, ghost.encode())
    # ... while a different value became the chosen next version
    chosen = Directory.decode(reg.value, part=k, parts=parts)
    chosen.create(b, 1)
    reg.version, reg.value = reg.version + 1, chosen.encode()
    assert await svc.refresh_hint()
    assert ghost_name in svc.current.vdis  # shown, as a hint
    await svc.update_name(c, lambda d: d.create(c, 1))
    final = Directory.decode(reg.value, part=k, parts=parts)
    assert sorted(final.vdis) == sorted([a, b, c])  # b kept, ghost never written
    vids = [r.vid for r in final.vdis.values()]
    assert len(vids) == len(set(vids))
