"""The command line's side of a mount's control socket: find the socket of
a mount or store, and send it one request for one reply, with a timeout on
every wait. (The mount's side is vdifs.control.server; vdifs.client is the
mount's VDI engine, not this.)"""

from __future__ import annotations

import errno
import os
from typing import Any

import trio

from vdifs.control.mounts import MOUNTS_FILE, read_mounts
from vdifs.errors import VdifsError, error_from_wire
from vdifs.wire.frames import ConnectionClosed, FrameStream, ProtocolError, check_reply

CONTROL_SOCKET = "control.sock"
DEFAULT_TIMEOUT = 30.0  # seconds to wait for an answer to a quick request


class NotMounted(VdifsError):
    errno = errno.ENOTCONN


def socket_for_mount(mountpoint: str, mounts_file: str = MOUNTS_FILE) -> str:
    """The control socket of the vdifs mount at `mountpoint`: the one of
    the store its mount source names (mount table: `mounts_file`)."""
    if not os.path.isdir(mountpoint):
        raise NotMounted(f"{mountpoint} is not a directory")
    wanted = os.path.realpath(mountpoint)
    for entry in reversed(read_mounts(mounts_file)):  # the last mount over a path is the visible one
        if entry.mountpoint in (mountpoint, wanted):
            if entry.store is None:
                break
            return socket_for_store(entry.store)
    raise NotMounted(f"{mountpoint} is not a vdifs mount")


def socket_for_store(store: str) -> str:
    """The control socket a mount of `store` listens on."""
    return os.path.join(store, CONTROL_SOCKET)


async def call(path: str, op: str, args: dict[str, Any] | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """Send `op` to the mount at socket `path`; its result, or its error raised."""
    with trio.fail_after(timeout):
        try:
            stream = await trio.open_unix_socket(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotMounted(f"no running vdifs mount serves {path}") from None
        async with stream:
            frames = FrameStream(stream)
            await frames.send([1, op, args or {}])
            try:
                rid, status, result = check_reply(await frames.receive())
            except (ConnectionClosed, ProtocolError) as e:
                raise VdifsError(f"the mount closed the control connection ({e})") from None
    if status:
        raise error_from_wire(status, str(result))
    return result
