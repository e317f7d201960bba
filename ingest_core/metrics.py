"""Prometheus metrics: every metric object, and the one-line calls the server and loader make.

The figures cover every process of a node. The listener (``ingestctl server`` / ``serve``)
gives its processes a fresh private folder in ``PROMETHEUS_MULTIPROC_DIR`` before it starts
any (:func:`use_process_folder`); worker processes and the loader's child processes inherit
it, and ``prometheus_client`` keeps each process's counts in a memory-mapped file there. The
admin listener (``ingest_server.admin``) adds them up at scrape time
(``MultiProcessCollector``); a worker that exits is marked dead (:func:`process_exited`), so
its live gauges leave the sum while its counters stay in it.

Rules: names start ``sis_ingest_``, in base units (seconds, bytes), counters end ``_total``;
labels are bounded: an account or spec name at most (both registered by operators, never a
client's user name before it logged in), never a file name or an address; reasons and kinds
come from the fixed sets below (anything else is ``other``).

Calls are cheap (a dictionary look-up and an add), but none sits on the per-packet upload
path: bytes are counted once, when an upload is committed.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, TypeVar

from prometheus_client import Counter, Gauge, Histogram, multiprocess, values

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "sis_ingest_"

# Why a TCP connection was refused before the SSH banner, from the refusal's first words.
REFUSAL_REASONS = (
    ("banned", "banned"),
    ("address not on any", "not_allowed"),
    ("too many new connections", "rate_limited"),
    ("server full", "server_full"),
    ("too many connections", "per_address_limit"),
    ("registry unavailable", "registry_unavailable"),
    ("proxy", "proxy_header"),
    ("no server worker", "no_worker"),
)
# Why a login failed (the connection's last refused key), from the audit log's reason.
LOGIN_FAILURE_REASONS = (
    ("registry unavailable", "registry_unavailable"),
    ("unknown account", "unknown_account"),
    ("account disabled", "account_disabled"),
    ("address not allowed", "address_not_allowed"),
    ("key refused by policy", "key_policy"),
    ("key expired", "key_expired"),
    ("key not registered", "key_not_registered"),
    ("signature refused", "bad_signature"),
)
# Why an upload was discarded.
DISCARD_REASONS = (
    ("session ended", "interrupted"),
    ("write error", "write_error"),
    ("could not store", "store_error"),
    ("unexpected error", "server_error"),
)
LIMIT_KINDS = frozenset(
    {
        "max_file_bytes",
        "max_hole_bytes",
        "account_quota_bytes",
        "free_disk_reserve_bytes",
        "max_channels_per_connection",
        "max_sessions_per_account",
    }
)
LOAD_STATUSES = frozenset({"loaded", "refused", "failed", "no_file"})
LOAD_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

_lock = threading.Lock()
_metrics: SimpleNamespace | None = None
F = TypeVar("F", bound=Callable[..., None])


def _never_fails(fn: F) -> F:
    """Counting must never cost an upload or a load: a failure here (the metrics folder gone
    at shutdown, say) is dropped."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> None:
        with contextlib.suppress(Exception):
            fn(*args, **kwargs)

    return call  # type: ignore[return-value]


def classify(text: str, table: tuple[tuple[str, str], ...]) -> str:
    """The fixed reason for a free-text one (``other`` when none matches)."""
    lowered = text.lower()
    for start, reason in table:
        if lowered.startswith(start):
            return reason
    return "other"


def _build() -> SimpleNamespace:
    """The metric objects, made at first use (after :func:`use_process_folder`, if at all),
    so they keep their values where this process's value class says."""

    def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
        return Counter(PREFIX + name, doc, labels, registry=None)

    return SimpleNamespace(
        admitted=counter(
            "connections_admitted", "TCP connections admitted past the IP gate and limits"
        ),
        refused=counter(
            "connections_refused",
            "TCP connections refused before the SSH banner, by reason",
            ("reason",),
        ),
        logins_ok=counter("logins_succeeded", "Successful logins, by account", ("account",)),
        logins_failed=counter(
            "logins_failed",
            "Connections that ended without a login after a refused key, by the last reason",
            ("reason",),
        ),
        bans=counter("bans", "Addresses banned by the brute-force defender"),
        sessions=Gauge(
            PREFIX + "active_sessions",
            "Logged-in SSH connections now, across every worker process",
            registry=None,
            multiprocess_mode="livesum",
        ),
        files=counter("files_received", "Uploads committed, by account", ("account",)),
        received=counter("received_bytes", "Bytes of committed uploads, by account", ("account",)),
        discarded=counter(
            "uploads_discarded", "Uploads discarded before commit, by reason", ("reason",)
        ),
        limits=counter("limits_hit", "Limits a client ran into, by kind", ("kind",)),
        loads=counter(
            "loads", "Load attempts of an account's files, by status", ("account", "status")
        ),
        rows=counter("loaded_rows", "Rows loaded by successful loads, by account", ("account",)),
        load_seconds=Histogram(
            PREFIX + "load_duration_seconds",
            "Time one file's validate, load and swap took",
            buckets=LOAD_BUCKETS,
            registry=None,
        ),
        pools=counter("pool_publishes", "Pool file publishes, by status", ("status",)),
    )


def _m() -> SimpleNamespace:
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _metrics = _build()
    return _metrics


# -- set-up (the listener) -------------------------------------------------------------------


def use_process_folder(folder: str) -> None:
    """From now on this process, and every process it starts, keeps its counts in ``folder``.

    Call it before any worker or loader child is started (they inherit the environment, and
    their ``prometheus_client`` picks the multiprocess value class when imported). This
    process imported it before, so its value class is chosen again here, and any metric
    object made before is dropped (made again at its next use).
    """
    global _metrics
    os.environ[MULTIPROC_ENV] = folder
    with _lock:
        values.ValueClass = values.MultiProcessValue()
        _metrics = None


@_never_fails
def process_exited(pid: int) -> None:
    """A process that kept counts in the shared folder exited: its live gauges leave the sum."""
    folder = os.environ.get(MULTIPROC_ENV)
    if folder and os.path.isdir(folder):
        multiprocess.mark_process_dead(pid, folder)


# -- the server ------------------------------------------------------------------------------


@_never_fails
def connection_admitted() -> None:
    _m().admitted.inc()


@_never_fails
def connection_refused(refusal: str) -> None:
    """``refusal``: the refusal's words as logged (e.g. "server full (200 connections)")."""
    _m().refused.labels(classify(refusal, REFUSAL_REASONS)).inc()


@_never_fails
def login_succeeded(account: str) -> None:
    m = _m()
    m.logins_ok.labels(account).inc()
    m.sessions.inc()


@_never_fails
def session_ended() -> None:
    """A logged-in connection ended (call once per :func:`login_succeeded`)."""
    _m().sessions.dec()


@_never_fails
def login_failed(reasons: list[str]) -> None:
    """A connection ended without a login; ``reasons``: its refused keys' reasons (none: it
    never offered a key, which is not counted)."""
    if reasons:
        _m().logins_failed.labels(classify(reasons[-1], LOGIN_FAILURE_REASONS)).inc()


@_never_fails
def ban() -> None:
    _m().bans.inc()


@_never_fails
def file_received(account: str, size: int) -> None:
    m = _m()
    m.files.labels(account).inc()
    m.received.labels(account).inc(size)


@_never_fails
def upload_discarded(reason: str) -> None:
    """``reason``: the discard's words as logged, or a limit's kind."""
    kind = "limit" if reason in LIMIT_KINDS else classify(reason, DISCARD_REASONS)
    _m().discarded.labels(kind).inc()


@_never_fails
def limit_hit(kind: str) -> None:
    _m().limits.labels(kind if kind in LIMIT_KINDS else "other").inc()


# -- the loader ------------------------------------------------------------------------------


@_never_fails
def load_finished(account: str, status: str, rows: int, seconds: float | None = None) -> None:
    """One load attempt's outcome (``seconds``: how long it took; None for no file)."""
    m = _m()
    m.loads.labels(account, status if status in LOAD_STATUSES else "other").inc()
    if status == "loaded":
        m.rows.labels(account).inc(rows)
    if seconds is not None:
        m.load_seconds.observe(seconds)


@_never_fails
def pool_published(ok: bool) -> None:
    _m().pools.labels("published" if ok else "failed").inc()
