"""Raw header blocks: split, read and re-join a message's bytes without changing them."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from relay.headerblock import MAX_LINE, Field, HeaderBlock, decode, fold


@given(st.binary(max_size=400))
def test_parse_then_join_gives_back_the_same_bytes(data: bytes) -> None:
    """Any bytes at all: parse, then to_bytes, is the identity."""
    assert HeaderBlock.parse(data).to_bytes() == data


def test_fields_separator_and_body() -> None:
    """Folded fields stay one field with their continuation lines; the empty line separates."""
    data = b"Received: from a\r\n\tby b\r\nSubject: hi\r\n\r\nFrom: not a header\r\n"
    block = HeaderBlock.parse(data)
    assert [f.raw for f in block.fields] == [b"Received: from a\r\n\tby b\r\n", b"Subject: hi\r\n"]
    assert block.separator == b"\r\n"
    assert block.body == b"From: not a header\r\n"
    assert block.fields[0].text() == "from a\tby b"
    assert block.eol == b"\r\n"


def test_lf_only_message() -> None:
    block = HeaderBlock.parse(b"Subject: x\n\nbody\n")
    assert (block.separator, block.body, block.eol) == (b"\n", b"body\n", b"\n")


def test_a_line_that_is_no_field_ends_the_block_without_a_separator() -> None:
    """Body text right after the headers (no empty line) is body, not a broken header."""
    block = HeaderBlock.parse(b"Subject: x\r\nthis is text\r\n\r\nmore")
    assert [f.name for f in block.fields] == ["subject"]
    assert (block.separator, block.body) == (b"", b"this is text\r\n\r\nmore")


def test_leading_continuation_line_is_body() -> None:
    block = HeaderBlock.parse(b" indented\r\nSubject: x\r\n\r\n")
    assert block.fields == ()
    assert block.body == b" indented\r\nSubject: x\r\n\r\n"


def test_message_without_headers_and_empty_message() -> None:
    assert HeaderBlock.parse(b"\r\nbody") == HeaderBlock((), b"\r\n", b"body")
    assert HeaderBlock.parse(b"") == HeaderBlock((), b"", b"")
    assert HeaderBlock.parse(b"").eol == b"\r\n"


def test_field_name_with_space_before_colon_and_odd_case() -> None:
    field = HeaderBlock.parse(b"FROM : a@b\r\n\r\n").fields[0]
    assert (field.name, field.value, field.text()) == ("from", b" a@b\r\n", "a@b")
    assert field.with_value(b" c@d\r\n").raw == b"FROM : c@d\r\n"


def test_with_fields_ends_all_but_the_last_line() -> None:
    """Appending after a last field that had no line ending gives that field the block's ending."""
    block = HeaderBlock.parse(b"Subject: x\nTo: y")
    assert block.fields[-1].eol == b""
    out = block.with_fields([*block.fields, Field(b"From: z")]).to_bytes()
    assert out == b"Subject: x\nTo: y\nFrom: z"


def test_decode_prefers_utf8_then_latin1() -> None:
    assert decode("Grüße".encode()) == "Grüße"
    assert decode("Grüße".encode("latin-1")) == "Grüße"


def test_fold_short_and_long() -> None:
    assert fold("To", "a@b").raw == b"To: a@b\r\n"
    words = " ".join(["word"] * 40)
    raw = fold("Subject", words, b"\n").raw
    lines = raw.split(b"\n")[:-1]
    assert all(len(line) <= 78 for line in lines)
    assert len(lines) > 1
    assert raw.replace(b"\n ", b" ") == b"Subject: " + words.encode() + b"\n"


def test_fold_never_writes_a_line_over_998() -> None:
    """A run without spaces longer than a line is cut; nothing else is."""
    raw = fold("X-Long", "a" * 3000).raw
    assert all(len(line) <= MAX_LINE for line in raw.split(b"\r\n"))
    assert raw.replace(b"\r\n ", b"").replace(b" ", b"") == b"X-Long:" + b"a" * 3000 + b"\r\n"
