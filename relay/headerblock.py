"""Raw RFC 5322 header blocks: find, read and edit header fields without re-serialising.

The router rewrites From/Reply-To/Sender and the bounce builder quotes the original headers; both
work on the bytes the client sent, so every field they do not touch keeps its bytes, its folding
and its line endings, and the body is never decoded. `email.message` is not used for this: its
generator re-folds headers and re-encodes bodies.

Splitting: the header block ends at the first empty line (CRLF or LF); that line is the
`separator` and everything after it is the body, untouched. A line that is neither a field
(`name:`) nor a continuation (leading space or tab) also ends the block; the body then starts at
that line and the separator is empty. Nothing here raises on malformed input.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

CRLF = b"\r\n"
MAX_LINE = 998  # RFC 5322 §2.1.1, without the CRLF
FOLD_AT = 78  # RFC 5322 §2.1.1: lines SHOULD be no longer than this

# A field: an ftext name (obsolete WSP before the colon allowed), the rest of its line, and its
# continuation lines (those starting with a space or tab); a last line may lack its LF.
_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:[^\n]*(?:\n|\Z)(?:[ \t][^\n]*(?:\n|\Z))*")
_FOLDING = re.compile(rb"\r?\n(?=[ \t])")


def decode(raw: bytes) -> str:
    """Header bytes as text: UTF-8 (RFC 6532) when valid, else Latin-1 (legacy 8-bit apps)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _eol(line: bytes) -> bytes:
    if line.endswith(CRLF):
        return CRLF
    return b"\n" if line.endswith(b"\n") else b""


@dataclass(frozen=True, slots=True)
class Field:
    """One header field as received: name, colon, value, continuation lines, line ending."""

    raw: bytes
    name: str = field(init=False, repr=False, compare=False)  # lower-cased, e.g. "from"

    def __post_init__(self) -> None:
        # Once here, not per look-up: the router asks every field's name several times.
        name = self.raw[: self.raw.index(b":")].rstrip(b" \t").decode("ascii").lower()
        object.__setattr__(self, "name", name)

    @property
    def value(self) -> bytes:
        """Everything after the colon, folding and the final line ending included."""
        return self.raw[self.raw.index(b":") + 1 :]

    @property
    def eol(self) -> bytes:
        """The field's final line ending (empty for a last line without one)."""
        return _eol(self.raw)

    def text(self) -> str:
        """The value unfolded (RFC 5322 §2.2.3), stripped and decoded, for parsers."""
        return decode(_FOLDING.sub(b"", self.value)).strip()

    def with_value(self, value: bytes) -> Field:
        """The same field name bytes with a new value (which brings its own line ending)."""
        return Field(self.raw[: self.raw.index(b":") + 1] + value)


@dataclass(frozen=True, slots=True)
class HeaderBlock:
    fields: tuple[Field, ...]
    separator: bytes  # the empty line (b"\r\n" or b"\n"), or b"" when there is none
    body: bytes

    @classmethod
    def parse(cls, data: bytes) -> HeaderBlock:
        fields: list[Field] = []
        pos = 0
        while field_match := _FIELD.match(data, pos):  # one match per field, folding included
            fields.append(Field(field_match.group()))
            pos = field_match.end()
        for separator in (CRLF, b"\n"):
            if data.startswith(separator, pos):
                return cls(tuple(fields), separator, data[pos + len(separator) :])
        return cls(tuple(fields), b"", data[pos:])

    @property
    def eol(self) -> bytes:
        """The line ending new fields should use: the block's own, CRLF when it has none."""
        for candidate in (*(f.eol for f in self.fields), self.separator):
            if candidate:
                return candidate
        return CRLF

    def get_all(self, name: str) -> list[Field]:
        return [f for f in self.fields if f.name == name]

    def header_bytes(self) -> bytes:
        return b"".join(f.raw for f in self.fields)

    def with_fields(self, fields: Iterable[Field]) -> HeaderBlock:
        """The block with other fields; all but the last get a line ending if they lack one."""
        fields = list(fields)
        eol = self.eol
        for i, f in enumerate(fields[:-1]):
            if not f.eol:
                fields[i] = Field(f.raw + eol)
        return HeaderBlock(tuple(fields), self.separator, self.body)

    def to_bytes(self) -> bytes:
        return self.header_bytes() + self.separator + self.body


def fold(name: str, value: str, eol: bytes = CRLF) -> Field:
    """A new field `name: value`, folded at spaces to stay within 78 octets where it can.

    A run without spaces longer than a line allows is cut, so no line exceeds 998 octets; callers
    that need a value to survive intact (addresses, encoded-words) keep their runs short.
    """
    lines = [name.encode("ascii") + b":"]
    started = False  # the first line has a word after the name: folding may begin
    for word in value.encode("utf-8").split(b" "):
        chunks = [word[i : i + MAX_LINE - 1] for i in range(0, len(word), MAX_LINE - 1)] or [b""]
        for chunk in chunks:
            length = len(lines[-1]) + 1 + len(chunk)
            if chunk and ((started and length > FOLD_AT) or length > MAX_LINE):
                lines.append(b" " + chunk)
            else:
                lines[-1] += b" " + chunk
            started = True
    return Field(eol.join(lines) + eol)
