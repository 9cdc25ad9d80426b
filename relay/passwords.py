"""Passwords of the local SMTP AUTH users: hashing for `relay hash-password`, checking for AUTH.

Takes a password (typed at a terminal, or sent by a client in AUTH PLAIN/LOGIN) and the stored
hash from relay.yaml `users: {name: {password_hash: ...}}`; stores nothing. Hashes describe
themselves, so parameters can change without breaking existing entries:

    scrypt$<n>$<r>$<p>$<salt>$<hash>         what hash_password() writes (salt, hash in base64)
    pbkdf2_sha256$<iterations>$<salt>$<hash> also verified; Django's format (salt as text)

Failures: verify_password() answers False for a wrong password and for a hash it cannot use
(unknown scheme, malformed, parameters beyond SCRYPT_MAX_MEMORY); it never raises and never puts
the password in an error. hash_password() raises ValueError for an empty password. Both take tens
of milliseconds on purpose, so callers inside the event loop run them in a thread.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import hmac
import os
import sys
from collections.abc import Callable
from typing import TextIO

# scrypt at n=2**14, r=8, p=1 costs ~16 MiB and ~40 ms: slow for a guesser, cheap enough to check
# a login without holding up other sessions (the listener runs it in a thread).
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_MAX_MEMORY = 64 * 1024 * 1024  # refuse stored parameters that would need more
SALT_BYTES = 16
HASH_BYTES = 32


def hash_password(password: str) -> str:
    """A new `scrypt$n$r$p$salt$hash` string for relay.yaml, with a random salt."""
    if not password:
        raise ValueError("the password is empty")
    salt = os.urandom(SALT_BYTES)
    digest = _scrypt(password.encode(), salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, HASH_BYTES)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str | bytes, stored: str) -> bool:
    """True when `password` matches `stored`; the final comparison takes constant time."""
    secret = password.encode() if isinstance(password, str) else password
    scheme, _, rest = stored.partition("$")
    try:
        if scheme == "scrypt":
            n, r, p, salt, expected = rest.split("$")
            salt_bytes, want = _unb64(salt), _unb64(expected)
            got = _scrypt(secret, salt_bytes, int(n), int(r), int(p), len(want))
        elif scheme == "pbkdf2_sha256":
            iterations, salt, expected = rest.split("$")
            want = _unb64(expected)
            got = hashlib.pbkdf2_hmac("sha256", secret, salt.encode(), int(iterations), len(want))
        else:
            return False
    except (ValueError, OverflowError, binascii.Error):
        return False  # malformed hash or unusable parameters: nobody logs in with it
    return bool(want) and hmac.compare_digest(got, want)


def read_new_password(stdin: TextIO, *, prompt: Callable[[str], str] = getpass.getpass) -> str:
    """Ask twice at a terminal (without echo); take one line when stdin is a pipe or a file.

    Raises ValueError when the two entries differ or the password is empty.
    """
    if stdin.isatty():
        password = prompt("Password: ")
        if prompt("Repeat password: ") != password:
            raise ValueError("the two passwords differ")
    else:
        password = stdin.readline().removesuffix("\n").removesuffix("\r")
    if not password:
        raise ValueError("the password is empty")
    return password


async def run_hash_password(
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    prompt: Callable[[str], str] = getpass.getpass,
) -> int:
    """`relay hash-password`: print the hash of a password for relay.yaml `users`; 0 or 1.

    Runs its blocking steps in place: it is a command of its own, nothing else shares the loop,
    and a getpass in a thread would keep Ctrl-C waiting for Enter.
    """
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    try:
        password = read_new_password(stdin, prompt=prompt)
    except ValueError as e:
        print(f"relay hash-password: {e}", file=stderr)
        return 1
    print(hash_password(password), file=stdout)
    return 0


def _scrypt(secret: bytes, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    if 128 * r * (n + p + 2) > SCRYPT_MAX_MEMORY:
        raise ValueError("scrypt parameters beyond SCRYPT_MAX_MEMORY")
    return hashlib.scrypt(
        secret, salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=SCRYPT_MAX_MEMORY + 1024 * 1024
    )


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)
