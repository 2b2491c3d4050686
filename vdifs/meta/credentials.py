"""Cluster credentials: the cluster id and a key.

`vdifs cluster format` creates the cluster secret and writes it to a file
(mode 0600); peers keep their own copy in STORE/secret. Whoever holds the
secret is an admin. `vdifs cluster credential ROLE NAME` derives the key of
one credential from it (`wire.rpc.credential_key`): a mount credential for
each hypervisor, an admin credential per operator, a peer credential for
tools that do what peers do. Peers check a credential by deriving its key
again, so nothing is distributed to them, and a holder of a credential can
neither compute the secret nor another credential. Peers themselves hold
the secret (they need it to check credentials) and call each other with it. The RPC server allows
each role its operations (`peer.daemon`, Op.roles). Rotating the secret
(`vdifs cluster rotate-secret`) invalidates every credential derived from
the old one.

Format, one `key=value` per line:

    cluster=4f0c...
    secret=9a1b...   (64 hex digits: 32 random bytes; the secret, or the credential's key)
    role=mount       (credential files only)
    name=hv1
"""

from __future__ import annotations

import errno
import os
import secrets
from dataclasses import dataclass

from vdifs.errors import VdifsError
from vdifs.fsutil import atomic_write
from vdifs.wire.rpc import ADMIN, CLUSTER_SECRET, ROLES, ClientKey, credential_key, valid_credential

#: seconds a peer still accepts the cluster secret (and its credentials) it had before a rotation
ROTATION_GRACE = 120.0
GRACE_MAX = 86400


@dataclass(frozen=True)
class Credentials:
    cluster_id: str
    secret: bytes  # the cluster secret, or (with a name) the credential's key
    role: str = ADMIN
    name: str = ""  # empty: `secret` is the cluster secret itself

    @classmethod
    def new(cls) -> Credentials:
        return cls(secrets.token_hex(8), secrets.token_bytes(32))

    @property
    def is_cluster_secret(self) -> bool:
        return not self.name

    @property
    def credential(self) -> str:
        return self.client_key().credential

    def client_key(self) -> ClientKey:
        return ClientKey(self.secret, self.role, self.name)

    def derive(self, role: str, name: str) -> Credentials:
        """The credential `role.name` of this cluster (only from the cluster secret)."""
        if not self.is_cluster_secret:
            raise VdifsError(f"credentials are derived from the cluster secret, not from {self.credential}",
                             code=errno.EACCES)
        if not valid_credential(role, name):
            raise VdifsError(f"a credential is a role ({', '.join(ROLES)}) and a name of 1-64 letters, "
                             "digits, '.', '_' or '-', starting with a letter or digit", code=errno.EINVAL)
        return Credentials(self.cluster_id, credential_key(self.secret, role, name), role, name)

    def encode(self) -> bytes:
        lines = f"cluster={self.cluster_id}\nsecret={self.secret.hex()}\n"
        if self.name:
            lines += f"role={self.role}\nname={self.name}\n"
        return lines.encode()

    @classmethod
    def decode(cls, raw: bytes, source: str = "secret file") -> Credentials:
        fields = {}
        for line in raw.decode(errors="replace").splitlines():
            key, sep, value = line.strip().partition("=")
            if sep:
                fields[key] = value
        try:
            creds = cls(fields["cluster"], bytes.fromhex(fields["secret"]), fields.get("role", ADMIN),
                        fields.get("name", ""))
        except (KeyError, ValueError):
            raise VdifsError(f"{source} is not a vdifs secret file (cluster=..., secret=...)",
                             code=errno.EINVAL) from None
        if creds.name and not valid_credential(creds.role, creds.name):
            raise VdifsError(f"{source}: {creds.role}.{creds.name} is not a valid credential", code=errno.EINVAL)
        return creds


def describe(creds: Credentials) -> str:
    return CLUSTER_SECRET if creds.is_cluster_secret else f"credential {creds.credential}"


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
