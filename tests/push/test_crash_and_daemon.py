"""The daemon killed (kill -9) in the middle of an upload, then started again: the run it
stopped in is taken up once and completes, or, stopped in a second time, is recorded failed
and mailed; no partial file stays on the server after the next run (OpenSSH sshd, where the
agent's own temporary name must be removed, and our server, where an upload is atomic).
Two daemons on one configuration: the second refuses to start, naming the first.

A loopback proxy holds the upload at a chosen byte count (it swallows what the agent sends
after that), so "mid-transfer" is a state the test waits for, not a moment it guesses."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from server_harness import RunningServer

from ingest_core.schedule import utc_now
from push_agent import runs
from push_agent.agent import Agent
from push_agent.connections import Connection

from .conftest import REPO, SmtpSink, SshdLab, ready

Cli = Callable[..., subprocess.CompletedProcess[str]]
MIB = 1024 * 1024


def wait_for(check: Callable[[], object], what: str, limit: float = 60.0) -> None:
    """Poll ``check`` until it is true; fail naming ``what`` after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


class Proxy:
    """A loopback TCP proxy. ``plan`` maps a connection's number (1 = the first accepted) to
    ("stall", n): after n bytes from the agent, swallow the rest (the upload hangs mid-way,
    until the agent goes away), or ("cut", n): after n bytes, drop the connection and stop
    listening (the next attempt is refused)."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.plan: dict[int, tuple[str, int]] = {}
        self.count = 0
        self.stalled = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.count += 1
            mode = self.plan.get(self.count)
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            pair = (client, upstream)
            for src, dst, how in ((client, upstream, mode), (upstream, client, None)):
                args = (src, dst, how, pair)
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        mode: tuple[str, int] | None,
        pair: tuple[socket.socket, socket.socket],
    ) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if mode is not None and sent >= mode[1]:
                    if mode[0] == "cut":
                        self.close()
                        break
                    self.stalled.set()
                    continue  # swallowed: the upload hangs until the agent goes away
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for sock in pair:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        """Stop listening now (shutdown wakes the accepting thread; close alone would not)."""
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


@pytest.fixture
def proxy_factory() -> Iterator[Callable[[int], Proxy]]:
    made: list[Proxy] = []

    def build(port: int) -> Proxy:
        made.append(Proxy(port))
        return made[-1]

    yield build
    for proxy in made:
        proxy.close()


class Daemons:
    """Real ``ingest-push daemon`` processes on the test's configuration file."""

    def __init__(self, config: Path, cwd: Path):
        self.config, self.cwd = config, cwd
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        err = open(self.cwd / f"daemon-{len(self.procs)}.err", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "push_agent.cli", "--config", str(self.config), "daemon"],
            cwd=self.cwd,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        err.close()
        self.procs.append(proc)
        return proc

    def stderr(self, proc: subprocess.Popen[bytes]) -> str:
        return (self.cwd / f"daemon-{self.procs.index(proc)}.err").read_text()

    def kill9(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, self.stderr(proc)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)


@pytest.fixture
def daemons(push_cli: Cli, tmp_path: Path) -> Iterator[Daemons]:
    made = Daemons(tmp_path / "ingest-push.toml", tmp_path)
    yield made
    made.close()


def make_due(agent: Agent, name: str) -> None:
    """The connection's last handled instant two hours ago: an hourly run is due now."""
    agent.state.update(name, schedule_anchor=utc_now() - timedelta(hours=2))


def scheduled_runs(agent: Agent, name: str) -> list[dict[str, object]]:
    return [r for r in agent.state.history(name) if r["trigger"] == "scheduled"]


def partial_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def big_payload(tmp_path: Path) -> Path:
    payload = tmp_path / "big.bin"
    payload.write_bytes(os.urandom(8 * MIB))
    return payload


def sshd_setup(
    agent: Agent,
    sshd: object,
    sshd_lab: SshdLab,
    sshd_connection: Callable[..., Connection],
    proxy_factory: Callable[[int], Proxy],
    tmp_path: Path,
) -> tuple[Proxy, Path]:
    proxy = proxy_factory(sshd.port)  # type: ignore[attr-defined]
    payload = big_payload(tmp_path)
    conn = sshd_connection(
        port=proxy.port, frequency="hourly", source_kind="file", source_path=str(payload),
        source_command=None, remote_name="big.bin", verify_fingerprint=False,
        notify=["ops@example.test"],
    )  # fmt: skip
    ready(agent, conn, sshd_lab.password)  # Test and Save: proxy connection 1
    make_due(agent, "sis")
    return proxy, payload


def kill_mid_upload(
    daemons: Daemons, proxy: Proxy, watch: Callable[[], object], agent: Agent
) -> dict[str, object]:
    """Start a daemon, wait until its upload hangs at the proxy, kill -9 it; returns the run
    it stopped in (started, never finished)."""
    proxy.stalled.clear()
    proc = daemons.start()
    wait_for(proxy.stalled.is_set, "the upload to reach the proxy's hold")
    wait_for(watch, "the partial upload on the server")
    daemons.kill9(proc)
    [run] = [r for r in scheduled_runs(agent, "sis") if r["finished_at"] is None]
    return run


def test_daemon_killed_mid_upload_takes_the_run_up_again_and_leaves_no_partial_file(
    agent: Agent,
    sshd: object,
    sshd_lab: SshdLab,
    sshd_connection: Callable[..., Connection],
    upload_dir: Path,
    proxy_factory: Callable[[int], Proxy],
    daemons: Daemons,
    push_cli: Cli,
    smtp_sink: SmtpSink,
    tmp_path: Path,
) -> None:
    push_cli("status", smtp_port=smtp_sink.port)  # the daemons' config, with mail
    proxy, payload = sshd_setup(agent, sshd, sshd_lab, sshd_connection, proxy_factory, tmp_path)
    proxy.plan = {2: ("stall", MIB)}
    stopped = kill_mid_upload(
        daemons, proxy, lambda: [p for p in upload_dir.iterdir() if p.stat().st_size], agent
    )
    assert not (upload_dir / "big.bin").exists()
    assert partial_files(upload_dir)  # sshd keeps what it got under the agent's temp name

    again = daemons.start()
    wait_for(lambda: agent.state.get_run(stopped["id"])["finished_at"], "the run to finish")  # type: ignore[index]
    daemons.stop(again)

    [run] = scheduled_runs(agent, "sis")  # the same run, finished: not a second one
    assert run["id"] == stopped["id"] and run["ok"] is True and run["restarts"] == 1
    assert (upload_dir / "big.bin").read_bytes() == payload.read_bytes()
    assert partial_files(upload_dir) == []
    [cause] = json.loads(str(run["attempt_causes"]))
    assert cause["category"] == "agent-stopped" and "took the run up again" in cause["cause"]
    entry = runs.status(agent)[0]
    assert entry["last_success"] == run["started_at"] and entry["last_failure"] is None
    assert not [m for m in smtp_sink.messages if "failed" in str(m["subject"])]


def test_daemon_killed_twice_in_one_run_records_it_failed_and_mails_it(
    agent: Agent,
    sshd: object,
    sshd_lab: SshdLab,
    sshd_connection: Callable[..., Connection],
    upload_dir: Path,
    proxy_factory: Callable[[int], Proxy],
    daemons: Daemons,
    push_cli: Cli,
    smtp_sink: SmtpSink,
    tmp_path: Path,
) -> None:
    push_cli("status", smtp_port=smtp_sink.port)
    proxy, payload = sshd_setup(agent, sshd, sshd_lab, sshd_connection, proxy_factory, tmp_path)
    proxy.plan = {2: ("stall", MIB), 3: ("stall", MIB)}
    first = kill_mid_upload(daemons, proxy, lambda: partial_files(upload_dir), agent)
    # Started again: it takes the run up, and is killed in it a second time.
    second = kill_mid_upload(daemons, proxy, lambda: proxy.count >= 3, agent)
    assert second["id"] == first["id"] and second["restarts"] == 1

    third = daemons.start()
    wait_for(lambda: agent.state.get_run(first["id"])["finished_at"], "the run to be recorded")  # type: ignore[index]
    wait_for(lambda: smtp_sink.messages, "the failure mail")
    daemons.stop(third)

    [run] = scheduled_runs(agent, "sis")  # recorded, not tried a third time
    assert run["ok"] is False and run["category"] == "agent-stopped"
    assert proxy.count == 3
    causes = [c["cause"] for c in json.loads(str(run["attempt_causes"]))]
    assert len(causes) == 2 and "a second time" in causes[1]
    assert "not tried again before the next scheduled run" in causes[1]
    [mail] = smtp_sink.messages
    assert mail["to"] == ["ops@example.test"]
    assert "scheduled transfer failed (agent-stopped)" in str(mail["subject"])
    body = str(mail["body"]).replace("\r\n", "\n")
    assert "The agent stopped in the middle of this run" in body
    assert "Every attempt (2):" in body and "a second time" in body
    entry = runs.status(agent)[0]
    assert entry["last_failure"] == run["started_at"] and entry["last_success"] is None
    assert not (upload_dir / "big.bin").exists()

    # The next run removes what the stopped uploads left on the server.
    assert partial_files(upload_dir)
    done = push_cli("run", "sis")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (upload_dir / "big.bin").read_bytes() == payload.read_bytes()
    assert partial_files(upload_dir) == []


@pytest.mark.slow
def test_daemon_killed_mid_upload_to_our_server_resumes_and_nothing_partial_shows(
    agent: Agent,
    ingest_server: RunningServer,
    alpha: Callable[..., Connection],
    proxy_factory: Callable[[int], Proxy],
    daemons: Daemons,
    push_cli: Cli,
    tmp_path: Path,
) -> None:
    push_cli("status")
    proxy = proxy_factory(ingest_server.port)
    payload = big_payload(tmp_path)
    alpha(port=proxy.port, frequency="hourly", source_path=str(payload))
    fingerprint = runs_test(agent).fingerprint  # proxy connection 1
    assert runs_test(agent, accept=fingerprint).pinned  # 2
    make_due(agent, "alpha")
    folder = ingest_server.folder("alpha")
    before = sorted(p.name for p in folder.iterdir())
    proxy.plan = {3: ("stall", MIB)}
    proxy.stalled.clear()
    proc = daemons.start()
    wait_for(proxy.stalled.is_set, "the upload to reach the proxy's hold")
    daemons.kill9(proc)
    [stopped] = [r for r in agent.state.history("alpha") if r["finished_at"] is None]
    # The upload is atomic on our server: nothing of it shows in the account folder.
    wait_for(lambda: sorted(p.name for p in folder.iterdir()) == before, "an unchanged folder")

    again = daemons.start()
    wait_for(lambda: agent.state.get_run(stopped["id"])["finished_at"], "the run to finish")  # type: ignore[index]
    daemons.stop(again)
    run = agent.state.get_run(stopped["id"])
    assert run is not None and run["ok"] is True and run["restarts"] == 1
    assert (folder / "big.bin").read_bytes() == payload.read_bytes()
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".part")]


def runs_test(agent: Agent, accept: str | None = None) -> runs.Outcome:
    import asyncio

    outcome = asyncio.run(runs.test_connection(agent, "alpha", accept))
    assert outcome.ok, outcome.failure
    return outcome


def test_a_second_daemon_refuses_to_start_naming_the_first(
    daemons: Daemons, push_cli: Cli, agent_settings: object
) -> None:
    push_cli("status")
    log = agent_settings.log_dir / "push-agent.jsonl"  # type: ignore[attr-defined]

    def started() -> int:
        return log.read_text().count("daemon_started") if log.exists() else 0

    first = daemons.start()
    wait_for(started, "the first daemon to start")
    second = daemons.start()
    assert second.wait(60) == 1
    [line] = daemons.stderr(second).splitlines()
    assert f"another ingest-push daemon (PID {first.pid}) already runs" in line
    assert first.poll() is None and started() == 1

    # Killed with kill -9, the first leaves a lock file behind that does not block.
    daemons.kill9(first)
    third = daemons.start()
    wait_for(lambda: started() == 2, "the third daemon to start")
    daemons.stop(third)
