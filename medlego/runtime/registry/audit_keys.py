"""The audit's Ed25519 keys and signed checkpoints: key pairs, signing and checking documents, and
the checkpoints written to the registry's object store (the design: :mod:`.audit`)."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from pathlib import Path

from ..errors import BadInputError
from .audit_chain import canonical, now_iso

log = logging.getLogger("medlego.audit")


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise BadInputError("signed audit checkpoints need the 'cryptography' package (pip install cryptography)") from None
    return ed25519, serialization, InvalidSignature


def _key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def _signed_text(doc: dict) -> bytes:
    return canonical({k: v for k, v in doc.items() if k != "signature"}).encode()


def generate_keypair(private_path: str | os.PathLike, public_path: str | os.PathLike | None = None) -> tuple[Path, Path, str]:
    """Write a fresh Ed25519 key pair: the private key (PKCS#8 PEM, mode 0600) and the public key
    (PEM) beside it (``FILE.pub``). Refuses to overwrite either file. (private, public, key id)."""
    ed25519, serialization, _ = _crypto()
    private_path = Path(private_path).expanduser()
    public_path = Path(public_path).expanduser() if public_path else private_path.with_name(private_path.name + ".pub")
    for p in (private_path, public_path):
        if p.exists():
            raise BadInputError(f"{p} already exists: keygen never overwrites a key (remove it or choose another name)")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(private_path, 0o600)
    pub = key.public_key()
    public_path.write_bytes(pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return private_path, public_path, _key_id(raw)


class Signer:
    """Signs checkpoints and prune markers with the audit's Ed25519 private key."""

    def __init__(self, key):
        _, serialization, _ = _crypto()
        self._key = key
        self.key_id = _key_id(key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Signer":
        ed25519, serialization, _ = _crypto()
        p = Path(path).expanduser()
        try:
            key = serialization.load_pem_private_key(p.read_bytes(), password=None)
        except ValueError as e:
            raise BadInputError(f"audit signing key {p} is not a PEM private key ({e})") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise BadInputError(f"audit signing key {p} is not an Ed25519 key (make one with `medlego audit keygen`)")
        return cls(key)

    def sign(self, doc: dict) -> dict:
        out = {**doc, "key_id": self.key_id}
        out["signature"] = base64.b64encode(self._key.sign(_signed_text(out))).decode()
        return out


class PublicKey:
    def __init__(self, key):
        _, serialization, self._invalid = _crypto()
        self._key = key
        self.key_id = _key_id(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "PublicKey":
        ed25519, serialization, _ = _crypto()
        p = Path(path).expanduser()
        try:
            key = serialization.load_pem_public_key(p.read_bytes())
        except ValueError as e:
            raise BadInputError(f"audit public key {p} is not a PEM public key ({e})") from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise BadInputError(f"audit public key {p} is not an Ed25519 key")
        return cls(key)

    def valid(self, doc: dict) -> bool:
        sig = doc.get("signature")
        if not isinstance(sig, str) or doc.get("key_id") != self.key_id:
            return False
        try:
            self._key.verify(base64.b64decode(sig, validate=True), _signed_text(doc))
        except (self._invalid, ValueError):
            return False
        return True


CHECKPOINT_PREFIX = "checkpoints/"


def checkpoint_name(seq: int) -> str:
    return f"{seq:020d}.json"


def write_checkpoint(store, signer: Signer, seq: int, h: str) -> dict:
    """Sign (seq, hash, now) and write it to the store's checkpoints and the log."""
    cp = signer.sign({"seq": seq, "hash": h, "time": now_iso()})
    text = canonical(cp)
    if store is not None:
        store.put_checkpoint(checkpoint_name(seq), text.encode())
    log.info("audit checkpoint %s", text)
    return cp


def read_checkpoints(store) -> list[tuple[str, dict | None]]:
    """(name, document or None when it is not JSON) of every checkpoint in the store."""
    out = []
    for name, data in store.checkpoints():
        try:
            doc = json.loads(data)
            out.append((name, doc if isinstance(doc, dict) else None))
        except ValueError:
            out.append((name, None))
    return out
