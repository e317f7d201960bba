"""The real ``ingest-push`` command line in a subprocess: passwords from stdin never echoed,
Test and Save with --accept, run, status/list/show/history --json, keys shown once, export,
one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from push_agent.settings import AgentSettings

from .conftest import SSH_USER, SmtpSink, SshdLab, SshdServer

Cli = Callable[..., subprocess.CompletedProcess[str]]


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (result.stdout, result.stderr)
    return result


def test_password_connection_end_to_end(
    push_cli: Cli,
    sshd: SshdServer,
    sshd_lab: SshdLab,
    upload_dir: Path,
    agent_settings: AgentSettings,
    smtp_sink: SmtpSink,
    tmp_path: Path,
) -> None:
    source = tmp_path / "sis_hr_user_info.txt"
    source.write_bytes(b"uuuid\r\nU1\r\n")
    added = ok(push_cli(
        "connection", "add", "sis", "--host", "127.0.0.1", "--port", str(sshd.port),
        "--path", "/upload", "--user", SSH_USER, "--frequency", "daily 02:00",
        "--file", str(source), "--since", "2026-01-01", "--notify", "ops@example.test",
        "--password-stdin",
        input=sshd_lab.password + "\n", smtp_port=smtp_sink.port,
    ))  # fmt: skip
    assert "created" in added.stdout
    assert len(smtp_sink.messages) == 1

    first = push_cli("connection", "test", "sis", "--json")
    outcome = json.loads(ok(first).stdout)
    assert outcome["ok"] and outcome["needs_confirmation"]
    assert outcome["fingerprint"] == sshd.fingerprint()
    blocked = push_cli("run", "sis")
    assert blocked.returncode == 1 and "New fingerprint detected." in blocked.stdout
    accepted = ok(push_cli("connection", "test", "sis", "--accept", sshd.fingerprint()))
    assert "fingerprint confirmed" in accepted.stdout
    ran = ok(push_cli("run", "sis"))
    assert "run of sis passed" in ran.stdout
    assert (upload_dir / "sis_hr_user_info.txt").read_bytes() == b"uuuid\r\nU1\r\n"

    status = json.loads(ok(push_cli("status", "--json")).stdout)
    assert status[0]["name"] == "sis" and status[0]["last_success"]
    assert status[0]["verified_fingerprint"] == sshd.fingerprint()
    assert status[0]["blocked"] is None
    assert "last success" in ok(push_cli("status")).stdout
    listed = json.loads(ok(push_cli("connection", "list", "--json")).stdout)
    assert [c["name"] for c in listed] == ["sis"]
    shown = json.loads(ok(push_cli("connection", "show", "sis", "--json")).stdout)
    assert shown["password_stored"] is True and shown["source_path"] == str(source)
    history = json.loads(ok(push_cli("history", "sis", "--json")).stdout)
    assert [h["trigger"] for h in history] == ["manual", "test", "manual", "test"]

    everything = (
        "".join(r.stdout + r.stderr for r in (added, first, blocked, accepted, ran))
        + json.dumps(shown)
        + (agent_settings.log_dir / "push-agent.jsonl").read_text()
    )
    assert sshd_lab.password not in everything

    out = tmp_path / "manual.txt"
    exported = ok(push_cli("export", "sis", "--out", str(out)))
    assert "unchanged" in exported.stdout and out.read_bytes() == b"uuuid\r\nU1\r\n"

    ok(push_cli("connection", "edit", "sis", "--frequency", "weekly fri 18:30"))
    assert "weekly fri 18:30" in smtp_sink.messages[-1]["body"]  # type: ignore[operator]
    ok(push_cli("connection", "delete", "sis"))
    assert push_cli("connection", "list").stdout.startswith("no connections")


def test_key_is_shown_once_then_only_its_fingerprint(push_cli: Cli) -> None:
    ok(push_cli(
        "connection", "add", "k", "--host", "127.0.0.1", "--path", "/", "--user", "alpha",
        "--auth", "key", "--frequency", "hourly", "--command", "true", "--remote-name", "a.txt",
    ))  # fmt: skip
    made = ok(push_cli("key", "generate", "k"))
    public = [line for line in made.stdout.splitlines() if line.startswith("ssh-rsa ")]
    assert len(public) == 1
    fingerprint = made.stdout.split("fingerprint: ")[1].strip()
    again = push_cli("key", "generate", "k")
    assert again.returncode == 1 and "ssh-rsa " not in again.stdout + again.stderr
    assert fingerprint in again.stderr and "key regenerate" in again.stderr
    assert json.loads(ok(push_cli("key", "show", "k", "--json")).stdout) == {
        "connection": "k", "fingerprint": fingerprint,
    }  # fmt: skip
    assert "ssh-rsa " not in ok(push_cli("connection", "show", "k")).stdout
    renewed = ok(push_cli("key", "regenerate", "k"))
    assert "ssh-rsa " in renewed.stdout and fingerprint not in renewed.stdout


def test_errors_are_one_line_and_passwords_never_come_from_argv(push_cli: Cli) -> None:
    missing = push_cli("connection", "show", "nope")
    assert missing.returncode == 1
    assert (
        missing.stderr.strip().count("\n") == 0 and "no connection named 'nope'" in missing.stderr
    )
    bad = push_cli(
        "connection", "add", "x", "--host", "h", "--path", "/", "--user", "u",
        "--frequency", "sometimes", "--command", "true", "--remote-name", "a", "--password-stdin",
        input="pw\n",
    )  # fmt: skip
    assert bad.returncode == 1 and "not a transfer frequency" in bad.stderr
    no_pw = push_cli(
        "connection", "add", "x", "--host", "h", "--path", "/", "--user", "u",
        "--frequency", "hourly", "--command", "true", "--remote-name", "a", input="",
    )  # fmt: skip
    assert no_pw.returncode == 1 and "--password-stdin" in no_pw.stderr
    argv_pw = push_cli("connection", "add", "x", "--password", "pw")
    assert argv_pw.returncode == 2
    assert sys.executable  # the CLI ran with this interpreter


def test_daemon_process_stops_cleanly_on_sigterm(
    push_cli: Cli, agent_settings: AgentSettings, tmp_path: Path
) -> None:
    import os
    import signal
    import time

    from .conftest import REPO

    config = tmp_path / "ingest-push.toml"
    push_cli("status")  # writes the config and creates the state
    proc = subprocess.Popen(
        [sys.executable, "-m", "push_agent.cli", "--config", str(config), "daemon"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    log = agent_settings.log_dir / "push-agent.jsonl"
    deadline = time.monotonic() + 30
    while "daemon_started" not in (log.read_text() if log.exists() else ""):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert "daemon_stopped" in log.read_text()


def _run_in_pty(argv: list[str], answers: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Run a command on a pseudo-terminal (its controlling tty), answering prompts."""
    import os
    import pty
    import select

    from .conftest import REPO

    pid, fd = pty.fork()
    if pid == 0:  # the child: exec the CLI with the pty as its terminal
        os.chdir(cwd)
        os.environ["PYTHONPATH"] = str(REPO)
        os.execv(argv[0], argv)
    output = b""
    pending = dict(answers)
    while True:
        ready_fds, _, _ = select.select([fd], [], [], 60)
        if not ready_fds:
            break
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
        for prompt in list(pending):
            if output.decode(errors="replace").rstrip().endswith(prompt):
                os.write(fd, (pending.pop(prompt) + "\n").encode())
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def test_prompts_on_a_terminal_password_and_fingerprint_confirmation(
    push_cli: Cli, sshd: SshdServer, sshd_lab: SshdLab, upload_dir: Path, tmp_path: Path
) -> None:
    push_cli("status")  # writes the config file
    base = [sys.executable, "-m", "push_agent.cli", "--config", str(tmp_path / "ingest-push.toml")]
    code, out = _run_in_pty(
        [*base, "connection", "add", "tty", "--host", "127.0.0.1", "--port", str(sshd.port),
         "--path", "/upload", "--user", SSH_USER, "--frequency", "hourly",
         "--command", "echo hi", "--remote-name", "hi.txt"],
        {"SFTP password:": sshd_lab.password, "Again:": sshd_lab.password},
        tmp_path,
    )  # fmt: skip
    assert code == 0, out
    assert sshd_lab.password not in out  # not echoed
    code, out = _run_in_pty(
        [*base, "connection", "test", "tty"], {"Confirm it? [y/N]": "y"}, tmp_path
    )
    assert code == 0, out
    assert f"The server's host key is ssh-ed25519 {sshd.fingerprint()}. Confirm it?" in out
    assert f"fingerprint confirmed: ssh-ed25519 {sshd.fingerprint()}; transfers may start" in out
    assert push_cli("run", "tty").returncode == 0
    assert (upload_dir / "hi.txt").read_text() == "hi\n"
