"""A JSON file holding one list, read one element at a time, so a 1.5 GB LLaVA-665K file
costs a record's memory rather than the whole list's."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

CHUNK_CHARS = 1 << 20
_SPACE = re.compile(r"[ \t\n\r]*")


class _Reader:
    """A window on the file's text that grows when a value runs past its end."""

    def __init__(self, file):
        self.file, self.text, self.pos = file, "", 0

    def more(self) -> bool:
        """Read the next chunk onto the window (dropping what was consumed); False at the end."""
        chunk = self.file.read(CHUNK_CHARS)
        if not chunk:
            return False
        self.text, self.pos = self.text[self.pos:] + chunk, 0
        return True

    def next_char(self) -> str:
        """The next character that is not white space, not consumed; '' at the end."""
        while True:
            self.pos = _SPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text) or not self.more():
                return self.text[self.pos:self.pos + 1]


def iter_json_array(path: str | Path, what: str = "records") -> Iterator:
    """The elements of the list that `path` holds, in order. A file that is not a list, or
    that breaks off or goes wrong inside an element, is a `ValueError` naming the file and
    the element's position."""
    decoder = json.JSONDecoder()
    try:
        file = open(path, encoding="utf-8")  # noqa: SIM115 (closed below, also when the caller stops early)
    except OSError as err:
        raise ValueError(f"{path}: cannot read {what}: {err}") from err
    with file:
        reader = _Reader(file)
        first = reader.next_char()
        if first != "[":
            found = {"{": "an object", "": "nothing"}.get(first, f"{first!r}")
            raise ValueError(f"{path}: cannot read {what}: expected a list of {what}, found {found}")
        reader.pos += 1
        if reader.next_char() == "]":
            return
        k = 0
        while True:
            while True:
                try:
                    value, end = decoder.raw_decode(reader.text, reader.pos)
                except json.JSONDecodeError as err:
                    if reader.more():
                        continue
                    raise ValueError(f"{path}: cannot read {what}: element #{k}: {err.msg}") from err
                number = isinstance(value, int | float) and not isinstance(value, bool)
                if number and len(reader.text) - end < 64 and reader.more():  # "-25" of "-2500.0e3" decodes too
                    continue
                break
            reader.pos = end
            yield value
            k += 1
            sep = reader.next_char()
            if sep == "]":
                return
            if sep != ",":
                raise ValueError(f"{path}: cannot read {what}: after element #{k - 1}, expected ',' or ']', "
                                 f"found {sep or 'the end of the file'!r}")
            reader.pos += 1
            reader.next_char()  # raw_decode takes no white space before a value
