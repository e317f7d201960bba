"""The external auditor ssh-audit finds no [fail] in the server's default algorithms."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from server_harness import RunningServer

POLICY = Path(__file__).resolve().parent.parent / "ssh_audit_policy.txt"


def ssh_audit() -> str:
    local = Path(sys.executable).parent / "ssh-audit"
    found = str(local) if local.exists() else shutil.which("ssh-audit")
    if found is None:
        pytest.fail("ssh-audit is not installed (it is in the test extras: pip install -e .[test])")
    return found


def test_no_fail_findings_with_default_settings(server: RunningServer) -> None:
    result = subprocess.run(
        [ssh_audit(), "-n", "--skip-rate-test", "-p", str(server.port), server.host],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode in (0, 2), result.stdout + result.stderr  # 3 means [fail]
    assert "[fail]" not in result.stdout, result.stdout
    assert "(gen) banner: SSH-2.0-sis-ingest" in result.stdout
    assert "compression: disabled" in result.stdout
    assert "kex-strict-s-v00@openssh.com" in result.stdout  # Terrapin counter-measure
    # The RSA host key signs with SHA-2 only: no SHA-1 `ssh-rsa` host key algorithm.
    assert "(key) ssh-rsa " not in result.stdout
    assert "(key) rsa-sha2-512" in result.stdout


def test_policy_file_passes(server: RunningServer) -> None:
    result = subprocess.run(
        [ssh_audit(), "-n", "-P", str(POLICY), "-p", str(server.port), server.host],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Passed" in result.stdout
