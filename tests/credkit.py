"""Credential files as an operator would have them: PEM key and certificate (the key encrypted
or not), a PFX with a passphrase, and a Kubernetes-style projected token file."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from relay.testing.emulator import self_signed_certificate


@dataclass(frozen=True)
class CertificateFiles:
    key_file: Path
    cert_file: Path
    pfx_file: Path
    cert_pem: bytes


@functools.cache
def app_certificate() -> tuple[bytes, bytes]:
    """An app credential's (certificate, key) pair; made once per run (RSA keys are slow)."""
    return self_signed_certificate("relay test app")


@functools.cache
def other_certificate() -> tuple[bytes, bytes]:
    """A second (certificate, key) pair, for "wrong certificate" cases."""
    return self_signed_certificate("another app")


def write_certificate_files(
    directory: Path, cert_pem: bytes, key_pem: bytes, *, passphrase: str | None = None
) -> CertificateFiles:
    """app.key (encrypted with `passphrase` when given), app.pem and app.pfx (same passphrase)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = serialization.load_pem_private_key(key_pem, None)
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase.encode())
        if passphrase
        else serialization.NoEncryption()
    )
    files = CertificateFiles(
        key_file=directory / "app.key",
        cert_file=directory / "app.pem",
        pfx_file=directory / "app.pfx",
        cert_pem=cert_pem,
    )
    files.key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )
    files.cert_file.write_bytes(cert_pem)
    files.pfx_file.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"relay",
            key,  # type: ignore[arg-type]
            x509.load_pem_x509_certificate(cert_pem),
            None,
            encryption,
        )
    )
    return files
