"""The pool file of deferred-fetch accounts: active applicant UUUIDs, one per line.

Format (Terra Dotta's): one column, no header, CRLF line ends. The file is written under a
hidden temporary name in the same folder, fsync'ed and renamed into place, so a client never
downloads half a file. Each scheduled publish happens once per cluster of nodes
(:mod:`loader.claims`). Where the IDs come from is a setting: the service table that
``ingestctl pool import`` fills (default), named by
``db.service_table_name('pool_applicants')`` (``sis_ingest.pool_applicants`` on PostgreSQL,
``ingest_pool_applicants`` on SQLite), or a SQL query against any database URL
(``pool.source = "query"``; the query may use ``:account``).

What an applicant ID may be (issue 11), whatever the source: 1 to 64 ASCII letters, digits,
``-``, ``_`` and ``.``, starting with a letter or a digit. So an ID is one token to every
reader of the pool file: no delimiter or quote a CSV reader would split on (``A,1``,
``"A2"``), no leading ``=``, ``+``, ``-`` or ``@`` a spreadsheet would run as a formula
(``=cmd|x``), no space, no Unicode look-alike, never the folder log's ``-``. An import file
breaking the rule is refused whole, with every bad line (the first 20) and the count.
The pool file lists the IDs in the order the source gives them: a query's own ORDER BY;
for the table, the order of the imported file (:meth:`SisDB.applicants`; a list imported
before the table kept that order comes in the order of its IDs until imported again).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import create_engine, text

from ingest_core import folder_log, metrics
from ingest_core.durable_files import replace_file
from ingest_core.errors import NotFound, Refused
from ingest_core.folders import POOL_FILE_NAME, POOL_TEMP_PREFIX, AccountFolder, account_folder
from ingest_core.registry import Registry
from ingest_core.settings import Settings
from ingest_core.structured_log import get_logger, log_limits
from loader.claims import FAILED, OK, POOL, job_turn
from loader.notify import notify_failure, operators_notice
from loader.sis_db import open_sis_db

MAX_ID_LENGTH = 64
ID_RULE = (
    f"1 to {MAX_ID_LENGTH} ASCII letters, digits, '-', '_' and '.', starting with a letter "
    "or a digit"
)
_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_ID_LENGTH - 1}}}")
MAX_REPORTED_LINES = 20


@dataclass(frozen=True)
class PoolResult:
    account: str
    ok: bool
    count: int
    path: str
    message: str
    # Not published here: "NAME: already done by NODE at TIME" / "NAME: running on NODE since
    # TIME" (another node's publish of the same run; nothing was written).
    skipped: str = ""


@dataclass(frozen=True)
class PoolView:
    account: str
    deferred_fetch: bool
    source: str
    ids_in_source: int | None
    imported_at: str | None  # the table source: when the IDs were last imported
    pool_file: str
    published: bool
    published_at: str | None
    ids_in_file: int | None


def id_problem(value: str) -> str | None:
    """What is wrong with an applicant ID, in words; None if it follows :data:`ID_RULE`."""
    if _ID.fullmatch(value):
        return None
    if not value:
        return "is empty"
    if len(value) > MAX_ID_LENGTH:
        return f"has {len(value)} characters, more than {MAX_ID_LENGTH}"
    bad = next((c for c in value if not (c.isascii() and (c.isalnum() or c in "._-"))), None)
    if bad is not None:
        shown = "a space" if bad == " " else repr(bad)
        return f"contains {shown}"
    return f"starts with {value[0]!r}"


def check_uuuid(value: str, where: str) -> str:
    """An applicant ID is one plain token (it becomes one CRLF line of the pool file)."""
    problem = id_problem(value)
    if problem is not None:
        raise Refused(f"{where}: applicant ID {value!r} {problem}; an ID is {ID_RULE}")
    return value


def read_id_file(path: Path) -> list[str]:
    """IDs from an import file, in the file's order: one per line (LF or CRLF), spaces around
    an ID and blank lines ignored. Every line that breaks the rule (or repeats an ID) is
    reported at once, the first :data:`MAX_REPORTED_LINES` of them, so one import fixes all."""
    if path.is_dir():
        raise Refused(f"{path}: is a folder, not a file; name the file of applicant IDs")
    if not path.is_file():
        raise NotFound(f"{path}: file not found")
    seen: dict[str, int] = {}
    problems: list[str] = []
    count = 0

    def bad(number: int, what: str) -> None:
        nonlocal count
        count += 1
        if len(problems) < MAX_REPORTED_LINES:
            problems.append(f"line {number}: {what}")

    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                bad(number, "not valid UTF-8")
                continue
            value = line.rstrip("\r\n").strip()
            if not value:
                continue
            problem = id_problem(value)
            if problem is not None:
                bad(number, f"applicant ID {value!r} {problem}")
            elif value in seen:
                bad(number, f"applicant ID {value!r} repeats line {seen[value]}")
            else:
                seen[value] = number
    if count:
        more = f"; and {count - len(problems):,} more" if count > len(problems) else ""
        lines = "line" if count == 1 else "lines"
        raise Refused(
            f"{path.name}: nothing imported, {count:,} {lines} to fix (an applicant ID is "
            f"{ID_RULE}, and each appears once): " + "; ".join(problems) + more
        )
    return list(seen)


def _require_deferred(settings: Settings, account: str) -> None:
    view = Registry(settings).get_account(account)
    if not view.deferred_fetch:
        raise Refused(
            f"account {account!r} is not a deferred-fetch account; only those get a pool file "
            "(create it with --deferred-fetch)"
        )


def import_ids(settings: Settings, account: str, path: Path) -> int:
    """Replace the account's applicant IDs in the SIS database from a file (one per line)."""
    _require_deferred(settings, account)
    ids = read_id_file(Path(path))
    count = open_sis_db(settings.sis_db_url).replace_applicants(account, ids)
    log = get_logger(settings.log_dir, "loader", **log_limits(settings))
    log.info("pool_imported", account=account, count=count)
    return count


def source_ids(settings: Settings, account: str) -> Iterator[str]:
    """The account's active applicant IDs from the configured source, validated."""
    if settings.pool.source == "table":
        db = open_sis_db(settings.sis_db_url)
        if db.applicants_imported(account) is None:
            # An empty pool file would tell the client "no active applicants", which nobody
            # said: refuse (and notify) until the list is set up.
            raise Refused(
                f"no applicant list has been imported for account {account!r} yet; import "
                f"one with: ingestctl pool import {account} FILE (an empty file says there are "
                "no active applicants)"
            )
        ids: Iterable[object] = db.applicants(account)
        yield from (check_uuuid(str(v), "pool table") for v in ids)
        return
    engine = create_engine(settings.pool.query_url)
    try:
        with engine.connect() as conn:
            query = text(settings.pool.query)
            params = {"account": account} if ":account" in settings.pool.query else {}
            for row in conn.execute(query, params):
                if row[0] is None:
                    continue
                yield check_uuuid(str(row[0]).strip(), "pool query")
    finally:
        engine.dispose()


def write_pool_file(folder: AccountFolder, ids: Iterable[str]) -> tuple[Path, int]:
    """Write the pool file atomically (temp name + fsync + rename); returns (path, count).
    Temporary pool files a killed publish left behind go first."""
    folder.remove_stale(POOL_TEMP_PREFIX)
    count = 0

    def lines() -> Iterator[bytes]:
        nonlocal count
        for uuuid in ids:
            yield uuuid.encode("utf-8") + b"\r\n"
            count += 1

    replace_file(folder.pool_file, lines(), folder.pool_temp(secrets.token_hex(6)))
    return folder.pool_file, count


def publish_pool(
    settings: Settings, account: str, now: datetime | None = None, run_key: str | None = None
) -> PoolResult:
    """Publish one account's pool file and log it, once per cluster (:mod:`loader.claims`:
    ``run_key`` is the scheduled run's local date, None for a manual publish); a failure keeps
    the previous pool file."""
    with job_turn(settings, POOL, account, run_key) as turn:
        if not turn.run:
            folder = account_folder(settings, account)
            return PoolResult(account, True, 0, str(folder.pool_file), turn.skipped, turn.skipped)
        result = _publish(settings, account, now)
        turn.outcome = OK if result.ok else FAILED
        return result


def _publish(settings: Settings, account: str, now: datetime | None) -> PoolResult:
    log = get_logger(settings.log_dir, "loader", **log_limits(settings))
    folder = account_folder(settings, account)
    when = now or datetime.now(settings.zone)
    try:
        folder_log.check_writable(folder)  # a pool file the log cannot report is not written
        seen: set[str] = set()
        unique = (v for v in source_ids(settings, account) if not (v in seen or seen.add(v)))
        path, count = write_pool_file(folder, unique)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        kept = (
            "the previous pool file stays"
            if folder.pool_file.is_file()
            else "no pool file has been published yet"
        )
        detail = (
            f"the pool file was not updated (a problem on our side; "
            f"{operators_notice(settings)}); {kept}"
        )
        log.error("pool_failed", account=account, error=error)
        try:
            folder_log.append(folder, settings.zone, "ERROR", POOL_FILE_NAME, detail, when)
        except OSError as log_error:  # the same full disk, say: the operators still hear
            log.error("folder_log_failed", account=account, error=str(log_error))
        notify_failure(settings, "Pool publish", account, POOL_FILE_NAME, error, when)
        metrics.pool_published(False)
        return PoolResult(account, False, 0, str(folder.pool_file), error)
    folder_log.append(
        folder, settings.zone, "POOL", POOL_FILE_NAME, f"{count:,} active applicant IDs", when
    )
    log.info("pool_published", account=account, count=count)
    metrics.pool_published(True)
    return PoolResult(account, True, count, str(path), f"{count:,} active applicant IDs")


def pool_accounts(settings: Settings, names: list[str] | None = None) -> list[str]:
    """The named accounts (each must be deferred-fetch), or every active deferred-fetch one."""
    if names:
        for name in names:
            _require_deferred(settings, name)
        return list(dict.fromkeys(names))
    return [
        a.name
        for a in Registry(settings).list_accounts()
        if a.status == "active" and a.deferred_fetch
    ]


def publish_pools(settings: Settings, names: list[str] | None = None) -> list[PoolResult]:
    return [publish_pool(settings, name) for name in pool_accounts(settings, names)]


def show_pool(settings: Settings, account: str) -> PoolView:
    deferred_fetch = Registry(settings).get_account(account).deferred_fetch
    folder = account_folder(settings, account)
    in_source: int | None = None
    imported_at: str | None = None
    source = f"query on {_safe_url(settings.pool.query_url)}"
    if settings.pool.source == "table":
        db = open_sis_db(settings.sis_db_url)
        source = f"table {db.service_table_name('pool_applicants')}"
        imported = db.applicants_imported(account)
        if imported is not None:
            in_source = db.applicant_count(account)
            imported_at = imported.astimezone(settings.zone).isoformat(timespec="seconds")
    published_at = None
    in_file = None
    if folder.pool_file.is_file():
        stat = folder.pool_file.stat()
        published_at = datetime.fromtimestamp(stat.st_mtime, settings.zone).isoformat(
            timespec="seconds"
        )
        with open(folder.pool_file, "rb") as handle:
            in_file = sum(1 for _ in handle)
    return PoolView(
        account=account,
        deferred_fetch=deferred_fetch,
        source=source,
        ids_in_source=in_source,
        imported_at=imported_at,
        pool_file=str(folder.pool_file),
        published=published_at is not None,
        published_at=published_at,
        ids_in_file=in_file,
    )


def _safe_url(url: str) -> str:
    """A database URL without its password (settings may carry one)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(unparsable URL)"
