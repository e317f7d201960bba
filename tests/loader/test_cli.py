"""ingestctl loader / pool / log through the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import pty
import subprocess

from conftest import INGESTCTL, REPO


def test_loader_run_log_and_history(acme, kit, ingestctl):
    kit.write_data(acme.data_file, 5)
    ok = ingestctl("loader", "run", "acme")
    assert ok.returncode == 0, ok.stderr
    # One line per file, under its account (not one long line per account).
    assert ok.stdout.splitlines()[:2] == [
        "acme:",
        "  LOADED sis_hr_user_info.txt 5 rows imported",
    ]
    assert not acme.data_file.exists()

    acme.data_file.write_text("UUUID\tfirst_name\n1\tx\n", encoding="utf-8")
    bad = ingestctl("loader", "run")
    assert bad.returncode == 1
    lines = bad.stdout.splitlines()
    assert lines[0] == "acme:"
    assert lines[1].startswith("  ERROR sis_hr_user_info.txt not loaded")

    log = ingestctl("log", "acme")
    assert log.returncode == 0
    lines = log.stdout.splitlines()
    assert " LOADED sis_hr_user_info.txt 5 rows imported" in lines[0]
    assert " ERROR sis_hr_user_info.txt not loaded" in lines[1]
    parsed = json.loads(ingestctl("log", "acme", "--json", "--tail", "1").stdout)
    assert [p["status"] for p in parsed] == ["ERROR"]
    assert parsed[0]["file"] == "sis_hr_user_info.txt"
    assert "missing: last_name, email" in parsed[0]["detail"]

    history = json.loads(ingestctl("loader", "history", "acme", "--json").stdout)
    assert [(h["status"], h["rows"]) for h in history] == [("loaded", 5), ("refused", 0)]


def test_loader_run_force_json_and_refusals(acme, kit, ingestctl):
    kit.write_data(acme.data_file, 10)
    assert ingestctl("loader", "run", "acme").returncode == 0
    kit.write_data(acme.data_file, 2)
    assert ingestctl("loader", "run", "acme").returncode == 1
    no_name = ingestctl("loader", "run", "--force")  # a usage error: exit 2, one line
    assert no_name.returncode == 2 and "--force needs the account name" in no_name.stderr
    assert len(no_name.stderr.splitlines()) == 1
    unknown = ingestctl("loader", "run", "nosuch")
    assert unknown.returncode == 1 and "no account named 'nosuch'" in unknown.stderr
    forced = ingestctl("loader", "run", "acme", "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    (result,) = json.loads(forced.stdout)
    assert result["ok"] and result["outcomes"][0]["rows"] == 2
    audit = json.loads(ingestctl("audit", "acme", "--json").stdout)
    assert any(e["action"] == "loader.force" for e in audit)


def test_progress_bar_on_a_terminal(acme, kit, config_file, workdir):
    kit.write_data(acme.data_file, 25_000)
    master, slave = pty.openpty()
    try:
        done = subprocess.run(
            [*INGESTCTL, "--config", str(config_file), "loader", "run", "acme"],
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=slave,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        os.close(slave)
        slave = -1
        shown = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert done.returncode == 0
    text = shown.decode()
    assert "] 0/1 accounts acme: sis_hr_user_info.txt 20,000 rows" in text
    assert "[########################] 1/1 accounts" in text


def test_pool_import_publish_show(settings, onboard, ingestctl, workdir):
    on = onboard(settings, "defer", deferred_fetch=True)
    (workdir / "ids.txt").write_text("B\nA\n", encoding="utf-8")  # published in this order
    imported = ingestctl("pool", "import", "defer", "ids.txt")
    assert imported.returncode == 0, imported.stderr
    assert "imported 2 applicant IDs for defer" in imported.stdout
    published = ingestctl("pool", "publish")
    assert published.returncode == 0
    assert "defer: published: 2 active applicant IDs" in published.stdout
    assert on.folder.pool_file.read_bytes() == b"B\r\nA\r\n"
    view = json.loads(ingestctl("pool", "show", "defer", "--json").stdout)
    assert view["ids_in_source"] == 2 and view["ids_in_file"] == 2
    assert "POOL applicant_pool.txt 2 active applicant IDs" in ingestctl("log", "defer").stdout
    refused = ingestctl("pool", "publish", "nosuch")
    assert refused.returncode == 1 and "no account named" in refused.stderr


def test_log_json_splits_the_two_word_status():
    from ingest_core.folder_log import parse_line

    assert parse_line("2026-11-23T03:00:01-05:00 NO FILE sis.txt no file received") == {
        "time": "2026-11-23T03:00:01-05:00",
        "status": "NO FILE",
        "file": "sis.txt",
        "detail": "no file received",
    }
    assert parse_line("2026-11-23T03:00:01-05:00 LOADED sis.txt 5 rows imported")["detail"] == (
        "5 rows imported"
    )
