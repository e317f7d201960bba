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
  UNIQUE index refuses a duplicate, and only then is the file validated again in full.

Rows are tuples of str, yielded only while the file is clean so far (a block holding an
error yields nothing): once an error is found the rest is still checked (to count and report
errors) but no more rows are handed to the loader, which rolls back when ``report.ok`` is
False at the end.
"""

from __future__ import annotations

import hashlib
import io
import re
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


_QUOTED = re.compile(r"'(?:[^'\\\n]|\\.)*'" + r'|"(?:[^"\\\n]|\\.)*"')  # Python reprs


def without_values(message: str) -> str:
    """A validation message for the operators' log and e-mail: every value quoted from the
    file (by :func:`_shown`) becomes '…'. The values themselves (a duplicated ID, say) stay
    in the client's own folder log, where they help; file contents go to no other log."""
    return _QUOTED.sub("'…'", message)


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
                    f"field {number} opens a quote that is never closed (and the approved "
                    "format quotes no field)"
                )
        return fields, ""

    def fields_or_problem(self, line: str) -> tuple[list[str] | None, str]:
        """Exact parse of one line with the reason it is wrong, if it is."""
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
            if line == "":
                return None, f"the line is empty (expected {self.n} fields)"
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
    needs a closer look (a wrong field count, an empty key).

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
    if fmt.key is not None:
        keys = fields[fmt.key :: n]
        if not all(keys):
            return None
        add_hashes(map(hash, keys))
    return zip(*[iter(fields)] * n, strict=False)


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


def _check_header(stream: BinaryIO, fmt: _Format, fail: Fail) -> bool:
    """Check line 1; False when the file cannot be checked further (nothing to load)."""
    spec = fmt.spec
    first = stream.readline(MAX_LINE_BYTES)
    has_bom = first.startswith(BOM)
    if has_bom:
        first = first[len(BOM) :]
    if not first:
        fail(None, "the file is empty")
        return False
    if has_bom and not spec.bom:
        fail(1, "the file starts with a UTF-8 byte order mark (BOM); the approved format has none")
    elif spec.bom and not has_bom:
        fail(1, "the file lacks the UTF-8 byte order mark (BOM) that the approved format has")
    if first.endswith(b"\r\n"):
        text, terminator = first[:-2], "\r\n"
    elif first.endswith(b"\n"):
        text, terminator = first[:-1], "\n"
    elif len(first) >= MAX_LINE_BYTES:
        fail(1, f"no line end in the first {MAX_LINE_BYTES >> 20} MiB (is this a text file?)")
        return False
    else:
        text, terminator = first, None
    try:
        header = text.decode("utf-8")
    except UnicodeDecodeError as exc:
        fail(1, _bad_byte(text, exc))
        return False
    if terminator is not None and terminator != fmt.t:
        fail(
            1,
            f"lines end with {TERMINATOR_NAMES[terminator]}; the approved format ends every "
            f"line with {fmt.t_name}",
        )
        return False
    if "\r" in header:
        fail(1, "contains a carriage return (CR) inside the row (mixed line ends?)")
        return False
    fields, problem = fmt.fields_or_problem(header)
    if fields is None and (fmt.other_delimiter(header) or "fields, expected" not in problem):
        fail(1, f"header: {problem}")
        return False
    if fields is None:  # a wrong column count: say which columns differ
        fields, _ = fmt.split_quoted(header) if fmt.quoted else (header.split(fmt.d), "")
        fields = fields or [header]
    difference = header_difference(tuple(fields), spec.columns)
    if difference:
        fail(1, difference)
        return False
    if terminator is None:
        fail(None, "the file has a header (line 1) but no data rows")
        return False
    return True


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
    first_line: dict[str, int] = {}
    key = fmt.key
    assert key is not None
    for number, raw in enumerate(stream, 2):
        text = raw.decode("utf-8", "replace").rstrip("\r\n")
        fields, _ = fmt.fields_or_problem(text)
        if fields is None:
            continue
        value = fields[key].strip(fmt.trim)
        if not value or hash(value) not in shared:
            continue
        if value in first_line:
            fail(
                number,
                f"duplicate key {fmt.spec.key_column} {_shown(value)} "
                f"(also on line {first_line[value]}; each row needs its own)",
            )
        else:
            first_line[value] = number


def _block_rows(
    lines: list[str],
    first: int,
    fmt: _Format,
    stripping: bool,
    checks_quotes: bool,
    add_hash: Callable[[int], None],
    fail: Fail,
) -> list[list[str]]:
    """Check one block's lines (the hot loop) and return their rows; errors go to ``fail``."""
    rows: list[list[str]] = []
    add = rows.append
    k, n, d, trim, sep, two_n = fmt.key, fmt.n, fmt.d, fmt.trim, fmt.quoted_sep, fmt.two_n
    quoted = fmt.quoted
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
            good = len(fields) == n and not (checks_quotes and '"' in line)
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

    def fail(line: int | None, message: str) -> None:
        report.error_count += 1
        if len(report.errors) < max_errors:
            report.errors.append(f"line {line}: {message}" if line else message)

    fmt = _Format(spec)
    with _HashingFile(path) if hash_file else open(path, "rb") as stream:
        if not _check_header(stream, fmt, fail):
            return
        keys = _KeyIndex()
        add_hash, add_hashes = keys.hashes.append, keys.hashes.extend
        if unique_by_database:
            add_hash = add_hashes = _ignore
        line_no = 1  # lines consumed so far (the header)
        pending = b""
        while True:
            chunk = stream.read(BLOCK_BYTES)
            if chunk:
                buf = pending + chunk if pending else chunk
                cut = buf.rfind(b"\n") + 1
                if cut == 0:
                    pending = buf
                    if len(pending) > MAX_LINE_BYTES:
                        fail(line_no + 1, f"longer than {MAX_LINE_BYTES >> 20} MiB (no line end)")
                        return
                    continue
                block, pending, last = buf[:cut], buf[cut:], False
            elif pending:
                block, pending, last = pending, b"", True
            else:
                break
            first = line_no + 1
            text = _clean_text(block, fmt)
            rows: Iterable[Sequence[str]] | None = None
            copy_text: str | None = None
            if text is None:
                lines = _lines_slowly(block, fmt, first, last, fail)
                stripping = True
            else:
                lines = _split_lines(text, fmt, last)
                if not fmt.quoted and '"' not in text:
                    if copy:
                        copy_text = _bare_copy_text(text, lines, fmt, last, add_hashes)
                    else:
                        rows = _bare_rows(text, lines, fmt, last, add_hashes)
                stripping = rows is None and copy_text is None and fmt.needs_trim(text)
            if rows is None and copy_text is None:
                quotes = not fmt.quoted and (text is None or '"' in text)
                rows = _block_rows(lines, first, fmt, stripping, quotes, add_hash, fail)
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
        if fmt.key is not None and not unique_by_database:
            shared = keys.duplicate_hashes()
            if shared:
                _report_duplicates(stream, fmt, shared, fail)
        if isinstance(stream, _HashingFile) and stream.whole:
            report.sha256 = stream.digest.hexdigest()


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
    line needs a closer look (field count, empty key, spaces to trim, characters to escape)."""
    n, d = fmt.n, fmt.d
    if n > 1:
        counts = list(map(str.count, lines, repeat(d)))
        if counts.count(n - 1) != len(counts):
            return None
    if "\\" in text or (d != "\t" and "\t" in text) or fmt.needs_trim(text):
        return None
    if fmt.key is not None:
        k, t = fmt.key, fmt.t
        if add_hashes is _ignore and n > 1 and k in (0, n - 1):
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
            if not all(keys):
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
