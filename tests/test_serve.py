"""The main job end to end: `ingestctl serve` runs the SFTP server and the loader together."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import server_harness
from server_harness import INGESTCTL, REPO, sftp_batch, wait_until

SAMPLE = "person_id\tfirst_name\tlast_name\r\nA1\tAda\tLovelace\r\nA2\tAlan\tTuring\r\n"


def test_serve_runs_server_and_loader_and_stops_cleanly(
    tmp_path: Path, make_key: Callable[..., Path]
) -> None:
    from ingest_core.registry import Registry
    from loader.approval import approve_spec

    running = server_harness.start_server(tmp_path / "srv", launch=False)
    key = make_key("rsa", 4096)
    server_harness.add_account(running, "uni", key)
    sample = tmp_path / "sis_hr_user_info.txt"
    sample.write_bytes(SAMPLE.encode())
    approve_spec(Registry(running.settings(), actor="test"), "uni", sample, key="person_id")

    log = open(running.workdir / "serve.out", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [*INGESTCTL, "--config", str(running.config), "serve"],
        cwd=running.workdir,
        stdout=log,
        stderr=log,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    try:
        wait_until(lambda: running.events("server.started"), 30, "server start")
        sftp_batch(running, key, "uni", f"put {sample}\n", check=True)
        folder = running.folder("uni")
        assert (folder / "sis_hr_user_info.txt").read_bytes() == SAMPLE.encode()

        def received() -> bool:
            log_file = folder / "sis_loader.log"
            return log_file.exists() and " RECEIVED sis_hr_user_info.txt " in log_file.read_text()

        wait_until(received, 30, "the loader's pre-check line")
        line = (folder / "sis_loader.log").read_text().splitlines()[-1]
        assert "2 rows" in line, line
        # `ingestctl status` names the upload's address from the activity journal, also for
        # a node whose own log folder holds nothing (another node's view).
        from loader.feed_status import feed_status

        elsewhere = running.settings().replace(log_dir=tmp_path / "other-node-logs")
        (row,) = feed_status(elsewhere)
        assert (row.spec, row.last_upload_address) == ("sis_hr_user_info.txt", "127.0.0.1")
        assert row.last_upload is not None and row.last_load is None
        # the client can read the log through the server that serve started
        got = tmp_path / "got.log"
        sftp_batch(running, key, "uni", f"get sis_loader.log {got}\n", check=True)
        assert " RECEIVED sis_hr_user_info.txt " in got.read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = process.wait(60)
        log.close()
    assert code == 0, (running.workdir / "serve.out").read_text()[-2000:]
    assert time.monotonic() - started < 30


# -- first start -----------------------------------------------------------------------


def _serve(workdir: Path, *args: str, command: list[str] | None = None) -> subprocess.Popen:
    """`ingestctl serve` as `make run` starts it, in its own process group (like a terminal's
    foreground job), stdout and stderr to files."""
    with open(workdir / "serve.out", "wb") as out, open(workdir / "serve.err", "wb") as err:
        return subprocess.Popen(
            [*(command or INGESTCTL), *args, "serve"],
            cwd=workdir,
            stdout=out,
            stderr=err,
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
            start_new_session=True,
        )


def _stop(process: subprocess.Popen, signum: int) -> int:
    try:
        os.killpg(process.pid, signum)
        return process.wait(60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_a_taken_port_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    running = server_harness.start_server(tmp_path / "srv", launch=False)
    with socket.create_server((running.host, running.port)):  # someone else has the port
        process = _serve(running.workdir, "--config", str(running.config))
        code = process.wait(60)
    out = (running.workdir / "serve.out").read_text()
    err = (running.workdir / "serve.err").read_text()
    assert code == 1, err
    assert "serving" not in out  # nothing claims to serve a port it never had
    assert err == (
        f"ingestctl: cannot listen on 127.0.0.1:{running.port}: the port is already in use "
        "(another sis-ingest or another program listens there); choose another port with "
        f"`[server] port` (and the address with `[server] host`) in {running.config}\n"
    )


def test_first_start_says_serving_once_listening_and_how_onboarding_starts(
    tmp_path: Path,
) -> None:
    running = server_harness.start_server(tmp_path / "srv", launch=False)
    # as after `make run`: .venv/bin/ingestctl, found through ./ingest.toml
    (running.workdir / ".venv").symlink_to(sys.prefix)
    process = _serve(running.workdir, command=[".venv/bin/ingestctl"])
    try:
        out = running.workdir / "serve.out"
        wait_until(lambda: "onboarding" in out.read_text(), 30, "the first-start lines")
        assert running.events("server.started")  # listening before it said so
        with socket.create_connection((running.host, running.port), timeout=5):
            pass
    finally:
        code = _stop(process, signal.SIGTERM)
    assert code == 0, (running.workdir / "serve.err").read_text()
    assert out.read_text().splitlines() == [
        f"sis-ingest serving SFTP/SCP on 127.0.0.1:{running.port}; loader at 03:00, pool at "
        f"00:00 America/New_York; logs in {running.log_dir}; Ctrl-C stops it",
        "no client accounts yet: start onboarding with `.venv/bin/ingestctl account create "
        "NAME` (README: Onboarding a client account, step 1)",
    ]


def test_ctrl_c_stops_serve_quietly_with_a_precheck_child_running(tmp_path: Path) -> None:
    running = server_harness.start_server(tmp_path / "srv", launch=False)
    server_harness.add_account(running, "uni", None)
    process = _serve(running.workdir, "--config", str(running.config))
    try:
        wait_until(lambda: running.events("server.started"), 30, "server start")
        assert "onboarding" not in (running.workdir / "serve.out").read_text()
        folder = running.folder("uni")
        temp = folder / ".ingest-upload-test"
        temp.write_text(SAMPLE)
        temp.rename(folder / "sis_hr_user_info.txt")  # as the server lands an upload
        log = folder / "sis_loader.log"
        # the pre-check ran, in its child process: the child Ctrl-C used to kill noisily
        wait_until(lambda: log.exists() and " RECEIVED " in log.read_text(), 30, "pre-check")
    finally:
        code = _stop(process, signal.SIGINT)  # Ctrl-C: the whole foreground process group
    err = (running.workdir / "serve.err").read_text()
    assert code == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
