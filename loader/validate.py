"""Strict streaming validation of a data file against its approved spec.

One pass, constant memory apart from the key check (8 bytes per row; none when the loader
leaves uniqueness to the database's UNIQUE index). The file is read in
32 KiB blocks cut at a line end; each block is decoded as UTF-8 at once and checked for the
approved terminator with a few C-speed counts. Only a block that fails those checks is taken
apart line by line, so an error always names the exact line (the line of the first bad byte
for an encoding error), while clean blocks stay fast. One row is one line: a value never
contains a line break, so a quote left open is reported on the line that opens it.

Fields are split with ``str.split``, not the ``csv`` module: for files quoted "none" a quote
character is plain data (but a field may not start with one), and for files quoted "all" a
line is accepted on the fast path only when it is exactly ``"v1"<d>"v2"...`` with no other
quote; anything else goes to a small exact parser that understands ``""`` (what
``csv.writer(quoting=QUOTE_ALL)`` writes) and says what is wrong. ``csv`` cannot tell
whether a field was quoted. A clean block of an unquoted file runs no Python code per row at
all: C-level counts check every line's delimiters, one split makes every field of the block
and ``zip`` cuts them into rows; :func:`iter_copy_blocks` even skips the split and hands the
block's own text to PostgreSQL's ``COPY``.

Policies (Terra Dotta's guidance for SIS feeds):

- values are trimmed: surrounding spaces (and tabs, where tab is not the delimiter) are
  removed when loading, not refused; the key column is compared after trimming;
- the last line may lack its terminator (many export tools write no final line end); every
  other line must end with exactly the approved terminator;
- a file whose BOM presence differs from the approved sample is refused;
- the key column must be non-empty and unique: a 64-bit hash per row is kept during the pass;
  only when hashes repeat is the file read a second time to confirm the duplicates by value
  and name both lines. The nightly load skips the hashes (``unique_by_database``): its
  UNIQUE index refuses a duplicate, and only then is the file validated again in full;
- a key must look like no other key: in Unicode NFC form, with no space other than the ASCII
  space and no invisible character (``_ODD_KEY_CHARACTERS``). Otherwise two keys that look
  the same on screen would load as two people. Only non-ASCII blocks pay for the check
  (``str.isascii`` is O(1)); a bad key is hashed in its normalised form, so a clash with a
  good key is reported with both lines;
- no blank line (empty, or spaces only), in any spec: it would load as an empty row. A final
  line end at the end of the file is not a blank line;
- no line equal to the header after line 1 (exports concatenated into one file); found with
  one substring search per block;
- a line is at most 16 MiB (``MAX_LINE_BYTES``), its line end included;
- UTF-16 (with or without its byte order mark) is named as such, not as "bad UTF-8";
- only a complete file is read: a file whose size or modification time changes while it is
  read, or that ends in the middle of a line that is wrong (cut short), is refused in words
  that say it looks half-written (``CHANGED_WHILE_READ``, ``ENDS_MID_LINE``).

Rows are tuples of str, yielded only while the file is clean so far (a block holding an
error yields nothing): once an error is found the rest is still checked (to count and report
errors) but no more rows are handed to the loader, which rolls back when ``report.ok`` is
False at the end.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import unicodedata
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from loader.spec import BOM, DELIMITER_NAMES, DELIMITERS, TERMINATOR_NAMES

if TYPE_CHECKING:
    from loader.spec import Spec

BLOCK_BYTES = 1 << 15  # small blocks keep a block's row objects in the CPU cache
MAX_LINE_BYTES = 16 << 20
KEY_BUCKETS = 64
MAX_SHOWN_VALUE = 60

Fail = Callable[[int | None, str], None]

BLANK_LINE = "the line is blank; remove it (a data file may hold no blank lines)"
REPEATED_HEADER = (
    "this line repeats the header (line 1): the file looks like several exports joined "
    "together; send one header only, on line 1"
)
_COMPLETE_FILES_ONLY = (
    "upload it under a temporary name and rename it to {name} once it is complete (only "
    "complete files, renamed into place, are read; uploads to this server do that by "
    "themselves)"
)
CHANGED_PREFIX = "the file changed while it was being read"
CHANGED_WHILE_READ = (
    CHANGED_PREFIX
    + " ({change}): it looks like it was still being written; "
    + _COMPLETE_FILES_ONLY
)
ENDS_MID_LINE = (
    "the file ends in the middle of this line (no line end after it, and the line is cut "
    "short), so it looks incomplete (was it still being written?): " + _COMPLETE_FILES_ONLY
)
ENDS_WITHOUT_LINE_END = (
    "the file ends without a line end after this line, but files of this format end with "
    "one, so it looks incomplete (was it still being written?): " + _COMPLETE_FILES_ONLY
)

# Spaces other than the ASCII space, and invisible characters (zero-width, bidi controls,
# soft hyphen, BOM): a key holding one looks like a key without it, but is another key.
_ODD_KEY_CHARACTERS = re.compile(
    "[\u0085\u00a0\u00ad\u1680\u180e\u2000-\u200f\u2028-\u202f\u205f-\u2064"
    "\u2066-\u2069\u3000\ufeff]"
)


@dataclass
class ValidationReport:
    """What one validation found: rows seen, and the errors (first N kept, all counted)."""

    file_name: str
    rows: int = 0
    error_count: int = 0
    errors: list[str] = field(default_factory=list)
    # The file's SHA-256, when the pass was asked for it (``hash_file``) and read the whole
    # file in order; "" otherwise.
    sha256: str = ""

    @property
    def ok(self) -> bool:
        return self.error_count == 0

    def summary(self) -> str:
        """One line for the folder log that a client's IT person can act on."""
        if self.ok:
            return f"{self.file_name}: {self.rows} rows, valid"
        plural = "error" if self.error_count == 1 else "errors"
        text = f"{self.file_name}: refused, {self.error_count} {plural}: " + "; ".join(self.errors)
        hidden = self.error_count - len(self.errors)
        if hidden > 0:
            text += f"; and {hidden} more"
        return text.replace("\n", " ").replace("\r", " ")


def _shown(value: str) -> str:
    """A value quoted for a message, cut short (messages go to logs; keep them small)."""
    if len(value) > MAX_SHOWN_VALUE:
        value = value[:MAX_SHOWN_VALUE] + "..."
    return repr(value)


def _code_points(value: str) -> str:
    """A value with every non-ASCII character escaped, to show two that look the same."""
    shown = ascii(value[:MAX_SHOWN_VALUE])
    return shown + "..." if len(value) > MAX_SHOWN_VALUE else shown


_QUOTED = re.compile(r"'(?:[^'\\\n]|\\.)*'" + r'|"(?:[^"\\\n]|\\.)*"')  # Python reprs


def without_values(message: str) -> str:
    """A validation message for the operators' log and e-mail: every value quoted from the
    file (by :func:`_shown`) becomes '…'. The values themselves (a duplicated ID, say) stay
    in the client's own folder log, where they help; file contents go to no other log."""
    return _QUOTED.sub("'…'", message)


def key_problem(key: str, column: str) -> str:
    """Why ``key`` cannot be a key although it is not empty ("" if it can): it is not in
    Unicode NFC form, or holds a space other than the ASCII space or an invisible character.
    Such a key looks exactly like another key on screen but would load as another person."""
    if key.isascii():
        return ""
    odd = _ODD_KEY_CHARACTERS.search(key)
    if odd is not None:
        char = odd.group()
        name = unicodedata.name(char, "").lower() or "a control character"
        return (
            f"the key {column} {_shown(key)} holds a {name} (U+{ord(char):04X}); a key may "
            "hold no space other than the ordinary space and no invisible character"
        )
    if not unicodedata.is_normalized("NFC", key):
        return (
            f"the key {column} {_shown(key)} (code points {_code_points(key)}) is not in "
            "Unicode NFC form (a letter and its accent are stored as separate characters: it "
            "looks the same as the composed form but is another key); export keys in NFC form"
        )
    return ""


def normal_key(key: str, trim: str = " \t") -> str:
    """The key a reader sees: NFC, other spaces made ASCII spaces, invisible characters
    dropped, trimmed. Two keys with the same normal form are the same key."""
    if key.isascii():
        return key
    plain = _ODD_KEY_CHARACTERS.sub(lambda m: " " if m.group().isspace() else "", key)
    return unicodedata.normalize("NFC", plain).strip(trim)


def utf16_problem(head: bytes) -> str:
    """Words for a file that is UTF-16 (with its byte order mark, or without one: NUL bytes in
    every other position of ASCII text), from the bytes of its first line; "" if it is not."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        order = "little-endian" if head[0] == 0xFF else "big-endian"
        how = f"{order}, with a byte order mark"
    else:
        sample = head[:4096]
        if len(sample) < 4 or b"\x00" not in sample:
            return ""
        even, odd = sample[0::2], sample[1::2]
        if odd.count(0) * 2 > len(odd) and even.count(0) * 4 < len(even):
            how = "little-endian, without a byte order mark"
        elif even.count(0) * 2 > len(even) and odd.count(0) * 4 < len(odd):
            how = "big-endian, without a byte order mark"
        else:
            return ""
    return (
        f"the file is UTF-16 ({how}), not UTF-8; the approved encoding is UTF-8: export or "
        "save the file as UTF-8"
    )


class _Format:
    """The spec, precomputed for the hot loop."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.d = spec.delimiter
        self.t = spec.terminator
        self.n = len(spec.columns)
        self.quoted = spec.quoting == "all"
        self.key = spec.key_index
        self.trim = " " if self.d == "\t" else " \t"
        self.d_name = DELIMITER_NAMES[self.d]
        self.t_name = TERMINATOR_NAMES[self.t]
        self.quoted_sep = f'"{self.d}"'
        # Files of this spec end with a line end (the sample did), so one without it was cut
        # short. Set when the spec records it; older specs do not (then only a last line that
        # is wrong as well shows a cut).
        self.final_line_end = bool(getattr(spec, "final_line_end", False))
        self.two_n = 2 * self.n
        # Substrings that show a value with a space (or tab) at its start or end. For a block
        # of unquoted lines, line ends are first turned into delimiters so they show too.
        if self.quoted:
            pads = ['" ', ' "'] + (['"\t', '\t"'] if self.d != "\t" else [])
            self.edges: frozenset[str] = frozenset()
        else:
            pads = [f"{ch}{self.d}" for ch in self.trim] + [f"{self.d}{ch}" for ch in self.trim]
            self.edges = frozenset(self.trim)
        self.pads = tuple(pads * 2)[:4]
        # CPython's substring search tests a needle's last character first (find) and rfind
        # its first: search so that the character tested is the rare one (the space), not the
        # delimiter.
        self.pad_find, self.pad_rfind = self._by_direction(pads)
        self.edge_chars = tuple(self.edges)

    @staticmethod
    def _by_direction(needles: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        forward = tuple(p for p in needles if p[-1] in " \t" and p[0] != " ")
        return forward, tuple(p for p in needles if p not in forward)

    def needs_trim(self, text: str) -> bool:
        """Could a value in this clean block of lines have spaces around it? (a few C-speed
        scans; the lines of a block that could are then checked one by one)."""
        if not self.quoted:
            # Line ends turned into delimiters: two scans instead of four.
            return self.joined_needs_trim(text.replace(self.t, self.d))
        if any(text.find(p) >= 0 for p in self.pad_find):
            return True
        return any(text.rfind(p) >= 0 for p in self.pad_rfind)

    def joined_needs_trim(self, joined: str) -> bool:
        """The same for a block whose line ends were replaced by the delimiter."""
        if any(joined.find(p) >= 0 for p in self.pad_find):
            return True
        if any(joined.rfind(p) >= 0 for p in self.pad_rfind):
            return True
        return joined.startswith(self.edge_chars) or joined.endswith(self.edge_chars)

    # -- slow paths: exact messages -------------------------------------------------------

    def other_delimiter(self, line: str) -> str | None:
        """The delimiter a line uses instead of the approved one, if that is what is wrong."""
        if self.n < 2 or self.d in line:
            return None
        for other in DELIMITERS:
            if other != self.d and line.count(other) >= self.n - 1:
                return other
        return None

    def split_quoted(self, line: str) -> tuple[list[str] | None, str]:
        """Parse an every-field-quoted line exactly; (fields, "") or (None, problem)."""
        fields: list[str] = []
        i, end, d = 0, len(line), self.d
        while True:
            number = len(fields) + 1
            if i >= end or line[i] != '"':
                return None, (
                    f"field {number} is not quoted, but the approved format quotes every field "
                    "(mixed quoting)"
                )
            j, parts = i + 1, []
            while True:
                q = line.find('"', j)
                if q < 0:
                    return None, f"field {number} opens a quote that is never closed"
                if line.startswith('"', q + 1):
                    parts.append(line[j : q + 1])
                    j = q + 2
                    continue
                parts.append(line[j:q])
                break
            fields.append("".join(parts))
            i = q + 1
            if i == end:
                return fields, ""
            if line[i] != d:
                return None, (
                    f"field {number}: {_shown(line[i])} after a closing quote (expected the "
                    f'{self.d_name} delimiter; a quote inside a value is written as "")'
                )
            i += 1

    def split_bare(self, line: str) -> tuple[list[str] | None, str]:
        fields = line.split(self.d)
        for number, value in enumerate(fields, 1):
            if value.startswith('"'):
                if len(value) >= 2 and value.endswith('"'):
                    return None, (
                        f"field {number} is quoted, but the approved format quotes no field "
                        "(mixed quoting)"
                    )
                return None, (
                    f"field {number} {_shown(value)} starts with a quote mark: the "
                    "approved format quotes no field, so a value may not begin with a quote "
                    "(a quote inside or at the end of a value is plain data); remove the "
                    "quote or move it"
                )
        return fields, ""

    def fields_or_problem(self, line: str) -> tuple[list[str] | None, str]:
        """Exact parse of one line with the reason it is wrong, if it is."""
        if not line.strip(self.trim):
            return None, BLANK_LINE
        other = self.other_delimiter(line)
        if other is not None:
            return None, (
                f"fields are separated by {DELIMITER_NAMES[other]} instead of the approved "
                f"{self.d_name}"
            )
        if self.quoted and line.count('"') % 2:
            return None, "a quote is never closed (the line has an odd number of quote marks)"
        fields, problem = self.split_quoted(line) if self.quoted else self.split_bare(line)
        if fields is None:
            return None, problem
        if len(fields) != self.n:
            return None, f"{len(fields)} fields, expected {self.n}"
        return fields, ""


def _bad_byte(content: bytes, exc: UnicodeDecodeError) -> str:
    column = len(content[: exc.start].decode("utf-8", "replace")) + 1
    return (
        f"not valid UTF-8 (byte 0x{content[exc.start]:02X} at column {column}); the approved "
        "encoding is UTF-8: export or save the file as UTF-8"
    )


def _lines_slowly(block: bytes, fmt: _Format, first: int, last: bool, fail: Fail) -> list[str]:
    """Take a block that failed the fast checks apart line by line, naming each bad line."""
    pieces = block.split(b"\n")
    if not last:
        pieces.pop()  # the empty piece after the final line end
    lines: list[str] = []
    crlf = fmt.t == "\r\n"
    for offset, raw in enumerate(pieces):
        number = first + offset
        terminated = not (last and offset == len(pieces) - 1)
        ends_cr = raw.endswith(b"\r")
        content = raw[:-1] if ends_cr else raw
        if not terminated and ends_cr:
            fail(number, "ends with a carriage return (CR) without a line feed")
        elif crlf and terminated and not ends_cr:
            fail(number, "ends with LF only; the approved format ends every line with CRLF")
        elif not crlf and ends_cr:
            fail(number, "ends with CRLF; the approved format ends every line with LF only")
        if b"\r" in content:
            fail(number, "contains a carriage return (CR) inside the row (mixed line ends?)")
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as exc:
            fail(number, _bad_byte(content, exc))
            text = content.decode("utf-8", "replace")
        if "\x00" in text:
            fail(number, "contains a NUL byte (UTF-16 or binary?); the approved encoding is UTF-8")
        lines.append(text)
    return lines


def _clean_text(block: bytes, fmt: _Format) -> str | None:
    """The block decoded, if it is valid UTF-8 without NUL and every line end is the approved
    one (a few C-speed scans); None sends the block to the line-by-line path."""
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "\x00" in text:
        return None
    if fmt.t == "\r\n":
        lf = text.count("\n")
        if text.count("\r\n") != lf or text.count("\r") != lf:
            return None
    elif "\r" in text:
        return None
    return text


def _split_lines(text: str, fmt: _Format, last: bool) -> list[str]:
    lines = text.split(fmt.t)
    if not last:
        lines.pop()  # the empty piece after the final line end
    return lines


def _bare_rows(
    text: str, lines: list[str], fmt: _Format, last: bool, add_hashes: Callable[..., None]
) -> Iterator[tuple[str, ...]] | None:
    """Rows of a clean, quote-free block with no Python code per row, or None when any line
    needs a closer look (a wrong field count, a blank line, an empty or odd key).

    Every line must hold exactly n-1 delimiters (one C-level count per line); then the line
    ends become delimiters, one split makes every field of the block, and ``zip`` cuts them
    into rows as the database driver asks for them.
    """
    n, d = fmt.n, fmt.d
    if n > 1:
        counts = list(map(str.count, lines, repeat(d)))
        if counts.count(n - 1) != len(counts):
            return None
        joined = text.replace(fmt.t, d)
        fields = joined.split(d)
        if not last:
            fields.pop()  # after the final line end, now a delimiter
        trim = fmt.joined_needs_trim(joined)
    else:
        fields, trim = lines, fmt.needs_trim(text)
    if trim:
        fields = list(map(str.strip, fields, repeat(fmt.trim)))
    if n == 1 and not all(fields):
        return None  # a blank line
    if fmt.key is not None:
        keys = fields[fmt.key :: n]
        if not all(keys) or (not text.isascii() and _any_odd_key(keys)):
            return None
        add_hashes(map(hash, keys))
    return zip(*[iter(fields)] * n, strict=False)


def _any_odd_key(keys: list[str]) -> bool:
    """Does any key of a block that holds non-ASCII text break the key rule? (one C-level
    join when the keys themselves are ASCII)."""
    if "".join(keys).isascii():
        return False
    return any(not key.isascii() and key_problem(key, "") for key in keys)


def _lines(block: bytes, fmt: _Format, first: int, last: bool, fail: Fail) -> list[str]:
    """The block's lines without terminators; exact per-line errors when anything is off."""
    text = _clean_text(block, fmt)
    if text is None:
        return _lines_slowly(block, fmt, first, last, fail)
    return _split_lines(text, fmt, last)


def header_difference(got: tuple[str, ...], approved: tuple[str, ...]) -> str:
    """What differs between a file's header and the approved one, in words ("" if nothing)."""
    if got == approved:
        return ""
    got_set, approved_set = set(got), set(approved)
    if got_set == approved_set and len(got) == len(approved):
        return (
            f"the header columns are reordered: got {', '.join(got)}; "
            f"approved order: {', '.join(approved)}"
        )
    parts = []
    renamed = [
        (position, was, now)
        for position, (was, now) in enumerate(zip(approved, got, strict=False), 1)
        if was != now and was not in got_set and now not in approved_set
    ]
    renamed_was = {was for _, was, _ in renamed}
    renamed_now = {now for _, _, now in renamed}
    if renamed:
        parts.append(
            "renamed: "
            + ", ".join(f"column {p} {was} is now {_shown(now)}" for p, was, now in renamed)
        )
    missing = [c for c in approved if c not in got_set and c not in renamed_was]
    if missing:
        parts.append("missing: " + ", ".join(missing))
    extra = [_shown(c) for c in got if c not in approved_set and c not in renamed_now]
    if extra:
        parts.append("extra: " + ", ".join(extra))
    twice = sorted({c for c in got if got.count(c) > 1})
    if twice:
        parts.append("repeated: " + ", ".join(_shown(c) for c in twice))
    common_got = [c for c in got if c in approved_set]
    common_approved = [c for c in approved if c in got_set]
    if not twice and common_got != common_approved:
        parts.append("reordered: " + ", ".join(common_got))
    return "the header differs from the approved one: " + "; ".join(parts)


def _check_header(stream: BinaryIO, fmt: _Format, fail: Fail) -> str | None:
    """Check line 1; its text (no BOM, no line end), or None when the file cannot be checked
    further (nothing to load)."""
    spec = fmt.spec
    first = stream.readline(MAX_LINE_BYTES)
    utf16 = utf16_problem(first)
    if utf16:
        fail(None, utf16)
        return None
    has_bom = first.startswith(BOM)
    if has_bom:
        first = first[len(BOM) :]
    if not first:
        fail(None, "the file is empty")
        return None
    if has_bom and not spec.bom:
        fail(1, "the file starts with a UTF-8 byte order mark (BOM); the approved format has none")
    elif spec.bom and not has_bom:
        fail(1, "the file lacks the UTF-8 byte order mark (BOM) that the approved format has")
    if first.endswith(b"\r\n"):
        text, terminator = first[:-2], "\r\n"
    elif first.endswith(b"\n"):
        text, terminator = first[:-1], "\n"
    elif len(first) >= MAX_LINE_BYTES:
        fail(1, _too_long(stream, first, -1))
        return None
    else:
        text, terminator = first, None
    try:
        header = text.decode("utf-8")
    except UnicodeDecodeError as exc:
        fail(1, _bad_byte(text, exc))
        return None
    if terminator is not None and terminator != fmt.t:
        fail(
            1,
            f"lines end with {TERMINATOR_NAMES[terminator]}; the approved format ends every "
            f"line with {fmt.t_name}",
        )
        return None
    if "\r" in header:
        fail(1, "contains a carriage return (CR) inside the row (mixed line ends?)")
        return None
    if "\x00" in header:
        fail(1, "contains a NUL byte (is this a text file?); the approved encoding is UTF-8")
        return None
    fields, problem = fmt.fields_or_problem(header)
    if fields is None and (fmt.other_delimiter(header) or "fields, expected" not in problem):
        fail(1, f"header: {problem}")
        return None
    if fields is None:  # a wrong column count: say which columns differ
        fields, _ = fmt.split_quoted(header) if fmt.quoted else (header.split(fmt.d), "")
        fields = fields or [header]
    difference = header_difference(tuple(fields), spec.columns)
    if difference:
        fail(1, difference)
        if terminator is None and _approved_header(fmt).startswith(header):
            fail(1, ENDS_MID_LINE.format(name=spec.file_name))  # a header cut short
            return None
        if terminator is None or len(fields) != len(spec.columns):
            return None
        # Only names differ (renamed or reordered): the rows still have the approved number of
        # fields, so they are checked too and the client hears of every problem at once.
    if terminator is None:
        fail(None, "the file has a header (line 1) but no data rows")
        return None
    return header


def _approved_header(fmt: _Format) -> str:
    """Line 1 as the approved format writes it."""
    if fmt.quoted:
        return fmt.d.join(f'"{name}"' for name in fmt.spec.columns)
    return fmt.d.join(fmt.spec.columns)


def _too_long(stream: BinaryIO, start: bytes, end: int) -> str:
    """The words for a line over ``MAX_LINE_BYTES``: ``start`` is the line so far (``end``, its
    LF's offset in it, or -1). Reads on to the line's end, keeping nothing, to say how long
    the line is, or that it never ends."""
    limit = f"longer than the {MAX_LINE_BYTES >> 20} MiB limit for one line"

    def size(count: int) -> str:
        return f"{count:,} bytes ({count / (1 << 20):.1f} MiB)"

    length = end
    if end < 0:
        length = len(start)
        while chunk := stream.read(1 << 20):
            cut = chunk.find(b"\n")
            if cut >= 0:
                length += cut
                break
            length += len(chunk)
        else:
            return (
                f"{limit}, and it never ends: from its start to the end of the file "
                f"({size(length)}) there is no line end (is this a text file in the approved "
                "format?)"
            )
    return (
        f"{limit}: it is {size(length)} long, up to its line end; no row of a data file "
        "can be that long: check the export"
    )


class _KeyIndex:
    """A 64-bit hash of each row's key; duplicates are found at the end with small sets."""

    def __init__(self) -> None:
        self.hashes = array("q")

    def duplicate_hashes(self) -> set[int]:
        """Hashes seen on more than one row (to be confirmed by value: hashes can collide).

        Split into buckets first so the sets stay small: memory stays ~8 bytes a row (a single
        set over all rows would cost ~64 bytes a row, for no gain in speed). Called once: the
        hashes move into the buckets.
        """
        buckets = [array("q") for _ in range(KEY_BUCKETS)]
        adds = [b.append for b in buckets]
        mask = KEY_BUCKETS - 1
        hashes = self.hashes
        while hashes:  # move the hashes over from the end, so they are never held twice
            chunk = hashes[-65536:]
            del hashes[-65536:]
            for h in chunk:
                adds[h & mask](h)
        shared: set[int] = set()
        for bucket in buckets:
            if len(set(bucket)) == len(bucket):
                continue
            seen: set[int] = set()
            for h in bucket:
                if h in seen:
                    shared.add(h)
                seen.add(h)
        return shared


def _report_duplicates(stream: BinaryIO, fmt: _Format, shared: set[int], fail: Fail) -> None:
    """Second look, only when hashes repeat: report each duplicate value with both lines."""
    stream.seek(0)
    stream.readline()
    first_line: dict[str, tuple[int, str]] = {}
    key = fmt.key
    assert key is not None
    column = fmt.spec.key_column
    for number, raw in enumerate(stream, 2):
        text = raw.decode("utf-8", "replace").rstrip("\r\n")
        fields, _ = fmt.fields_or_problem(text)
        if fields is None:
            continue
        written = fields[key].strip(fmt.trim)
        value = normal_key(written, fmt.trim)
        if not value or hash(value) not in shared:
            continue
        if value not in first_line:
            first_line[value] = number, written
            continue
        line, first_written = first_line[value]
        if written == first_written:
            fail(
                number,
                f"duplicate key {column} {_shown(value)} "
                f"(also on line {line}; each row needs its own)",
            )
        else:
            fail(
                number,
                f"duplicate key {column}: {_shown(written)} is the same key as "
                f"{_shown(first_written)} on line {line} (code points "
                f"{_code_points(written)} and {_code_points(first_written)}: they differ only "
                "in Unicode form or in invisible or non-ASCII space characters; each row needs "
                "its own key)",
            )


def _block_rows(
    lines: list[str],
    first: int,
    fmt: _Format,
    stripping: bool,
    checks_quotes: bool,
    checks_keys: bool,
    add_hash: Callable[[int], None],
    fail: Fail,
) -> list[list[str]]:
    """Check one block's lines (the hot loop) and return their rows; errors go to ``fail``.

    ``checks_keys``: the block holds non-ASCII text, so a key may break the key rule."""
    rows: list[list[str]] = []
    add = rows.append
    k, n, d, trim, sep, two_n = fmt.key, fmt.n, fmt.d, fmt.trim, fmt.quoted_sep, fmt.two_n
    quoted = fmt.quoted
    one_bare = n == 1 and not quoted  # a blank line would pass as one empty field
    edges, (p0, p1, p2, p3) = fmt.edges, fmt.pads
    for number, line in enumerate(lines, first):
        if quoted:
            # Fast path: exactly "v1"<d>"v2"... with no other quote character in the line.
            if line[:1] == '"' and line[-1:] == '"' and line.count('"') == two_n:
                fields = line[1:-1].split(sep)
                good = len(fields) == n
            else:
                good = False
        else:
            fields = line.split(d)
            good = (
                len(fields) == n
                and not (checks_quotes and '"' in line)
                and not (one_bare and not line.strip(trim))
            )
        if not good:
            parsed, problem = fmt.fields_or_problem(line)
            if parsed is None:
                fail(number, problem)
                continue
            fields = parsed
        if stripping and (
            line[:1] in edges
            or line[-1:] in edges
            or p0 in line
            or p1 in line
            or p2 in line
            or p3 in line
        ):
            fields = [value.strip(trim) for value in fields]
        if k is not None:
            key = fields[k]
            if not key:
                fail(number, f"the key column {fmt.spec.key_column} is empty")
                continue
            if checks_keys and not key.isascii():
                problem = key_problem(key, fmt.spec.key_column or "")
                if problem:
                    fail(number, problem)
                    add_hash(hash(normal_key(key, trim)))  # a clash is named with both lines
                    continue
            add_hash(hash(key))
        add(fields)
    return rows


class _HashingFile(io.BufferedReader):
    """A file that feeds what is read from it to a SHA-256, so a load hashes the file in its
    one pass instead of reading it again. ``whole``: read to the end, in order."""

    def __init__(self, path: Path) -> None:
        super().__init__(io.FileIO(path, "r"), buffer_size=BLOCK_BYTES)
        self.digest = hashlib.sha256()
        self.whole = False
        self._in_order = True

    def read(self, size: int | None = -1, /) -> bytes:
        data = super().read(size)
        if self._in_order:
            self.digest.update(data)
            self.whole = not data and size != 0
        return data

    def readline(self, size: int | None = -1, /) -> bytes:
        line = super().readline(size)
        if self._in_order:
            self.digest.update(line)
        return line

    def seek(self, target: int, whence: int = 0, /) -> int:
        self._in_order = self.whole = False
        return super().seek(target, whence)


def _blocks(
    path: Path,
    spec: Spec,
    report: ValidationReport,
    max_errors: int,
    copy: bool,
    unique_by_database: bool = False,
    hash_file: bool = False,
) -> Iterator[Iterable[Sequence[str]] | tuple[int, str]]:
    """The one pass behind :func:`iter_row_blocks` and :func:`iter_copy_blocks`.

    With ``unique_by_database`` the key column is only checked for empty values: the caller
    loads into a UNIQUE index, and finds the duplicates (with their lines) with
    :func:`validate_file` only if the database refuses one. With ``hash_file`` the bytes read
    also make ``report.sha256``.
    """

    last_failed = 0  # the line of the latest error

    def fail(line: int | None, message: str) -> None:
        nonlocal last_failed
        last_failed = line or 0
        report.error_count += 1
        if len(report.errors) < max_errors:
            report.errors.append(f"line {line}: {message}" if line else message)

    def first_fail(line: int | None, message: str) -> None:
        """An error that explains the others (the file was cut or changed): listed first."""
        report.error_count += 1
        report.errors.insert(0, f"line {line}: {message}" if line else message)
        del report.errors[max_errors:]

    fmt = _Format(spec)
    with _HashingFile(path) if hash_file else open(path, "rb") as stream:
        at_start = os.fstat(stream.fileno())
        header = _check_header(stream, fmt, fail)
        if header is None:
            return
        headers = (header, "\ufeff" + header)  # repeated, perhaps with its BOM
        keys = _KeyIndex()
        add_hash, add_hashes = keys.hashes.append, keys.hashes.extend
        if unique_by_database:
            add_hash = add_hashes = _ignore
        line_no = 1  # lines consumed so far (the header)
        pending = b""
        ends_open = b""  # the file's last line, when it has no line end
        while True:
            chunk = stream.read(BLOCK_BYTES)
            if chunk:
                buf = pending + chunk if pending else chunk
                if len(buf) >= MAX_LINE_BYTES:  # only a line near the limit makes such a block
                    end = buf.find(b"\n")
                    if end < 0 or end >= MAX_LINE_BYTES:
                        fail(line_no + 1, _too_long(stream, buf, end))
                        return
                cut = buf.rfind(b"\n") + 1
                if cut == 0:
                    pending = buf
                    continue
                block, pending, last = buf[:cut], buf[cut:], False
            elif pending:
                block, pending, last = pending, b"", True
                ends_open = block  # the rest after the last line end
            else:
                break
            first = line_no + 1
            text = _clean_text(block, fmt)
            rows: Iterable[Sequence[str]] | None = None
            copy_text: str | None = None
            if text is None:
                lines = _lines_slowly(block, fmt, first, last, fail)
                stripping = True
                if header in lines or headers[1] in lines:
                    _report_headers(lines, headers, first, fail)
            else:
                lines = _split_lines(text, fmt, last)
                # C-level searches; the lines are looked at one by one only when one repeats it.
                if header in text and (header in lines or headers[1] in lines):
                    _report_headers(lines, headers, first, fail)
                if not fmt.quoted and '"' not in text:
                    if copy:
                        copy_text = _bare_copy_text(text, lines, fmt, last, add_hashes)
                    else:
                        rows = _bare_rows(text, lines, fmt, last, add_hashes)
                stripping = rows is None and copy_text is None and fmt.needs_trim(text)
            if rows is None and copy_text is None:
                quotes = not fmt.quoted and (text is None or '"' in text)
                odd_keys = fmt.key is not None and (text is None or not text.isascii())
                rows = _block_rows(lines, first, fmt, stripping, quotes, odd_keys, add_hash, fail)
            line_no += len(lines)
            report.rows += len(lines)
            if report.error_count == 0:
                if not copy:
                    yield rows  # type: ignore[misc]
                elif copy_text is not None:
                    yield len(lines), copy_text
                else:
                    built = list(rows)  # type: ignore[arg-type]
                    yield len(built), _copy_text(built)
        if report.rows == 0:
            fail(None, "the file has a header (line 1) but no data rows")
        if ends_open and last_failed == line_no and _looks_cut(ends_open, fmt):
            first_fail(line_no, ENDS_MID_LINE.format(name=spec.file_name))
        elif ends_open and fmt.final_line_end:
            first_fail(line_no, ENDS_WITHOUT_LINE_END.format(name=spec.file_name))
        change = _change(at_start, os.fstat(stream.fileno()), stream.tell())
        if change:
            first_fail(None, CHANGED_WHILE_READ.format(change=change, name=spec.file_name))
        if fmt.key is not None and not unique_by_database:
            shared = keys.duplicate_hashes()
            if shared:
                _report_duplicates(stream, fmt, shared, fail)
        if isinstance(stream, _HashingFile) and stream.whole:
            report.sha256 = stream.digest.hexdigest()


def _report_headers(lines: list[str], headers: tuple[str, str], first: int, fail: Fail) -> None:
    """Name each line of a block that repeats the header (the block's text contains it)."""
    for offset, line in enumerate(lines):
        if line in headers:
            fail(first + offset, REPEATED_HEADER)


def _looks_cut(line: bytes, fmt: _Format) -> bool:
    """Could this last line, with no line end, be the start of a longer line? (the file was
    read while it was being written): it ends with a CR, inside a UTF-8 character or a quoted
    value, or holds fewer fields than the format has."""
    if line.endswith(b"\r"):
        return True
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.reason == "unexpected end of data":
            return True
        text = line.decode("utf-8", "replace")
    if not text.strip(fmt.trim):
        return False  # a blank line: wrong, but not the start of a row
    if not fmt.quoted:
        return text.count(fmt.d) < fmt.n - 1 and fmt.other_delimiter(text) is None
    if text.count('"') % 2:
        return True
    fields, _ = fmt.split_quoted(text)
    return text.endswith(fmt.d) if fields is None else len(fields) < fmt.n


def _change(before: os.stat_result, after: os.stat_result, read: int) -> str:
    """How the open file changed while it was read, in words ("" if it did not)."""
    if after.st_size != before.st_size:
        return f"its size went from {before.st_size:,} to {after.st_size:,} bytes"
    if read != before.st_size:
        return f"{read:,} bytes were read from a file of {before.st_size:,} bytes"
    if after.st_mtime_ns != before.st_mtime_ns:
        return "it was written to while it was read"
    return ""


def _ignore(_hashes: object) -> None:
    """Key hashes nobody needs (the database checks uniqueness): not even computed."""


def iter_row_blocks(
    path: Path,
    spec: Spec,
    report: ValidationReport,
    max_errors: int = 20,
    unique_by_database: bool = False,
    hash_file: bool = False,
) -> Iterator[Iterable[Sequence[str]]]:
    """The rows of each 32 KiB block, while the file is clean so far.

    The same single pass as :func:`iter_rows`, for a bulk loader that wants whole blocks.
    With ``hash_file``, ``report.sha256`` is the file's SHA-256 once the last block is out.
    """
    blocks = _blocks(path, spec, report, max_errors, False, unique_by_database, hash_file)
    return blocks  # type: ignore[return-value]


def iter_copy_blocks(
    path: Path,
    spec: Spec,
    report: ValidationReport,
    max_errors: int = 20,
    unique_by_database: bool = False,
    hash_file: bool = False,
) -> Iterator[tuple[int, str]]:
    """(row count, text) per 32 KiB block in PostgreSQL ``COPY ... FROM STDIN`` text format
    (tab-separated, LF, backslash escapes), validating exactly as :func:`iter_rows` does.

    For a clean block of an unquoted file that needs no trimming and holds no backslash
    the text is the file's own text (delimiter and line ends swapped if they differ): no
    value is split out or joined again, so the database, not Python, sets the pace.
    """
    blocks = _blocks(path, spec, report, max_errors, True, unique_by_database, hash_file)
    return blocks  # type: ignore[return-value]


def _bare_copy_text(
    text: str, lines: list[str], fmt: _Format, last: bool, add_hashes: Callable[..., None]
) -> str | None:
    """A clean, quote-free block as COPY text without splitting values, or None when any
    line needs a closer look (field count, blank line, empty or odd key, spaces to trim,
    characters to escape)."""
    n, d = fmt.n, fmt.d
    if n > 1:
        counts = list(map(str.count, lines, repeat(d)))
        if counts.count(n - 1) != len(counts):
            return None
    elif not all(lines):
        return None  # a blank line
    if "\\" in text or (d != "\t" and "\t" in text) or fmt.needs_trim(text):
        return None
    if fmt.key is not None:
        k, t = fmt.key, fmt.t
        if add_hashes is _ignore and n > 1 and k in (0, n - 1) and text.isascii():
            # Only emptiness to check, and the key is at a line's edge: C-level searches.
            if k == 0:
                empty = text.startswith(d) or t + d in text
            else:
                empty = d + t in text or (last and text.endswith(d))
            if empty:
                return None
        else:
            if n == 1:
                keys = lines
            else:
                keys = list(map(itemgetter(k), map(str.split, lines, repeat(d), repeat(k + 1))))
            if not all(keys) or (not text.isascii() and _any_odd_key(keys)):
                return None
            add_hashes(map(hash, keys))
    if fmt.t != "\n":
        text = text.replace(fmt.t, "\n")
    if d != "\t":
        text = text.replace(d, "\t")
    if last:
        text += "\n"
    return text


def _copy_value(value: str) -> str:
    return (
        value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    )


def _copy_text(rows: list[Sequence[str]]) -> str:
    """Rows in COPY text format, escaping only when a value needs it."""
    text = "\n".join(["\t".join(row) for row in rows]) + "\n" if rows else ""
    width = len(rows[0]) if rows else 0
    if "\\" in text or "\r" in text or text.count("\t") != len(rows) * (width - 1):
        text = "".join("\t".join(map(_copy_value, row)) + "\n" for row in rows)
    return text


def iter_rows(
    path: Path,
    spec: Spec,
    report: ValidationReport,
    max_errors: int = 20,
    unique_by_database: bool = False,
) -> Iterator[Sequence[str]]:
    """Yield each data row's (trimmed) values while validating; record problems in ``report``.

    One pass; rows stop coming after the first problem (from the block it is in), but the
    file is still read to the end to count and report every problem. Check ``report.ok``
    after the last row. Rows come out of C-level chaining of whole blocks: no Python frame
    per row between the file and the database driver.
    """
    blocks = iter_row_blocks(path, spec, report, max_errors, unique_by_database)
    return chain.from_iterable(blocks)


def validate_file(path: Path, spec: Spec, max_errors: int = 20) -> ValidationReport:
    """Check a whole file against its spec without loading it (the on-arrival pre-check)."""
    report = ValidationReport(file_name=Path(path).name)
    for _ in iter_row_blocks(path, spec, report, max_errors):
        pass  # a block is fully checked before it is handed out; its rows need not be made
    return report
