"""Any name an operator can copy into a folder: the nightly run, the pre-check and every
`ingestctl` output cope with it (reported escaped, skipped, nothing forged, nothing raw on a
terminal), and the approved file next to it still loads."""

from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime
from pathlib import Path

from ingest_core import folder_log
from ingest_core.db import open_control_db
from ingest_core.journal import record_events
from loader.nightly import run_account
from loader.precheck import PreCheckWatcher, precheck_file
from loader.sis_db import open_sis_db
from loader.spec import table_name

NOT_UTF8 = b"\xff\xfe-x.txt"
FORGED = "2026-11-23T03:00:01-05:00 LOADED sis_hr_user_info.txt 48,213 rows imported"
# Names with each separator seen to forge log entries, and a terminal escape.
ODD_NAMES = [
    f"a\u2028{FORGED}",
    f"b\x85{FORGED}",
    f"c\r{FORGED}",
    f"d\n{FORGED}",
    "e\x1b[2J\x1b[31mred.txt",
]
# C0 (but the line feed that ends each printed line), DEL, C1, U+2028, U+2029.
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def _put(folder: Path, name: bytes | str, text: str = "x\n") -> Path:
    """Create a file of any name, as an operator's `cp` would."""
    path = Path(os.fsdecode(os.path.join(os.fsencode(folder), os.fsencode(name))))
    with open(path, "wb") as handle:
        handle.write(text.encode())
    return path


def _rows(on) -> int:
    return len(open_sis_db(on.settings.sis_db_url).table_rows(table_name(on.spec)))


def test_a_name_that_is_not_utf8_is_reported_and_the_approved_file_still_loads(
    acme, kit, ingestctl
):
    kit.write_data(acme.data_file, 4)
    _put(acme.folder.root, NOT_UTF8)

    run = ingestctl("loader", "run", "acme", subprocess_=True)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert "LOADED sis_hr_user_info.txt 4 rows imported" in run.stdout
    assert "SKIPPED \\xff\\xfe-x.txt not loaded: the file name is not usable" in run.stdout
    assert _rows(acme) == 4 and not acme.data_file.exists()
    assert os.path.exists(os.path.join(os.fsencode(acme.folder.root), NOT_UTF8))  # left alone

    acme.folder.log_file.read_bytes().decode("utf-8")  # strict: the log stays UTF-8
    (bad,) = [ln for ln in folder_log.read_lines(acme.folder) if " SKIPPED " in ln]
    assert (
        " SKIPPED \\xff\\xfe-x.txt not loaded: the file name is not usable: file names must " in bad
    )
    assert "approved names: sis_hr_user_info.txt" in bad

    as_json = ingestctl("log", "acme", "--json", subprocess_=True)
    assert as_json.returncode == 0, as_json.stderr
    entries = json.loads(as_json.stdout)
    assert [(e["status"], e["file"]) for e in entries] == [
        ("SKIPPED", "\\xff\\xfe-x.txt"),
        ("LOADED", "sis_hr_user_info.txt"),
    ]

    # The next night: told once already (a stray is reported once per arrival).
    again = run_account(acme.settings, acme.name)
    assert again.ok and [o.status for o in again.outcomes] == ["NO FILE"]


def test_names_with_line_separators_or_escapes_forge_nothing_and_print_escaped(
    acme, kit, ingestctl
):
    for name in ODD_NAMES:
        _put(acme.folder.root, name)
    kit.write_data(acme.data_file, 3)

    run = ingestctl("loader", "run", "acme", subprocess_=True)
    assert run.returncode == 0, run.stderr
    assert not RAW_CONTROL.search(run.stdout)
    assert "e\\x1b[2J\\x1b[31mred.txt" in run.stdout
    # The account, then one line per file (each name escaped: none starts a line of its own).
    assert run.stdout.count("\n") == 1 + len(ODD_NAMES) + 1

    as_json = ingestctl("log", "acme", "--json", subprocess_=True)
    assert as_json.returncode == 0, as_json.stderr
    assert not RAW_CONTROL.search(as_json.stdout)
    entries = json.loads(as_json.stdout)
    assert [e["status"] for e in entries] == ["SKIPPED"] * len(ODD_NAMES) + ["LOADED"]
    loaded = [e for e in entries if e["status"] == "LOADED"]
    assert [(e["file"], e["detail"]) for e in loaded] == [
        ("sis_hr_user_info.txt", "3 rows imported")
    ]
    for entry in entries:
        datetime.fromisoformat(entry["time"])  # every entry is a real one
    assert {e["file"] for e in entries[:-1]} == {
        f"a\\u2028{FORGED}",
        f"b\\x85{FORGED}",
        f"c\\r{FORGED}",
        f"d\\n{FORGED}",
        "e\\x1b[2J\\x1b[31mred.txt",
    }

    text = ingestctl("log", "acme", subprocess_=True)
    assert text.returncode == 0, text.stderr
    assert not RAW_CONTROL.search(text.stdout)
    assert len(text.stdout.splitlines()) == len(entries)


def test_activity_prints_logged_names_escaped(settings, acme, ingestctl):
    events = [
        {"event": "file.received", "name": f"a\u2028{FORGED}", "bytes": 5},
        {"event": "file.received", "name": "b\x1b[2J\x1b]0;pwned\x07.txt", "bytes": 6},
        {"event": "file.renamed", "old_name": "c\r\n.txt", "name": "d\x85.txt"},
        {"event": "file.removed", "name": "\udcff\udcfe-x.txt"},  # as os.fsdecode gives it
    ]
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.log_dir / "server.jsonl", "w", encoding="utf-8") as handle:
        for number, event in enumerate(events):
            event |= {"account": "acme", "address": "127.0.0.1"}
            event["timestamp"] = f"2026-11-23T08:00:0{number}Z"
            # Raw U+2028 and NEL are valid inside a JSON string: a writer may leave them raw.
            # A lone surrogate can only be written as an escape, as our writer does.
            raw = "\udcff" not in event["name"]
            handle.write(json.dumps(event, ensure_ascii=not raw) + "\n")
    # The server records each logged event in the activity journal too; activity reads that.
    with open(settings.log_dir / "server.jsonl", encoding="utf-8") as handle:
        logged = [json.loads(line) for line in handle]
    record_events(open_control_db(settings.control_db_url), logged, "node-1")

    table = ingestctl("activity", "acme", subprocess_=True)
    assert table.returncode == 0, table.stderr
    assert not RAW_CONTROL.search(table.stdout)
    rows = table.stdout.splitlines()
    assert len(rows) == 1 + len(events)  # the header, then one row per event
    assert f"a\\u2028{FORGED}" in rows[1]
    assert "b\\x1b[2J\\x1b]0;pwned\\x07.txt" in rows[2]
    assert "c\\r\\n.txt -> d\\x85.txt" in rows[3]
    assert "\\xff\\xfe-x.txt" in rows[4]

    as_json = ingestctl("activity", "acme", "--json", subprocess_=True)
    assert as_json.returncode == 0, as_json.stderr
    assert not RAW_CONTROL.search(as_json.stdout)
    shown = json.loads(as_json.stdout)
    assert [e["name"] for e in shown] == [
        f"a\u2028{FORGED}",
        "b\x1b[2J\x1b]0;pwned\x07.txt",
        "d\x85.txt",
        "\\xff\\xfe-x.txt",  # a lone surrogate would trouble other JSON readers
    ]


def test_the_pre_check_reports_any_name_escaped(acme, kit):
    for name in [NOT_UTF8, *ODD_NAMES]:
        line = precheck_file(acme.settings, _put(acme.folder.root, name, kit.data_text(2)))
        assert line is not None
        assert " RECEIVED " in line and line.count("\n") == 1
        assert not RAW_CONTROL.search(line.rstrip("\n"))
        assert "will NOT load: the file name is not usable" in line
    lines = folder_log.read_lines(acme.folder)
    assert [folder_log.parse_line(ln)["status"] for ln in lines] == ["RECEIVED"] * 6


def test_the_watcher_reports_an_odd_name_and_keeps_checking(acme, kit):
    watcher = PreCheckWatcher(acme.settings)
    watcher.start()
    try:
        for name in [NOT_UTF8, ODD_NAMES[0].encode()]:
            tmp = acme.folder.upload_temp("odd")
            tmp.write_text(kit.data_text(2), encoding="utf-8")
            os.rename(tmp, os.path.join(os.fsencode(acme.folder.root), name))
        kit.upload(acme.folder, acme.spec.file_name, kit.data_text(7))
        lines = _wait_for_lines(acme.folder, 3)
    finally:
        watcher.stop()
    assert len(lines) == 3
    assert any("RECEIVED \\xff\\xfe-x.txt will NOT load: the file name" in ln for ln in lines)
    assert any(
        "will NOT load: the file name is not usable" in ln and "\\u2028" in ln for ln in lines
    )
    assert any("RECEIVED sis_hr_user_info.txt passed the checks: 7 rows" in ln for ln in lines)


def _wait_for_lines(folder, count: int, timeout: float = 15.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = folder_log.read_lines(folder)
        if len(lines) >= count:
            return lines
        time.sleep(0.05)
    return folder_log.read_lines(folder)
