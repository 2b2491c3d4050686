"""systemd's notify protocol, for `Type=notify` units (sd_notify(3)).

A process started by systemd with NOTIFY_SOCKET set tells it, in datagrams
of `KEY=value` lines: READY=1 once it serves, STATUS=... while it works
(recovery progress), STOPPING=1 when it begins to stop, and WATCHDOG=1
regularly when the unit has WatchdogSec=: systemd restarts a process
whose pings stop. The pings come from a task on the event loop, so a loop
that is stuck (a blocking call, a livelock) is restarted. Without
NOTIFY_SOCKET every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

import trio

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path  # "@": the abstract namespace
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and mine else None
        self._status = ""

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, **fields: str) -> None:
        """One datagram of KEY=value lines (keys given in lower case)."""
        if not self.address:
            return
        message = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        try:  # never waits: a full queue (systemd busy) drops this message, not the event loop
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as s:
                s.sendto(message, self.address)
        except OSError as e:  # systemd gone, busy, or the socket wrong: nothing to tell
            log.debug("could not notify systemd (%s): %s", self.address, e)

    def ready(self, status: str = "") -> None:
        self.send(ready="1", **({"status": status} if status else {}))
        self._status = status

    def status(self, text: str) -> None:
        """STATUS=text, unless it is what was sent last."""
        if text != self._status:
            self._status = text
            self.send(status=text)

    def stopping(self) -> None:
        self.send(stopping="1")

    async def keep_alive(self) -> None:
        """WATCHDOG=1 every half of WatchdogSec=, from the event loop; returns
        at once without a watchdog."""
        if self.watchdog_interval is None or not self.address:
            return
        while True:
            self.send(watchdog="1")
            await trio.sleep(self.watchdog_interval)
