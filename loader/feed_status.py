"""Every feed at a glance (``ingestctl status``): one row per account and approved spec.

Each row says whether the feed needs attention, worst first:

- ``failing``: the spec's last run was refused or failed (or was killed mid-load);
- ``key expired``: the account's oldest key is past ``[keys] max_age_days`` (logins with it
  are refused): rotate or remove it;
- ``late``: it has loaded before, and ``[alerts] missing_file_runs`` runs in a row since then
  loaded nothing (0 turns lateness off);
- ``key expires soon``: the oldest key expires within 30 days; the feed still works and the
  reminder mails are going out, so this is shown but is not counted as needing attention;
- ``never loaded``: no run has loaded it yet (a new account, or an account with no approved
  spec, which gets one row without a spec);
- ``ok``;
- ``disabled``: the account is disabled (nothing is loaded for it, and nobody is alerted).

The state comes from the control database (accounts, specs, keys) and the SIS database's load
history (:meth:`SisDB.streak`), which every node shares, so every node shows the same state.
The last upload's time and address come from the activity journal in the control database
(``file.received``, or a ``file.renamed`` that gave the file its approved name), whichever
node received it; the load history stands in (time only) for a spec whose upload the journal
no longer holds (``[cluster] journal_retention_days``). The last error is the load
history's message, which holds no value from the file (see ``without_values``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, cast, func, select

from ingest_core.db import Account, AccountKey, FileSpec, JournalEvent, open_control_db
from ingest_core.errors import NotFound
from ingest_core.folders import account_folder
from ingest_core.key_age import EXPIRED, EXPIRES_SOON, key_age
from ingest_core.settings import Settings
from loader.sis_db import (
    FAILED,
    INTERRUPTED,
    REFUSED,
    LoadChanges,
    LoadRecord,
    SisDB,
    open_sis_db,
)
from loader.validate import without_values

OK = "ok"
LATE = "late"
FAILING = "failing"
KEY_EXPIRED = "key expired"
KEY_EXPIRES_SOON = "key expires soon"
NEVER_LOADED = "never loaded"
DISABLED = "disabled"

# Worst first: the order of the rows, and what --check counts as needing attention.
STATE_ORDER = (FAILING, KEY_EXPIRED, LATE, KEY_EXPIRES_SOON, NEVER_LOADED, OK, DISABLED)
NEEDS_ATTENTION = frozenset({FAILING, KEY_EXPIRED, LATE})
# A key state takes the place of these (a failing or disabled feed says more as it is).
KEY_STATES_REPLACE = frozenset({LATE, NEVER_LOADED, OK})
FAILED_RUNS = (REFUSED, FAILED, INTERRUPTED)

# Journaled server events that put a file in place under its name.
UPLOAD_EVENTS = ("file.received", "file.renamed")

TIME_FIELDS = ("last_upload", "last_load", "oldest_key_added", "oldest_key_expires")


@dataclass(frozen=True)
class FeedStatus:
    """One account and spec (``spec`` None: an account with no approved spec)."""

    account: str
    spec: str | None
    state: str
    needs_attention: bool
    last_upload: datetime | None  # when the spec's file (with no spec: any file) last arrived
    last_upload_address: str | None  # from where (None: known from the load history only)
    last_load: datetime | None  # the last successful load
    last_load_rows: int | None
    last_load_changes: str | None  # what that load changed (rows added, removed, changed)
    runs_missed: int  # runs in a row since the last load that did not load it
    last_error: str  # the latest refusal or failure since the last load, in one line
    files_waiting: int  # complete files in the account's folder, not loaded yet
    oldest_key_added: datetime | None
    oldest_key_age_days: int | None  # None: the account has no key
    oldest_key_expires: datetime | None  # None: no key, or keys do not expire
    # "never" (keys do not expire), "ok", "expires soon", "expired"; None: no key
    oldest_key_expiry: str | None


@dataclass
class _Account:
    name: str
    active: bool
    specs: list[str]
    oldest_key: datetime | None


def feed_status(
    settings: Settings,
    names: Sequence[str] | None = None,
    now: Callable[[], datetime] | None = None,
) -> list[FeedStatus]:
    """The status of every spec of the named accounts (all accounts if none), worst first.
    A name that is no account raises :class:`NotFound`."""
    when = (now or (lambda: datetime.now(UTC)))()
    accounts = _accounts(settings, names)
    db = open_sis_db(settings.sis_db_url)
    wanted = {(a.name, spec) for a in accounts for spec in a.specs}
    without_specs = {a.name for a in accounts if not a.specs}
    uploads = _uploads_from_journal(settings, wanted, without_specs)
    rows: list[FeedStatus] = []
    for account in accounts:
        waiting = len(account_folder(settings, account.name).candidate_files())
        age = None
        if account.oldest_key is not None:
            age = key_age(account.oldest_key, settings.keys.max_age_days, when)
        common: dict[str, Any] = {
            "account": account.name,
            "files_waiting": waiting,
            "oldest_key_added": account.oldest_key,
            "oldest_key_age_days": age.age_days if age else None,
            "oldest_key_expires": age.expires_at if age else None,
            "oldest_key_expiry": age.expiry if age else None,
        }
        if not account.specs:
            state = _with_key_state(
                NEVER_LOADED if account.active else DISABLED, common["oldest_key_expiry"]
            )
            upload = uploads.get((account.name, None))  # any file: the client's test upload
            rows.append(
                FeedStatus(
                    spec=None,
                    state=state,
                    needs_attention=state in NEEDS_ATTENTION,
                    last_upload=upload[0] if upload else None,
                    last_upload_address=upload[1] if upload else None,
                    last_load=None,
                    last_load_rows=None,
                    last_load_changes=None,
                    runs_missed=0,
                    last_error="",
                    **common,
                )
            )
            continue
        for spec in account.specs:
            rows.append(
                _spec_status(settings, db, account, spec, uploads.get((account.name, spec)), common)
            )
    rank = {state: i for i, state in enumerate(STATE_ORDER)}
    rows.sort(key=lambda r: (rank[r.state], -r.runs_missed, r.account, r.spec or ""))
    return rows


def _spec_status(
    settings: Settings,
    db: SisDB,
    account: _Account,
    spec: str,
    upload: tuple[datetime, str | None] | None,
    common: dict[str, Any],
) -> FeedStatus:
    streak = db.streak(account.name, spec, recent=1)
    last = streak.last_loaded
    last_run = streak.recent[-1] if streak.recent else None
    late_after = settings.alerts.missing_file_runs
    if not account.active:
        state = DISABLED
    elif last_run is not None and last_run.status in FAILED_RUNS:
        state = FAILING
    elif last is None:
        state = NEVER_LOADED
    elif late_after and streak.missed >= late_after:
        state = LATE
    else:
        state = OK
    state = _with_key_state(state, common["oldest_key_expiry"])
    if upload is None:
        upload = _upload_from_history(db, account.name, spec)
    return FeedStatus(
        spec=spec,
        state=state,
        needs_attention=state in NEEDS_ATTENTION,
        last_upload=upload[0] if upload else None,
        last_upload_address=upload[1] if upload else None,
        last_load=(last.finished or last.started) if last else None,
        last_load_rows=last.rows if last else None,
        last_load_changes=_changes_text(last),
        runs_missed=streak.missed,
        last_error=_last_error(db, account.name, spec, last.id if last else 0),
        **common,
    )


def _with_key_state(state: str, expiry: str | None) -> str:
    """The row's state once the oldest key's expiry is weighed in."""
    if state not in KEY_STATES_REPLACE:
        return state
    if expiry == EXPIRED:
        return KEY_EXPIRED
    if expiry == EXPIRES_SOON and state != LATE:
        return KEY_EXPIRES_SOON
    return state


def _changes_text(last: LoadRecord | None) -> str | None:
    """What the last load changed, by key, as its LOADED line says it (None: no key column,
    a first load, or a load recorded before the counts were)."""
    if last is None:
        return None
    added, removed, changed, rows = last.added, last.removed, last.changed, last.rows
    if added is None or removed is None or changed is None or rows is None:
        return None
    return LoadChanges(rows - added + removed, added, removed, changed).summary()


def _accounts(settings: Settings, names: Sequence[str] | None) -> list[_Account]:
    control = open_control_db(settings.control_db_url)
    with control.session() as session:
        query = select(Account).order_by(Account.name)
        if names:
            query = query.where(Account.name.in_(list(names)))
        found = {a.name: a for a in session.scalars(query)}
        for name in names or ():
            if name not in found:
                raise NotFound(f"no account named {name!r} (see 'ingestctl account list')")
        specs: dict[int, list[str]] = {}
        for account_id, file_name in session.execute(
            select(FileSpec.account_id, FileSpec.file_name).order_by(FileSpec.id)
        ):
            specs.setdefault(account_id, []).append(file_name)
        keys: dict[int, datetime] = {}
        for account_id, added in session.execute(
            select(AccountKey.account_id, AccountKey.added_at)
        ):
            if account_id not in keys or added < keys[account_id]:
                keys[account_id] = added
        return [
            _Account(a.name, a.status == "active", specs.get(a.id, []), keys.get(a.id))
            for a in found.values()
        ]


def _uploads_from_journal(
    settings: Settings, wanted: set[tuple[str, str]], any_file: set[str]
) -> dict[tuple[str, str | None], tuple[datetime, str | None]]:
    """The newest upload of each (account, spec file) in ``wanted``, and of any file for each
    account in ``any_file`` (keyed ``(account, None)``: an account with no approved spec,
    whose test upload an operator looks for), from the activity journal, whichever node
    received it: when, and from which address. The journal's ``file.received`` and
    ``file.renamed`` rows, the newest per account and file name (or per account)."""
    found: dict[tuple[str, str | None], tuple[datetime, str | None]] = {}
    db = open_control_db(settings.control_db_url)
    journal = JournalEvent
    if db.engine.dialect.name == "sqlite":
        name = func.json_extract(journal.detail, "$.name")
    else:
        name = func.json_extract_path_text(cast(journal.detail, JSON), "name")
    uploads = journal.kind.in_(UPLOAD_EVENTS)
    newest = []
    if wanted:
        newest.append(
            select(func.max(journal.id))
            .where(
                uploads,
                journal.account.in_(sorted({account for account, _ in wanted})),
                name.in_(sorted({spec for _, spec in wanted})),
            )
            .group_by(journal.account, name)
        )
    if any_file:
        newest.append(
            select(func.max(journal.id))
            .where(uploads, journal.account.in_(sorted(any_file)))
            .group_by(journal.account)
        )
    with db.engine.connect() as conn:
        for ids in newest:
            rows = conn.execute(
                select(journal.account, name, journal.at, journal.address).where(
                    journal.id.in_(ids)
                )
            ).all()
            for account, file_name, at, address in rows:
                if (account, file_name) in wanted:
                    found[(account, file_name)] = (at, address)
                if account in any_file:
                    found[(account, None)] = (at, address)
    return found


def _upload_from_history(db: SisDB, account: str, spec: str) -> tuple[datetime, str | None] | None:
    """When the loader last found the spec's file (no address: the load history has none)."""
    loads = db.tables.loads
    with db.engine.connect() as conn:
        started = conn.scalar(
            select(loads.c.started)
            .where(loads.c.account == account, loads.c.spec_file == spec)
            .where(loads.c.file_name == spec)
            .order_by(loads.c.id.desc())
            .limit(1)
        )
    return (started, None) if started is not None else None


def _last_error(db: SisDB, account: str, spec: str, after_id: int) -> str:
    """The newest refused or failed run's message since the last load, in one line."""
    loads = db.tables.loads
    with db.engine.connect() as conn:
        message = conn.scalar(
            select(loads.c.message)
            .where(loads.c.account == account, loads.c.spec_file == spec)
            .where(loads.c.id > after_id, loads.c.status.in_(FAILED_RUNS))
            .order_by(loads.c.id.desc())
            .limit(1)
        )
    return " ".join(without_values(message or "").split())
