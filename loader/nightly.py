"""The nightly run: for each account and approved spec, validate, load, commit, then delete.

Rules that matter (issue 4):
- the file is deleted only after the load committed, and only if the name still points at the
  very file that was loaded (a newer upload that landed meanwhile stays for the next run);
- a refused or failed load leaves the database and the file as they were;
- files still being uploaded never show up here (``AccountFolder.candidate_files``);
- a file whose name is not usable (not UTF-8, or holding control characters: an operator can
  copy any name in) gets one escaped line in the folder log and is skipped; it never stops
  the account's run and does not by itself make the run fail;
- one run per account at a time (an fcntl lock on ``folders.lock_path``), and one account's
  failure never stops the others.

:func:`load_file` is the "validate + load + swap" of one file with nothing else around it
(no lock, no delete, no folder log): the benchmark and the tests call it directly.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from itertools import chain
from pathlib import Path

from ingest_core import folder_log
from ingest_core.durable_files import fsync_folder
from ingest_core.errors import Refused
from ingest_core.file_names import (
    UNUSABLE_NAME_REASON,
    escape_for_operator,
    undecodable_or_control,
)
from ingest_core.folders import account_folder, lock_path
from ingest_core.registry import Registry
from ingest_core.settings import Settings
from ingest_core.structured_log import get_logger, log_limits
from loader.notify import notify_failure
from loader.sis_db import (
    FAILED,
    LOADED,
    NO_FILE,
    REFUSED,
    SisDB,
    SwapAborted,
    open_sis_db,
)
from loader.spec import Spec, closest_spec_hint, match_spec, specs_for, table_name
from loader.validate import (
    ValidationReport,
    iter_copy_blocks,
    iter_row_blocks,
    validate_file,
    without_values,
)

HASH_BLOCK = 1 << 20

# progress(account, file_name, rows_so_far)
Progress = Callable[[str, str, int], None]


@dataclass(frozen=True)
class FileIdentity:
    """What a path pointed at: a different inode, size or mtime means a different file."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileIdentity:
        st = os.stat(path)
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def same_inode(self, other: FileIdentity) -> bool:
        return (self.device, self.inode) == (other.device, other.inode)


@dataclass(frozen=True)
class LoadResult:
    """The outcome of one file's validate + load + swap."""

    account: str
    spec_file: str
    file_name: str
    table: str
    status: str  # loaded | refused | failed
    rows: int
    sha256: str
    message: str  # for the client's folder log: what was wrong and what to do
    load_id: int | None = None
    internal_error: str = ""  # for operators only (structlog, e-mail), never the folder log
    identity: FileIdentity | None = None
    replaced_during_load: bool = False

    @property
    def ok(self) -> bool:
        return self.status == LOADED


@dataclass(frozen=True)
class FileOutcome:
    """One line of an account's run, as it went into the folder log."""

    status: str  # LOADED | NO FILE | ERROR
    file_name: str  # escaped: any name the folder held, safe to show and to log
    detail: str
    rows: int = 0
    # False for a file skipped for its name alone: the client is told, but no load failed.
    fails_run: bool = True


@dataclass
class AccountResult:
    account: str
    outcomes: list[FileOutcome] = field(default_factory=list)
    busy: bool = False
    crashed: str = ""

    @property
    def ok(self) -> bool:
        return (
            not self.busy
            and not self.crashed
            and all(o.status != "ERROR" or not o.fails_run for o in self.outcomes)
        )

    def summary(self) -> str:
        """One line for operators, control characters escaped (file names can hold any)."""
        if self.busy:
            text = f"{self.account}: skipped, another load of this account is running"
        elif self.crashed:
            text = f"{self.account}: FAILED ({self.crashed})"
        elif not self.outcomes:
            text = f"{self.account}: nothing to do (no approved file spec and no file)"
        else:
            parts = [f"{o.status} {o.file_name} {o.detail}" for o in self.outcomes]
            text = f"{self.account}: " + "; ".join(parts)
        return escape_for_operator(text)


@dataclass
class _ValidatedFile:
    """The file for :meth:`SisDB.replace_table`, validated into ``report`` as it is read, and
    hashed in the same pass."""

    path: Path
    spec: Spec
    report: ValidationReport
    max_errors: int
    everything_reported: bool = False
    _sha256: str | None = None

    def rows(self) -> Iterator[Sequence[str]]:
        blocks = iter_row_blocks(self.path, self.spec, self.report, self.max_errors, True, True)
        return chain.from_iterable(blocks)

    def copy_blocks(self) -> Iterator[tuple[int, str]]:
        return iter_copy_blocks(self.path, self.spec, self.report, self.max_errors, True, True)

    def sha256(self) -> str:
        """The file's SHA-256: from the load's own pass when it read the whole file, else
        (a load cut short) from reading the file now; "" if it cannot be read."""
        if self._sha256 is None:
            self._sha256 = self.report.sha256
            if not self._sha256:
                with contextlib.suppress(OSError):
                    self._sha256 = file_sha256(self.path)
        return self._sha256

    def report_everything(self) -> None:
        """The load is refused: read the file once more, checking everything including the
        key's uniqueness (left to the database's UNIQUE index on the way), so the message
        lists every problem as the pre-check does."""
        if self.everything_reported:
            return
        full = validate_file(self.path, self.spec, self.max_errors)
        self.report.errors[:] = full.errors
        self.report.error_count = full.error_count
        self.everything_reported = True


def error_text(exc: BaseException) -> str:
    """An exception as one short, escaped line for operators (its text can quote a path)."""
    return escape_for_operator(f"{type(exc).__name__}: {exc}".splitlines()[0][:500])


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _guard_message(rows: int, last_rows: int, share: float, last_when: datetime, zone) -> str:
    day = last_when.astimezone(zone).date().isoformat()
    return (
        f"not loaded: the file has {rows:,} data rows, less than {share:.0%} of the "
        f"{last_rows:,} rows loaded on {day}; a shortened export would wipe data. Check the "
        "export; if the drop is expected, ask the operator to load it once with --force"
    )


def load_file(
    settings: Settings,
    spec: Spec,
    path: Path,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
    db: SisDB | None = None,
) -> LoadResult:
    """Validate ``path`` against ``spec`` while loading it, and swap it in if all is well.

    Never deletes the file and never writes the folder log. The row-count guard compares
    with the last successful load of the same account and spec, unless ``force``.
    """
    db = db or open_sis_db(settings.sis_db_url)
    table = table_name(spec)
    before = FileIdentity.of(path)
    last = db.last_loaded(spec.account, spec.file_name)
    load_id = db.begin_load(spec.account, spec.file_name, table, path.name, None)
    report = ValidationReport(file_name=path.name)
    source = _ValidatedFile(path, spec, report, settings.loader.max_reported_errors)
    replaced = False

    def before_swap(count: int) -> str:
        nonlocal replaced
        if not report.ok:
            source.report_everything()
            raise SwapAborted(f"not loaded: {report.summary()}")
        now = FileIdentity.of(path) if path.exists() else None
        if now is not None and now.same_inode(before) and now != before:
            raise SwapAborted(
                "not loaded: the file changed while it was being loaded (was it still being "
                "written?); upload it to a temporary name and rename it when complete"
            )
        replaced = now is None or not now.same_inode(before)
        if replaced:
            # We may have read either copy: refuse this one, the caller retries the new one.
            raise SwapAborted(
                "not loaded: a newer copy of the file arrived during the load; it stays in the "
                "folder and will be loaded at the next run"
            )
        share = settings.loader.min_row_share
        if not force and last is not None and last.rows and count < share * last.rows:
            raise SwapAborted(_guard_message(count, last.rows, share, last.started, settings.zone))
        return source.sha256()

    def result(status: str, count: int, message: str, internal: str = "") -> LoadResult:
        return LoadResult(
            account=spec.account,
            spec_file=spec.file_name,
            file_name=path.name,
            table=table,
            status=status,
            rows=count,
            sha256=source.sha256(),
            message=message,
            load_id=load_id,
            internal_error=internal,
            identity=before,
            replaced_during_load=replaced,
        )

    try:
        count = db.replace_table(
            load_id, table, spec.columns, spec.key_column, source, before_swap, progress
        )
    except SwapAborted as exc:
        db.finish_load(load_id, REFUSED, report.rows, str(exc), source.sha256())
        return result(REFUSED, report.rows, str(exc))
    except Exception as exc:
        internal = error_text(exc)
        if not report.ok:  # the validator's own refusal surfaced through the driver
            source.report_everything()
            message = f"not loaded: {report.summary()}"
            db.finish_load(load_id, REFUSED, report.rows, message, source.sha256())
            return result(REFUSED, report.rows, message)
        db.finish_load(load_id, FAILED, report.rows, internal, source.sha256())
        message = (
            "not loaded: the SIS database could not be updated (a problem on our side; the "
            "operators were notified); the file stays and will be loaded at the next run"
        )
        return result(FAILED, report.rows, message, internal)
    return result(LOADED, count, f"{count:,} rows imported")


@contextmanager
def account_lock(settings: Settings, account: str) -> Iterator[bool]:
    """Hold the account's run lock if free; yields False if another run holds it."""
    path = lock_path(settings, account)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _identity(path: Path) -> FileIdentity | None:
    """What ``path`` points at now (None: nothing)."""
    try:
        return FileIdentity.of(path)
    except FileNotFoundError:
        return None


def _delete_if_same(path: Path, identity: FileIdentity | None) -> bool:
    """Delete the loaded file, unless the name now points at a newer upload."""
    if identity is None or _identity(path) != identity:
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    fsync_folder(path.parent)
    return True


def run_account(
    settings: Settings,
    account: str,
    force: bool = False,
    progress: Progress | None = None,
    now: Callable[[], datetime] | None = None,
) -> AccountResult:
    """One account's nightly run. Never raises for a bad file or a database failure."""
    log = get_logger(settings.log_dir, "loader", **log_limits(settings))
    result = AccountResult(account)
    clock = now or _now(settings)
    try:
        with account_lock(settings, account) as got:
            if not got:
                result.busy = True
                log.warning("load_skipped_busy", account=account)
                return result
            _run_locked(settings, account, force, progress, result)
            folder_log.trim(
                account_folder(settings, account), settings.loader.log_retention_days, clock()
            )
    except Exception as exc:  # one account's crash never stops the others
        result.crashed = error_text(exc)
        report_crash(settings, account, result.crashed, clock())
    return result


def report_crash(settings: Settings, account: str, error: str, when: datetime) -> None:
    """A run that broke on our side: tell the client in words, the operators in detail."""
    log = get_logger(settings.log_dir, "loader", **log_limits(settings))
    log.error("load_crashed", account=account, error=error)
    # The folder itself may be the problem; the operators still get the e-mail.
    with contextlib.suppress(OSError):
        folder_log.append(
            account_folder(settings, account),
            settings.zone,
            "ERROR",
            "-",
            "the load stopped because of a problem on our side (the operators were notified); "
            "the SIS data and any uploaded file stay as they were",
            when,
        )
    notify_failure(settings, "Load", account, "-", error, when)


def _now(settings: Settings) -> Callable[[], datetime]:
    return lambda: datetime.now(settings.zone)


def _run_locked(
    settings: Settings,
    account: str,
    force: bool,
    progress: Progress | None,
    result: AccountResult,
) -> None:
    log = get_logger(settings.log_dir, "loader", **log_limits(settings))
    folder = account_folder(settings, account)
    zone = settings.zone
    specs = specs_for(settings, account)
    files = folder.candidate_files()
    db = open_sis_db(settings.sis_db_url)

    def line(
        status: str, file_name: str, detail: str, rows: int = 0, fails_run: bool = True
    ) -> None:
        folder_log.append(folder, zone, status, file_name, detail)
        shown = escape_for_operator(file_name)
        result.outcomes.append(FileOutcome(status, shown, detail, rows, fails_run))

    for path in files:
        if undecodable_or_control(path.name):
            shown = escape_for_operator(path.name)
            detail = (
                f"not loaded: {UNUSABLE_NAME_REASON}; the file stays in the folder and is "
                f"skipped; {closest_spec_hint(specs, shown)}"
            )
            line("ERROR", path.name, detail, fails_run=False)
            log.warning("file_name_unusable", account=account, file=shown)
            notify_failure(settings, "Load", account, shown, detail, datetime.now(zone))
        elif match_spec(specs, path.name) is None:
            detail = (
                f"not loaded: {path.name!r} is not an approved file name; "
                f"{closest_spec_hint(specs, path.name)}; the file stays in the folder"
            )
            line("ERROR", path.name, detail)
            log.warning("file_unknown", account=account, file=path.name)
            notify_failure(settings, "Load", account, path.name, detail, datetime.now(zone))

    for spec in specs:
        # Looked up at its turn, not from the listing above: a file that landed while an
        # earlier spec was loading is complete (renamed into place) and loads now.
        path = folder.root / spec.file_name
        if not path.is_file() or path.is_symlink():
            db.record(account, spec.file_name, table_name(spec), NO_FILE, "no file received")
            line("NO FILE", spec.file_name, "no file received; the SIS data stays as it was")
            log.info("load_no_file", account=account, file=spec.file_name)
            continue

        def report_rows(rows: int, name: str = spec.file_name) -> None:
            if progress is not None:
                progress(account, name, rows)

        try:
            outcome = load_file(settings, spec, path, force=force, progress=report_rows, db=db)
            if outcome.replaced_during_load and path.exists():
                log.info("load_retry_newer_copy", account=account, file=path.name)
                outcome = load_file(settings, spec, path, force=force, progress=report_rows, db=db)
        except FileNotFoundError:  # removed by the client since the folder was listed
            line("NO FILE", spec.file_name, "no file received; the SIS data stays as it was")
            log.info("load_no_file", account=account, file=spec.file_name, vanished=True)
            continue
        except Exception as exc:  # e.g. the SIS database is down: the next spec still runs
            error = error_text(exc)
            line(
                "ERROR",
                path.name,
                "not loaded: a problem on our side (the operators were notified); the file "
                "stays and will be loaded at the next run; the SIS data stays as it was",
            )
            log.error("load_failed", account=account, file=path.name, error=error)
            notify_failure(settings, "Load", account, path.name, error, datetime.now(zone))
            continue
        event = {
            "account": account,
            "file": path.name,
            "status": outcome.status,
            "rows": outcome.rows,
            "sha256": outcome.sha256,
            "load_id": outcome.load_id,
            "forced": force,
        }
        if outcome.ok:
            # The client hears first, then the file goes: if the line cannot be written (a
            # full disk) or the run dies in between, the file stays and the next run loads it
            # again and says so, rather than the night's load never reaching the log.
            detail = f"{outcome.rows:,} rows imported"
            if _identity(path) not in (outcome.identity, None):
                detail += "; a newer copy of the file arrived meanwhile and stays for the next run"
            line("LOADED", path.name, detail, outcome.rows)
            deleted = _delete_if_same(path, outcome.identity)
            log.info("load_done", deleted=deleted, **event)
            continue
        line("ERROR", path.name, f"{outcome.message}; the SIS data stays as it was")
        operators = without_values(outcome.message)  # the values stay in the client's log
        log.error("load_failed", message=operators, error=outcome.internal_error, **event)
        notify_failure(
            settings,
            "Load",
            account,
            path.name,
            outcome.internal_error or operators,
            datetime.now(zone),
        )


def accounts_to_run(settings: Settings, names: Sequence[str] | None) -> list[str]:
    """The named accounts (each must exist), or every active account."""
    registry = Registry(settings)
    if names:
        for name in names:
            registry.get_account(name)  # raises NotFound with the right words
        return list(dict.fromkeys(names))
    return [a.name for a in registry.list_accounts() if a.status == "active"]


def run_accounts(
    settings: Settings,
    names: Sequence[str] | None = None,
    force: bool = False,
    progress: Progress | None = None,
    on_account: Callable[[AccountResult], None] | None = None,
) -> list[AccountResult]:
    """Run each account in turn in this process; returns every account's result."""
    if force and not names:
        raise Refused("--force overrides the row-count guard once: name the account(s) it is for")
    results = []
    for name in accounts_to_run(settings, names):
        result = run_account(settings, name, force=force, progress=progress)
        results.append(result)
        if on_account is not None:
            on_account(result)
    return results
