"""The main job end to end: `ingestctl serve` runs the SFTP server and the loader together."""

from __future__ import annotations

import signal
import subprocess
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
    from loader.spec import approve_spec

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
