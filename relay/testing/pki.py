"""The emulator's own certificate authority.

One CA per emulator run; it issues the server certificate for 127.0.0.1 and localhost that the
identity platform, SMTP submission and Graph all present, and writes its certificate to a file
that users (and relay's `ca_file`) can point at.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import trustme


class EmulatorPKI:
    def __init__(self, *hostnames: str) -> None:
        self._ca = trustme.CA(organization_name="relay emulator")
        self._cert = self._ca.issue_cert(*(hostnames or ("127.0.0.1", "localhost")))

    @property
    def ca_pem(self) -> bytes:
        return self._ca.cert_pem.bytes()

    def write_ca(self, path: Path) -> Path:
        """Write the CA certificate (PEM) to `path` and return it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.ca_pem)
        return path

    def server_context(self) -> ssl.SSLContext:
        """A TLS server context presenting the emulator's certificate, TLS 1.2 or later."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._cert.configure_cert(ctx)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A TLS client context that trusts only the emulator's CA (for tests)."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self._ca.configure_trust(ctx)
        return ctx

    def issue(self, *hostnames: str) -> tuple[bytes, bytes]:
        """A further (certificate PEM chain, private key PEM) pair, e.g. for a TLS listener test."""
        cert = self._ca.issue_cert(*hostnames)
        chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
        return chain, cert.private_key_pem.bytes()
