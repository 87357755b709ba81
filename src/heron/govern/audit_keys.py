"""Ed25519 keys for signing audit-log checkpoints (RFC 8032, through `cryptography`).

    private, public = generate_keys("keys/")       # keys/audit_ed25519.pem, keys/audit_ed25519.pub.pem
    signature = sign(message, load_signing_key(private))
    signature_holds(message, signature, load_public_key(public))

Keys are PEM files: the private key PKCS#8 and unencrypted, so keep it
readable by its owner only (it is written with mode 0600) and off the
machine that holds the log where you can; the public key SubjectPublicKeyInfo.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # cryptography loads on first use, not with every record_event
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PRIVATE_KEY_FILE, PUBLIC_KEY_FILE = "audit_ed25519.pem", "audit_ed25519.pub.pem"


def _ed25519():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519, serialization


def generate_keys(folder: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write a new key pair into `folder`; returns (private, public). Never overwrites a key."""
    ed25519, serialization = _ed25519()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / PRIVATE_KEY_FILE, folder / PUBLIC_KEY_FILE
    for path in (private, public):
        if path.exists():
            raise FileExistsError(f"{path}: exists; keys are never overwritten")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def load_signing_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    ed25519, serialization = _ed25519()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (TypeError, ValueError) as err:  # not PEM, encrypted, ...
        raise ValueError(f"{path}: not a readable private key ({err})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    ed25519, serialization = _ed25519()
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except ValueError as err:
        raise ValueError(f"{path}: not a readable public key ({err})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def sign(message: bytes, key: Ed25519PrivateKey) -> str:
    """The Ed25519 signature of `message`, hex."""
    return key.sign(message).hex()


def signature_holds(message: bytes, signature: str, public_key: Ed25519PublicKey) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(bytes.fromhex(signature), message)
    except (InvalidSignature, ValueError, TypeError):  # a wrong signature, or not hex at all
        return False
    return True


__all__ = ["PRIVATE_KEY_FILE", "PUBLIC_KEY_FILE", "generate_keys", "load_public_key", "load_signing_key", "sign",
           "signature_holds"]
