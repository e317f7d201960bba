"""Third-party clients institutions really use: PuTTY's psftp/pscp (Windows) and lftp.

They are Debian packages (putty-tools, lftp) that the Makefile installs; a missing binary
skips its test with the reason printed (-ra).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from server_harness import CLIENT_TIMEOUT, RunningServer

pytestmark = pytest.mark.clients


def need(binary: str) -> str:
    found = shutil.which(binary)
    if found is None:
        pytest.skip(f"{binary} is not installed (apt-get install putty-tools lftp)")
    return found


@pytest.fixture(scope="module")
def ppk_key(alpha_key: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    need("puttygen")
    ppk = tmp_path_factory.mktemp("ppk") / "alpha.ppk"
    subprocess.run(
        ["puttygen", str(alpha_key), "-O", "private", "-o", str(ppk)],
        check=True,
        capture_output=True,
    )
    return ppk


def putty_args(server: RunningServer, ppk: Path) -> list[str]:
    """Batch mode, our key, and the host key pinned by its SHA256 fingerprint."""
    keys = json.loads(server.ingestctl("hostkey", "show", "--json").stdout)
    args = ["-batch", "-i", str(ppk), "-P", str(server.port)]
    for key in keys:
        args += ["-hostkey", key["fingerprint"]]
    return args


def test_psftp_upload_and_listing(server: RunningServer, ppk_key: Path, tmp_path: Path) -> None:
    psftp = need("psftp")
    (tmp_path / "from-psftp.txt").write_text("psftp upload\n")
    script = tmp_path / "script.txt"
    script.write_text(f"put {tmp_path / 'from-psftp.txt'} from-psftp.txt\nls\n")
    result = subprocess.run(
        [psftp, *putty_args(server, ppk_key), "-b", str(script), f"alpha@{server.host}"],
        capture_output=True, text=True, timeout=CLIENT_TIMEOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert (server.folder("alpha") / "from-psftp.txt").read_text() == "psftp upload\n"
    assert "from-psftp.txt" in result.stdout


@pytest.mark.parametrize("protocol", ["-sftp", "-scp"])
def test_pscp_upload(server: RunningServer, ppk_key: Path, tmp_path: Path, protocol: str) -> None:
    pscp = need("pscp")
    name = f"from-pscp{protocol}.txt"
    (tmp_path / name).write_text("pscp upload\n")
    result = subprocess.run(
        [pscp, protocol, *putty_args(server, ppk_key), str(tmp_path / name),
         f"alpha@{server.host}:{name}"],
        capture_output=True, text=True, timeout=CLIENT_TIMEOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert (server.folder("alpha") / name).read_text() == "pscp upload\n"


def test_lftp_upload_and_listing(server: RunningServer, alpha_key: Path, tmp_path: Path) -> None:
    lftp = need("lftp")
    (tmp_path / "from-lftp.txt").write_text("lftp upload\n")
    ssh = " ".join(["ssh", "-a", "-x", *server.ssh_options(alpha_key)])
    script = (
        f'set sftp:connect-program "{ssh}"; set net:max-retries 1; '
        f"open -u alpha, -p {server.port} sftp://{server.host}; "
        f"put {tmp_path / 'from-lftp.txt'} -o from-lftp.txt; ls; bye"
    )
    result = subprocess.run(
        [lftp, "-c", script],
        capture_output=True, text=True, timeout=CLIENT_TIMEOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert (server.folder("alpha") / "from-lftp.txt").read_text() == "lftp upload\n"
    assert "from-lftp.txt" in result.stdout
