"""Signed records: what makes a leaderboard entry "verified".

A record says what it scored, but anyone can edit a JSON file. A scoring machine signs each
record it writes with its own Ed25519 key; the leaderboard trusts the public keys committed
under ``leaderboard/keys/*.pub`` and shows a record as verified only when its signature
checks against one of them. Everything else is self-reported: listed, never vouched for.

The signature covers :func:`payload`: the record as it reads back from disk, without its
``signature`` block (and without the legacy ``verified`` flag, which asserted nothing), in
one canonical JSON form. Nothing here needs JAX: the site builds without it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (Ed25519PrivateKey,
                                                               Ed25519PublicKey)

from metabench.results import as_written, write_bytes_atomic

__all__ = ["ALGORITHM", "KeyFileError", "TrustedKey", "Verdict", "default_key_path",
           "init_key", "key_id", "load_private_key", "parse_public_key", "payload",
           "public_key_text", "sign", "trusted_keys", "unsigned", "verify"]

ALGORITHM = "ed25519"
SIGNATURE = "signature"
LEGACY = ("verified",)
"""Fields that never count: the old self-asserted flag is dropped before signing."""
VERIFIED, SELF_REPORTED = "verified", "self-reported"
KEYS_DIR_LABEL = "leaderboard/keys"


class KeyFileError(ValueError):
    """A key file that cannot be used; names the file and the problem."""


class TrustedKey(NamedTuple):
    """A public key the leaderboard trusts, and the file that says so (shown on the site)."""

    name: str
    key: Ed25519PublicKey


class Verdict(NamedTuple):
    """Whether a record is vouched for, and why (shown to readers as the badge's tooltip)."""

    status: str
    reason: str

    @property
    def verified(self) -> bool:
        return self.status == VERIFIED


# --- keys -------------------------------------------------------------------------------------


def default_key_path() -> Path:
    """Where this machine's signing key lives: ``$METABENCH_KEY``, else the user's config
    folder. Never inside a repository, so that a private key cannot be committed by accident."""
    if os.environ.get("METABENCH_KEY"):
        return Path(os.environ["METABENCH_KEY"]).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "metabench" / "signing_key.pem"


def init_key(path: str | os.PathLike, force: bool = False) -> Ed25519PrivateKey:
    """Creates a new private key at ``path`` (PEM, mode 0600, its folder 0700). Refuses to
    replace an existing key unless ``force``: records it signed would lose their signer."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; refusing to overwrite a signing key "
                              "(use --force to replace it)")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_bytes_atomic(path, pem, mode=0o600)  # never readable by others, even briefly
    return key


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: a {type(key).__name__}, not an Ed25519 key")
    return key


def _raw(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The one-line form of a public key, as ``leaderboard/keys/*.pub`` holds it."""
    return f"{ALGORITHM} {base64.b64encode(_raw(key)).decode('ascii')}"


def parse_public_key(text: str) -> Ed25519PublicKey:
    """The inverse of :func:`public_key_text`; ValueError on anything else."""
    parts = text.split()
    if len(parts) != 2 or parts[0] != ALGORITHM:
        raise ValueError(f"expected '{ALGORITHM} <base64 of 32 bytes>'")
    try:
        raw = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the key is not valid base64") from None
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def key_id(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """A short name of a public key: the first 16 hex digits of the sha256 of its raw bytes."""
    return hashlib.sha256(_raw(key)).hexdigest()[:16]


def trusted_keys(keys_dir: str | os.PathLike) -> dict[str, TrustedKey]:
    """``{key id: TrustedKey}`` from ``keys_dir/*.pub`` (one key line each; ``#`` starts a
    comment line). No folder trusts nothing. A malformed file is an error naming it rather
    than a key silently dropped: the maintainers meant to trust it."""
    keys_dir = Path(keys_dir)
    found: dict[str, TrustedKey] = {}
    if not keys_dir.is_dir():
        return found
    for path in sorted(keys_dir.glob("*.pub")):
        try:
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as e:
            raise KeyFileError(f"{path}: cannot read the key file ({e})") from None
        keys = [ln for ln in lines if ln and not ln.startswith("#")]
        if len(keys) != 1:
            raise KeyFileError(f"{path}: expected one '{ALGORITHM} <base64>' line, "
                               f"found {len(keys)}")
        try:
            public = parse_public_key(keys[0])
        except ValueError as e:
            raise KeyFileError(f"{path}: {e}") from None
        found.setdefault(key_id(public), TrustedKey(path.name, public))
    return found


# --- signing and checking ---------------------------------------------------------------------


def unsigned(record: Any) -> Any:
    """``record`` as written, without its signature and legacy fields."""
    data = as_written(record)
    if isinstance(data, dict):
        for k in (SIGNATURE, *LEGACY):
            data.pop(k, None)
    return data


def payload(record: Any) -> bytes:
    """The bytes a signature covers: :func:`unsigned` in canonical JSON (sorted keys, no
    spaces, ASCII only), so that re-indenting or re-ordering a file keeps its signature and
    changing any value breaks it."""
    return json.dumps(unsigned(record), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True, allow_nan=True).encode("ascii")


def sign(record: dict, private_key: Ed25519PrivateKey) -> dict:
    """A new record: ``record`` as it will be written (see :func:`metabench.results.as_written`)
    with a ``signature`` block by ``private_key``. Write the returned dict, not the argument:
    the signature covers the written form."""
    data = unsigned(record)
    data[SIGNATURE] = {
        "algorithm": ALGORITHM,
        "key_id": key_id(private_key),
        "public_key": public_key_text(private_key),
        "value": base64.b64encode(private_key.sign(payload(data))).decode("ascii"),
    }
    return data


def _short(x: Any, n: int = 16) -> str:
    text = x if isinstance(x, str) else f"({type(x).__name__})"
    return text if len(text) <= n else text[:n] + "\u2026"


def verify(record: Any, trusted: Mapping[str, TrustedKey]) -> Verdict:
    """Whether ``record``'s signature is by a trusted key and covers the record as it is.
    Never raises: a record is untrusted data, and any fault is a reason to show."""
    def no(reason: str) -> Verdict:
        return Verdict(SELF_REPORTED, reason)

    if not isinstance(record, dict):
        return no("not a record")
    sig = record.get(SIGNATURE)
    if sig is None:
        return no("no signature")
    if not isinstance(sig, dict):
        return no("malformed signature block (not an object)")
    if sig.get("algorithm") != ALGORITHM:
        return no(f"unsupported signature algorithm {_short(sig.get('algorithm'))}")
    kid, value = sig.get("key_id"), sig.get("value")
    if not isinstance(kid, str) or not isinstance(value, str):
        return no("malformed signature block (key_id and value must be text)")
    signer = trusted.get(kid)
    if signer is None:
        return no(f"signed by key {_short(kid)}, which {KEYS_DIR_LABEL} does not trust")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return no("malformed signature (not base64)")
    try:
        signer.key.verify(raw, payload(record))
    except InvalidSignature:
        return no("signature does not match the record (edited after signing?)")
    except (ValueError, TypeError, RecursionError) as e:  # a record JSON cannot hold
        return no(f"the record cannot be checked ({type(e).__name__})")
    return Verdict(VERIFIED, f"signed by {signer.name}")
