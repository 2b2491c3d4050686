"""Clients of before a protocol feature, for tests that check how peers
treat them."""

from __future__ import annotations

from typing import Any

from vdifs.wire.rpc import RpcClient


def deaf_to_encryption(client: RpcClient) -> None:
    """Make `client` behave as one of before encryption: it never sees the
    server's demand for it ("enc" in the server's hello), so never asks."""
    client.encrypt = False
    handshake = client._handshake

    async def deaf(frames: Any) -> None:
        receive = frames.receive

        async def without_enc() -> Any:
            msg = await receive()
            if isinstance(msg, dict):
                msg.pop("enc", None)
            return msg
        frames.receive = without_enc
        try:
            await handshake(frames)
        finally:
            frames.receive = receive
    client._handshake = deaf  # type: ignore[method-assign]
