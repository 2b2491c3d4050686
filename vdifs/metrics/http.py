"""The metrics endpoint: GET /metrics over HTTP/1.x, one request per
connection, on trio (prometheus-client's own server would be a thread).

A scrape is read within a deadline and bounded in size; anything else than
GET /metrics (or /) gets its 4xx; a failure to gather the figures is a
500 and a log line, never the end of the process that serves it."""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from vdifs.errors import VdifsError
from vdifs.wire.rpc import split_address

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10.0  # seconds to read a request and send the answer
HEAD_MAX = 8192  # bytes of a request's line and headers

Gather = Callable[[], Awaitable[list[Metric]]]


class _Figures(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def check_address(address: str) -> None:
    """VdifsError (EINVAL) unless `address` is HOST:PORT."""
    split_address(address)


def render(families: list[Metric]) -> bytes:
    """The Prometheus text exposition of `families`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Figures(families))
    return generate_latest(registry)


async def serve_metrics(address: str, gather: Gather, *,
                        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `gather`'s figures on `address` (HOST:PORT); started() with the port."""
    host, port = split_address(address)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as e:
        raise VdifsError(f"cannot serve metrics on {address}: {e.strerror or e}", code=e.errno or errno.EIO) from None
    bound = listeners[0].socket.getsockname()[1]
    log.info("metrics on http://%s:%d/metrics", host, bound)
    task_status.started(bound)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                await _answer(stream, gather)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:
            log.exception("metrics: a request failed")
        finally:
            await trio.aclose_forcefully(stream)

    await trio.serve_listeners(handle, listeners)


async def _answer(stream: trio.SocketStream, gather: Gather) -> None:
    head = b""
    while b"\r\n\r\n" not in head and b"\n\n" not in head:
        if len(head) > HEAD_MAX:
            await _reply(stream, 431, b"request header too large\n")
            return
        chunk = await stream.receive_some(4096)
        if not chunk:
            return
        head += chunk
    parts = head.split(b"\r\n", 1)[0].split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        await _reply(stream, 400, b"bad request\n")
        return
    method, path = parts[0], parts[1].split(b"?", 1)[0]
    if path not in (b"/metrics", b"/"):
        await _reply(stream, 404, b"only /metrics here\n")
        return
    if method not in (b"GET", b"HEAD"):
        await _reply(stream, 405, b"GET only\n")
        return
    try:
        body = render(await gather())
    except Exception:
        log.exception("metrics: could not gather the figures")
        await _reply(stream, 500, b"could not gather the figures (see the log)\n")
        return
    await _reply(stream, 200, body, CONTENT_TYPE_LATEST, head_only=method == b"HEAD")


REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           431: "Request Header Fields Too Large", 500: "Internal Server Error"}


async def _reply(stream: trio.SocketStream, status: int, body: bytes,
                 content_type: str = "text/plain; charset=utf-8", *, head_only: bool = False) -> None:
    head = (f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    await stream.send_all(head + (b"" if head_only else body))
