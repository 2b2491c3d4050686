"""Authenticated, multiplexed request/reply connections between vdifs processes.

Handshake (every frame a msgpack frame, see `frames`):

    server -> client  {"proto": 2, "nonce": Ns, "cluster": id | None, "peer": id}
    client -> server  {"proto": 2, "nonce": Nc, "mac": HMAC(secret, "vdifs-c" Ns Nc) | None}
    server -> client  {"ok": true, "mac": HMAC(secret, "vdifs-s" Nc Ns)}   or  {"ok": false, "error": "..."}

Both sides prove they hold the cluster secret without sending it, or a
credential derived from it: a client that adds `"as": [role, name]` to its
hello proves `credential_key(secret, role, name)` instead (`ClientKey`),
and its session may send only its role's operations (the server's
`role_ops`); a client that names none proves the secret itself, which is
the admin role. A peer of
no cluster yet (before `cluster format`) accepts clients without a MAC, but
only for the operations it marks open (joining, formatting). Until the
handshake is done frames are limited to 4 KiB; afterwards to one object
plus headers. After an authenticated handshake both ends derive a session
key from the two nonces and every frame carries an integrity tag
(`seal`): a frame changed on the way fails the check and ends the
connection before anything acts on it. A client that asks (`"enc"` in its
hello), or a peer that demands it (`"enc"` in its own), makes the frames
encrypted as well. A peer of no cluster yet adds an
X25519 public key (`kx`) to its hello, the client answers with its own,
and their frames are encrypted with the agreed key: the secret that
`cluster format` hands out never crosses the wire in clear.

Requests `[id, op, args]` and replies `[id, status, result]` are
multiplexed: many in flight per connection, one reader task routes the
replies. Anything malformed closes that connection with a logged reason.

Nothing a client sends can end the server: replies are bounded (error
texts are cut to MAX_ERROR_TEXT; a result too big for a frame is answered
EIO), a handler's bug is logged and answered EIO, and anything else that
goes wrong on a connection ends that connection only. Memory is bounded
with backpressure: a server stops reading a connection while the data of
its requests and replies in memory would pass HELD_BYTES_PER_CONNECTION, or
all connections' would pass HELD_BYTES_TOTAL (a connection holding nothing
may still send one request, so a client that never reads its replies
cannot starve the others). A connection that stops in the middle of a frame
for `idle_timeout` is closed.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import hmac
import logging
import math
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from vdifs.errors import PoolError, VdifsError
from vdifs.model.ids import OBJECT_SIZE
from vdifs.model.iostats import OpStats
from vdifs.wire.frames import (
    Blob, ConnectionClosed, FrameStream, ProtocolError, check_reply, check_request, cut_text, encode_frame,
)

from vdifs.wire.seal import FrameSeal, KeyExchange, session_key

log = logging.getLogger(__name__)

PROTO = 2  # 2: frames after an authenticated handshake carry an integrity tag (`seal`)
HANDSHAKE_MAX_FRAME = 4096
MAX_FRAME = OBJECT_SIZE + (1 << 16)
HANDSHAKE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
MAX_INFLIGHT_PER_CONNECTION = 64
#: bytes of requests and replies one server holds in memory at a time (data
#: received and not yet handled, answers not yet handed to the kernel) ...
HELD_BYTES_TOTAL = 48 << 20
#: ... and one connection (a connection that holds nothing may always send one more)
HELD_BYTES_PER_CONNECTION = 16 << 20
#: seconds a connection may stay in the middle of a frame without sending a byte
IDLE_TIMEOUT = 60.0
#: characters of an error text a reply carries at most (texts may quote what the client sent)
MAX_ERROR_TEXT = 512
#: characters of an operation name (longer ones are answered ENOSYS without being quoted whole)
MAX_OP_NAME = 64

#: status of a reply that says "your cluster map is older than mine"
ESTALE_EPOCH = errno.ESTALE

#: What a mount may send to a peer it cannot reach through another peer
#: (`peer.relay`): the data path's operations, never consensus or membership.
RELAYED_OPS = frozenset({"obj.read", "obj.write", "obj.writev", "obj.create", "obj.delete", "obj.sync", "obj.list",
                         "obj.vids", "obj.finish_vid", "lease.fence", "peer.info"})


class PeerUnavailable(PoolError):
    """The peer cannot be reached, or the connection broke mid-request."""


class RemoteError(VdifsError):
    """The peer answered with an error status."""

    def __init__(self, status: int, result: Any) -> None:
        message = result if isinstance(result, str) else (result or {}).get("message", "error")
        super().__init__(str(message), code=status)
        self.result = result


def mac(secret: bytes, label: bytes, a: bytes, b: bytes) -> bytes:
    return hmac.new(secret, label + a + b, hashlib.sha256).digest()


# -- credentials --------------------------------------------------------------------

ADMIN, MOUNT, PEER = "admin", "mount", "peer"
ROLES = (ADMIN, MOUNT, PEER)
#: how a session that proved the cluster secret itself is named in logs and errors
CLUSTER_SECRET = "the cluster secret"
CREDENTIAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


def credential_key(secret: bytes, role: str, name: str) -> bytes:
    """The key of credential `role.name`: derived from the cluster secret, so
    a peer checks any credential without a keyring, and a holder of one
    cannot compute the secret or another credential's key."""
    return hmac.new(secret, b"vdifs-credential\0" + role.encode() + b"\0" + name.encode(),
                    hashlib.sha256).digest()


def valid_credential(role: Any, name: Any) -> bool:
    return role in ROLES and isinstance(name, str) and CREDENTIAL_NAME.match(name) is not None


@dataclass(frozen=True)
class ClientKey:
    """What a client proves in the handshake: the cluster secret itself
    (no name: the admin role) or the credential `role.name`."""

    key: bytes
    role: str = ADMIN
    name: str = ""

    @property
    def credential(self) -> str:
        return f"{self.role}.{self.name}" if self.name else CLUSTER_SECRET

    @classmethod
    def derived(cls, secret: bytes, role: str, name: str) -> ClientKey:
        return cls(credential_key(secret, role, name), role, name)


def client_key(secret: bytes | ClientKey | None) -> ClientKey | None:
    """Plain bytes are the cluster secret."""
    return secret if secret is None or isinstance(secret, ClientKey) else ClientKey(secret)


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise VdifsError(f"address {address!r} is not HOST:PORT", code=errno.EINVAL)
    return host.strip("[]"), int(port)


Handler = Callable[[dict[str, Any], "Session"], Awaitable[Any]]


class _EveryOp(frozenset[str]):
    """Contains every operation: a session made by hand (simulations)."""

    def __contains__(self, op: object) -> bool:
        return True


class Session:
    """What a handler knows about the connection it serves: who is at the
    other end (`credential`, `role`: None before authentication) and which
    operations it may send (`ops`)."""

    def __init__(self, remote: str, authenticated: bool, *, role: str | None = None, name: str = "",
                 credential: str = "", ops: frozenset[str] | None = None, key: bytes | None = None) -> None:
        self.remote = remote
        self.authenticated = authenticated
        self.name = name  # of the credential; empty: the cluster secret itself
        self.key = key  # the key the client proved (the secret, or its credential's)
        self.role = role if role is not None or not authenticated else ADMIN
        self.credential = credential
        self.ops = ops if ops is not None else (_EveryOp() if authenticated else frozenset())
        self.refused_ops: set[str] = set()  # logged once each


FAST_YIELD = 16  # the reader lets other tasks run after this many answers without a wait
#: What a fast handler returns when it cannot answer without waiting.
NOT_NOW: Any = type("NotNow", (), {"__repr__": lambda self: "NOT_NOW"})()
FastHandler = Callable[[dict[str, Any], Session], Any]
#: per op, how many bytes its reply may carry (read lengths; 0 for small replies)
ReplySize = Callable[[str, dict[str, Any]], int]


class _Connection:
    """What the server tracks of one connection: held bytes, and progress
    for the idle sweep."""

    __slots__ = ("frames", "remote", "held", "seen", "since")

    def __init__(self, frames: FrameStream, remote: str) -> None:
        self.frames = frames
        self.remote = remote
        self.held = 0  # bytes of this connection's requests and replies in memory
        self.seen = 0  # frames.received at the last sweep
        self.since = trio.current_time()  # when it last moved


class RpcServer:
    def __init__(self, name: str, handlers: dict[str, Handler], *,
                 secret: Callable[[], bytes | None], cluster_id: Callable[[], str | None],
                 old_secrets: Callable[[], list[bytes]] = lambda: [], encrypt: bool = False,
                 peer_id: str, open_ops: frozenset[str] = frozenset(),
                 role_ops: dict[str, frozenset[str]] | None = None,
                 fast: dict[str, FastHandler] | None = None, reply_size: ReplySize | None = None,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        """`fast`: per op, a plain function tried first, in the connection's
        reader, that answers at once or returns NOT_NOW (then the op's handler
        runs in a task of its own as usual). It saves the task, the
        semaphore and the scheduling passes of requests that need no wait,
        such as reads from the page cache. `reply_size`: how many bytes a
        request's reply may carry, counted against the held-bytes limits
        from when it is read until its reply is sent. `role_ops`: the
        operations each role may send (None: every authenticated session
        may send every operation); `open_ops` need no authentication."""
        self.name = name
        self.handlers = handlers
        self.fast = fast or {}
        self.fast_answers = 0
        self.secret = secret
        self.old_secrets = old_secrets  # still accepted for a while after a rotation
        self.encrypt = encrypt  # every authenticated connection must be encrypted
        self.cluster_id = cluster_id
        self.peer_id = peer_id
        self.open_ops = open_ops
        every = frozenset(handlers) | frozenset(self.fast) | open_ops
        self.role_ops = {role: (role_ops.get(role, frozenset()) if role_ops is not None else every) | open_ops
                         for role in ROLES}
        self.refused = 0  # connections dropped for bad traffic or credentials
        self.reply_size = reply_size or (lambda op, args: 0)
        self.idle_timeout = idle_timeout
        self.held = 0  # bytes held by all connections
        self._released = trio.Event()  # set (and replaced) whenever held bytes are given back
        self._connections: set[_Connection] = set()
        self._unauthenticated: dict[trio.abc.Stream, Session] = {}

    async def close_unauthenticated(self, keep: Session | None = None) -> None:
        """Hang up on every connection made before we had a secret (but `keep`,
        the one whose request is being answered): their clients reconnect and
        authenticate. Pre-format sessions must not linger into the cluster,
        where they can call nothing but the open operations."""
        for stream, session in list(self._unauthenticated.items()):
            if session is not keep:
                with trio.CancelScope(shield=True):
                    await stream.aclose()

    async def serve(self, host: str, port: int, *,
                    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED) -> None:
        # backlog None: the most the kernel allows (net.core.somaxconn), for many hypervisors at once
        listeners = await trio.open_tcp_listeners(port, host=host, backlog=None)
        task_status.started(listeners)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sweep_idle)
            await trio.serve_listeners(self.handle, listeners)

    async def _sweep_idle(self) -> None:
        """Close connections that stopped in the middle of a frame: one sweep
        a second for all of them, instead of a deadline on every receive."""
        while True:
            await trio.sleep(min(1.0, self.idle_timeout / 4))
            now = trio.current_time()
            for conn in list(self._connections):
                frames = conn.frames
                if frames.received != conn.seen or not frames.mid_frame:
                    conn.seen, conn.since = frames.received, now
                elif now - conn.since >= self.idle_timeout:
                    self._connections.discard(conn)
                    log.warning("%s: closing the connection from %s: it sent nothing for %.0f s in the middle "
                                "of a frame", self.name, conn.remote, now - conn.since)
                    with trio.CancelScope(shield=True):
                        await frames.aclose(abort=True)

    # -- held bytes --------------------------------------------------------------------

    def _admit(self, conn: _Connection, cost: int) -> bool:
        """Count `cost` held bytes for conn now if the limits allow (no await)."""
        if conn.held and (conn.held + cost > HELD_BYTES_PER_CONNECTION or self.held + cost > HELD_BYTES_TOTAL):
            return False
        conn.held += cost
        self.held += cost
        return True

    async def _wait_admit(self, conn: _Connection, cost: int) -> None:
        while not self._admit(conn, cost):
            await self._released.wait()

    def _give_back(self, conn: _Connection, cost: int) -> None:
        if cost:
            conn.held -= cost
            self.held -= cost
            self._released.set()
            self._released = trio.Event()

    def _refuse(self, remote: str, reason: str) -> None:
        """Count and log a refused connection."""
        self.refused += 1
        log.warning("%s: refused connection from %s: %s", self.name, remote, reason)

    async def _turn_away(self, frames: FrameStream, remote: str, reason: str, error: str) -> None:
        """Refuse a handshake: logged first, then `error` told to the client,
        so whoever hears the refusal finds its reason in the log."""
        self._refuse(remote, reason)
        await frames.send({"ok": False, "error": error})

    async def handle(self, stream: trio.abc.Stream) -> None:
        remote = _remote_name(stream)
        frames = FrameStream(stream, HANDSHAKE_MAX_FRAME)
        try:
            session = await self._handshake(frames, remote)
            if session is None:
                return
            frames.max_frame = MAX_FRAME
            if not session.authenticated:
                self._unauthenticated[stream] = session
            conn = _Connection(frames, remote)
            self._connections.add(conn)
            try:
                await self._serve_requests(conn, session)
            finally:
                self._connections.discard(conn)
        except ProtocolError as e:
            self._refuse(remote, str(e))
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except trio.TooSlowError:
            self._refuse(remote, "no handshake within %.0f s" % HANDSHAKE_TIMEOUT)
        except Exception:  # a bug of ours: it ends this connection, never the server
            log.exception("%s: connection from %s ended by an internal error", self.name, remote)
        finally:
            self._unauthenticated.pop(stream, None)
            with trio.move_on_after(1) as cs:
                cs.shield = True
                await stream.aclose()

    async def _handshake(self, frames: FrameStream, remote: str) -> Session | None:
        nonce_s = os.urandom(16)
        # No cluster yet, so no secret to derive a key from: agree on one (see `seal`).
        kx = KeyExchange() if self.secret() is None else None
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await frames.send({"proto": PROTO, "nonce": nonce_s, "cluster": self.cluster_id(),
                               "peer": self.peer_id, **({"kx": kx.public} if kx is not None else {}),
                               **({"enc": True} if self.encrypt else {})})
            hello = await frames.receive()
        if not isinstance(hello, dict) or not isinstance(hello.get("nonce"), bytes):
            raise ProtocolError("malformed handshake")
        if hello.get("proto") != PROTO:
            await self._turn_away(frames, remote, f"protocol version {hello.get('proto')!r}",
                                  f"protocol version {hello.get('proto')!r} is not {PROTO}")
            return None
        secret = self.secret()
        given = hello.get("mac")
        if secret is None:
            # No cluster yet: anyone may talk, but only the open operations,
            # and encrypted (they carry the new secret at format time).
            theirs = hello.get("kx")
            key = kx.key(theirs, nonce_s, hello["nonce"]) if kx is not None and isinstance(theirs, bytes) else None
            if key is None:
                await self._turn_away(frames, remote, "no key agreement before the format",
                                      "this peer belongs to no cluster yet: the handshake "
                                      "must agree on a key (kx)")
                return None
            await frames.send({"ok": True, "mac": None})
            frames.seal = FrameSeal(key, server=True, encrypt=True)
            return Session(remote, authenticated=False, ops=self.open_ops)
        claimed = hello.get("as")
        if claimed is not None and not (isinstance(claimed, list) and len(claimed) == 2
                                        and valid_credential(*claimed)):
            await self._turn_away(frames, remote, "malformed credential",
                                  "malformed credential: 'as' must be [role, name]")
            return None
        proof = None
        for candidate in [secret, *self.old_secrets()]:
            tried = ClientKey(candidate) if claimed is None else ClientKey.derived(candidate, *claimed)
            if isinstance(given, bytes) and hmac.compare_digest(given, mac(tried.key, b"vdifs-c", nonce_s,
                                                                           hello["nonce"])):
                proof = tried
                break
        if proof is None:
            what = "cluster secret" if claimed is None else f"key for credential {claimed[0]}.{claimed[1]}"
            await self._turn_away(frames, remote, f"authentication failed (wrong or missing {what})",
                                  f"authentication failed: wrong or missing {what}")
            return None
        encrypted = hello.get("enc") is True
        if self.encrypt and not encrypted:
            await self._turn_away(frames, remote, f"{proof.credential} did not ask for encryption",
                                  "this peer requires encrypted connections")
            return None
        await frames.send({"ok": True, "mac": mac(proof.key, b"vdifs-s", hello["nonce"], nonce_s)})
        frames.seal = FrameSeal(session_key(proof.key, nonce_s, hello["nonce"]), server=True, encrypt=encrypted)
        return Session(remote, authenticated=True, role=proof.role, name=proof.name,
                       credential=proof.credential, ops=self.role_ops[proof.role], key=proof.key)

    def _refusal(self, op: str, session: Session) -> str:
        """The error text of an operation outside the session's role (logged
        once per connection and operation, naming the credential)."""
        if not session.authenticated:
            return f"{op} needs an authenticated connection"
        roles = [r for r in ROLES if op in self.role_ops[r]]
        why = (f"{op} is refused to {session.credential} (role {session.role}): "
               f"it needs a credential of role {' or '.join(roles)}")
        if op not in session.refused_ops:
            session.refused_ops.add(op)
            log.warning("%s: %s from %s", self.name, why, session.remote)
        return why

    async def _serve_requests(self, conn: _Connection, session: Session) -> None:
        frames = conn.frames
        limit = trio.Semaphore(MAX_INFLIGHT_PER_CONNECTION)
        ended: Exception | None = None
        replies: list[Blob] = []  # fast replies not sent yet: they leave together
        replies_held = 0  # their held bytes

        async def send_replies() -> None:
            nonlocal replies, replies_held
            await self._send_encoded(frames, replies)
            replies = []
            self._give_back(conn, replies_held)
            replies_held = 0

        try:
            async with trio.open_nursery() as nursery:
                try:
                    while True:
                        if frames.broken:  # requests still buffered would be answered to no one
                            raise trio.BrokenResourceError("a reply could not be sent")
                        if replies and not frames.frame_buffered():  # no more requests at hand
                            await send_replies()
                        msg, blob = await frames.receive_frame()
                        rid, op, args = check_request(msg)
                        cost = self._held_cost(op, args, blob)
                        if blob is not None:
                            args["data"] = blob  # object data rides outside msgpack
                        if not self._admit(conn, cost):
                            if replies:  # what we hold may be what must leave first
                                await send_replies()
                            await self._wait_admit(conn, cost)  # backpressure: stop reading
                        fast = self.fast.get(op)
                        if fast is not None and op in session.ops:
                            reply = self._answer_now(fast, session, rid, op, args)
                            if reply is not None:
                                replies.extend(self._encode_reply(reply, op, session))
                                replies_held += cost
                                if not self.fast_answers % FAST_YIELD:  # a flood of them must
                                    await send_replies()  # not starve other tasks
                                    await trio.lowlevel.checkpoint()
                                continue
                        if replies:
                            await send_replies()
                        try:
                            await limit.acquire()  # backpressure: stop reading while full
                        except BaseException:
                            self._give_back(conn, cost)
                            raise
                        nursery.start_soon(self._dispatch, conn, session, rid, op, args, limit, cost)
                except (ProtocolError, ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError) as e:
                    ended = e  # raised below, outside the nursery, so it is not wrapped in a group
                    nursery.cancel_scope.cancel()
        finally:
            self._give_back(conn, replies_held)
        if ended is not None:
            raise ended

    def _held_cost(self, op: str, args: dict[str, Any], blob: bytearray | None) -> int:
        """Bytes a request holds from when it is read until its reply is sent."""
        try:
            reply = self.reply_size(op, args)
        except Exception:  # the handler will refuse what the estimate could not read
            reply = 0
        return (len(blob) if blob is not None else 0) + min(max(reply, 0), MAX_FRAME)

    def _answer_now(self, fast: FastHandler, session: Session, rid: int, op: str,
                    args: dict[str, Any]) -> list[Any] | None:
        """The reply of a fast handler, or None when it could not answer now."""
        try:
            result = fast(args, session)
        except Exception as e:
            reply = self._error_reply(rid, op, session, e)
        else:
            if result is NOT_NOW:
                return None
            reply = [rid, 0, result]
        self.fast_answers += 1
        return reply

    def _error_reply(self, rid: int, op: str, session: Session, e: Exception) -> list[Any]:
        if isinstance(e, RemoteError):
            return [rid, e.errno, e.result]
        if isinstance(e, VdifsError):
            return [rid, e.errno, cut_text(str(e), MAX_ERROR_TEXT)]
        # Handlers check their arguments (vdifs.wire.args: InvalidArgument,
        # EINVAL), so anything else that escapes is a bug: say so loudly.
        log.exception("%s: %s from %s failed", self.name, op, session.remote, exc_info=e)
        return [rid, errno.EIO, cut_text(f"internal error in {op}: {e}", MAX_ERROR_TEXT)]

    def _encode_reply(self, reply: list[Any], op: str, session: Session) -> list[Blob]:
        """A reply's frame; one whose result does not fit a frame becomes an
        EIO (a handler must bound what it returns: this is its bug)."""
        try:
            return _encode_reply(reply)
        except (ProtocolError, ValueError, TypeError, OverflowError) as e:  # too big, or not encodable
            log.error("%s: the reply to %s from %s cannot be sent: %s", self.name, op, session.remote, e)
            why = cut_text(f"internal error in {op}: reply not sendable: {e}", MAX_ERROR_TEXT)
            return _encode_reply([reply[0], errno.EIO, why])

    @staticmethod
    async def _send_encoded(frames: FrameStream, parts: list[Blob]) -> None:
        try:
            await frames.send_encoded(parts)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the reader meets the broken connection and ends it

    async def _dispatch(self, conn: _Connection, session: Session, rid: int, op: str,
                        args: dict[str, Any], limit: trio.Semaphore, cost: int) -> None:
        frames = conn.frames
        try:
            handler = self.handlers.get(op)
            if handler is None:
                reply = [rid, errno.ENOSYS, f"unknown operation {cut_text(op, MAX_OP_NAME)!r}"]
            elif op not in session.ops:
                reply = [rid, errno.EACCES, self._refusal(op, session)]
            else:
                try:
                    reply = [rid, 0, await handler(args, session)]
                except Exception as e:
                    reply = self._error_reply(rid, op, session, e)
            await self._send_encoded(frames, self._encode_reply(reply, op, session))
        finally:
            limit.release()
            self._give_back(conn, cost)


def _encode_reply(reply: list[Any]) -> list[Blob]:
    """A reply's frame; data a handler returns rides as the frame's blob."""
    result = reply[2]
    if isinstance(result, (bytes, bytearray, memoryview)) and reply[1] == 0:
        return encode_frame([reply[0], 0, None], MAX_FRAME, result)
    return encode_frame(reply, MAX_FRAME)


def _remote_name(stream: trio.abc.Stream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]  # type: ignore[attr-defined]
        return f"{host}:{port}"
    except Exception:
        return "?"


class RpcClient:
    """One multiplexed connection to one peer, reconnected on demand.

    `call` never waits without a timeout. A broken connection fails every
    request in flight with PeerUnavailable; the next call reconnects.
    """

    def __init__(self, address: str, secret: bytes | ClientKey | None, nursery: trio.Nursery, *,
                 expect_cluster: str | None = None, encrypt: bool = False) -> None:
        """`secret`: the cluster secret, a credential's key, or None (only
        for a peer of no cluster yet). `encrypt`: ask for an encrypted
        connection (a peer may also demand one)."""
        self.address = address
        self.key = client_key(secret)
        self.encrypt = encrypt
        self.nursery = nursery
        self.expect_cluster = expect_cluster
        self.remote_peer: str | None = None
        self.remote_cluster: str | None = None
        self._frames: FrameStream | None = None
        self._pending: dict[int, PendingCall] = {}
        self._calls_started = trio.Event()  # wakes the idle watchdog (see `_watchdog`)
        self._next_id = 1
        self._connect_lock = trio.Lock()
        self.last_heard = -math.inf  # trio time of the last frame received from the peer
        self.round_trips = OpStats()  # request to reply, of every call answered

    async def _connect(self) -> FrameStream:
        frames = self._frames
        if frames is not None:  # the common case: no lock to take
            return frames
        async with self._connect_lock:
            if self._frames is not None:
                return self._frames
            host, port = split_address(self.address)
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    stream = await trio.open_tcp_stream(host, port)
            except (OSError, trio.TooSlowError) as e:
                raise PeerUnavailable(f"cannot connect to {self.address}: {e or 'timeout'}") from None
            frames = FrameStream(stream, HANDSHAKE_MAX_FRAME)
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    await self._handshake(frames)
            except (ProtocolError, ConnectionClosed, trio.BrokenResourceError, trio.TooSlowError) as e:
                await stream.aclose()
                raise PeerUnavailable(f"handshake with {self.address} failed: {e or 'timeout'}") from None
            except BaseException:
                await stream.aclose()
                raise
            frames.max_frame = MAX_FRAME
            self._frames = frames
            watch = trio.CancelScope()  # the reader ends the watchdog with the connection
            flush = trio.CancelScope()
            self.nursery.start_soon(self._reader, frames, watch, flush)
            self.nursery.start_soon(self._watchdog, frames, watch)
            self.nursery.start_soon(self._flusher, frames, flush)
            return frames

    async def _handshake(self, frames: FrameStream) -> None:
        hello = await frames.receive()
        if not isinstance(hello, dict) or not isinstance(hello.get("nonce"), bytes):
            raise ProtocolError("malformed handshake")
        self.remote_peer, self.remote_cluster = hello.get("peer"), hello.get("cluster")
        if self.expect_cluster and self.remote_cluster not in (None, self.expect_cluster):
            raise VdifsError(f"{self.address} belongs to another cluster ({self.remote_cluster})",
                             code=errno.EPERM)
        nonce_c = os.urandom(16)
        mine = self.key
        token = mac(mine.key, b"vdifs-c", hello["nonce"], nonce_c) if mine else None
        kx = KeyExchange() if hello.get("cluster") is None and isinstance(hello.get("kx"), bytes) else None
        encrypted = self.encrypt or hello.get("enc") is True
        await frames.send({"proto": PROTO, "nonce": nonce_c, "mac": token,
                           **({"as": [mine.role, mine.name]} if mine and mine.name else {}),
                           **({"enc": True} if encrypted else {}),
                           **({"kx": kx.public} if kx is not None else {})})
        answer = await frames.receive()
        if not isinstance(answer, dict) or not answer.get("ok"):
            error = answer.get("error") if isinstance(answer, dict) else "refused"
            raise VdifsError(f"{self.address} refused us: {error}", code=errno.EACCES)
        if kx is not None and answer.get("mac") is None:  # a peer of no cluster yet: an agreed key
            key = kx.key(hello["kx"], hello["nonce"], nonce_c)
            if key is None:
                raise ProtocolError("the peer's key agreement is malformed")
            frames.seal = FrameSeal(key, server=False, encrypt=True)
            return
        if mine and (hello.get("cluster") is not None or answer.get("mac") is not None):
            expected = mac(mine.key, b"vdifs-s", nonce_c, hello["nonce"])
            if not isinstance(answer.get("mac"), bytes) or not hmac.compare_digest(answer["mac"], expected):
                raise VdifsError(f"{self.address} could not prove it knows the cluster secret",
                                 code=errno.EACCES)
            frames.seal = FrameSeal(session_key(mine.key, hello["nonce"], nonce_c), server=False, encrypt=encrypted)

    async def _reader(self, frames: FrameStream, watch: trio.CancelScope, flush: trio.CancelScope) -> None:
        try:
            while True:
                msg, blob = await frames.receive_frame()
                self.last_heard = now = trio.current_time()
                rid, status, result = check_reply(msg)
                if blob is not None:
                    result = blob
                call = self._pending.pop(rid, None)
                if call is not None:
                    self.round_trips.add(0, now - call.sent)
                    call.done(status, result)
        except (ProtocolError, ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            if self._pending:
                log.info("connection to %s lost: %s", self.address, e or type(e).__name__)
        finally:
            watch.cancel()
            flush.cancel()
            if self._frames is frames:
                self._frames = None
            for call in self._pending.values():
                call.done(LOST, "connection lost")
            self._pending.clear()
            with trio.CancelScope(shield=True):
                await frames.aclose()

    @staticmethod
    async def _flusher(frames: FrameStream, flush: trio.CancelScope) -> None:
        """Send the requests `start(soon=True)` queued (FrameStream.send_soon);
        the reader cancels it when the connection ends. A failed send breaks
        the stream, and the reader ends the calls in flight."""
        with flush:
            try:
                await frames.flush_queued()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _watchdog(self, frames: FrameStream, watch: trio.CancelScope) -> None:
        """Fail the calls whose time is up, for the whole connection at once:
        one sweep every WATCHDOG_INTERVAL instead of a cancel scope per call
        (12-23 us each here, on every request). The reader cancels it when the
        connection ends, so closing a client does not wait for a sweep.
        With no call pending it sleeps until one starts: a peer keeps a
        connection to most others, and an idle one woke 4 times a second
        for each of them."""
        with watch:
            while True:
                if not self._pending:
                    self._calls_started = trio.Event()
                    await self._calls_started.wait()
                await trio.sleep(WATCHDOG_INTERVAL)
                now = trio.current_time()
                late = [rid for rid, call in self._pending.items() if call.deadline <= now]
                for rid in late:
                    self._pending.pop(rid).done(TIMED_OUT, "no answer in time")

    async def start(self, op: str, args: dict[str, Any] | None = None, *, soon: bool = False) -> PendingCall:
        """Send a request; `finish` waits for its reply. Lets a caller have
        requests to several peers in flight without a task per request.

        `soon`: queue it for the connection's flusher instead of sending it
        now, so the requests that tasks started in one scheduling pass go out
        in one system call and wake the peer once (replicated writes: see
        FrameStream.send_soon). While a send waits on a full socket it waits
        behind it as usual: the queue never grows past what the kernel holds
        back."""
        frames = await self._connect()
        rid = self._next_id
        self._next_id += 1
        call = PendingCall(self, rid, op)
        call.sent = trio.current_time()
        if not self._pending:
            self._calls_started.set()
        self._pending[rid] = call
        args = dict(args or {})
        data = args.pop("data", None)
        blob = data if isinstance(data, (bytes, bytearray, memoryview)) else None
        if data is not None and blob is None:
            args["data"] = data
        try:
            if soon and not frames.sending:
                frames.send_soon([rid, op, args], blob=blob)
            else:
                await frames.send([rid, op, args], blob=blob)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._pending.pop(rid, None)
            raise PeerUnavailable(f"connection to {self.address} broke") from None
        except BaseException:
            self._pending.pop(rid, None)
            raise
        return call

    async def call(self, op: str, args: dict[str, Any] | None = None, *, timeout: float = 30.0) -> Any:
        frames = self._frames
        if frames is not None and not frames.busy:
            call = await self.start(op, args)  # nothing to wait behind: no scope needed
        else:  # connecting, or queued behind a send a slow receiver holds up
            with trio.move_on_after(timeout) as scope:
                call = await self.start(op, args)
            if scope.cancelled_caught:
                raise PeerUnavailable(f"{self.address} did not take {op} within {timeout:.0f} s")
        return await call.finish(timeout)

    def forget(self, rid: int) -> None:
        """A call's caller no longer waits for its reply."""
        self._pending.pop(rid, None)

    async def aclose(self, *, abort: bool = False) -> None:
        """Close the connection (`abort`: reset it, see FrameStream.aclose)."""
        if self._frames is not None:
            await self._frames.aclose(abort=abort)
            self._frames = None


LOST = -1  # PendingCall status: the connection ended before the reply
TIMED_OUT = -2  # PendingCall status: the watchdog gave up on the reply
WATCHDOG_INTERVAL = 0.25  # seconds: how late past its timeout a call may fail


class PendingCall:
    """A request in flight; `finish` waits for the reply, until the
    connection's watchdog gives up on it once its timeout has passed.

    The waiting task is parked and woken directly (`wait_task_rescheduled`,
    `reschedule`): no Event per call. A cancelled waiter just leaves; a
    reply that comes after that is dropped."""

    __slots__ = ("client", "rid", "op", "task", "status", "result", "deadline", "timeout", "sent")

    def __init__(self, client: RpcClient, rid: int, op: str) -> None:
        self.client = client
        self.rid = rid
        self.op = op
        self.task: trio.lowlevel.Task | None = None  # parked in finish(), waiting for done()
        self.status: int | None = None
        self.result: Any = None
        self.deadline = math.inf  # set by finish()
        self.timeout = 0.0
        self.sent = 0.0  # trio time the request was sent

    def done(self, status: int, result: Any) -> None:
        self.status, self.result = status, result
        task, self.task = self.task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    def _abort(self, raise_cancel: Any) -> trio.lowlevel.Abort:
        self.task = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def finish(self, timeout: float) -> Any:
        if self.status is None:
            self.timeout = timeout
            self.deadline = trio.current_time() + timeout
            self.task = trio.lowlevel.current_task()
            try:
                await trio.lowlevel.wait_task_rescheduled(self._abort)
            finally:
                self.client.forget(self.rid)  # cancelled: nobody waits for it any more
        status, result = self.status, self.result
        if status == TIMED_OUT:
            raise PeerUnavailable(f"{self.client.address} did not answer {self.op} within {self.timeout:.0f} s")
        if status == LOST:
            raise PeerUnavailable(f"connection to {self.client.address} lost during {self.op}")
        if status:
            raise RemoteError(status, result)
        return result


class RpcPool:
    """One RpcClient per address, created on first use."""

    def __init__(self, secret: bytes | ClientKey | None, nursery: trio.Nursery, *,
                 cluster_id: str | None = None, encrypt: bool = False) -> None:
        self.key = client_key(secret)
        self.encrypt = encrypt
        self.nursery = nursery
        self.cluster_id = cluster_id
        self._clients: dict[str, RpcClient] = {}

    def reset(self, secret: bytes | ClientKey | None) -> None:
        """New credentials: connections made from now on authenticate with
        `secret`. Cached connections are forgotten (each closes when its peer
        hangs up or its reader ends), so no later call rides an old session."""
        self.key = client_key(secret)
        self._clients.clear()

    def get(self, address: str) -> RpcClient:
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = RpcClient(address, self.key, self.nursery, encrypt=self.encrypt,
                                                        expect_cluster=self.cluster_id)
        return client

    async def call(self, address: str, op: str, args: dict[str, Any] | None = None, *,
                   timeout: float = 30.0) -> Any:
        return await self.get(address).call(op, args, timeout=timeout)

    def round_trips(self) -> dict[str, OpStats]:
        """Each peer's round trips so far, by address (of the connections kept)."""
        return {address: client.round_trips for address, client in self._clients.items()}

    async def start(self, address: str, op: str, args: dict[str, Any] | None = None, *,
                    soon: bool = False) -> PendingCall:
        return await self.get(address).start(op, args, soon=soon)

    async def drop(self, address: str, *, abort: bool = False) -> None:
        """Close the connection to `address`: what is in flight on it fails
        now with PeerUnavailable; the next call reconnects. `abort`: reset
        it, so requests the kernel still holds unsent never reach the peer
        later (after a partition heals, behind newer requests sent another way)."""
        client = self._clients.get(address)
        if client is not None:
            await client.aclose(abort=abort)

    def drop_soon(self, address: str, *, abort: bool = False) -> None:
        """`drop` from a function that cannot wait (a map change hook)."""
        if address in self._clients:
            self.nursery.start_soon(functools.partial(self.drop, address, abort=abort))

    def last_heard(self, address: str) -> float:
        """When the peer at `address` last sent us anything (-inf: never)."""
        client = self._clients.get(address)
        return client.last_heard if client is not None else -math.inf

    async def aclose(self) -> None:
        for c in self._clients.values():
            await c.aclose()
