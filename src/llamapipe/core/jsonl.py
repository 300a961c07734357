"""Reading JSON-lines files a line at a time, so a bad line is named by its number.

Binary, decoded line by line: one bad byte is reported with its line number instead of failing
the whole read. prepare_data (the data's splits) and predict (the prompts) read through here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO, Any

BLANK = object()  # what ``json_value`` gives for a line of whitespace only


class BadLine(ValueError):
    """A line that is not UTF-8 or not JSON; the message says which and where."""


def numbered_lines(f: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, raw bytes) of a file opened in binary, a UTF-8 BOM dropped."""
    for number, raw in enumerate(f, start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 BOM from some editors
            raw = raw[3:]
        yield number, raw


def json_value(raw: bytes) -> Any:
    """The JSON value of one line, ``BLANK`` for a blank line; ``BadLine`` for bad bytes or JSON."""
    import json

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadLine(f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    if not text.strip():
        return BLANK
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadLine(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
