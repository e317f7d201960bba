"""The loader's scheduler: nightly load and pool publish at local wall-clock times.

Times come from ``settings.schedule`` in ``settings.zone``; the DST-correct arithmetic lives in
``ingest_core/schedule.py``. The last local date each job completed is kept in the control
DB's ``job_runs`` table, so a restart that missed a run catches up once (if
``catch_up_missed_runs``), never twice. A first start ever does not run a job it "missed"
before it was installed. Several nodes may run this daemon on one control DB: each wakes at
the scheduled minute, and each account's load or pool publish of that run happens on one of
them (:mod:`loader.claims`); ``job_runs`` only moves forward, so a node catching up never
redoes, or rewinds, what another node did.

The same event loop may also serve SSH (``ingestctl serve``), so no load runs in it: each
account's load (and each pool publish, and each pre-check) runs in a spawned child process. A
child that dies (killed, out of memory) costs that account's run only. A child dies with its
parent, even one killed with SIGKILL (Linux ``PR_SET_PDEATHSIG``): no orphan goes on loading.
The pre-check takes completed uploads from the control DB's journal, whichever node received
them (:func:`loader.precheck.claim_arrivals`), and files copied in by other means from a
watchdog observer.

Ctrl-C sends SIGINT to the whole foreground process group, children included: the children
ignore it (the parent's stop ends them, as after SIGTERM), so a Ctrl-C prints no child's
KeyboardInterrupt traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime, time
from typing import Any, TypeVar

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from ingest_core import nodes
from ingest_core.db import JobRun, open_control_db, utcnow
from ingest_core.file_names import escape_for_operator
from ingest_core.lifecycle import run_until_signalled
from ingest_core.schedule import Daily, local_date, missed_run, parse_hhmm, utc_now, wait_until
from ingest_core.settings import Settings
from ingest_core.structured_log import get_logger, log_limits
from loader.key_expiry import send_key_reminders
from loader.nightly import AccountResult, accounts_to_run, error_text, report_crash, run_account
from loader.notify import notify_failure
from loader.pool import PoolResult, pool_accounts, publish_pool
from loader.precheck import (
    CLAIM_BATCH,
    WATCH_SETTLE,
    PreCheckWatcher,
    claim_arrivals,
    precheck_arrival,
    precheck_file,
)
from loader.validate import without_values

LOAD_JOB = "loader.load"
POOL_JOB = "loader.pool"
# How often the pre-check looks for uploads in the journal when the last look found none.
JOURNAL_POLL_SECONDS = 1.0

T = TypeVar("T")


def read_last_done(settings: Settings, job: str) -> str | None:
    db = open_control_db(settings.control_db_url)
    with db.session() as session:
        return session.scalar(select(JobRun.last_local_date).where(JobRun.job == job))


def write_last_done(settings: Settings, job: str, local_day: str) -> None:
    """Record that ``job`` ran for ``local_day``; never moves back (a node catching up on an
    older run after another node did a newer one), and two nodes writing at once both win."""
    db = open_control_db(settings.control_db_url)
    try:
        with db.session.begin() as session:
            session.add(JobRun(job=job, last_local_date=local_day, updated_at=utcnow()))
        return
    except IntegrityError:
        pass  # the row exists (or another node just made it): move it forward
    with db.session.begin() as session:
        session.execute(
            update(JobRun)
            .where(JobRun.job == job, JobRun.last_local_date < local_day)
            .values(last_local_date=local_day, updated_at=utcnow())
        )


def due_run(
    freq: Daily, last_done: str | None, now: datetime, catch_up: bool
) -> tuple[datetime | None, str | None]:
    """What to do at start-up: (instant to run now or None, baseline date to record or None).

    A job never run before, or with catch-up off, starts from the latest scheduled instant
    as if done (recorded as the baseline); otherwise the one missed run, if any, is due.
    """
    latest = freq.last_at_or_before(now)
    if last_done is None or not catch_up:
        baseline = local_date(latest, freq.zone)
        if last_done is not None and baseline <= last_done:
            return None, None
        return None, baseline
    return missed_run(freq, last_done, now, freq.zone), None


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL this process when the thread that started it ends (the
    parent killed with SIGKILL included), then make sure that parent is still there: it may
    have died before the request was made."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os._exit(1)


def _child_start(parent: int) -> None:
    """A child's first acts: die with the parent; leave Ctrl-C to the parent, which stops
    the child in its time."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ChildRunner:
    """Runs functions in a spawned child process, one at a time; a dead child is replaced.

    Every call goes through one thread of the runner's own, which starts the child: the
    kernel's parent-death signal follows the thread that forked, so that thread must live as
    long as the runner does (a pool thread that ends would kill a healthy child).
    """

    def __init__(self, in_process: bool = False) -> None:
        self._in_process = in_process
        self._executor: Executor | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="child-runner")
        self._closed = False

    def _get(self) -> Executor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_child_start,
                initargs=(os.getpid(),),
            )
        return self._executor

    def _call_here(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return self._get().submit(fn, *args).result()
        except BrokenProcessPool:
            self._reset()
            raise

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in the child and wait (raises BrokenProcessPool if it died)."""
        if self._in_process:
            return fn(*args)
        return self._thread.submit(self._call_here, fn, *args).result()

    async def acall(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(self.call, fn, *args)

    def child_pids(self) -> list[int]:
        """The running children's process ids (tests, diagnostics)."""
        processes = getattr(self._executor, "_processes", None) or {}
        return list(processes)

    def _reset(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _close_here(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._thread.submit(self._close_here).result()
        self._thread.shutdown(wait=True)


class LoaderDaemon:
    """Nightly loads, pool publishes and on-arrival pre-checks until ``stop`` is set."""

    def __init__(
        self,
        settings: Settings,
        now: Callable[[], datetime] = utc_now,
        step: float = 30.0,
        in_process: bool = False,
        journal_poll: float = JOURNAL_POLL_SECONDS,
        watch_settle: float = WATCH_SETTLE,
        heartbeat: bool = False,
    ) -> None:
        """``heartbeat``: this daemon runs alone (``ingestctl loader daemon``), so it claims
        the data root (a SQLite control DB is one node's) and keeps the node's heartbeat and
        marker itself; under ``ingestctl serve`` the server does."""
        self.settings = settings
        self.heartbeat = heartbeat
        self.now = now
        self.step = step
        self.journal_poll = journal_poll
        self.watch_settle = watch_settle
        self.watcher: PreCheckWatcher | None = None  # the watchdog path, while running
        self.log = get_logger(settings.log_dir, "loader", **log_limits(settings))
        self._loads = ChildRunner(in_process)
        self._pools = ChildRunner(in_process)
        self._prechecks = ChildRunner(in_process)
        self.job_runs: list[tuple[str, str]] = []  # (job, local date) done by this daemon
        self.waiting: set[str] = set()  # jobs now sleeping until their next run

    async def run(self, stop: asyncio.Event) -> None:
        zone = self.settings.zone
        schedule = self.settings.schedule
        if self.heartbeat:
            await asyncio.to_thread(self._start_beating)
        watcher: PreCheckWatcher | None = None
        if self.settings.loader.precheck:
            watcher = PreCheckWatcher(
                self.settings,
                check=lambda p: self._prechecks.call(precheck_file, self.settings, p),
                settle=self.watch_settle,
            )
            self.watcher = watcher
            await asyncio.to_thread(watcher.start)
        self.log.info(
            "daemon_started",
            load=Daily(parse_hhmm(schedule.loader_time), zone).describe(),
            pool=Daily(parse_hhmm(schedule.pool_time), zone).describe(),
        )
        loops = [
            self._job_loop(LOAD_JOB, parse_hhmm(schedule.loader_time), self.run_loads, stop),
            self._job_loop(POOL_JOB, parse_hhmm(schedule.pool_time), self.run_pools, stop),
        ]
        if self.settings.loader.precheck:
            loops.append(self._journal_loop(stop))
        if self.heartbeat:
            loops.append(self._heartbeat_loop(stop))
        try:
            await asyncio.gather(*loops)
        finally:
            if watcher is not None:
                await asyncio.to_thread(watcher.stop)
            for runner in (self._loads, self._pools, self._prechecks):
                await asyncio.to_thread(runner.close)
            self.log.info("daemon_stopped")

    async def _job_loop(
        self,
        job: str,
        at: time,
        action: Callable[[datetime], Awaitable[object]],
        stop: asyncio.Event,
    ) -> None:
        freq = Daily(at, self.settings.zone)
        catch_up = self.settings.schedule.catch_up_missed_runs
        last = await asyncio.to_thread(read_last_done, self.settings, job)
        due, baseline = due_run(freq, last, self.now(), catch_up)
        if baseline is not None:
            await asyncio.to_thread(write_last_done, self.settings, job, baseline)
            last = baseline
        while not stop.is_set():
            if due is None:
                due = missed_run(freq, last, self.now(), freq.zone)
            if due is None:
                self.waiting.add(job)
                woke = await wait_until(freq.next_after(self.now()), self.now, self.step, stop)
                self.waiting.discard(job)
                if not woke:
                    return
                continue
            day = local_date(due, freq.zone)
            self.log.info("job_start", job=job, scheduled=due.isoformat(), local_date=day)
            try:
                await action(due)
            except Exception as exc:  # a job's failure must not end the schedule
                error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
                self.log.error("job_failed", job=job, local_date=day, error=error)
                what = "Nightly load" if job == LOAD_JOB else "Pool publish"
                await asyncio.to_thread(
                    notify_failure, self.settings, what, "(all accounts)", "-", error, due
                )
            await asyncio.to_thread(write_last_done, self.settings, job, day)
            self.job_runs.append((job, day))
            self.log.info("job_done", job=job, local_date=day)
            last, due = day, None

    def _start_beating(self) -> None:
        """Refuse a data root another node used with a SQLite control DB (one line, exit 1);
        then this node is seen (blocking)."""
        nodes.claim_data_root(self.settings)
        nodes.note_alive(open_control_db(self.settings.control_db_url), self.settings)

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
        """The node's heartbeat and marker, every ``HEARTBEAT_SECONDS`` until ``stop``."""
        db = open_control_db(self.settings.control_db_url)
        while not stop.is_set():
            try:
                await asyncio.to_thread(nodes.heartbeat, db, self.settings)
            except Exception as exc:  # the control DB is away: try again at the next beat
                first = (str(exc).splitlines() or [type(exc).__name__])[0]
                self.log.warning("heartbeat_failed", error=first[:300])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), nodes.HEARTBEAT_SECONDS)

    async def _journal_loop(self, stop: asyncio.Event) -> None:
        """Pre-check each upload the journal recorded (on any node), once per cluster."""
        failing = False
        while not stop.is_set():
            try:
                arrivals = await asyncio.to_thread(claim_arrivals, self.settings)
                failing = False
            except Exception as exc:  # the control DB is away: try again later
                if not failing:
                    self.log.error("precheck_journal_unavailable", error=error_text(exc))
                failing, arrivals = True, []
            for arrival in arrivals:
                try:
                    await self._prechecks.acall(precheck_arrival, self.settings, arrival)
                except Exception as exc:  # one bad file (or a dead child) never stops the loop
                    self.log.error(
                        "precheck_failed",
                        account=arrival.account,
                        file=escape_for_operator(arrival.name),
                        error=error_text(exc),
                    )
            if len(arrivals) < CLAIM_BATCH:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.journal_poll)

    async def run_loads(self, due: datetime | None = None) -> list[AccountResult]:
        """Every active account's load, each in its own child process run; ``due`` (the
        scheduled instant) makes it the run of that local date, done once per cluster."""
        names = await asyncio.to_thread(accounts_to_run, self.settings, None)
        key = local_date(due, self.settings.zone) if due is not None else None
        results = []
        for name in names:
            try:
                result = await self._loads.acall(
                    run_account, self.settings, name, False, None, None, key
                )
            except BrokenProcessPool:
                result = AccountResult(name, crashed="the load process died unexpectedly")
                await asyncio.to_thread(
                    report_crash,
                    self.settings,
                    name,
                    result.crashed,
                    datetime.now(self.settings.zone),
                )
            results.append(result)
            summary = without_values(result.summary())
            self.log.info("account_run", account=name, ok=result.ok, summary=summary)
        await asyncio.to_thread(send_key_reminders, self.settings, self.now())
        return results

    async def run_pools(self, due: datetime | None = None) -> list[PoolResult]:
        """Every deferred-fetch account's pool publish, once per cluster for ``due``'s date."""
        names = await asyncio.to_thread(pool_accounts, self.settings, None)
        key = local_date(due, self.settings.zone) if due is not None else None
        results = []
        for name in names:
            try:
                results.append(
                    await self._pools.acall(publish_pool, self.settings, name, None, key)
                )
            except BrokenProcessPool:
                error = "the pool process died unexpectedly"
                await asyncio.to_thread(
                    notify_failure,
                    self.settings,
                    "Pool publish",
                    name,
                    "applicant_pool.txt",
                    error,
                    datetime.now(self.settings.zone),
                )
                results.append(PoolResult(name, False, 0, "", error))
        return results


def run_forever(settings: Settings) -> None:
    """``ingestctl loader daemon``: run until SIGTERM or SIGINT."""
    run_until_signalled(LoaderDaemon(settings, heartbeat=True).run)
