"""What approval refuses, so that every approved spec loads every night on SQLite and on
PostgreSQL, and the words of each refusal and hint.

Each test drives the real CLI with real sample files and a real SIS database, on each
backend: a spec approved on SQLite today must still load if the operator moves to PostgreSQL.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
from sites import BACKENDS, Site, make_site

from ingest_core import folder_log
from ingest_core.folders import account_folder
from ingest_core.settings import Settings
from loader.sis_db import open_sis_db


@pytest.fixture(params=BACKENDS)
def site(request, settings: Settings, config_file: Path, ingestctl) -> Site:
    """A deployment with one account, ``acme``."""
    made = make_site(request, settings, config_file, ingestctl)
    made.ctl("account", "create", "acme", check=True)
    return made


def _approved_specs(site: Site) -> list[str]:
    shown = site.ctl("spec", "show", "acme", "--json", check=True)
    return [spec["file_name"] for spec in json.loads(shown.stdout)]


def _data_tables(site: Site) -> list[str]:
    from sqlalchemy import inspect

    db = open_sis_db(site.settings.sis_db_url)
    names = inspect(db.engine).get_table_names(schema=db.data_schema)
    return [name for name in names if name.startswith("sis")]  # SQLite: not ingest_*


def _refusal(site: Site, sample: Path, *options: str) -> str:
    """Approve ``sample`` expecting a refusal: exit 1, nothing on stdout, one stderr line."""
    refused = site.ctl("spec", "approve", "acme", str(sample), *options)
    assert refused.returncode == 1, refused.stdout
    assert refused.stdout == ""
    (line,) = refused.stderr.splitlines()
    return line.removeprefix("ingestctl: ")


# -- finding 2: specs that could never load on PostgreSQL ------------------------------------


def test_specs_beyond_either_databases_limits_are_refused(site: Site, tmp_path: Path) -> None:
    long_name = "a" * 64
    system = "every table has tableoid, xmin, cmin, xmax, cmax, ctid"
    cases = {
        "\t".join(f"c{i}" for i in range(1601)): (
            "the header has 1,601 columns; accepted: at most 1,600 (PostgreSQL's limit per "
            "table is 1,600, SQLite's here 2,000)"
        ),
        f"person_id\t{long_name}": (
            f"header column 2: column name '{long_name}' is 64 characters long; accepted: at "
            "most 63 (PostgreSQL's limit for names)"
        ),
        **{
            f"person_id\t{name}": (
                f"header column 2: column name '{name}' is a PostgreSQL system column "
                f"({system}); accepted: any other name, such as '{name}_value'"
            )
            for name in ("xmin", "ctid", "cmax", "cmin", "xmax", "tableoid", "XMin")
        },
        "person_id\trowid": (
            "header column 2: column name 'rowid' is a SQLite system column (every table has "
            "rowid, oid, _rowid_); accepted: any other name, such as 'rowid_value'"
        ),
    }
    for header, reason in cases.items():
        columns = header.count("\t") + 1
        sample = tmp_path / "wide.txt"
        sample.write_text(f"{header}\n" + "\t".join(["v"] * columns) + "\n", encoding="utf-8")
        assert _refusal(site, sample) == reason
    assert _approved_specs(site) == []
    assert _data_tables(site) == []


def test_a_spec_at_both_databases_limits_loads(site: Site, tmp_path: Path) -> None:
    """1,600 columns, one of them named with 63 characters: approved, and it loads."""
    columns = ["person_id", "b" * 63] + [f"c{i}" for i in range(1598)]
    header = "\t".join(columns) + "\n"
    rows = ["\t".join([f"P{r}"] + [f"v{r}"] * 1599) + "\n" for r in range(3)]
    sample = tmp_path / "wide.txt"
    sample.write_text(header + rows[0], encoding="utf-8")
    site.ctl("spec", "approve", "acme", str(sample), "--key", "person_id", check=True)
    data = site.upload("acme", "wide.txt", (header + "".join(rows)).encode())

    run = site.ctl("loader", "run", "acme")

    assert run.returncode == 0, run.stdout + run.stderr
    assert not data.exists()
    log = folder_log.read_lines(account_folder(site.settings, "acme"))
    assert log[-1].split(" ", 1)[1] == "LOADED wide.txt 3 rows imported"
    loaded = open_sis_db(site.settings.sis_db_url).table_rows("sis_acme_wide")
    assert [len(row) for row in loaded] == [1600] * 3
    assert [row[0] for row in loaded] == ["P0", "P1", "P2"]


# -- finding 6: a CR-only sample, a name in another Unicode form -----------------------------


def test_a_sample_with_cr_only_line_ends_is_refused_saying_so(site: Site, tmp_path: Path) -> None:
    sample = tmp_path / "people.txt"
    sample.write_bytes(b"person_id\tname\rP1\tAda\rP2\tBob\r")

    assert _refusal(site, sample) == (
        "sample people.txt: its lines end with CR only (classic Mac OS line ends); accepted: "
        "LF or CRLF line ends"
    )
    assert _approved_specs(site) == []

    sample.write_bytes(b"person_id\tname\r\nP1\tAda\r\nP2\tBob\r\n")
    site.ctl("spec", "approve", "acme", str(sample), check=True)
    assert _approved_specs(site) == ["people.txt"]


def test_a_file_name_in_another_unicode_form_is_told_apart(site: Site, tmp_path: Path) -> None:
    composed = unicodedata.normalize("NFC", "résumé.txt")
    decomposed = unicodedata.normalize("NFD", composed)
    sample = tmp_path / "sample.txt"
    sample.write_bytes(b"person_id\tname\nP1\tAda\n")
    site.ctl("spec", "approve", "acme", str(sample), "--as", composed, check=True)
    arrived = site.upload("acme", decomposed, b"person_id\tname\nP1\tAda\nP2\tBob\n")

    run = site.ctl("loader", "run", "acme")

    assert run.returncode == 1
    assert arrived.read_bytes() == b"person_id\tname\nP1\tAda\nP2\tBob\n"
    error = next(
        line
        for line in folder_log.read_lines(account_folder(site.settings, "acme"))
        if " ERROR " in line
    )
    assert (
        f"not loaded: no {composed}; found {decomposed} (the name differs in its Unicode form, "
        "NFD (decomposed accents, as macOS may write them) instead of NFC (composed accents): "
        "the names look the same but are different characters): rename it or fix the export"
    ) in error
    db = open_sis_db(site.settings.sis_db_url)
    # The approved file's run is refused for the near miss, under its own name.
    assert [(r.status, r.file_name) for r in db.loads("acme")] == [("refused", decomposed)]
    assert _data_tables(site) == []


# -- finding 9: --as names no client could send ----------------------------------------------


def test_approve_as_refuses_names_that_cannot_arrive(site: Site, tmp_path: Path) -> None:
    sample = tmp_path / "sample.txt"
    sample.write_bytes(b"person_id\tname\nP1\tAda\n")
    device = (
        "is a Windows device name (CON, PRN, AUX, NUL, COM0-COM9, LPT0-LPT9, with or without "
        "an extension): Windows cannot create such a file; choose a name such as "
        "sis_hr_user_info.txt"
    )
    cases = {
        "-": "file name '-' is not accepted: a lone '-' stands for 'no file' in the folder "
        "log; choose a name such as sis_hr_user_info.txt",
        "line\nbreak.txt": "file name 'line\\nbreak.txt': file name contains a control "
        "character (\\n): use names of printable characters only (no tabs, line breaks or "
        "escapes)",
        "data.txt.": "file name 'data.txt.' ends with a dot or a space, which Windows drops "
        "from names; choose a name that ends with a letter or digit, such as "
        "sis_hr_user_info.txt",
        **{
            name: f"file name {name!r} {device}"
            for name in ("CON", "nul.txt", "COM1", "lpt1.csv", "Aux.tar.gz", "CON .txt", "COM²")
        },
    }
    for name, reason in cases.items():
        assert _refusal(site, sample, "--as", name) == reason
    assert _approved_specs(site) == []
    for near_miss in ("console.txt", "com10.txt", "lpt.txt", "-data.txt"):
        site.ctl("spec", "approve", "acme", str(sample), f"--as={near_miss}", check=True)
    assert _approved_specs(site) == ["console.txt", "com10.txt", "lpt.txt", "-data.txt"]
