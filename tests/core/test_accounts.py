"""Account lifecycle through the real CLI: create, list, show, disable/enable, delete."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

from ingest_core.folders import FOLDER_MODE

Run = Callable[..., subprocess.CompletedProcess[str]]


def test_create_makes_a_private_folder_and_shows_up(ingestctl: Run, workdir: Path) -> None:
    created = ingestctl(
        "account",
        "create",
        "study_abroad",
        "--institution",
        "Uni A",
        "--deferred-fetch",
        "--json",
        check=True,
    )
    view = json.loads(created.stdout)
    folder = Path(view["folder"])
    assert folder == workdir / "var" / "accounts" / "study_abroad"
    assert folder.is_dir() and (folder.stat().st_mode & 0o777) == FOLDER_MODE
    assert view["status"] == "active" and view["deferred_fetch"] is True
    listed = json.loads(ingestctl("account", "list", "--json", check=True).stdout)
    assert [a["name"] for a in listed] == ["study_abroad"]
    table = ingestctl("account", "list", check=True).stdout
    assert "study_abroad" in table and "Uni A" in table
    shown = ingestctl("account", "show", "study_abroad", check=True).stdout
    assert "no client can log in yet" in shown


def test_create_says_what_comes_next(ingestctl: Run) -> None:
    plain = ingestctl("account", "create", "plain", check=True).stdout
    # The commands are said as this ingestctl is run (with its --config), so they work pasted.
    me = r"\S*ingestctl(?: --config \S+)?"
    assert re.search(rf"next: {me} key add plain FILE\.pub; {me} ip add plain ADDRESS", plain)
    assert "pool import" not in plain
    deferred = ingestctl("account", "create", "defer", "--deferred-fetch", check=True).stdout
    assert re.search(rf"and: {me} pool import defer FILE", deferred)


def test_names_must_be_valid_and_unique(ingestctl: Run) -> None:
    for bad in ("Uni", "uni a", "x" * 33, "uni/../x", ""):
        result = ingestctl("account", "create", bad)
        assert result.returncode == 1, bad
        assert "use 1-32 lowercase letters" in result.stderr
    ingestctl("account", "create", "uni", check=True)
    again = ingestctl("account", "create", "uni")
    assert again.returncode == 1 and "already exists" in again.stderr
    assert len(json.loads(ingestctl("account", "list", "--json").stdout)) == 1


def test_disable_enable_and_audit(ingestctl: Run) -> None:
    ingestctl("account", "create", "uni", check=True)
    assert "disabled" in ingestctl("account", "disable", "uni", check=True).stdout
    assert json.loads(ingestctl("account", "show", "uni", "--json").stdout)["status"] == "disabled"
    ingestctl("account", "enable", "uni", check=True)
    trail = json.loads(ingestctl("audit", "uni", "--json", check=True).stdout)
    assert [e["action"] for e in trail] == ["account.create", "account.disable", "account.enable"]
    assert all(e["actor"] for e in trail)
    assert trail[1]["detail"] == {"after": "disabled", "before": "active"}


def test_delete_asks_keeps_files_unless_purge(ingestctl: Run, workdir: Path) -> None:
    ingestctl("account", "create", "uni", check=True)
    folder = workdir / "var" / "accounts" / "uni"
    (folder / "data.txt").write_text("kept\n")
    unconfirmed = ingestctl("account", "delete", "uni")
    assert unconfirmed.returncode == 1 and "--yes" in unconfirmed.stderr
    assert json.loads(ingestctl("account", "list", "--json").stdout)
    ingestctl("account", "delete", "uni", "--yes", check=True)
    assert json.loads(ingestctl("account", "list", "--json").stdout) == []
    assert (folder / "data.txt").read_text() == "kept\n"
    trail = json.loads(ingestctl("audit", "uni", "--json").stdout)
    assert trail[-1]["action"] == "account.delete"
    ingestctl("account", "create", "uni", check=True)
    ingestctl("account", "delete", "uni", "--yes", "--purge", check=True)
    assert not folder.exists()


def test_unknown_account_and_usage_errors(ingestctl: Run) -> None:
    missing = ingestctl("account", "show", "nobody")
    assert missing.returncode == 1
    assert missing.stderr.strip() == (
        "ingestctl: no account named 'nobody' (see 'ingestctl account list')"
    )
    usage = ingestctl("account", "frobnicate")
    assert usage.returncode == 2 and "invalid choice" in usage.stderr
    assert "Traceback" not in usage.stderr


def test_help_reads_well(ingestctl: Run) -> None:
    top = ingestctl("--help", check=True).stdout
    for noun in ("init", "account", "key", "ip", "hostkey", "keygen", "audit"):
        assert noun in top
    for args in (
        ["account", "--help"],
        ["account", "create", "--help"],
        ["key", "add", "--help"],
        ["ip", "add", "--help"],
        ["hostkey", "show", "--help"],
        ["keygen", "--help"],
        ["audit", "--help"],
        ["init", "--help"],
    ):
        result = ingestctl(*args, check=True)
        assert result.stdout.startswith("usage: ingestctl")
