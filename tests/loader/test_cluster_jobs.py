"""Several nodes on one control DB and one data root: each account's nightly load and pool
publish happens once per scheduled run, the pre-check once per arrival, a dead node's claim
blocks nothing, and the loader's children die with their parent.

Two "nodes" are two Settings that differ only in ``[cluster] node_id`` (threads of this
process, each with its own database connections and locks), or two processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from ingest_core import folder_log
from ingest_core.db import JobClaim, JournalEvent, open_control_db, utcnow
from ingest_core.registry import Registry
from ingest_core.schedule import local_date
from ingest_core.settings import KeyPolicySettings, Settings, SmtpSettings
from loader.claims import KEYS, LOAD, job_lock
from loader.daemon import LOAD_JOB, POOL_JOB, LoaderDaemon, read_last_done, write_last_done
from loader.key_expiry import EVERY_ACCOUNT, send_key_reminders
from loader.nightly import run_account
from loader.pool import publish_pool
from loader.precheck import PreCheckWatcher, claim_arrivals, precheck_arrival
from loader.sis_db import open_sis_db


@pytest.fixture
def nodes(make_settings: Callable[..., Settings], pg_url: str) -> tuple[Settings, Settings]:
    """Two nodes sharing one PostgreSQL (control and SIS database) and one data root."""

    def node(name: str) -> Settings:
        return make_settings(
            control_db_url=pg_url,
            sis_db_url=pg_url,
            cluster={"node_id": name},
            loader={"precheck": False},
        )

    return node("node-a"), node("node-b")


def _lines(folder, status: str) -> list[str]:
    return [ln for ln in folder_log.read_lines(folder) if f" {status} " in ln]


def _both(fn_a: Callable[[], object], fn_b: Callable[[], object]) -> list[object]:
    """Run two nodes' work at the same moment (threads released together)."""
    start = threading.Barrier(2)
    out: list[object] = [None, None]
    errors: list[BaseException] = []

    def go(i: int, fn: Callable[[], object]) -> None:
        try:
            start.wait()
            out[i] = fn()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(i, f)) for i, f in enumerate((fn_a, fn_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


@pytest.mark.postgres
def test_two_nodes_load_each_account_once_for_one_scheduled_run(nodes, onboard, kit):
    a, b = nodes
    accounts = [onboard(a, "acme"), onboard(a, "globex")]
    for i, on in enumerate(accounts):
        kit.write_data(on.data_file, 200 + i)
    day = local_date(utcnow(), a.zone)
    names = [on.name for on in accounts]

    def node_run(s: Settings, order: list[str]) -> list:
        return [run_account(s, n, run_key=day) for n in order]

    ran_a, ran_b = _both(lambda: node_run(a, names), lambda: node_run(b, names[::-1]))
    # a node started late (0.5-2.5 s late gave LOADED then NO FILE before)
    late = node_run(b, names)
    for on in accounts:
        assert len(_lines(on.folder, "LOADED")) == 1, folder_log.read_lines(on.folder)
        assert not _lines(on.folder, "NO FILE") and not _lines(on.folder, "ERROR")
        assert len(folder_log.read_lines(on.folder)) == 1
        assert not on.data_file.exists()
        history = open_sis_db(a.sis_db_url).loads(on.name)
        assert [r.status for r in history] == ["loaded"]
    results = [r for r in ran_a + ran_b if not r.skipped]  # type: ignore[operator]
    assert sorted(r.account for r in results) == names and all(r.ok for r in results)
    assert all(r.ok and r.skipped.startswith(f"{r.account}: already done by node-") for r in late)
    with open_control_db(a.control_db_url).session() as session:
        claims = list(session.scalars(select(JobClaim).where(JobClaim.run_key == day)))
    assert sorted(c.account for c in claims) == names
    assert all(c.job == LOAD and c.finished_at and c.outcome == "ok" for c in claims)


@pytest.mark.postgres
def test_two_nodes_publish_each_pool_once(nodes, onboard, tmp_path):
    from loader.pool import import_ids

    a, b = nodes
    on = onboard(a, "initech", deferred_fetch=True)
    ids = tmp_path / "ids.txt"
    ids.write_text("A1\nA2\nA3\n", encoding="utf-8")
    import_ids(a, on.name, ids)
    day = local_date(utcnow(), a.zone)
    first = _both(
        lambda: publish_pool(a, on.name, run_key=day), lambda: publish_pool(b, on.name, run_key=day)
    )
    late = publish_pool(b, on.name, run_key=day)
    assert len(_lines(on.folder, "POOL")) == 1, folder_log.read_lines(on.folder)
    assert sorted(bool(r.skipped) for r in first) == [False, True]  # type: ignore[union-attr]
    assert late.ok and late.skipped.startswith("initech: already done by node-")
    assert on.folder.pool_file.read_bytes() == b"A1\r\nA2\r\nA3\r\n"
    # a manual publish is an operator's own: it publishes again
    assert not publish_pool(b, on.name).skipped
    assert len(_lines(on.folder, "POOL")) == 2


@pytest.mark.postgres
def test_manual_runs_on_two_nodes_at_once_load_once_and_both_exit_0(nodes, onboard, kit, workdir):
    from conftest import run_ingestctl_in_process

    a, _ = nodes
    on = onboard(a, "acme")
    kit.write_data(on.data_file, 30_000)
    config_b = workdir / "node-b.toml"
    config_b.write_text(
        f'data_root = "var"\nlog_dir = "logs"\ncontrol_db_url = "{a.control_db_url}"\n'
        f'sis_db_url = "{a.sis_db_url}"\n[cluster]\nnode_id = "node-b"\n',
        encoding="utf-8",
    )
    inside, release = threading.Event(), threading.Event()

    def hold(_account: str, _name: str, _rows: int) -> None:
        inside.set()
        release.wait(60)

    seen: list = []
    node_a = threading.Thread(target=lambda: seen.append(run_account(a, on.name, progress=hold)))
    node_a.start()
    try:
        assert inside.wait(60)  # node-a is loading acme, holding its lock
        done = run_ingestctl_in_process(
            ["--config", str(config_b), "loader", "run", "acme"], workdir
        )
    finally:
        release.set()
        node_a.join()
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    assert line.startswith("acme: running on node-a since ")
    assert seen[0].ok and not seen[0].skipped
    assert len(_lines(on.folder, "LOADED")) == 1 and len(folder_log.read_lines(on.folder)) == 1
    # the same command again, in sequence, runs again (and finds no file)
    again = run_ingestctl_in_process(["--config", str(config_b), "loader", "run", "acme"], workdir)
    assert again.returncode == 0 and "NO FILE" in again.stdout
    assert [r.status for r in open_sis_db(a.sis_db_url).loads("acme")] == ["loaded", "no_file"]


@pytest.mark.postgres
def test_a_busy_account_on_another_node_gets_nothing_written(nodes, onboard, kit):
    a, b = nodes
    on = onboard(a, "acme")
    kit.write_data(on.data_file, 5)
    day = local_date(utcnow(), a.zone)
    with job_lock(a, LOAD, "acme") as got:  # node-a's run holds the account
        assert got
        result = run_account(b, "acme", run_key=day)
    assert result.ok and result.skipped.startswith("acme: ")
    assert on.data_file.exists() and folder_log.read_lines(on.folder) == []
    assert open_sis_db(a.sis_db_url).loads("acme") == []
    # the claim went with the skipped attempt: the run is still to do, and is done
    assert run_account(b, "acme", run_key=day).ok and not on.data_file.exists()


@pytest.mark.postgres
def test_a_dead_nodes_claim_does_not_block_the_next_run(nodes, onboard, kit):
    a, b = nodes
    on = onboard(a, "acme")
    kit.write_data(on.data_file, 7)
    day = local_date(utcnow(), a.zone)
    db = open_control_db(a.control_db_url)
    with db.session.begin() as session:  # node-a died mid-run: claimed, never finished
        session.add(
            JobClaim(
                job=LOAD,
                account="acme",
                run_key=day,
                node="node-a",
                claimed_at=utcnow() - timedelta(minutes=5),
            )
        )
    result = run_account(b, "acme", run_key=day)
    assert result.ok and not result.skipped
    assert len(_lines(on.folder, "LOADED")) == 1
    with db.session() as session:
        (claim,) = session.scalars(select(JobClaim).where(JobClaim.account == "acme"))
    assert (claim.node, claim.outcome) == ("node-b", "ok") and claim.finished_at


@pytest.mark.postgres
def test_catch_up_after_restart_does_not_redo_another_nodes_run(nodes, onboard, kit):
    a, b = nodes
    on = onboard(a, "acme")
    kit.write_data(on.data_file, 9)
    zone = a.zone
    now = datetime.now(zone).replace(hour=12, minute=0, second=0, microsecond=0)
    day = now.date().isoformat()
    yesterday = (now - timedelta(days=1)).date().isoformat()
    assert run_account(a, "acme", run_key=day).ok  # node-a did today's 03:00 run
    write_last_done(a, LOAD_JOB, yesterday)  # ... but died before recording it
    write_last_done(a, POOL_JOB, day)
    daemon = LoaderDaemon(b, now=lambda: now.astimezone(zone), step=0.01, in_process=True)

    async def until_waiting() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        while daemon.waiting != {LOAD_JOB, POOL_JOB} and not task.done():
            await asyncio.sleep(0.01)
        stop.set()
        await task

    asyncio.run(until_waiting())
    assert daemon.job_runs == [(LOAD_JOB, day)]  # node-b caught up the run ...
    assert folder_log.read_lines(on.folder)[1:] == []  # ... and wrote nothing: it was done
    assert read_last_done(b, LOAD_JOB) == day
    write_last_done(b, LOAD_JOB, yesterday)  # a late writer never moves it back
    assert read_last_done(b, LOAD_JOB) == day


def _received(s: Settings, account: str, name: str, node: str = "node-a") -> None:
    """What the server records for a completed upload (the journal's file.received row)."""
    db = open_control_db(s.control_db_url)
    with db.session.begin() as session:
        session.add(
            JournalEvent(
                at=utcnow(),
                node=node,
                account=account,
                kind="file.received",
                detail=json.dumps({"name": name, "bytes": 1, "sha256": "x"}),
            )
        )


def _poll_until_empty(s: Settings) -> int:
    checked = 0
    while arrivals := claim_arrivals(s, limit=2):
        for arrival in arrivals:
            precheck_arrival(s, arrival)
            checked += 1
    return checked


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_each_journal_arrival_is_pre_checked_once_by_two_pollers(
    backend, request, settings, onboard, kit
):
    if backend == "sqlite":
        a, b = settings, settings.replace(cluster=settings.cluster.__class__(node_id="node-b"))
    else:
        a, b = request.getfixturevalue("nodes")
    accounts = [onboard(a, f"acct{i}") for i in range(6)]
    for i, on in enumerate(accounts):
        kit.upload(on.folder, on.spec.file_name, kit.data_text(3 + i))
        _received(a, on.name, on.spec.file_name)
    counts = _both(lambda: _poll_until_empty(a), lambda: _poll_until_empty(b))
    assert sum(counts) == 6  # type: ignore[arg-type]
    for i, on in enumerate(accounts):
        (line,) = folder_log.read_lines(on.folder)
        assert f"RECEIVED sis_hr_user_info.txt passed the checks: {3 + i} rows" in line
    with open_control_db(a.control_db_url).session() as session:
        rows = list(session.scalars(select(JournalEvent)))
    assert all(r.checked_at and r.checked_by in (a.node_id, "node-b") for r in rows)


def test_the_watchdog_leaves_journal_arrivals_to_the_journal_and_checks_copies(
    settings, onboard, kit
):
    on = onboard(settings, "acme")
    other = onboard(settings, "globex")
    watcher = PreCheckWatcher(settings, settle=0.3)
    watcher.start()
    try:
        _received(settings, "acme", on.spec.file_name)  # an upload through the server
        kit.upload(on.folder, on.spec.file_name, kit.data_text(4))
        kit.upload(other.folder, other.spec.file_name, kit.data_text(5))  # an operator's copy
        time.sleep(0.5)  # let the observer deliver both events (their checks are waited for below)
        assert watcher.idle(30)
    finally:
        watcher.stop()
    assert folder_log.read_lines(on.folder) == []  # the journal poller's to check
    (line,) = folder_log.read_lines(other.folder)
    assert "RECEIVED sis_hr_user_info.txt passed the checks: 5 rows" in line
    assert _poll_until_empty(settings) == 1
    assert len(folder_log.read_lines(on.folder)) == 1


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_kill_9_of_the_loader_daemon_kills_its_children(acme, kit, config_file, workdir):
    from conftest import start_loader_daemon
    from server_harness import process_tree

    daemon = start_loader_daemon(workdir, config_file, stderr=subprocess.DEVNULL)
    try:
        _received(acme.settings, "acme", acme.spec.file_name)
        kit.upload(acme.folder, acme.spec.file_name, kit.data_text(6))
        deadline = time.monotonic() + 60
        while not folder_log.read_lines(acme.folder) and time.monotonic() < deadline:
            assert daemon.poll() is None
            time.sleep(0.1)
        assert folder_log.read_lines(acme.folder), "the pre-check child never ran"
        children = process_tree(daemon.pid)[1:]
        assert children  # the pre-check's child (and multiprocessing's helper) are running
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in children if _alive(p)]
    finally:
        if daemon.poll() is None:
            daemon.kill()


@pytest.mark.postgres
def test_two_nodes_send_each_key_reminder_once(nodes, make_key, smtp_sink):
    sink, port = smtp_sink
    smtp = SmtpSettings(host="127.0.0.1", port=port, recipients=["ops@example.edu"], timeout=10)
    keys = KeyPolicySettings(accept_ed25519=True, max_age_days=365)
    a, b = (n.replace(smtp=smtp, keys=keys) for n in nodes)
    registry = Registry(a, actor="test")
    registry.create_account("acme")
    registry.add_contact("acme", "it@acme.edu")
    registry.add_key("acme", make_key("ed25519", 256, "acme").with_suffix(".pub").read_text())
    (key,) = registry.list_keys("acme")
    assert key.expires_at is not None
    when = datetime.fromisoformat(key.expires_at) - timedelta(days=6)

    # While another node holds the reminders' lock, this one sends nothing (deterministic;
    # the race below may or may not overlap the two nodes).
    with job_lock(a, KEYS, EVERY_ACCOUNT) as got:
        assert got
        assert send_key_reminders(b, when) == []
    assert sink.messages == []

    sent = _both(lambda: send_key_reminders(a, when), lambda: send_key_reminders(b, when))
    again = send_key_reminders(b, when + timedelta(hours=1))

    assert sorted(len(s) for s in sent) == [0, 1] and again == []
    assert sorted(m["To"] for m in sink.messages) == ["it@acme.edu", "ops@example.edu"]
