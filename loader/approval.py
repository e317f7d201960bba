"""Approving a data file format: reading an approved sample into a :class:`Spec` (its
delimiter, line ends, quoting, header and key column, then the whole sample validated as
every later file will be) and freezing it in the registry (audited).

Apart from :mod:`loader.spec`, which the validator needs and which so needs nothing of it.
"""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from ingest_core.db import Account, FileSpec
from ingest_core.errors import IngestError, NotFound, Refused
from ingest_core.registry import Registry
from ingest_core.settings import Settings
from loader.sis_db import open_sis_db
from loader.spec import (
    BOM,
    DELIMITER_NAMES,
    DELIMITERS,
    MAX_HEADER_BYTES,
    Spec,
    account_row,
    check_file_name,
    check_header_names,
    spec_from_row,
    table_name,
)
from loader.validate import utf16_problem, validate_file

# -- detection ------------------------------------------------------------------------------


def _split_header(text: str, delimiter: str) -> tuple[tuple[str, ...], str]:
    """Header names and the quoting style; refuses a header that mixes quoted and bare names."""
    raw = text.split(delimiter)
    quoted = [len(f) >= 2 and f[0] == '"' and f[-1] == '"' for f in raw]
    if all(quoted):
        return tuple(f[1:-1].replace('""', '"') for f in raw), "all"
    if any(quoted) or any('"' in f for f in raw):
        raise Refused(
            "the header quotes some column names but not others; accepted: quotes on every "
            "field or on none"
        )
    return tuple(raw), "none"


def _detect_delimiter(header: str) -> str:
    counts = {d: header.count(d) for d in DELIMITERS}
    best = max(counts.values())
    if best == 0:
        return "\t"  # one column: nothing to detect; tab is Terra Dotta's format
    winners = [d for d, c in counts.items() if c == best]
    if len(winners) > 1:
        names = " and ".join(DELIMITER_NAMES[d] for d in winners)
        raise Refused(f"the header has as many {names} characters: cannot tell the delimiter")
    return winners[0]


def detect_spec(
    sample: Path, account: str, as_name: str | None = None, key: str | None = None
) -> Spec:
    """Read an approved sample and return its frozen format (refuses a sample that is not
    self-consistent, with the reason)."""
    sample = Path(sample)
    file_name = check_file_name(as_name if as_name is not None else sample.name)
    if not sample.is_file():
        raise NotFound(f"sample file {sample} not found")
    with sample.open("rb") as stream:
        first = stream.readline(MAX_HEADER_BYTES)
    where = f"sample {sample.name}"
    utf16 = utf16_problem(first)
    if utf16:
        raise Refused(f"{where}: {utf16}")
    bom = first.startswith(BOM)
    if bom:
        first = first[len(BOM) :]
    if not first:
        raise Refused(f"{where} is empty; a sample needs a header row and at least one data row")
    if first.endswith(b"\r\n"):
        terminator = "\r\n"
    elif first.endswith(b"\n"):
        terminator = "\n"
    elif b"\r" in first:  # no LF at all, before the end or within the first MiB
        raise Refused(
            f"{where}: its lines end with CR only (classic Mac OS line ends); accepted: LF or "
            "CRLF line ends"
        )
    elif len(first) >= MAX_HEADER_BYTES:
        raise Refused(f"{where}: line 1 is longer than {MAX_HEADER_BYTES} bytes")
    else:
        raise Refused(f"{where} has a header but no data rows")
    try:
        header = first[: -len(terminator)].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refused(
            f"{where}: line 1 is not valid UTF-8 (byte 0x{first[exc.start]:02X}); "
            "accepted: UTF-8 with or without BOM"
        ) from None
    if "\r" in header:
        raise Refused(f"{where}: line 1 contains a carriage return inside the row")
    delimiter = _detect_delimiter(header)
    columns, quoting = _split_header(header, delimiter)
    check_header_names(columns)
    if key is not None and key not in columns:
        raise Refused(
            f"key column {key!r} is not in the header of {sample.name} "
            f"(columns: {', '.join(columns)})"
        )
    spec = Spec(
        account=account,
        file_name=file_name,
        encoding="utf-8",
        bom=bom,
        delimiter=delimiter,
        terminator=terminator,
        quoting=quoting,
        columns=columns,
        key_column=key,
    )
    report = validate_file(sample, spec, max_errors=1)
    if not report.ok:
        more = f" (and {report.error_count - 1} more)" if report.error_count > 1 else ""
        raise Refused(f"{where}: {report.errors[0]}{more}")
    return spec


# -- the registry side ------------------------------------------------------------------------


def approve_spec(
    registry: Registry,
    account: str,
    sample: Path,
    as_name: str | None = None,
    key: str | None = None,
) -> Spec:
    """Freeze the sample's format as an approved spec of ``account`` (audited)."""
    spec = detect_spec(sample, account, as_name, key)
    table = table_name(spec)
    _check_table_is_free(registry.settings, account, spec.file_name, table)
    with registry.change() as session:
        owner = account_row(session, account)
        if any(s.file_name == spec.file_name for s in owner.specs):
            raise Refused(
                f"{account!r} already has an approved spec for {spec.file_name}; an approved "
                f"format cannot change: remove it first ('ingestctl spec remove {account} "
                f"{spec.file_name}')"
            )
        for other_account, row in session.execute(
            select(Account.name, FileSpec).join(FileSpec.account)
        ).all():
            if table_name(spec_from_row(other_account, row)) == table:
                raise Refused(
                    f"{spec.file_name} would load into table {table}, which {other_account}'s "
                    f"spec {row.file_name} already uses; approve it under another name (--as)"
                )
        row = FileSpec(
            account=owner,
            file_name=spec.file_name,
            encoding=spec.encoding,
            bom=spec.bom,
            delimiter=spec.delimiter,
            terminator=spec.terminator,
            quoting=spec.quoting,
            columns=json.dumps(list(spec.columns)),
            key_column=spec.key_column,
            approved_by=registry.actor,
        )
        session.add(row)
        session.flush()
        stored = spec_from_row(account, row)
        registry.audit(
            session,
            account,
            "spec.approve",
            file_name=spec.file_name,
            sample=str(sample),
            format=spec.describe(),
            columns=list(spec.columns),
            key_column=spec.key_column,
        )
    return stored


def _check_table_is_free(settings: Settings, account: str, file_name: str, table: str) -> None:
    """Refuse a spec whose table already exists in the SIS database with data that is not
    this account's: another account's loads (a spec since removed), or a table the loader
    never made (the institution's own). Each night's load would replace it."""
    try:
        loaders = open_sis_db(settings.sis_db_url).data_table_loaders(table)
    except SQLAlchemyError as exc:
        first_line = str(exc.orig if getattr(exc, "orig", None) else exc).splitlines()[0]
        raise IngestError(
            f"cannot check the SIS database for a table named {table} ({first_line}); "
            "approval needs the SIS database"
        ) from None
    if loaders is None or loaders == {account}:
        return
    others = sorted(loaders - {account})
    whose = (
        f"holds data loaded for {', '.join(others)}"
        if others
        else "was not made by the loader (an application's own table?)"
    )
    raise Refused(
        f"{file_name} would load into table {table}, which already exists in the SIS database "
        f"and {whose}; approve it under another name (--as)"
    )
