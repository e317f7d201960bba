"""Fixtures every test area shares: isolated settings, real keys, a real PostgreSQL.

Area-specific fixtures (a running server, an sshd, an SMTP sink) live in the area's own
conftest.py under tests/<area>/.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ingest_core.db import close_all
from ingest_core.settings import Settings, settings_from_mapping

REPO = Path(__file__).resolve().parent.parent
INGESTCTL = [sys.executable, "-m", "ingestctl.main"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def write_config(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """An empty folder standing in for a checkout or a deployment."""
    (tmp_path / "run").mkdir()
    return tmp_path / "run"


@pytest.fixture
def config_file(workdir: Path) -> Iterator[Path]:
    """A TOML config that puts everything under the test's own folder, on a free port, with
    the control database `ingestctl init` makes (commands are refused without one)."""
    from ingest_core.db import close_all, open_control_db
    from ingest_core.settings import load_settings

    path = write_config(
        workdir / "ingest.toml",
        f'data_root = "var"\nlog_dir = "logs"\n\n[server]\nport = {free_port()}\n'
        'host_key_dir = "keys"\n',
    )
    open_control_db(load_settings(path).control_db_url)
    yield path
    close_all()


@pytest.fixture
def settings(workdir: Path, config_file: Path) -> Iterator[Settings]:
    from ingest_core.settings import load_settings

    yield load_settings(config_file)
    close_all()


@pytest.fixture
def make_settings(workdir: Path) -> Iterator[Callable[..., Settings]]:
    """Settings from a mapping (for tests that vary one setting)."""

    def build(**raw: object) -> Settings:
        raw.setdefault("data_root", "var")
        raw.setdefault("log_dir", "logs")
        return settings_from_mapping(dict(raw), workdir, "test")

    yield build
    close_all()


def start_loader_daemon(
    workdir: Path, config: Path, stdout: int = subprocess.DEVNULL, stderr: int = subprocess.PIPE
) -> subprocess.Popen[str]:
    """``ingestctl loader daemon`` as a real process (the caller stops it)."""
    return subprocess.Popen(
        [*INGESTCTL, "--config", str(config), "loader", "daemon"],
        cwd=workdir,
        stdout=stdout,
        stderr=stderr,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def run_ingestctl_in_process(
    args: list[str], cwd: Path, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The real CLI entry point, in this process (a subprocess costs ~1 s of imports)."""
    import contextlib
    import io

    from ingestctl.main import main

    out, err = io.StringIO(), io.StringIO()
    old_cwd, old_stdin = Path.cwd(), sys.stdin
    sys.stdin = io.StringIO(input or "")
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(args)
            except SystemExit as exc:  # argparse: --help and usage errors
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.stdin = old_stdin
        os.chdir(old_cwd)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture
def ingestctl(workdir: Path, config_file: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run `ingestctl` with the test's config: in-process, or as a real subprocess."""

    def run(
        *args: str,
        input: str | None = None,
        check: bool = False,
        config: Path | None = None,
        subprocess_: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        full = ["--config", str(config or config_file), *args]
        if subprocess_:
            result = subprocess.run(
                [*INGESTCTL, *full],
                cwd=workdir,
                input=input,
                capture_output=True,
                text=True,
                timeout=120,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        else:
            result = run_ingestctl_in_process(full, workdir, input)
        if check and result.returncode != 0:
            raise AssertionError(f"{args} failed ({result.returncode}): {result.stderr}")
        return result

    return run


@pytest.fixture(scope="session")
def keygen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys")


@pytest.fixture(scope="session")
def make_key(keygen_dir: Path) -> Callable[..., Path]:
    """Generate a real client key pair with ssh-keygen; returns the private key path.

    Keys are cached per (type, bits, label) for the session: RSA 4096/8192 take seconds.
    """
    made: dict[tuple[str, int, str], Path] = {}

    def make(key_type: str = "rsa", bits: int = 4096, label: str = "") -> Path:
        wanted = (key_type, bits, label)
        if wanted not in made:
            path = keygen_dir / f"id_{key_type}_{bits}_{label or 'k'}"
            cmd = [
                "ssh-keygen",
                "-q",
                "-t",
                key_type,
                "-N",
                "",
                "-C",
                f"test-{label}",
                "-f",
                str(path),
            ]
            if key_type in ("rsa", "ecdsa", "dsa"):
                cmd[4:4] = ["-b", str(bits)]
            subprocess.run(cmd, check=True, capture_output=True)
            made[wanted] = path
        return made[wanted]

    return make


# -- PostgreSQL -------------------------------------------------------------------------------


def _pg_ready() -> bool:
    return subprocess.run(["pg_isready", "-q"], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def pg_server() -> str:
    """Start the machine's PostgreSQL 15 cluster if needed; returns a base URL for root."""
    if shutil.which("pg_ctlcluster") is None:
        pytest.fail("PostgreSQL 15 is not installed (the README's setup step installs it)")
    if not _pg_ready():
        subprocess.run(["pg_ctlcluster", "15", "main", "start"], check=False, capture_output=True)
        for _ in range(50):
            if _pg_ready():
                break
            subprocess.run(["sleep", "0.2"])
    if not _pg_ready():
        pytest.fail("PostgreSQL did not start (pg_ctlcluster 15 main start)")
    user = os.environ.get("USER") or "root"
    if os.geteuid() == 0:
        subprocess.run(["su", "postgres", "-c", f"createuser -s {user}"], capture_output=True)
    return "postgresql+psycopg:///"


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    subprocess.run(["createdb", name], check=True, capture_output=True)
    yield f"{pg_server}{name}"
    close_all()
    subprocess.run(["dropdb", "--if-exists", "--force", name], capture_output=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MB tmpfs, for a real ENOSPC (mounting needs root, as CI has)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr!r}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_disk(mount: Path, name: str = "filler.bin") -> Path:
    """Fill ``mount`` to the last byte with one file; returns it (delete it to make room)."""
    filler = mount / name
    with open(filler, "wb", buffering=0) as handle:
        block = b"\0" * 4096
        try:
            while True:
                handle.write(block)
        except OSError:
            pass
        try:
            while True:
                handle.write(b"\0")
        except OSError:
            pass
    return filler
