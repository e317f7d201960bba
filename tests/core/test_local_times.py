"""One time zone per output: every `ingestctl` command shows times in the
configured zone (`[schedule] timezone`) with its offset, tables and `--json` alike, whatever
the time was stored or logged in (UTC `Z`, `+00:00`, another zone's offset).

The zone here is Asia/Kolkata (+05:30), neither UTC nor the default America/New_York, so a
time left as stored shows.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from ingest_core import folder_log
from ingest_core.console import local_time
from ingest_core.db import open_control_db
from ingest_core.folders import account_folder
from ingest_core.journal import record_events
from ingest_core.settings import load_settings
from ingest_core.structured_log import get_logger

Run = Callable[..., subprocess.CompletedProcess[str]]
ZONE = ZoneInfo("Asia/Kolkata")
LOCAL = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+05:30$")
NEW_YORK = ZoneInfo("America/New_York")


@pytest.fixture
def zoned(config_file: Path) -> Path:
    """The test's config, with [schedule] timezone = Asia/Kolkata (same folders)."""
    path = config_file.with_name("zoned.toml")
    path.write_text(
        config_file.read_text() + '\n[schedule]\ntimezone = "Asia/Kolkata"\n', encoding="utf-8"
    )
    return path


def test_local_time_is_one_format_for_every_input() -> None:
    instant = datetime(2026, 11, 23, 8, 0, 4, 123456, tzinfo=UTC)
    shown = "2026-11-23T13:30:04+05:30"
    assert local_time(instant, ZONE) == shown
    assert local_time(instant.replace(tzinfo=None), ZONE) == shown  # naive: stored UTC
    assert local_time("2026-11-23T08:00:04.123456Z", ZONE) == shown  # structlog's
    assert local_time("2026-11-23T08:00:04+00:00", ZONE) == shown  # the registry's
    assert local_time("2026-11-23T03:00:04-05:00", ZONE) == shown  # the folder log's
    assert local_time(instant, NEW_YORK) == "2026-11-23T03:00:04-05:00"
    assert local_time(datetime(2026, 7, 1, 7, tzinfo=UTC), NEW_YORK) == (
        "2026-07-01T03:00:00-04:00"  # the offset of that date (daylight saving time)
    )
    for kept in ("", None, "not a time", "2026-11-23T08:00:04"):  # no offset: not guessed
        assert local_time(kept, ZONE) == (kept or "")


def test_audit_and_account_times(ingestctl: Run, zoned: Path) -> None:
    ingestctl("account", "create", "uni", config=zoned, check=True)
    rows = ingestctl("audit", config=zoned, check=True).stdout.splitlines()[1:]
    assert rows and all(LOCAL.match(row.split()[0]) for row in rows), rows
    (event,) = json.loads(ingestctl("audit", "--json", config=zoned, check=True).stdout)
    assert LOCAL.match(event["at"]), event
    view = json.loads(ingestctl("account", "show", "uni", "--json", config=zoned).stdout)
    assert LOCAL.match(view["created_at"]) and LOCAL.match(view["updated_at"]), view
    shown = ingestctl("account", "show", "uni", config=zoned, check=True).stdout
    created = next(line for line in shown.splitlines() if line.startswith("created"))
    assert LOCAL.match(created.split()[-1]), created


def test_activity_times(ingestctl: Run, zoned: Path) -> None:
    settings = load_settings(zoned)
    log = get_logger(settings.log_dir, "server")
    log.info("auth.success", account="uni", address="127.0.0.1", fingerprint="SHA256:abc")
    log.info("file.received", account="uni", address="127.0.0.1", name="a.txt", bytes=3)
    logged = [json.loads(line) for line in (settings.log_dir / "server.jsonl").open()]
    assert all(e["timestamp"].endswith("Z") for e in logged)  # the log stays in UTC
    record_events(open_control_db(settings.control_db_url), logged, "node-1")  # as the server
    table = ingestctl("activity", "uni", config=zoned, check=True).stdout.splitlines()
    assert len(table) == 3 and all(LOCAL.match(row.split()[0]) for row in table[1:]), table
    events = json.loads(ingestctl("activity", "uni", "--json", config=zoned).stdout)
    assert [local_time(e["timestamp"], ZONE) for e in logged] == [e["timestamp"] for e in events]
    assert all(LOCAL.match(e["timestamp"]) for e in events)


def test_folder_log_times(ingestctl: Run, zoned: Path) -> None:
    ingestctl("account", "create", "uni", config=zoned, check=True)
    folder = account_folder(load_settings(zoned), "uni")
    when = datetime(2026, 11, 23, 3, 0, 4, tzinfo=NEW_YORK)  # written in another zone
    folder_log.append(folder, NEW_YORK, "LOADED", "sis_hr_user_info.txt", "5 rows imported", when)
    with open(folder.log_file, "a", encoding="utf-8") as hand:
        hand.write("a note an operator typed\n")
    assert folder.log_file.read_text().startswith("2026-11-23T03:00:04-05:00 LOADED ")
    lines = ingestctl("log", "uni", config=zoned, check=True).stdout.splitlines()
    assert lines == [
        "2026-11-23T13:30:04+05:30 LOADED sis_hr_user_info.txt 5 rows imported",
        "a note an operator typed",
    ]
    parsed = json.loads(ingestctl("log", "uni", "--json", config=zoned, check=True).stdout)
    assert [p["time"] for p in parsed] == ["2026-11-23T13:30:04+05:30", ""]


def test_loader_history_times(ingestctl: Run, zoned: Path, tmp_path: Path) -> None:
    from ingest_core.registry import Registry
    from loader.approval import approve_spec

    settings = load_settings(zoned)
    registry = Registry(settings, actor="test")
    registry.create_account("uni")
    sample = tmp_path / "sis_hr_user_info.txt"
    sample.write_text("person_id\tname\nA1\tAda\nA2\tAlan\n", encoding="utf-8")
    approve_spec(registry, "uni", sample, key="person_id")
    (account_folder(settings, "uni").root / sample.name).write_bytes(sample.read_bytes())
    assert ingestctl("loader", "run", "uni", config=zoned).returncode == 0
    table = ingestctl("loader", "history", config=zoned, check=True).stdout.splitlines()
    assert len(table) == 2 and LOCAL.match(table[1].split()[0]), table
    (load,) = json.loads(ingestctl("loader", "history", "--json", config=zoned).stdout)
    assert LOCAL.match(load["started"]) and LOCAL.match(load["finished"]), load
    spec = json.loads(ingestctl("spec", "show", "uni", "--json", config=zoned).stdout)
    assert LOCAL.match(spec[0]["approved_at"]), spec
