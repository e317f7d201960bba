"""The loader's scheduler: nightly load and pool publish at local wall-clock times.

Times come from ``settings.schedule`` in ``settings.zone``; the DST-correct arithmetic lives in
``ingest_core/schedule.py``. The last local date each job completed is kept in the control
DB's ``job_runs`` table, so a restart that missed a run catches up once (if
``catch_up_missed_runs``), never twice. A first start ever does not run a job it "missed"
before it was installed.

The same event loop may also serve SSH (``ingestctl serve``), so no load runs in it: each
account's load (and each pool publish, and each pre-check) runs in a spawned child process. A
child that dies (killed, out of memory) costs that account's run only.

Ctrl-C sends SIGINT to the whole foreground process group, children included: the children
ignore it (the parent's stop ends them, as after SIGTERM), so a Ctrl-C prints no child's
KeyboardInterrupt traceback.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime, time
from typing import Any, TypeVar

from sqlalchemy import select

from ingest_core.db import JobRun, open_control_db, utcnow
from ingest_core.lifecycle import run_until_signalled
from ingest_core.schedule import Daily, local_date, missed_run, parse_hhmm, utc_now, wait_until
from ingest_core.settings import Settings
from ingest_core.structured_log import get_logger, log_limits
from loader.nightly import AccountResult, accounts_to_run, report_crash, run_account
from loader.notify import notify_failure
from loader.pool import PoolResult, pool_accounts, publish_pool
from loader.precheck import PreCheckWatcher, precheck_file
from loader.validate import without_values

LOAD_JOB = "loader.load"
POOL_JOB = "loader.pool"

T = TypeVar("T")


def read_last_done(settings: Settings, job: str) -> str | None:
    db = open_control_db(settings.control_db_url)
    with db.session() as session:
        return session.scalar(select(JobRun.last_local_date).where(JobRun.job == job))


def write_last_done(settings: Settings, job: str, local_day: str) -> None:
    db = open_control_db(settings.control_db_url)
    with db.session.begin() as session:
        row = session.get(JobRun, job)
        if row is None:
            session.add(JobRun(job=job, last_local_date=local_day, updated_at=utcnow()))
        else:
            row.last_local_date = local_day
            row.updated_at = utcnow()


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


def _ignore_sigint() -> None:
    """A child's first act: leave Ctrl-C to the parent, which stops the child in its time."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ChildRunner:
    """Runs functions in a spawned child process, one at a time; a dead child is replaced."""

    def __init__(self, in_process: bool = False) -> None:
        self._in_process = in_process
        self._executor: Executor | None = None
        self._lock = threading.Lock()

    def _get(self) -> Executor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_ignore_sigint,
            )
        return self._executor

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in the child and wait (raises BrokenProcessPool if it died)."""
        if self._in_process:
            return fn(*args)
        with self._lock:
            try:
                return self._get().submit(fn, *args).result()
            except BrokenProcessPool:
                self._reset()
                raise

    async def acall(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(self.call, fn, *args)

    def _reset(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def close(self) -> None:
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)
                self._executor = None


class LoaderDaemon:
    """Nightly loads, pool publishes and on-arrival pre-checks until ``stop`` is set."""

    def __init__(
        self,
        settings: Settings,
        now: Callable[[], datetime] = utc_now,
        step: float = 30.0,
        in_process: bool = False,
    ) -> None:
        self.settings = settings
        self.now = now
        self.step = step
        self.log = get_logger(settings.log_dir, "loader", **log_limits(settings))
        self._loads = ChildRunner(in_process)
        self._pools = ChildRunner(in_process)
        self._prechecks = ChildRunner(in_process)
        self.job_runs: list[tuple[str, str]] = []  # (job, local date) done by this daemon
        self.waiting: set[str] = set()  # jobs now sleeping until their next run

    async def run(self, stop: asyncio.Event) -> None:
        zone = self.settings.zone
        schedule = self.settings.schedule
        watcher: PreCheckWatcher | None = None
        if self.settings.loader.precheck:
            watcher = PreCheckWatcher(
                self.settings,
                check=lambda p: self._prechecks.call(precheck_file, self.settings, p),
            )
            await asyncio.to_thread(watcher.start)
        self.log.info(
            "daemon_started",
            load=Daily(parse_hhmm(schedule.loader_time), zone).describe(),
            pool=Daily(parse_hhmm(schedule.pool_time), zone).describe(),
        )
        try:
            await asyncio.gather(
                self._job_loop(LOAD_JOB, parse_hhmm(schedule.loader_time), self.run_loads, stop),
                self._job_loop(POOL_JOB, parse_hhmm(schedule.pool_time), self.run_pools, stop),
            )
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

    async def run_loads(self, due: datetime | None = None) -> list[AccountResult]:
        """Every active account's load, each in its own child process run."""
        names = await asyncio.to_thread(accounts_to_run, self.settings, None)
        results = []
        for name in names:
            try:
                result = await self._loads.acall(run_account, self.settings, name)
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
        return results

    async def run_pools(self, due: datetime | None = None) -> list[PoolResult]:
        names = await asyncio.to_thread(pool_accounts, self.settings, None)
        results = []
        for name in names:
            try:
                results.append(await self._pools.acall(publish_pool, self.settings, name))
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
    run_until_signalled(LoaderDaemon(settings).run)
