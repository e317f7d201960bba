"""E-mails against a real SMTP server (aiosmtpd on 127.0.0.1) and the daemon's schedule driven
by an injected clock: DST-correct daily runs, catch-up once, failures mailed, no secrets."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from push_agent import connections, daemon, runs
from push_agent.agent import Agent
from push_agent.connections import Connection

from .conftest import FakeClock, SmtpSink, SshdLab, free_port, ready, smtp_settings


def log_text(agent: Agent) -> str:
    return (agent.settings.log_dir / "push-agent.jsonl").read_text(encoding="utf-8")


def test_create_edit_delete_are_mailed_with_who_when_what_never_secrets(
    make_agent: Callable[..., Agent],
    smtp_sink: SmtpSink,
    sshd_lab: SshdLab,
    sshd_connection: Callable[..., Connection],
) -> None:
    clock = FakeClock(datetime.fromisoformat("2026-07-04T15:30:00+00:00"))
    agent = make_agent(now=clock, smtp=smtp_settings(smtp_sink.port))
    secret = "s3cret-Pa55word"
    db_url = "postgresql+psycopg://reporter:db-Pa55@127.0.0.1/sis"
    conn = sshd_connection(
        notify=["registrar@example.test"],
        source_kind="query",
        source_command=None,
        source_url=db_url,
        source_query="select 1",
    )
    connections.add(agent, conn, secret)
    connections.edit(agent, "sis", {"frequency": "weekly mon 03:00"}, password="n3w-Pa55word")
    connections.delete(agent, "sis")

    created, edited, deleted = smtp_sink.messages
    assert created["to"] == ["registrar@example.test"]
    assert created["subject"] == "[ingest-push] connection sis created"
    assert "By:   root" in created["body"]
    assert "Saturday 2026-07-04 11:30:00 EDT" in created["body"]
    assert "frequency: daily 02:00" in created["body"] and "password: set" in created["body"]
    assert "frequency: daily 02:00 -> weekly mon 03:00" in edited["body"]
    assert "password: (hidden) -> changed" in edited["body"]
    assert deleted["subject"] == "[ingest-push] connection sis deleted"
    everything = "".join(str(m) for m in smtp_sink.messages) + log_text(agent)
    for leaked in (secret, "n3w-Pa55word", "db-Pa55"):
        assert leaked not in everything
    assert not connections.password_path(agent, "sis").exists()


def test_password_file_is_0600_and_holds_only_the_password(
    agent: Agent, sshd_connection: Callable[..., Connection]
) -> None:
    connections.add(agent, sshd_connection(), "pw-line\n")
    path = connections.password_path(agent, "sis")
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert path.read_text() == "pw-line"
    assert "pw-line" not in log_text(agent)


def test_daemon_runs_daily_at_local_time_across_dst_and_catches_up_once(
    make_agent: Callable[..., Agent],
    sshd_lab: SshdLab,
    sshd_connection: Callable[..., Connection],
    upload_dir: Path,
) -> None:
    # America/New_York springs forward on 2026-03-08: 02:00 does not exist that day.
    clock = FakeClock(datetime.fromisoformat("2026-03-06T12:00:00+00:00"))
    agent = make_agent(now=clock)
    ready(agent, sshd_connection(verify_fingerprint=False), sshd_lab.password)

    def tick_at(text: str) -> list[runs.Outcome]:
        clock.at(text)
        return asyncio.run(daemon.tick(agent))

    assert tick_at("2026-03-07T06:59:59+00:00") == []  # 01:59:59 EST
    assert [o.ok for o in tick_at("2026-03-07T07:00:00+00:00")] == [True]  # 02:00 EST
    assert tick_at("2026-03-07T07:30:00+00:00") == []  # not twice
    # Spring-forward day: the missing 02:00 runs at 03:00 EDT = 07:00 UTC, not skipped.
    assert tick_at("2026-03-08T06:59:00+00:00") == []
    assert len(tick_at("2026-03-08T07:00:00+00:00")) == 1
    # Next day 02:00 EDT = 06:00 UTC.
    assert tick_at("2026-03-09T05:59:00+00:00") == []
    assert len(tick_at("2026-03-09T06:00:00+00:00")) == 1
    # The machine was off for three days: one catch-up run, not three.
    assert len(tick_at("2026-03-12T12:00:00+00:00")) == 1
    assert tick_at("2026-03-12T12:01:00+00:00") == []
    assert runs.status(agent)[0]["next_run"] == datetime.fromisoformat("2026-03-13T06:00:00+00:00")
    scheduled = [r for r in agent.state.history("sis") if r["trigger"] == "scheduled"]
    assert len(scheduled) == 4 and all(r["ok"] for r in scheduled)


def test_daemon_serve_loop_follows_the_injected_clock(
    make_agent: Callable[..., Agent],
    sshd_lab: SshdLab,
    sshd_connection: Callable[..., Connection],
) -> None:
    start = datetime.fromisoformat("2026-05-01T00:10:00+00:00")
    ticks = {"n": 0}

    def fast_clock() -> datetime:  # every look at the clock is 20 simulated minutes later
        ticks["n"] += 1
        return start + timedelta(minutes=20 * ticks["n"])

    agent = make_agent(now=fast_clock)
    ready(
        agent,
        sshd_connection(frequency="every 2 hours", verify_fingerprint=False),
        sshd_lab.password,
    )

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.serve(agent, stop))
        while len(agent.state.history("sis")) < 3 + 1:  # the test run + 3 scheduled
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.wait_for(task, 10)

    asyncio.run(main())
    scheduled = [r for r in agent.state.history("sis") if r["trigger"] == "scheduled"]
    assert all(r["ok"] for r in scheduled)
    # One run per two-hour slot, never two in a slot; the anchor sits on a whole even hour.
    slots = {int(r["started_at"].timestamp() // 7200) for r in scheduled}
    assert len(slots) == len(scheduled) >= 3
    anchor = agent.state.get("sis")["schedule_anchor"]  # type: ignore[index]
    assert anchor.minute == 0 and anchor.hour % 2 == 0
    events = [e for e in log_text(agent).splitlines() if "daemon_stopped" in e]
    assert events


def test_scheduled_failure_is_mailed_with_time_message_and_cause(
    make_agent: Callable[..., Agent],
    smtp_sink: SmtpSink,
    sshd_lab: SshdLab,
    sshd_connection: Callable[..., Connection],
) -> None:
    clock = FakeClock(datetime.fromisoformat("2026-11-02T12:00:00+00:00"))
    agent = make_agent(now=clock, smtp=smtp_settings(smtp_sink.port))
    server = sshd_lab.server()
    ready(
        agent,
        sshd_connection(port=server.port, notify=["ops@example.test"], verify_fingerprint=False),
        sshd_lab.password,
    )
    server.stop()
    smtp_sink.messages.clear()
    clock.at("2026-11-03T07:00:00+00:00")  # 02:00 EST
    [outcome] = asyncio.run(daemon.tick(agent))
    assert not outcome.ok
    [mail] = smtp_sink.messages
    assert mail["to"] == ["ops@example.test"]
    assert "scheduled transfer failed (port-refused)" in str(mail["subject"])
    body = str(mail["body"])
    assert "Attempted: Tuesday 2026-11-03 02:00:00 EST" in body
    assert "Port was refused. Check that the port number is correct." in body
    assert f"Cause: 127.0.0.1:{server.port} refused the TCP connection" in body
    assert sshd_lab.password not in body + log_text(agent)
    # A manual run that fails is shown to the operator, not mailed.
    asyncio.run(runs.run_connection(agent, "sis"))
    assert len(smtp_sink.messages) == 1


def test_daemon_skips_an_untested_connection_and_mail_failure_is_not_fatal(
    make_agent: Callable[..., Agent], sshd_connection: Callable[..., Connection]
) -> None:
    clock = FakeClock(datetime.fromisoformat("2026-06-01T12:00:00+00:00"))
    dead_smtp = smtp_settings(free_port())  # nothing listens: mail fails, the change stands
    agent = make_agent(now=clock, smtp=dead_smtp)
    connections.add(agent, sshd_connection(notify=["a@example.test"]), "pw")
    assert '"event": "mail_failed"' in log_text(agent)
    clock.at("2026-06-02T12:00:00+00:00")
    [outcome] = asyncio.run(daemon.tick(agent))
    assert outcome.blocked and "no passing test" in outcome.blocked
    assert agent.state.history("sis") == []
    assert asyncio.run(daemon.tick(agent)) == []  # the instant is used up
