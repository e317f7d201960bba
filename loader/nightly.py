"""The nightly run: for each account and approved spec, validate, load, commit, then delete.

Rules that matter (issue 4):
- the file is deleted only after the load committed, and only if the name still points at the
  very file that was loaded (a newer upload that landed meanwhile stays for the next run);
- a refused or failed load leaves the database and the file as they were;
- files still being uploaded never show up here (``AccountFolder.candidate_files``);
- a file whose name is not usable (not UTF-8, or holding control characters: an operator can
  copy any name in) gets one escaped line in the folder log and is skipped; it never stops
  the account's run and does not by itself make the run fail;
- one run per account at a time, and each scheduled run once per cluster of nodes
  (:mod:`loader.claims`: a lock and a claim row); a node that finds the run done or going on
  elsewhere writes nothing; one account's failure never stops the others;
- every line says what happened (issue 11): a file removed, replaced or changed in place while
  it was being loaded, or one the loader may not read, is named as such, never as valid, as
  a newer copy or as a database failure; a folder log that is not a regular file (a symbolic
  link) stops the account's run before anything is loaded, and the operators are told;
- the load history's ``message`` holds what the operators may see: values quoted from the file are
  '…' there as in e-mail; a load forced past the row-count guard says so there and in the
  client's LOADED line;
- a file under no approved name (a stray) is told to the client once per arrival: a SKIPPED
  line in the first run after it arrived (the folder log itself remembers: a SKIPPED line for
  the name written at or after the file's arrival), never a failure and never a mail. But when
  an approved file did not come and a near miss of its name did (case, extension, date stamp),
  the approved file's line is an ERROR naming the near miss, and the run fails;
- a file still in the folder ``[loader] unloaded_file_retention_days`` after it arrived (a
  stray, or a file refused every run since) is deleted: a WARNING line WARNING_DAYS before, a
  REMOVED line when it goes;
- mail, to the operators and the account's contacts, only when it matters (:func:`_alert`): the
  first refused or failed run of a spec since its last load, a feed that loaded before and
  then missed ``[alerts] missing_file_runs`` runs in a row (once per streak, with a LATE line),
  and its first load after that. Every count comes from the load history
  (:meth:`SisDB.streak`): no other state, the same on every node, and a manual
  ``ingestctl loader run`` counts as a run as the nightly one does.

:func:`load_file` is the "validate + load + swap" of one file with nothing else around it
(no lock, no delete, no folder log): the benchmark and the tests call it directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import chain
from pathlib import Path
from zoneinfo import ZoneInfo

from ingest_core import folder_log, metrics
from ingest_core.durable_files import fsync_folder
from ingest_core.errors import Refused
from ingest_core.file_names import (
    UNUSABLE_NAME_REASON,
    escape_for_operator,
    undecodable_or_control,
)
from ingest_core.folders import AccountFolder, account_folder
from ingest_core.registry import Registry
from ingest_core.settings import Settings
from ingest_core.structured_log import get_logger, log_limits
from loader.claims import LOAD, job_lock, job_turn
from loader.key_expiry import send_key_reminders
from loader.notify import notify_failure, notify_late, notify_resumed
from loader.sis_db import (
    FAILED,
    LOADED,
    NO_FILE,
    REFUSED,
    LoadChanges,
    SisDB,
    Streak,
    SwapAborted,
    open_sis_db,
)
from loader.spec import (
    Spec,
    _name_differences,
    closest_spec_hint,
    match_spec,
    specs_for,
    table_name,
)
from loader.validate import (
    ValidationReport,
    iter_copy_blocks,
    iter_row_blocks,
    validate_file,
    without_values,
)

HASH_BLOCK = 1 << 20

# How the file at the load's path differs from the one the load began with.
REMOVED = "removed"
REPLACED = "replaced"
CHANGED = "changed"
_MOVED_MESSAGES = {
    REMOVED: "not loaded: the file was removed from the folder while it was being loaded",
    # The nightly run loads the newer copy at once; the client reads this only when that
    # copy is replaced during its load too.
    REPLACED: "not loaded: a newer copy of the file arrived during the load; the newest copy "
    "stays in the folder and will be loaded at the next run",
    CHANGED: "not loaded: the file changed while it was being loaded (it was still being "
    "written, or written to again); it stays in the folder and will be loaded at the next "
    "run. A file must only appear under its name once it is complete: write it under another "
    "name and rename it when done (uploads through this service always do)",
}
FORCED_NOTE = "forced past the row-count guard by an operator"
REMOVED_FORCED_NOTE = "forced past the removed-keys guard by an operator"
# The client's log warns this many days before a file that was not loaded is deleted.
WARNING_DAYS = 7

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


def _movement(before: FileIdentity, path: Path) -> str:
    """How ``path`` differs from the file the load began with: REMOVED, REPLACED (another
    file under the name), CHANGED (the same file written to: its size or mtime moved), or
    the empty string when it is the same file, untouched."""
    now = _identity(path)
    if now is None:
        return REMOVED
    if not now.same_inode(before):
        return REPLACED
    return CHANGED if now != before else ""


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
    moved: str = ""  # REMOVED, REPLACED or CHANGED during the load
    forced: str = ""  # the load went past the row-count guard with --force: what it said
    changes: LoadChanges | None = None  # rows added, removed, changed (key column, not first)

    @property
    def ok(self) -> bool:
        return self.status == LOADED

    @property
    def replaced_during_load(self) -> bool:
        return self.moved == REPLACED


@dataclass(frozen=True)
class FileOutcome:
    """One line of an account's run, as it went into the folder log."""

    status: str  # LOADED | NO FILE | ERROR
    file_name: str  # escaped: any name the folder held, safe to show and to log
    detail: str
    rows: int = 0
    # False for a file skipped for its name alone: the client is told, but no load failed.
    fails_run: bool = True
    load_id: int | None = None  # the load history row, for a file a load was tried on
    forced: bool = False  # loaded past the row-count guard with --force


@dataclass
class AccountResult:
    account: str
    outcomes: list[FileOutcome] = field(default_factory=list)
    # Not run here: "NAME: already done by NODE at TIME" or "NAME: running on NODE since TIME".
    skipped: str = ""
    crashed: str = ""

    @property
    def busy(self) -> bool:
        """Another run (on this node or another) did or is doing this account's run."""
        return bool(self.skipped)

    @property
    def ok(self) -> bool:
        return not self.crashed and all(
            o.status != "ERROR" or not o.fails_run for o in self.outcomes
        )

    def summary(self) -> str:
        """One line for operators, control characters escaped (file names can hold any)."""
        if self.skipped:
            text = self.skipped
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


def _forced_note(rows: int, last_rows: int, share: float, last_when: datetime, zone) -> str:
    day = last_when.astimezone(zone).date().isoformat()
    return (
        f"{FORCED_NOTE}: {rows:,} rows, less than {share:.0%} of the {last_rows:,} rows "
        f"loaded on {day}"
    )


def _loaded_since(last_when: datetime | None, zone) -> str:
    return f" on {last_when.astimezone(zone).date().isoformat()}" if last_when else ""


def _removed_message(changes: LoadChanges, share: float, last_when: datetime | None, zone) -> str:
    return (
        f"not loaded: the file would remove {changes.removed:,} of the {changes.previous:,} "
        f"keys loaded{_loaded_since(last_when, zone)}, more than {share:.0%}; an export that "
        "lost rows or changed its IDs would wipe data. Check the export; if the change is "
        "expected, ask the operator to load it once with --force"
    )


def _removed_forced_note(
    changes: LoadChanges, share: float, last_when: datetime | None, zone
) -> str:
    return (
        f"{REMOVED_FORCED_NOTE}: {changes.removed:,} of the {changes.previous:,} keys loaded"
        f"{_loaded_since(last_when, zone)} removed, more than {share:.0%}"
    )


def _loaded_detail(outcome: LoadResult) -> str:
    """``48,213 rows imported (120 new, 35 gone, 410 changed)``, with the guards forced."""
    notes = [outcome.changes.summary()] if outcome.changes is not None else []
    notes += [note for note in (FORCED_NOTE, REMOVED_FORCED_NOTE) if note in outcome.forced]
    return f"{outcome.rows:,} rows imported" + (f" ({'; '.join(notes)})" if notes else "")


def _unreadable(path: Path) -> tuple[str, str]:
    """(client words, operator words) for a file the loader may not open: its permissions."""
    try:
        st = os.stat(path)
        mode, owner = f"mode {st.st_mode & 0o7777:03o}", f"owner uid {st.st_uid}"
    except OSError:
        mode, owner = "mode unknown", "owner unknown"
    client = (
        f"not loaded: the loader is not allowed to read the file (its permissions on the "
        f"server, {mode}, do not let the service read it); nothing was changed and the file "
        "stays; upload it again (a file uploaded through this service is always readable), "
        "or ask the operators (they were notified) to fix its permissions; it will be loaded "
        "at the next run"
    )
    operators = escape_for_operator(
        f"the loader (uid {os.geteuid()}) may not read {path.name} ({mode}, {owner}): give "
        "the service user read permission (chmod / chown) or have the client upload it again"
    )
    return client, operators


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
    started = time.monotonic()  # metrics: the load's duration
    table = table_name(spec)
    before = FileIdentity.of(path)
    last = db.last_loaded(spec.account, spec.file_name)
    load_id = db.begin_load(spec.account, spec.file_name, table, path.name, None)
    report = ValidationReport(file_name=path.name)
    source = _ValidatedFile(path, spec, report, settings.loader.max_reported_errors)
    moved = ""
    forced = ""
    changes: LoadChanges | None = None

    def refusal() -> str | None:
        """Why the file cannot be loaded as read: it moved or changed under the load, or it
        breaks a rule (then every problem is listed); None if neither. Checked before the
        errors, so a file still being written is never described by half of it, and the
        errors of a re-read that found none never read as "valid"."""
        nonlocal moved
        moved = _movement(before, path)
        if moved:
            return _MOVED_MESSAGES[moved]
        if report.ok and not source.everything_reported:
            return None
        first_pass_ok = report.ok
        source.report_everything()
        moved = _movement(before, path)
        if not moved and report.ok and not first_pass_ok:
            moved = CHANGED  # two reads of one file disagree: it was written to meanwhile
        if moved:
            return _MOVED_MESSAGES[moved]
        return None if report.ok else f"not loaded: {report.summary()}"

    def before_swap(count: int) -> str:
        nonlocal forced
        refused = refusal()
        if refused is not None:
            raise SwapAborted(refused)
        share = settings.loader.min_row_share
        if last is not None and last.rows and count < share * last.rows:
            if not force:
                raise SwapAborted(
                    _guard_message(count, last.rows, share, last.started, settings.zone)
                )
            forced = _forced_note(count, last.rows, share, last.started, settings.zone)
        return source.sha256()

    def removed_guard(found: LoadChanges) -> None:
        """The removed-keys guard: after before_swap, with the comparison's counts."""
        nonlocal forced, changes
        changes = found
        share = settings.loader.max_removed_share
        if share and found.previous and found.removed > share * found.previous:
            when = last.started if last is not None else None
            if not force:
                raise SwapAborted(_removed_message(found, share, when, settings.zone))
            note = _removed_forced_note(found, share, when, settings.zone)
            forced = f"{forced}; {note}" if forced else note

    def result(status: str, count: int, message: str, internal: str = "") -> LoadResult:
        metrics.load_finished(spec.account, status, count, time.monotonic() - started)
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
            moved=moved,
            forced=forced if status == LOADED else "",
            changes=changes if status == LOADED else None,
        )

    def refused(message: str) -> LoadResult:
        """Record a refusal (values quoted from the file stay out of the load history: operators
        read it) and return it with the client's words."""
        status = NO_FILE if moved == REMOVED else REFUSED
        stored = without_values(message)
        db.finish_load(load_id, status, report.rows, stored, source.sha256())
        return result(status, report.rows, message)

    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        message, internal = _unreadable(path)
        db.finish_load(load_id, REFUSED, None, internal)
        return result(REFUSED, 0, message, internal)
    except FileNotFoundError:
        moved = REMOVED
        return refused(_MOVED_MESSAGES[REMOVED])
    try:
        count = db.replace_table(
            load_id,
            table,
            spec.columns,
            spec.key_column,
            source,
            before_swap,
            progress,
            on_changes=removed_guard,
        )
    except SwapAborted as exc:
        return refused(str(exc))
    except Exception as exc:
        internal = error_text(exc)
        if isinstance(exc, PermissionError) and exc.filename == str(path):
            message, internal = _unreadable(path)
            db.finish_load(load_id, REFUSED, report.rows, internal, source.sha256())
            return result(REFUSED, report.rows, message, internal)
        why = refusal()  # the validator's own refusal surfaced through the driver, or a move
        if why is not None:
            return refused(why)
        db.finish_load(load_id, FAILED, report.rows, internal, source.sha256())
        message = (
            "not loaded: the SIS database could not be updated (a problem on our side; the "
            "operators were notified); the file stays and will be loaded at the next run"
        )
        return result(FAILED, report.rows, message, internal)
    if forced:
        # The swap's transaction marks a load done with an empty message; a forced one
        # says so in the history (a second, short transaction, after the commit).
        db.finish_load(load_id, LOADED, count, forced, source.sha256())
    return result(LOADED, count, f"{count:,} rows imported")


@contextmanager
def account_lock(settings: Settings, account: str) -> Iterator[bool]:
    """Hold the account's run lock if free (the same one a run takes: advisory on PostgreSQL,
    a file lock on SQLite); yields False if another run holds it."""
    with job_lock(settings, LOAD, account) as got:
        yield got


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
    run_key: str | None = None,
) -> AccountResult:
    """One account's run, once per cluster (:mod:`loader.claims`): ``run_key`` is the
    scheduled run's local date, None for a manual run. A node that finds the run done or the
    account busy writes nothing and says why in ``skipped``. Never raises for a bad file or a
    database failure."""
    log = get_logger(settings.log_dir, "loader", **log_limits(settings))
    result = AccountResult(account)
    clock = now or _now(settings)
    try:
        with job_turn(settings, LOAD, account, run_key) as turn:
            if not turn.run:
                result.skipped = turn.skipped
                log.info("load_skipped", account=account, reason=turn.skipped)
                return result
            try:
                _run_locked(settings, account, force, progress, result, clock)
                folder_log.trim(
                    account_folder(settings, account), settings.loader.log_retention_days, clock()
                )
            finally:
                turn.outcome = "ok" if result.ok else ("crashed" if result.crashed else "failed")
    except folder_log.UnsafeLogFile as exc:
        # Not followed, not repaired: whoever put it there (only someone on the server can)
        # replaces it; until then nothing loads, so no load goes unreported.
        result.crashed = escape_for_operator(
            f"{exc}; until then nothing is loaded for this account and its files stay"
        )
        report_crash(settings, account, result.crashed, clock())
    except Exception as exc:  # one account's crash never stops the others
        result.crashed = error_text(exc)
        report_crash(settings, account, result.crashed, clock())
    return result


def report_crash(settings: Settings, account: str, error: str, when: datetime) -> None:
    """A run that broke on our side: tell the client in words, the operators in detail."""
    log = get_logger(settings.log_dir, "loader", **log_limits(settings))
    log.error("load_crashed", account=account, error=error)
    # The folder itself may be the problem; the operators still get the e-mail.
    client = (
        "the load stopped because of a problem on our side (the operators were notified); "
        "the SIS data and any uploaded file stay as they were"
    )
    with contextlib.suppress(OSError):
        folder_log.append(
            account_folder(settings, account), settings.zone, "ERROR", "-", client, when
        )
    notify_failure(settings, "Load", account, "-", error, when, client)


def _now(settings: Settings) -> Callable[[], datetime]:
    return lambda: datetime.now(settings.zone)


@dataclass(frozen=True)
class _SpecRun:
    """How one spec's turn in a run went, for the alerts: ``loaded``, ``missed`` (a run that
    was recorded in the load history without loading it) or ``unrecorded`` (nothing recorded:
    the file vanished before its load began, or the SIS database could not be reached)."""

    kind: str
    reason: str = ""  # for a missed run: what happened, in words the client may read
    rows: int = 0
    problem: bool = False  # refused or failed (a misnamed file included): worth a mail
    operator_error: str = ""  # a problem's full error, for the operators' mail


def _arrival(st: os.stat_result) -> datetime:
    """When a file was put in the folder (or last changed): the later of its mtime and its
    ctime, which a client cannot set (a rename into place sets it), in whole seconds as the
    folder log's timestamps are."""
    return datetime.fromtimestamp(max(st.st_mtime, st.st_ctime), UTC).replace(microsecond=0)


def near_misses(spec: Spec, names: Sequence[str]) -> list[str]:
    """The names in ``names`` that are the approved name but for case, extension, date stamp
    or Unicode form (as :func:`loader.spec.closest_spec_hint` says "did you mean")."""
    return [n for n in names if n != spec.file_name and _name_differences(n, spec.file_name)]


def _told_since(entries: list[dict[str, str]], status: str, shown: str, since: datetime) -> bool:
    """Does the folder log hold a ``status`` line for the file shown as ``shown`` written at
    or after ``since``? (How the run remembers that it told the client already.)"""
    for entry in entries:
        if entry["status"] != status or entry["file"] != shown:
            continue
        when = folder_log.line_time(entry["time"])
        if when is not None and when >= since:
            return True
    return False


def _and(items: list[str]) -> str:
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else "".join(items)


def _day(when: datetime, zone: ZoneInfo) -> str:
    return when.astimezone(zone).date().isoformat()


def _run_locked(
    settings: Settings,
    account: str,
    force: bool,
    progress: Progress | None,
    result: AccountResult,
    clock: Callable[[], datetime],
) -> None:
    log = get_logger(settings.log_dir, "loader", **log_limits(settings))
    folder = account_folder(settings, account)
    zone = settings.zone
    specs = specs_for(settings, account)
    files = folder.candidate_files()
    folder_log.check_writable(folder)  # before anything is loaded that it could not report
    db = open_sis_db(settings.sis_db_url)
    retention = settings.loader.unloaded_file_retention_days
    told = [folder_log.parse_line(ln) for ln in folder_log.read_lines(folder)]

    def line(
        status: str,
        file_name: str,
        detail: str,
        rows: int = 0,
        fails_run: bool = True,
        outcome: LoadResult | None = None,
    ) -> None:
        folder_log.append(folder, zone, status, file_name, detail, clock())
        shown = escape_for_operator(file_name)
        load_id, forced = (outcome.load_id, bool(outcome.forced)) if outcome else (None, False)
        result.outcomes.append(FileOutcome(status, shown, detail, rows, fails_run, load_id, forced))

    def deleted_on(path: Path) -> str:
        """When a file that is not loaded goes (for the client's line), or ""."""
        if not retention:
            return ""
        with contextlib.suppress(OSError):
            deadline = _arrival(os.stat(path)) + timedelta(days=retention)
            return f"; it is deleted on {_day(deadline, zone)} ({retention} days after it arrived)"
        return ""

    # Files under no approved name: told once per arrival (the pre-check's RECEIVED line on
    # arrival, and this line in the first run after it), never a failure and never a mail.
    # A near miss of an approved file that did not come is that file's ERROR line instead.
    usable = [p.name for p in files if not undecodable_or_control(p.name)]
    strays = [n for n in usable if match_spec(specs, n) is None]
    misnamed = {
        spec.file_name: near_misses(spec, strays) for spec in specs if spec.file_name not in usable
    }
    named_in_errors = {n for names in misnamed.values() for n in names}
    for path in files:
        unusable = undecodable_or_control(path.name)
        if not unusable and (match_spec(specs, path.name) or path.name in named_in_errors):
            continue
        shown = escape_for_operator(path.name)
        try:
            arrived = _arrival(os.stat(path))
        except FileNotFoundError:
            continue
        if _told_since(told, "SKIPPED", shown, arrived):
            continue
        if unusable:
            detail = (
                f"not loaded: {UNUSABLE_NAME_REASON}; the file stays in the folder and is "
                f"skipped; {closest_spec_hint(specs, shown)}"
            )
        else:
            detail = (
                f"not loaded: {path.name!r} is not an approved file name; "
                f"{closest_spec_hint(specs, path.name)}; the file stays in the folder"
            )
        line("SKIPPED", path.name, detail + deleted_on(path), fails_run=False)
        log.info("file_skipped", account=account, file=shown, unusable=unusable)

    for spec in specs:
        try:
            before: Streak | None = db.streak(account, spec.file_name)
        except Exception as exc:  # the load below meets the same trouble and reports it
            before = None
            log.warning("streak_unreadable", account=account, file=spec.file_name, error=str(exc))
        turn = _load_spec(
            settings, account, spec, folder, db, force, progress, line, misnamed, clock
        )
        _alert(settings, account, spec, before, turn, line, clock)

    if retention:
        _expire_unloaded(settings, account, folder, specs, retention, told, line, clock)


def _load_spec(
    settings: Settings,
    account: str,
    spec: Spec,
    folder: AccountFolder,
    db: SisDB,
    force: bool,
    progress: Progress | None,
    line: Callable[..., None],
    misnamed: dict[str, list[str]],
    clock: Callable[[], datetime],
) -> _SpecRun:
    """One spec's turn: load its file if there is one, and write its line."""
    log = get_logger(settings.log_dir, "loader", **log_limits(settings))
    # Looked up at its turn, not from the listing: a file that landed while an earlier spec
    # was loading is complete (renamed into place) and loads now.
    path = folder.root / spec.file_name
    if not path.is_file() or path.is_symlink():
        found = [n for n in misnamed.get(spec.file_name, []) if (folder.root / n).is_file()]
        if found:
            names = ", ".join(
                f"{n} (the name differs in {_and(_name_differences(n, spec.file_name))})"
                for n in found
            )
            which = "it" if len(found) == 1 else "one of them"
            detail = (
                f"not loaded: no {spec.file_name}; found {names}: rename {which} or fix the "
                "export (the name must be exactly the approved one every day)"
            )
            db.record(
                account, spec.file_name, table_name(spec), REFUSED, detail, file_name=found[0]
            )
            metrics.load_finished(account, REFUSED, 0)
            line("ERROR", spec.file_name, f"{detail}; the SIS data stays as it was")
            log.warning("load_misnamed", account=account, file=spec.file_name, found=names)
            return _SpecRun("missed", detail, problem=True, operator_error=detail)
        db.record(account, spec.file_name, table_name(spec), NO_FILE, "no file received")
        metrics.load_finished(account, NO_FILE, 0)
        line("NO FILE", spec.file_name, "no file received; the SIS data stays as it was")
        log.info("load_no_file", account=account, file=spec.file_name)
        return _SpecRun("missed", "no file received")

    def report_rows(rows: int, name: str = spec.file_name) -> None:
        if progress is not None:
            progress(account, name, rows)

    try:
        outcome = load_file(settings, spec, path, force=force, progress=report_rows, db=db)
        if outcome.replaced_during_load and path.exists():
            log.info("load_retry_newer_copy", account=account, file=path.name)
            outcome = load_file(settings, spec, path, force=force, progress=report_rows, db=db)
        if outcome.replaced_during_load and not path.exists():  # replaced, then removed
            message = _MOVED_MESSAGES[REMOVED]
            outcome = dataclasses.replace(outcome, moved=REMOVED, message=message)
    except FileNotFoundError:  # removed by the client since the folder was listed
        line(
            "NO FILE",
            spec.file_name,
            "the file was removed from the folder before it could be loaded; the SIS data "
            "stays as it was",
        )
        log.info("load_no_file", account=account, file=spec.file_name, vanished=True)
        return _SpecRun("unrecorded")
    except Exception as exc:  # e.g. the SIS database is down: the next spec still runs
        error = error_text(exc)
        metrics.load_finished(account, FAILED, 0)
        client = (
            "not loaded: a problem on our side (the operators were notified); the file "
            "stays and will be loaded at the next run; the SIS data stays as it was"
        )
        line("ERROR", path.name, client)
        log.error("load_failed", account=account, file=path.name, error=error)
        notify_failure(settings, "Load", account, path.name, error, clock(), client)
        return _SpecRun("unrecorded")
    event = {
        "account": account,
        "file": path.name,
        "status": outcome.status,
        "rows": outcome.rows,
        "sha256": outcome.sha256,
        "load_id": outcome.load_id,
        "forced": bool(outcome.forced),
    }
    if outcome.ok:
        # The client hears first, then the file goes: if the line cannot be written (a
        # full disk) or the run dies in between, the file stays and the next run loads it
        # again and says so, rather than the night's load never reaching the log.
        detail = _loaded_detail(outcome)
        if _identity(path) not in (outcome.identity, None):
            detail += "; a newer copy of the file arrived meanwhile and stays for the next run"
        line("LOADED", path.name, detail, outcome.rows, outcome=outcome)
        deleted = _delete_if_same(path, outcome.identity)
        log.info("load_done", deleted=deleted, **event)
        return _SpecRun("loaded", rows=outcome.rows)
    if outcome.moved == REMOVED:  # the client took it back: nothing failed
        line(
            "NO FILE",
            spec.file_name,
            f"{outcome.message}; nothing was changed: the SIS data stays as it was",
            fails_run=False,
            outcome=outcome,
        )
        log.info("load_file_removed", **event)
        return _SpecRun("missed", "the file was removed from the folder during its load")
    line("ERROR", path.name, f"{outcome.message}; the SIS data stays as it was", outcome=outcome)
    operators = without_values(outcome.message)  # the values stay in the client's log
    log.error("load_failed", message=operators, error=outcome.internal_error, **event)
    return _SpecRun(
        "missed", operators, problem=True, operator_error=outcome.internal_error or operators
    )


def _alert(
    settings: Settings,
    account: str,
    spec: Spec,
    before: Streak | None,
    turn: _SpecRun,
    line: Callable[..., None],
    clock: Callable[[], datetime],
) -> None:
    """Mail what matters about one spec's turn, once: the first refused or failed run since
    the last load (not every night the same file is refused again), the run that makes a feed
    that loaded before late, and the load that ends a late streak. ``before`` is the load
    history as it was before this turn (None: unreadable; a problem is then mailed)."""
    log = get_logger(settings.log_dir, "loader", **log_limits(settings))
    late_after = settings.alerts.missing_file_runs
    if turn.problem:
        earlier = (
            before.by_status.get(REFUSED, 0) + before.by_status.get(FAILED, 0) if before else 0
        )
        if earlier == 0:
            notify_failure(
                settings, "Load", account, spec.file_name, turn.operator_error, clock(), turn.reason
            )
        else:
            log.info(
                "load_failure_not_mailed",
                account=account,
                file=spec.file_name,
                reason="already mailed in this streak of runs without a load",
            )
    if before is None or before.last_loaded is None or not late_after:
        return
    if turn.kind == "missed" and before.missed + 1 == late_after:
        missed = before.missed + 1
        last = before.last_loaded
        day = _day(last.finished or last.started, settings.zone)
        line(
            "LATE",
            spec.file_name,
            f"no {spec.file_name} has been loaded for {missed} runs in a row (last loaded on "
            f"{day}); the operators and the account's contacts are told once; the SIS data of "
            "that load stays in place until the file loads again",
            fails_run=False,
        )
        log.warning("feed_late", account=account, file=spec.file_name, missed=missed)
        notify_late(settings, account, spec.file_name, last, missed, turn.reason, clock())
    elif turn.kind == "loaded" and before.missed >= late_after:
        log.info("feed_resumed", account=account, file=spec.file_name, missed=before.missed)
        notify_resumed(settings, account, spec.file_name, turn.rows, before.missed, clock())


def _expire_unloaded(
    settings: Settings,
    account: str,
    folder: AccountFolder,
    specs: list[Spec],
    retention: int,
    told: list[dict[str, str]],
    line: Callable[..., None],
    clock: Callable[[], datetime],
) -> None:
    """Delete each file still in the folder ``retention`` days after it arrived (a stray, or
    a file that was refused every run since): it holds personal data that nobody will load.
    The client's log says so WARNING_DAYS before, once, and again when it goes."""
    log = get_logger(settings.log_dir, "loader", **log_limits(settings))
    zone = settings.zone
    now = clock()
    for path in folder.candidate_files():
        try:
            identity = FileIdentity.of(path)
            arrived = _arrival(os.stat(path))
        except FileNotFoundError:
            continue
        deadline = arrived + timedelta(days=retention)
        shown = escape_for_operator(path.name)
        approved = not undecodable_or_control(path.name) and match_spec(specs, path.name)
        if now >= deadline:
            if not _delete_if_same(path, identity):
                continue  # replaced meanwhile: a new arrival, with its own time
            line(
                "REMOVED",
                path.name,
                f"deleted: it was not loaded within {retention} days of its arrival on "
                f"{_day(arrived, zone)}; files that are not loaded are not kept longer, as they "
                "may hold personal data",
                fails_run=False,
            )
            log.info("file_expired", account=account, file=shown, arrived=arrived.isoformat())
        elif now >= deadline - timedelta(days=WARNING_DAYS) and not _told_since(
            told, "WARNING", shown, arrived
        ):
            what = (
                "fix it (see its ERROR line) and upload it again"
                if approved
                else "upload it under an approved name if it is meant to load"
            )
            line(
                "WARNING",
                path.name,
                f"not loaded since it arrived on {_day(arrived, zone)}: it will be deleted on "
                f"{_day(deadline, zone)} ({retention} days after it arrived); {what}",
                fails_run=False,
            )
            log.info("file_expiring", account=account, file=shown, deadline=deadline.isoformat())


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
    """Run each account in turn in this process (a manual run: see :func:`run_account`);
    returns every account's result."""
    if force and not names:
        raise Refused("--force overrides the row-count guard once: name the account(s) it is for")
    results = []
    for name in accounts_to_run(settings, names):
        result = run_account(settings, name, force=force, progress=progress)
        results.append(result)
        if on_account is not None:
            on_account(result)
    send_key_reminders(settings)  # due even for accounts with no file tonight
    return results
