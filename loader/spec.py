"""Approved file specs: the data file format frozen at onboarding.

A client's data file format is approved once; any later change is refused.
``ingestctl spec approve`` reads an approved sample and freezes what it finds: the exact file
name, the encoding (UTF-8, with or without a BOM), the column delimiter (tab, comma, pipe or
semicolon), the row terminator (CRLF or LF), the quoting style, the header names in order and
an optional key column that must be present and unique in every row.

Quoting is ``"none"`` (no field is quoted; a quote character inside a value is plain data) or
``"all"`` (every field is quoted, as ``csv.writer(quoting=csv.QUOTE_ALL)`` writes it, with
``""`` for a quote inside a value). Terra Dotta's guidance is "quotes on every field or none",
so a sample that quotes only some fields ("minimal" quoting) is refused, and so is a file that
mixes the two styles later. Values never contain a line break: one row is one line.

Header names must be SQL identifiers that need no quoting anywhere: ASCII letters, digits and
underscores, starting with a letter or underscore, at most 63 characters (PostgreSQL's limit),
no SQL reserved word of SQLite or PostgreSQL, no system column name of either (PostgreSQL's
``ctid``, ``xmin``...; SQLite's ``rowid``), no duplicates (compared case-insensitively, as SQL
compares unquoted names). A header has at most 1,600 columns (PostgreSQL's limit; SQLite's is
2,000). A spec approved under these rules loads on both databases, so moving the SIS
database from SQLite to PostgreSQL never strands an approved spec.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import sqlite3
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import PurePath
from typing import Any

from sqlalchemy import select

from ingest_core.db import Account, FileSpec, open_control_db
from ingest_core.errors import NotFound, Refused
from ingest_core.file_names import client_name_refusal, escape_for_operator
from ingest_core.folders import is_data_file_name
from ingest_core.registry import Registry
from ingest_core.settings import Settings

BOM = b"\xef\xbb\xbf"
DELIMITERS = ("\t", ",", "|", ";")
DELIMITER_NAMES = {"\t": "tab", ",": "comma", "|": "pipe", ";": "semicolon"}
TERMINATOR_NAMES = {"\r\n": "CRLF", "\n": "LF"}
QUOTING = ("none", "all")
MAX_HEADER_BYTES = 1 << 20
MAX_COLUMN_NAME = 63  # PostgreSQL cuts longer names (NAMEDATALEN - 1 bytes; names are ASCII)
MAX_TABLE_NAME = 40  # loader/sis_db.py adds suffixes and PostgreSQL cuts names at 63 bytes
POSTGRES_MAX_COLUMNS = 1600  # MaxHeapAttributeNumber: CREATE TABLE refuses more


def _sqlite_max_columns() -> int:
    """SQLITE_MAX_COLUMN of the SQLite this Python links (2,000 unless compiled otherwise)."""
    probe = sqlite3.connect(":memory:")
    try:
        return probe.getlimit(sqlite3.SQLITE_LIMIT_COLUMN)
    finally:
        probe.close()


SQLITE_MAX_COLUMNS = _sqlite_max_columns()
# Both databases' limit: a spec must load on either, whichever the settings name today.
MAX_COLUMNS = min(POSTGRES_MAX_COLUMNS, SQLITE_MAX_COLUMNS)

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# System columns every table has: PostgreSQL's (manual, "System Columns"; CREATE TABLE
# refuses a column of that name) and the names of SQLite's hidden row id (a column of that
# name hides the row id from readers).
SYSTEM_COLUMNS = {
    "tableoid": "PostgreSQL",
    "xmin": "PostgreSQL",
    "cmin": "PostgreSQL",
    "xmax": "PostgreSQL",
    "cmax": "PostgreSQL",
    "ctid": "PostgreSQL",
    "rowid": "SQLite",
    "oid": "SQLite",
    "_rowid_": "SQLite",
}

# SQLite's keyword list (sqlite.org/lang_keywords.html), the system column names above, and
# PostgreSQL's reserved and "reserved (can be function or type)" key words (PostgreSQL
# manual, appendix C). A column named after any of them would need quoting in every query,
# or cannot be created at all.
SQL_RESERVED_WORDS = frozenset(
    """
    abort action add after all alter always analyze and as asc attach autoincrement before
    begin between by cascade case cast check collate column commit conflict constraint create
    cross current current_date current_time current_timestamp database default deferrable
    deferred delete desc detach distinct do drop each else end escape except exclude exclusive
    exists explain fail filter first following for foreign from full generated glob group groups
    having if ignore immediate in index indexed initially inner insert instead intersect into is
    isnull join key last left like limit match materialized natural no not nothing notnull null
    nulls of offset on or order others outer over partition plan pragma preceding primary query
    raise range recursive references regexp reindex release rename replace restrict returning
    right rollback row rows savepoint select set table temp temporary then ties to transaction
    trigger unbounded union unique update using vacuum values view virtual when where window
    with without
    rowid oid _rowid_ tableoid xmin cmin xmax cmax ctid
    analyse any array asymmetric both current_catalog current_role current_schema current_user
    fetch grant ilike lateral leading localtime localtimestamp only placing session_user some
    symmetric system_user trailing true false user variadic authorization binary collation
    concurrently freeze overlaps similar tablesample verbose
    """.split()  # noqa: SIM905 - one word list is easier to read and extend than 190 lines
)

# Names Windows reserves for devices, with any extension (Microsoft, "Naming Files, Paths,
# and Namespaces"): a client on Windows can neither create nor send a file of that name.
WINDOWS_DEVICE_NAMES = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"{port}{digit}" for port in ("COM", "LPT") for digit in "0123456789\u00b9\u00b2\u00b3"}
)
NO_FILE_MARKER = "-"  # the folder log's file field when an event concerns no file

_DATE_STAMP = re.compile(
    r"[-_.]?(?:\d{4}[-_.]?\d{2}[-_.]?\d{2}(?:[-_T]?\d{2}[-_:]?\d{2}(?:[-_:]?\d{2})?)?|\d{8,14})"
)
_TEXT_EXTENSIONS = (".txt", ".csv", ".tsv", ".tab", ".dat", ".psv", "")


@dataclass(frozen=True)
class Spec:
    """One approved data file format of one account."""

    account: str
    file_name: str
    encoding: str
    bom: bool
    delimiter: str
    terminator: str
    quoting: str
    columns: tuple[str, ...]
    key_column: str | None
    approved_at: str = field(default="", compare=False)
    approved_by: str = field(default="", compare=False)

    @property
    def key_index(self) -> int | None:
        return None if self.key_column is None else self.columns.index(self.key_column)

    def describe(self) -> str:
        """The format in words, for operators and clients' IT people."""
        bom = " with BOM" if self.bom else ""
        quotes = "every field quoted" if self.quoting == "all" else "no quotes"
        key = f", key {self.key_column}" if self.key_column else ""
        return (
            f"{DELIMITER_NAMES[self.delimiter]}-delimited, {TERMINATOR_NAMES[self.terminator]} "
            f"line ends, {quotes}, UTF-8{bom}, {len(self.columns)} columns{key}"
        )

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["columns"] = list(self.columns)
        data["table"] = table_name(self)
        return data


# -- header names ---------------------------------------------------------------------------


_NAME_RULE = "accepted: A-Z, a-z, 0-9 and '_', starting with a letter or '_', no SQL reserved words"


def header_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a column name and what is accepted, or None when it can."""
    if name == "":
        return f"a column name is empty; {_NAME_RULE}"
    if " " in name or "\t" in name:
        return f"column name {name!r} contains a space; {_NAME_RULE}"
    if not _IDENTIFIER.match(name):
        if name[0].isdigit():
            return f"column name {name!r} starts with a digit; {_NAME_RULE}"
        return (
            f"column name {name!r} contains characters other than A-Z, a-z, 0-9 and '_'; "
            f"{_NAME_RULE}"
        )
    if len(name) > MAX_COLUMN_NAME:
        return (
            f"column name {name!r} is {len(name)} characters long; accepted: at most "
            f"{MAX_COLUMN_NAME} (PostgreSQL's limit for names)"
        )
    system = SYSTEM_COLUMNS.get(name.lower())
    if system is not None:
        names = ", ".join(n for n, db in SYSTEM_COLUMNS.items() if db == system)
        return (
            f"column name {name!r} is a {system} system column (every table has {names}); "
            f"accepted: any other name, such as '{name}_value'"
        )
    if name.lower() in SQL_RESERVED_WORDS:
        return f"column name {name!r} is an SQL reserved word; {_NAME_RULE}"
    return None


def check_header_names(columns: tuple[str, ...]) -> None:
    """Refuse a header that would not make a clean SQL table on SQLite and on PostgreSQL
    (first problem found): a spec must load on either, whichever the settings name."""
    if not columns:
        raise Refused("the header row is empty")
    if len(columns) > MAX_COLUMNS:
        raise Refused(
            f"the header has {len(columns):,} columns; accepted: at most {MAX_COLUMNS:,} "
            f"(PostgreSQL's limit per table is {POSTGRES_MAX_COLUMNS:,}, SQLite's here "
            f"{SQLITE_MAX_COLUMNS:,})"
        )
    seen: dict[str, int] = {}
    for position, name in enumerate(columns, 1):
        problem = header_name_problem(name)
        if problem:
            raise Refused(f"header column {position}: {problem}")
        lowered = name.lower()
        if lowered in seen:
            raise Refused(
                f"header columns {seen[lowered]} and {position} are both named {name!r} "
                "(column names must be unique, ignoring case)"
            )
        seen[lowered] = position


def check_file_name(name: str) -> str:
    """An approved file name is a plain, visible, complete file name in the account folder."""
    if not name or PurePath(name).name != name or name in (".", ".."):
        raise Refused(f"file name {name!r} is not valid: give a plain name without folders")
    if len(name.encode("utf-8", "surrogateescape")) > 255:
        raise Refused(f"file name {name!r} is longer than 255 bytes")
    refusal = client_name_refusal(name.encode("utf-8", "surrogateescape"))
    if refusal is not None:  # a name no client could upload would never load
        raise Refused(f"file name '{escape_for_operator(name)}': {refusal}")
    if not is_data_file_name(name):
        raise Refused(
            f"file name {name!r} is reserved (hidden, partial-upload or service file names "
            "are never loaded); choose a name such as sis_hr_user_info.txt"
        )
    if name == NO_FILE_MARKER:
        raise Refused(
            f"file name {name!r} is not accepted: a lone '-' stands for 'no file' in the "
            "folder log; choose a name such as sis_hr_user_info.txt"
        )
    if windows_device_name(name):
        raise Refused(
            f"file name {name!r} is a Windows device name (CON, PRN, AUX, NUL, COM0-COM9, "
            "LPT0-LPT9, with or without an extension): Windows cannot create such a file; "
            "choose a name such as sis_hr_user_info.txt"
        )
    if name[-1] in ". ":
        raise Refused(
            f"file name {name!r} ends with a dot or a space, which Windows drops from names; "
            "choose a name that ends with a letter or digit, such as sis_hr_user_info.txt"
        )
    return name


def windows_device_name(name: str) -> bool:
    """True for a name Windows takes for a device (``CON``, ``nul.txt``, ``COM1 .csv``):
    the part before the first dot, trailing spaces dropped, compared ignoring case."""
    return name.split(".", 1)[0].rstrip(" ").upper() in WINDOWS_DEVICE_NAMES


# -- the registry side ----------------------------------------------------------------------


def spec_from_row(account: str, row: FileSpec) -> Spec:
    return Spec(
        account=account,
        file_name=row.file_name,
        encoding=row.encoding,
        bom=row.bom,
        delimiter=row.delimiter,
        terminator=row.terminator,
        quoting=row.quoting,
        columns=tuple(json.loads(row.columns)),
        key_column=row.key_column,
        approved_at=row.approved_at.isoformat(timespec="seconds"),
        approved_by=row.approved_by,
    )


def account_row(session: Any, account: str) -> Account:
    row = session.scalar(select(Account).where(Account.name == account))
    if row is None:
        raise NotFound(f"no account named {account!r} (see 'ingestctl account list')")
    return row


def specs_for(settings_or_registry: Settings | Registry, account: str) -> list[Spec]:
    """The approved specs of ``account``, oldest first (NotFound for an unknown account)."""
    if isinstance(settings_or_registry, Registry):
        db = settings_or_registry.db
    else:
        db = open_control_db(settings_or_registry.control_db_url)
    with db.session() as session:
        owner = account_row(session, account)
        return [spec_from_row(account, row) for row in owner.specs]


def remove_spec(registry: Registry, account: str, file_name: str) -> Spec:
    """Forget an approved spec (the SIS table and its data stay); audited."""
    with registry.change() as session:
        owner = account_row(session, account)
        for row in owner.specs:
            if row.file_name == file_name:
                removed = spec_from_row(account, row)
                owner.specs.remove(row)
                registry.audit(
                    session,
                    account,
                    "spec.remove",
                    file_name=file_name,
                    format=removed.describe(),
                )
                break
        else:
            names = ", ".join(s.file_name for s in owner.specs) or "none"
            raise NotFound(f"{account!r} has no approved spec for {file_name} (approved: {names})")
    return removed


# -- names ----------------------------------------------------------------------------------


def match_spec(specs: list[Spec], file_name: str) -> Spec | None:
    """The spec whose file name is exactly ``file_name`` (names are case-sensitive)."""
    for spec in specs:
        if spec.file_name == file_name:
            return spec
    return None


def _stem_and_ext(name: str) -> tuple[str, str]:
    path = PurePath(name)
    return path.stem, path.suffix


def _unicode_form(name: str) -> str:
    """The Unicode normalization form ``name`` is written in, in words."""
    if unicodedata.is_normalized("NFC", name):
        return "NFC (composed accents)"
    if unicodedata.is_normalized("NFD", name):
        return "NFD (decomposed accents, as macOS may write them)"
    return "a mix of composed and decomposed accents"


def _name_differences(file_name: str, approved: str) -> list[str]:
    """How ``file_name`` differs from ``approved`` when it is a near miss, else [].

    Names are compared in one Unicode form (``é`` as one character, NFC, or as ``e`` plus a
    combining accent, NFD), and a different form is named as a difference of its own: shown
    to a person, the two names look identical.
    """
    differences = []
    if _unicode_form(file_name) != _unicode_form(approved):
        differences.append(
            f"its Unicode form, {_unicode_form(file_name)} instead of {_unicode_form(approved)}: "
            "the names look the same but are different characters"
        )
    file_name = unicodedata.normalize("NFC", file_name)
    approved = unicodedata.normalize("NFC", approved)
    stem, ext = _stem_and_ext(file_name)
    their_stem, their_ext = _stem_and_ext(approved)
    undated = _DATE_STAMP.sub("", stem)
    if undated.lower() != their_stem.lower():
        return []
    if ext.lower() != their_ext.lower() and not (
        ext.lower() in _TEXT_EXTENSIONS and their_ext.lower() in _TEXT_EXTENSIONS
    ):
        return []
    if undated != stem:
        differences.append("a date stamp")
    if ext.lower() != their_ext.lower():
        differences.append(f"its extension, {ext or 'none'} instead of {their_ext or 'none'}")
    if undated != their_stem or (ext != their_ext and ext.lower() == their_ext.lower()):
        differences.append("upper/lower case")
    return differences


def closest_spec_hint(specs: list[Spec], file_name: str) -> str:
    """One sentence telling a client which approved name their file probably meant."""
    if not specs:
        return "no file format is approved for this account yet"
    names = [s.file_name for s in specs]
    approved = "approved names: " + ", ".join(names)
    for name in names:
        differences = _name_differences(file_name, name)
        if differences:
            said = ", ".join(differences[:-1]) + " and " if len(differences) > 1 else ""
            return (
                f"did you mean {name}? (the name differs in {said}{differences[-1]}; "
                "it must be exactly the approved name every day)"
            )
    close = difflib.get_close_matches(file_name, names, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]}? ({approved})"
    return approved


def table_name(spec: Spec) -> str:
    """The SIS table for a spec: ``sis_<account>_<file stem>``, SQL-safe, stable, <= 40 chars.

    Always ``sis`` followed by ``[a-z0-9_]`` with no ``__``: so never the name of a service
    table (their own schema on PostgreSQL, the ``ingest_`` prefix on SQLite; see
    loader/sis_db.py) nor of a staging table or key index (``__staging``, ``__key``).
    Two specs may still map to one name (``a-b`` + ``c.txt``, ``a`` + ``b-c.txt``):
    :func:`approve_spec` refuses the second.
    """
    stem = PurePath(spec.file_name).stem or spec.file_name
    raw = f"sis_{spec.account}_{stem}".lower()
    name = re.sub(r"[^a-z0-9_]+", "_", raw).strip("_")
    name = re.sub(r"_+", "_", name)
    if len(name) > MAX_TABLE_NAME:
        digest = hashlib.blake2b(
            f"{spec.account}/{spec.file_name}".encode(), digest_size=4
        ).hexdigest()
        name = f"{name[: MAX_TABLE_NAME - 9].rstrip('_')}_{digest}"
    return name
