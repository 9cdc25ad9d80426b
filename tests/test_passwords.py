"""Password hashes for local SMTP AUTH users, and `relay hash-password`."""

from __future__ import annotations

import base64
import hashlib
import io
import subprocess
import sys
from collections.abc import Iterator

import pytest

from relay.passwords import (
    SCRYPT_N,
    hash_password,
    read_new_password,
    run_hash_password,
    verify_password,
)


def test_a_new_hash_describes_itself_and_verifies() -> None:
    stored = hash_password("s3cret pässword")
    scheme, n, r, p, salt, digest = stored.split("$")
    assert (scheme, int(n), int(r), int(p)) == ("scrypt", SCRYPT_N, 8, 1)
    assert len(base64.b64decode(salt)) == 16 and len(base64.b64decode(digest)) == 32
    assert verify_password("s3cret pässword", stored)
    assert verify_password("s3cret pässword".encode(), stored)  # as it arrives in AUTH
    assert not verify_password("s3cret password", stored)
    assert not verify_password(b"s3cret p\xe4ssword", stored)  # Latin-1 is other bytes


def test_each_hash_has_its_own_salt() -> None:
    assert hash_password("same") != hash_password("same")


def test_an_empty_password_is_refused() -> None:
    with pytest.raises(ValueError, match="the password is empty"):
        hash_password("")


def test_django_pbkdf2_hashes_verify() -> None:
    """`pbkdf2_sha256$iterations$salt$hash`, the salt used as text, as Django writes it."""
    digest = hashlib.pbkdf2_hmac("sha256", b"letmein", b"NaCl4you", 1000)
    stored = f"pbkdf2_sha256$1000$NaCl4you${base64.b64encode(digest).decode()}"
    assert verify_password("letmein", stored)
    assert not verify_password("letmeout", stored)


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "plain-text-password",
        "md5$abc$def",
        "scrypt$16384$8$1$c2FsdA==",  # a field missing
        "scrypt$16384$8$1$not base64!$aGFzaA==",
        "scrypt$16383$8$1$c2FsdA==$aGFzaA==",  # n not a power of two
        "scrypt$x$8$1$c2FsdA==$aGFzaA==",
        "scrypt$1073741824$8$1$c2FsdA==$aGFzaA==",  # would need 1 TiB: refused, not tried
        "scrypt$16384$8$1$c2FsdA==$",  # no hash at all
        "pbkdf2_sha256$0$salt$aGFzaA==",
        "pbkdf2_sha256$1000$salt",
    ],
)
def test_a_hash_that_cannot_be_used_never_matches(stored: str) -> None:
    assert verify_password("anything", stored) is False


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def prompts(*answers: str) -> Iterator[str]:
    yield from answers


def test_at_a_terminal_the_password_is_asked_twice() -> None:
    answers = prompts("hunter2", "hunter2")
    asked: list[str] = []

    def prompt(text: str) -> str:
        asked.append(text)
        return next(answers)

    assert read_new_password(Tty(), prompt=prompt) == "hunter2"
    assert asked == ["Password: ", "Repeat password: "]


def test_two_different_entries_are_refused() -> None:
    answers = prompts("hunter2", "hunter3")
    with pytest.raises(ValueError, match="the two passwords differ"):
        read_new_password(Tty(), prompt=lambda _: next(answers))


def test_from_a_pipe_one_line_is_read() -> None:
    assert read_new_password(io.StringIO("from a pipe \r\nignored\n")) == "from a pipe "


async def test_hash_password_command_prints_a_hash() -> None:
    out, err = io.StringIO(), io.StringIO()
    assert await run_hash_password(stdin=io.StringIO("hunter2\n"), stdout=out, stderr=err) == 0
    assert verify_password("hunter2", out.getvalue().strip())
    assert err.getvalue() == ""


async def test_hash_password_command_refuses_an_empty_password() -> None:
    out, err = io.StringIO(), io.StringIO()
    assert await run_hash_password(stdin=io.StringIO("\n"), stdout=out, stderr=err) == 1
    assert out.getvalue() == ""
    assert err.getvalue() == "relay hash-password: the password is empty\n"


def test_relay_hash_password_from_stdin() -> None:
    """The installed command: the password on stdin, the hash on stdout, nothing else."""
    done = subprocess.run(
        [sys.executable, "-m", "relay", "hash-password"],
        input="correct horse\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert verify_password("correct horse", done.stdout.strip())
