"""Reading files the user names (specs, datasets, configs): regular files only, bounded, UTF-8.

A path in a spec or on the command line can be anything the filesystem allows: a FIFO (whose
open blocks until a writer comes), `/dev/zero` (endless), `/proc/self/mem` (an I/O error on
read), a 100 MB single line, a path longer than the kernel takes, text in another encoding, or
JSON nested deep enough to overflow the parser's stack. Every reader of user files goes through
here, so each of those is one `FileInputError` line (exit 2) instead of a hang, a traceback or
gigabytes of memory.
"""
from __future__ import annotations

import codecs
import json
import os
import re
import stat
from pathlib import Path
from typing import BinaryIO, Iterator

from contract.errors import UserError

# Linux's PATH_MAX and NAME_MAX, in bytes: longer fails inside open() as "File name too long".
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
# A spec is a page of YAML; a megabyte is already a thousand pages.
MAX_SPEC_BYTES = 1 << 20
# One dataset example per line: a 32k-token chat is ~150 KB, so 64 MiB only stops runaway input
# (a file with no newline at all) before it is held in memory.
MAX_LINE_BYTES = 64 << 20
# Alpaca and chat records nest 3 or 4 levels; json's C parser overflows the stack near 1000.
MAX_JSON_DEPTH = 100
SHOWN_PATH_CHARS = 160


class FileInputError(UserError):
    """A user-named file that cannot be read as what it should be; the message is the one line shown."""


class JSONTooDeep(json.JSONDecodeError):
    """JSON nested deeper than MAX_JSON_DEPTH: a JSONDecodeError, so callers that report bad JSON
    lines (with their column) treat it as one more."""


# C0 and C1 control characters (and DEL) as Python writes them in a literal: "\\n", "\\x1b".
_CONTROL_ESCAPES = {c: repr(chr(c))[1:-1] for c in (*range(32), *range(127, 160))}


def escape_controls(text: str) -> str:
    """The text with control characters written as escapes: a newline or a terminal escape in a
    name must not break (or repaint) the one line an error is."""
    return text.translate(_CONTROL_ESCAPES)


def shown(value: object, limit: int = SHOWN_PATH_CHARS) -> str:
    """A path or name as an error line shows it: control characters escaped, cut to `limit` characters."""
    escaped = escape_controls(str(value))
    return escaped if len(escaped) <= limit else escaped[:limit - 1] + "…"


def path_problem(path: str | os.PathLike) -> str | None:
    """Why the kernel would refuse this path before looking at the disk (NUL byte, too long, a
    component too long), or None."""
    raw = os.fsencode(path)
    if b"\0" in raw:
        return "it contains a NUL byte"
    if len(raw) > MAX_PATH_BYTES:
        return f"it is {len(raw):,} bytes long, over the {MAX_PATH_BYTES} a path may have"
    longest = max((len(part) for part in raw.split(b"/")), default=0)
    if longest > MAX_NAME_BYTES:
        return f"one of its names is {longest:,} bytes long, over the {MAX_NAME_BYTES} a file name may have"
    return None


def check_path(path: str | os.PathLike, what: str) -> Path:
    """The path, if the kernel could take it; else a FileInputError naming `what` it was for."""
    problem = path_problem(path)
    if problem is not None:
        raise FileInputError(f"{what} path {shown(path)} is not usable: {problem}")
    return Path(path)


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _refuse_irregular(mode: int, path: Path, what: str) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise FileInputError(f"{what} {shown(path)} is {kind}, not a regular file")


def open_regular(path: str | os.PathLike, what: str) -> BinaryIO:
    """Open a regular file for binary reading. Opened non-blocking, so a FIFO is refused at once
    instead of waiting forever for a writer; anything but a regular file is refused after fstat."""
    path = check_path(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise FileInputError(f"{what} not found: {shown(path)}") from None
    except OSError as e:
        try:  # a socket cannot be opened at all (ENXIO): say what it is rather than the errno
            _refuse_irregular(os.stat(path).st_mode, path, what)
        except OSError:
            pass
        raise FileInputError(f"cannot open {what} {shown(path)}: {e.strerror or e}") from None
    try:
        _refuse_irregular(os.fstat(fd).st_mode, path, what)
        # Back to blocking reads: O_NONBLOCK only had to get a FIFO past open().
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n:,} bytes"


def read_bytes(path: str | os.PathLike, what: str, max_bytes: int) -> bytes:
    """The whole file, refused when over `max_bytes`. The size is checked on what was read too:
    files under /proc say they are empty whatever they hold."""
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise FileInputError(f"{what} {shown(path)} is {_size(size)}, over the {_size(max_bytes)} limit")
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise FileInputError(f"cannot read {what} {shown(path)}: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise FileInputError(f"{what} {shown(path)} is over the {_size(max_bytes)} limit")
    return data


def _not_text_reason(data: bytes) -> str | None:
    """Why bytes that fail UTF-8 decoding look like some other format, to name the fix."""
    if data.startswith(b"\x1f\x8b"):
        return "it is gzip-compressed: decompress it first"
    if data.startswith((b"BZh", b"\xfd7zXZ", b"(\xb5/\xfd", b"PK\x03\x04")):
        return "it is a compressed archive: extract it first"
    if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "it is UTF-32 text: save it as UTF-8"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "it is UTF-16 text: save it as UTF-8"
    if b"\0" in data[:4096]:
        return "it holds NUL bytes (binary data, or UTF-16 without a byte-order mark): save it as UTF-8 text"
    return None


def decode_utf8(data: bytes, where: str) -> str:
    """UTF-8 text (a leading byte-order mark dropped), or a FileInputError saying what it is instead
    and where the first bad byte sits."""
    reason = _not_text_reason(data)
    if reason is not None:
        raise FileInputError(f"{where} is not UTF-8 text: {reason}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
        at = e.start + bom
        line = data.count(b"\n", 0, at) + 1
        raise FileInputError(f"{where} is not UTF-8 text ({e.reason} at line {line}, byte {at}): "
                             "save it as UTF-8") from None
    return text


def read_text(path: str | os.PathLike, what: str, max_bytes: int) -> str:
    """A small text file (a spec, a config) whole: regular, at most `max_bytes`, UTF-8."""
    return decode_utf8(read_bytes(path, what, max_bytes), f"{what} {shown(path)}")


def iter_lines(f: BinaryIO, path: str | os.PathLike, what: str,
               max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) for each line of the open file `f` (the `what` at `path`), never
    holding more than one line of `max_line_bytes`; a longer one is a FileInputError naming the
    line. Decoding is the caller's: a dataset may skip a bad line where a spec may not."""
    line_no = 0
    while True:
        try:
            raw = f.readline(max_line_bytes + 1)
        except OSError as e:
            raise FileInputError(f"cannot read {what} {shown(path)}: {e.strerror or e}") from None
        if not raw:
            return
        line_no += 1
        if len(raw) > max_line_bytes:
            raise FileInputError(f"{shown(path)}:{line_no}: line is over the {_size(max_line_bytes)} a line may have")
        yield line_no, raw


# A JSON string (escapes included) or one bracket; everything else is skipped by finditer.
_JSON_NESTING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def json_too_deep_at(text: str, max_depth: int = MAX_JSON_DEPTH) -> int | None:
    """The index where `text` first nests deeper than `max_depth`, or None. Brackets inside
    strings do not count; a line with fewer brackets than the limit is passed without a scan."""
    if text.count("[") + text.count("{") <= max_depth:
        return None
    depth = 0
    for match in _JSON_NESTING.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > max_depth:
                return match.start()
        elif token in "]}":
            depth -= 1
    return None


def loads_json(text: str, max_depth: int = MAX_JSON_DEPTH):
    """json.loads with a depth limit: deeper input raises JSONTooDeep (a JSONDecodeError) instead
    of RecursionError from inside the parser."""
    at = json_too_deep_at(text, max_depth)
    if at is not None:
        raise JSONTooDeep(f"nested deeper than {max_depth} levels", text, at)
    return json.loads(text)
