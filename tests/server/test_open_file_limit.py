"""Every server process raises its soft open-file limit to the hard limit at start.

Started from a shell with the usual soft limit (1024, here 256), the server would run out of
file descriptors long before its budgets (seen: ~20,000 handles ended in EMFILE and every
new connection was reset). The systemd unit sets ``LimitNOFILE``; started any other way the
server raises the soft limit itself and says so in its ``server.started`` event.
"""

from __future__ import annotations

import os
import resource
import subprocess
from pathlib import Path

from server_harness import INGESTCTL, REPO, RunningServer, start_server

LOW_SOFT_LIMIT = 256


def with_low_soft_limit() -> None:
    """In the server's child process before exec: the soft limit a login shell might give."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (LOW_SOFT_LIMIT, hard))


def soft_open_file_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError(f"no open-file limit for process {pid}")


def child_pids(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in children]


def launch_with_low_limit(running: RunningServer) -> None:
    stderr = open(running.workdir / "server.stderr", "ab")  # noqa: SIM115 - lives with the process
    running.process = subprocess.Popen(
        [*INGESTCTL, "--config", str(running.config), "server"],
        cwd=running.workdir,
        stdout=stderr,
        stderr=stderr,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        preexec_fn=with_low_soft_limit,
    )


def test_server_and_workers_raise_the_soft_limit_to_the_hard_limit(tmp_path: Path) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard > LOW_SOFT_LIMIT, "this machine's hard limit leaves nothing to raise"
    running = start_server(tmp_path / "server", {"server": {"workers": 2}}, launch=False)
    launch_with_low_limit(running)
    try:
        started = running.wait_for_event("server.started", timeout=30)
        assert started["open_file_limit"] == hard
        assert running.process is not None
        assert soft_open_file_limit(running.process.pid) == hard
        workers = child_pids(running.process.pid)
        assert len(workers) == 2
        assert [soft_open_file_limit(pid) for pid in workers] == [hard, hard]
    finally:
        assert running.stop() == 0
