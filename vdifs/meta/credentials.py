"""Cluster credentials: the cluster id and the shared secret.

The secret is created by `vdifs cluster format` and written to a file
(mode 0600) that mounts and admin commands read with --secret-file; peers
keep their own copy in STORE/secret. Format, one `key=value` per line:

    cluster=4f0c...
    secret=9a1b...   (64 hex digits: 32 random bytes)
"""

from __future__ import annotations

import errno
import os
import secrets
from dataclasses import dataclass

from vdifs.errors import VdifsError
from vdifs.fsutil import atomic_write


@dataclass(frozen=True)
class Credentials:
    cluster_id: str
    secret: bytes

    @classmethod
    def new(cls) -> Credentials:
        return cls(secrets.token_hex(8), secrets.token_bytes(32))

    def encode(self) -> bytes:
        return f"cluster={self.cluster_id}\nsecret={self.secret.hex()}\n".encode()

    @classmethod
    def decode(cls, raw: bytes, source: str = "secret file") -> Credentials:
        fields = {}
        for line in raw.decode(errors="replace").splitlines():
            key, sep, value = line.strip().partition("=")
            if sep:
                fields[key] = value
        try:
            return cls(fields["cluster"], bytes.fromhex(fields["secret"]))
        except (KeyError, ValueError):
            raise VdifsError(f"{source} is not a vdifs secret file (cluster=..., secret=...)",
                             code=errno.EINVAL) from None


def default_secret_file() -> str:
    if os.geteuid() == 0:
        return "/etc/vdifs/secret"
    return os.path.join(os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "vdifs", "secret")


def read_credentials(path: str) -> Credentials:
    try:
        with open(path, "rb") as f:
            return Credentials.decode(f.read(), path)
    except FileNotFoundError:
        raise VdifsError(f"no secret file at {path} (written by 'vdifs cluster format'; "
                         "pass --secret-file)", code=errno.ENOENT) from None
    except PermissionError:
        raise VdifsError(f"cannot read the secret file {path}: permission denied", code=errno.EACCES) from None


def write_credentials(path: str, creds: Credentials) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    atomic_write(path, creds.encode())
    os.chmod(path, 0o600)
