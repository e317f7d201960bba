"""The external auditor ssh-audit: no [fail], few [warn], and its DHEat rate test passes.

Every run here includes ssh-audit's connection-rate test (no ``--skip-rate-test``): it opens
up to 38 connections in 1.5 s from one address and passes when fewer than 20 a second get
an SSH banner, which ``[limits] connection_rate_per_address`` (10 a second, bursts of 10)
makes true. With the default ("compatible") algorithm lists ssh-audit may warn twice, both
times for what only curl/libssh2 1.10 needs; with ``algorithm_profile = "strict"`` once.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from server_harness import CLIENT_TIMEOUT, RunningServer, add_account, sftp_batch, start_server

POLICY = Path(__file__).resolve().parent.parent / "ssh_audit_policy.txt"
# ssh-audit's DHEat.MAX_SAFE_RATE: more new connections a second per source is a finding.
SAFE_RATE = 20.0
# ssh-audit -d reports what its rate test got through.
MEASURED_RATE = re.compile(r"dh_rate_test\(\) results: ([\d.]+) connections opened per second")
THROTTLING_NOTE = "Potentially insufficient connection throttling"
# The two warnings the default lists may cause, both for libssh2 1.10 (see settings.py).
COMPATIBLE_WARNINGS = {"(kex) curve25519-sha256", "(mac) hmac-sha2-256"}


def ssh_audit() -> str:
    local = Path(sys.executable).parent / "ssh-audit"
    found = str(local) if local.exists() else shutil.which("ssh-audit")
    if found is None:
        pytest.fail("ssh-audit is not installed (it is in the test extras: pip install -e .[test])")
    return found


@dataclass
class AuditReport:
    """One ssh-audit run, with its findings parsed from the output lines."""

    returncode: int
    output: str
    failures: list[str]
    warnings: list[str]
    rate: float | None  # connections a second its rate test got a banner for; None: no test


def findings(output: str, level: str) -> list[str]:
    """``"(kex) name: message"`` for every ``[level]`` line, continuation lines included."""
    found = []
    algorithm = ""
    for line in output.splitlines():
        named = re.match(r"^\((\w+)\) (\S+)", line)
        if named:
            algorithm = f"({named[1]}) {named[2]}"
        if f"[{level}]" in line:
            found.append(f"{algorithm}: {line.split(f'[{level}]', 1)[1].strip()}")
    return found


def wait_for_full_bucket(server: RunningServer) -> None:
    """Let this address's connection budget refill: the previous run's rate test emptied it,
    and the next run's first connections (banner, host keys) must not be refused."""
    limits = server.settings().limits
    if limits.connection_rate_per_address:
        time.sleep(limits.connection_burst / limits.connection_rate_per_address + 0.2)


def run_audit(server: RunningServer, *extra: str) -> AuditReport:
    wait_for_full_bucket(server)
    result = subprocess.run(
        [ssh_audit(), "-d", "-n", *extra, "-p", str(server.port), server.host],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    measured = MEASURED_RATE.search(output)
    return AuditReport(
        returncode=result.returncode,
        output=output,
        failures=findings(result.stdout, "fail"),
        warnings=findings(result.stdout, "warn"),
        rate=float(measured[1]) if measured else None,
    )


def assert_rate_test_passed(report: AuditReport, server: RunningServer) -> None:
    assert report.rate is not None, "ssh-audit's rate test did not run:\n" + report.output
    assert report.rate < SAFE_RATE, report.output
    assert THROTTLING_NOTE not in report.output
    # The limiter refused the excess (not a slow machine that let the test pass by luck).
    refused = [
        e
        for e in server.events("connection.refused")
        if e["reason"].startswith("too many new connections from this address")
    ]
    assert refused, "no connection refused for its rate"
    assert refused[0]["reason"] == (
        "too many new connections from this address (at most 10 a second)"
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, alpha_key: Path) -> Iterator[RunningServer]:
    """The shipped settings (the connection rate limit included); the defender off, as the
    shared fixture has it. Replaces that fixture here, which turns the rate limit off."""
    running = start_server(tmp_path_factory.mktemp("shipped"), {"defender": {"enabled": False}})
    add_account(running, "alpha", alpha_key)
    yield running
    running.stop()


def test_default_lists_pass_the_rate_test_with_at_most_two_warnings(
    server: RunningServer,
) -> None:
    report = run_audit(server)
    assert report.returncode in (0, 2), report.output  # 3 means [fail]
    assert report.failures == [], report.output
    assert len(report.warnings) <= 2, report.warnings
    assert {w.split(":")[0] for w in report.warnings} <= COMPATIBLE_WARNINGS, report.warnings
    assert_rate_test_passed(report, server)
    assert "(gen) banner: SSH-2.0-sis-ingest" in report.output
    assert "compression: disabled" in report.output
    assert "kex-strict-s-v00@openssh.com" in report.output  # Terrapin counter-measure
    # The RSA host key signs with SHA-2 only: no SHA-1 `ssh-rsa` host key algorithm.
    assert "(key) ssh-rsa " not in report.output
    assert "(key) rsa-sha2-512" in report.output


def test_policy_file_passes(server: RunningServer) -> None:
    wait_for_full_bucket(server)
    result = subprocess.run(
        [ssh_audit(), "-n", "-P", str(POLICY), "-p", str(server.port), server.host],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Passed" in result.stdout


# -- the strict profile ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def strict_server(
    tmp_path_factory: pytest.TempPathFactory, alpha_key: Path
) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("strict"),
        {"server": {"algorithm_profile": "strict"}, "defender": {"enabled": False}},
    )
    add_account(running, "alpha", alpha_key)
    yield running
    running.stop()


def test_strict_profile_passes_the_rate_test_with_at_most_one_warning(
    strict_server: RunningServer,
) -> None:
    report = run_audit(strict_server)
    assert report.returncode in (0, 2), report.output
    assert report.failures == [], report.output
    assert len(report.warnings) <= 1, report.warnings
    assert "(mac) hmac-sha2-256 " not in report.output
    assert_rate_test_passed(report, strict_server)


def test_strict_profile_serves_openssh_but_not_libssh2(
    strict_server: RunningServer, alpha_key: Path, tmp_path: Path
) -> None:
    wait_for_full_bucket(strict_server)  # after the audit's rate test on this server
    source = tmp_path / "strict.txt"
    source.write_text("over the strict profile\n")
    sftp_batch(strict_server, alpha_key, "alpha", f"put {source} strict.txt\n", check=True)
    assert (strict_server.folder("alpha") / "strict.txt").read_text() == source.read_text()
    if "libssh2/1.10" not in curl_version():
        pytest.skip("the libssh2 1.10 part needs curl built with libssh2 1.10")
    result = curl_upload(strict_server, alpha_key, source, "curl.txt")
    assert result.returncode != 0
    assert "Unable to exchange encryption keys" in result.stderr  # no MAC in common


def test_strict_profile_serves_psftp(
    strict_server: RunningServer, alpha_key: Path, tmp_path: Path
) -> None:
    upload_with_psftp(strict_server, alpha_key, tmp_path)


# -- what the compatible profile is for ----------------------------------------------------------


@pytest.fixture(scope="module")
def compatible_server(
    tmp_path_factory: pytest.TempPathFactory, alpha_key: Path
) -> Iterator[RunningServer]:
    """Default algorithm lists, and SHA-1 RSA signatures allowed as libssh2 1.10 needs."""
    running = start_server(
        tmp_path_factory.mktemp("compatible"),
        {"server": {"allow_sha1_rsa_signatures": True}, "defender": {"enabled": False}},
    )
    add_account(running, "alpha", alpha_key)
    yield running
    running.stop()


def test_compatible_profile_serves_curl_libssh2(
    compatible_server: RunningServer, alpha_key: Path, tmp_path: Path
) -> None:
    version = curl_version()
    if "libssh2" not in version:
        pytest.skip("curl with libssh2 is not installed")
    source = tmp_path / "curl.txt"
    source.write_text("from curl\n")
    result = curl_upload(compatible_server, alpha_key, source, "curl.txt")
    assert result.returncode == 0, result.stderr
    assert (compatible_server.folder("alpha") / "curl.txt").read_text() == "from curl\n"


def test_compatible_profile_serves_psftp(
    compatible_server: RunningServer, alpha_key: Path, tmp_path: Path
) -> None:
    upload_with_psftp(compatible_server, alpha_key, tmp_path)


# -- clients -------------------------------------------------------------------------------------


def need(binary: str) -> str:
    found = shutil.which(binary)
    if found is None:
        pytest.skip(f"{binary} is not installed (apt-get install putty-tools curl)")
    return found


def curl_version() -> str:
    return subprocess.run([need("curl"), "-V"], capture_output=True, text=True).stdout


def curl_upload(
    server: RunningServer, key: Path, source: Path, name: str
) -> subprocess.CompletedProcess[str]:
    """curl sftp:// (libssh2), host key not checked (--insecure: loopback test server)."""
    return subprocess.run(
        [
            "curl", "--silent", "--show-error", "--insecure", "--key", str(key),
            "--pubkey", f"{key}.pub", "--user", "alpha:", "--upload-file", str(source),
            f"sftp://{server.host}:{server.port}/{name}",
        ],
        capture_output=True, text=True, timeout=CLIENT_TIMEOUT,
    )  # fmt: skip


def upload_with_psftp(server: RunningServer, key: Path, tmp_path: Path) -> None:
    """PuTTY's psftp (0.78 on Debian 12) uploads one file; its host key pinned."""
    psftp = need("psftp")
    wait_for_full_bucket(server)
    ppk = tmp_path / "key.ppk"
    subprocess.run(
        [need("puttygen"), str(key), "-O", "private", "-o", str(ppk)],
        check=True,
        capture_output=True,
    )
    source = tmp_path / "psftp.txt"
    source.write_text("from psftp\n")
    script = tmp_path / "script.txt"
    script.write_text(f"put {source} psftp.txt\n")
    args = ["-batch", "-i", str(ppk), "-P", str(server.port), "-b", str(script)]
    for host_key in json.loads(server.ingestctl("hostkey", "show", "--json").stdout):
        args += ["-hostkey", host_key["fingerprint"]]
    result = subprocess.run(
        [psftp, *args, f"alpha@{server.host}"],
        capture_output=True, text=True, timeout=CLIENT_TIMEOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert (server.folder("alpha") / "psftp.txt").read_text() == "from psftp\n"
