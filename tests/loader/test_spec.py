"""Approved file specs: detection from a sample, header rules, the registry, name hints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from sample_files import COLUMNS, make_spec, people, render, write, write_people

from ingest_core.errors import NotFound, Refused
from ingest_core.registry import Registry
from ingest_core.settings import Settings
from loader.approval import approve_spec, detect_spec
from loader.spec import (
    MAX_COLUMNS,
    SQL_RESERVED_WORDS,
    SQLITE_MAX_COLUMNS,
    check_header_names,
    closest_spec_hint,
    match_spec,
    remove_spec,
    specs_for,
    table_name,
)

# -- detection ---------------------------------------------------------------------------


@pytest.mark.parametrize("delimiter", ["\t", ",", "|", ";"])
@pytest.mark.parametrize("terminator", ["\n", "\r\n"])
def test_detects_delimiter_and_terminator(tmp_path: Path, delimiter: str, terminator: str) -> None:
    path = write_people(tmp_path / "sis_hr_user_info.txt", 3, delimiter=delimiter,
                        terminator=terminator)  # fmt: skip
    spec = detect_spec(path, "acme", None, "UUUID")
    assert spec == make_spec(delimiter=delimiter, terminator=terminator)


def test_detects_bom_and_quote_all(tmp_path: Path) -> None:
    path = write_people(tmp_path / "custom.csv", 3, delimiter=",", quoting="all", bom=True)
    spec = detect_spec(path, "acme", "custom_fields.csv", None)
    assert spec == make_spec(
        delimiter=",", quoting="all", bom=True, key=None, file_name="custom_fields.csv"
    )
    assert spec.describe() == (
        "comma-delimited, LF line ends, every field quoted, UTF-8 with BOM, 5 columns"
    )


def test_single_column_file_defaults_to_tab(tmp_path: Path) -> None:
    path = write(tmp_path / "ids.txt", "UUUID\r\nA1\r\nA2\r\n")
    spec = detect_spec(path, "acme", None, "UUUID")
    assert (spec.delimiter, spec.terminator, spec.columns) == ("\t", "\r\n", ("UUUID",))


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "sample s.txt is empty"),
        (b"\xef\xbb\xbf", "sample s.txt is empty"),
        (b"UUUID\tName", "sample s.txt has a header but no data rows"),
        (b"UUUID\tName\rx\ty\r", "sample s.txt: its lines end with CR only (classic Mac OS"),
        (b"UUUID\tName\r", "sample s.txt: its lines end with CR only"),
        (b"UUUID\tName\n", "sample s.txt: the file has a header (line 1) but no data rows"),
        (b"UUUID\tFirst Name\nx\ty\n", "column name 'First Name' contains a space"),
        (b"UUUID\tName-2\nx\ty\n", "column name 'Name-2' contains characters other than A-Z"),
        (b"UUUID\t2nd\nx\ty\n", "column name '2nd' starts with a digit"),
        (b"UUUID\tGroup\nx\ty\n", "column name 'Group' is an SQL reserved word"),
        (b"UUUID\t\nx\ty\n", "header column 2: a column name is empty"),
        (b"UUUID\tName\tNAME\nx\ty\tz\n", "header columns 2 and 3 are both named 'NAME'"),
        (b'"UUUID"\tName\nx\ty\n', "quotes some column names but not others"),
        (b"UUUID\tName\nx\tJos\xe9\n", "sample s.txt: line 2: not valid UTF-8 (byte 0xE9"),
        (b"UUUID\tName\nx\ty\nz\n", "sample s.txt: line 3: 1 fields, expected 2"),
        (b"UUUID\tName\r\nx\ty\nz\tw\r\n", "line 2: ends with LF only"),
        (b"UUUID\xff\tName\nx\ty\n", "sample s.txt: line 1 is not valid UTF-8 (byte 0xFF)"),
        (b"A,B\tC,D\tE\n1,2\t3,4\t5\n", "as many tab and comma characters"),
    ],
)
def test_bad_samples_are_refused_with_the_reason(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    path = write(tmp_path / "s.txt", content)
    with pytest.raises(Refused) as caught:
        detect_spec(path, "acme", None, None)
    assert reason in str(caught.value)
    assert "\n" not in str(caught.value)


def test_key_column_must_be_in_the_header_and_unique_in_the_sample(tmp_path: Path) -> None:
    path = write_people(tmp_path / "s.txt", 3)
    with pytest.raises(Refused, match="key column 'UUID' is not in the header"):
        detect_spec(path, "acme", None, "UUID")
    rows = people(3)
    rows[2][0] = rows[0][0]
    dup = write(tmp_path / "d.txt", render(COLUMNS, rows))
    with pytest.raises(Refused, match="line 4: duplicate key UUUID 'U0000001'"):
        detect_spec(dup, "acme", None, "UUUID")


@pytest.mark.parametrize(
    "name",
    [
        "../x.txt",
        "sub/x.txt",
        ".hidden.txt",
        "x.txt.filepart",
        "sis_loader.log",
        "",
        # names the server refuses to create, so a file of that name could never arrive
        "line\nbreak.txt",
        "fake\u2028LOADED.txt",
        "SIS_LOADER.LOG",
        "\udcff-x.txt",
        # the folder log's "no file" marker; names Windows clients cannot create
        "-",
        "CON",
        "nul.txt",
        "LPT1.csv",
        "com9",
        "data.txt.",
        "data.txt ",
    ],
)
def test_reserved_or_unsafe_file_names_are_refused(tmp_path: Path, name: str) -> None:
    path = write_people(tmp_path / "s.txt", 2)
    with pytest.raises(Refused, match="file name"):
        detect_spec(path, "acme", name, None)


def test_reserved_words_cover_sqlite_and_postgresql() -> None:
    for word in ("select", "order", "group", "rowid", "user", "analyse", "limit", "offset"):
        assert word in SQL_RESERVED_WORDS
    with pytest.raises(Refused, match="'Order' is an SQL reserved word"):
        check_header_names(("UUUID", "Order"))
    check_header_names(("UUUID", "First_Name", "_private", "Order_Date"))


@pytest.mark.parametrize("name", ["xmin", "XMAX", "cmin", "cmax", "ctid", "tableoid"])
def test_postgresql_system_column_names_are_refused(name: str) -> None:
    with pytest.raises(Refused, match=f"'{name}' is a PostgreSQL system column"):
        check_header_names(("UUUID", name))
    assert name.lower() in SQL_RESERVED_WORDS  # generated headers avoid them too


def test_column_count_and_name_length_fit_both_databases() -> None:
    assert MAX_COLUMNS == 1600 and SQLITE_MAX_COLUMNS >= MAX_COLUMNS
    check_header_names(tuple(f"c{i}" for i in range(1600)))
    with pytest.raises(Refused, match=r"^the header has 1,601 columns; accepted: at most 1,600"):
        check_header_names(tuple(f"c{i}" for i in range(1601)))
    check_header_names(("a" * 63,))
    with pytest.raises(Refused, match="is 64 characters long; accepted: at most 63"):
        check_header_names(("a" * 64,))


# -- registry ----------------------------------------------------------------------------


@pytest.fixture
def registry(settings: Settings) -> Registry:
    reg = Registry(settings, actor="tester")
    reg.create_account("acme")
    return reg


def test_approve_stores_audits_lists_and_removes(
    tmp_path: Path, settings: Settings, registry: Registry
) -> None:
    core = write_people(tmp_path / "sis_hr_user_info.txt", 3, terminator="\r\n")
    custom = write_people(tmp_path / "sample.csv", 2, delimiter=",", quoting="all")
    first = approve_spec(registry, "acme", core, key="UUUID")
    second = approve_spec(registry, "acme", custom, as_name="custom_fields.csv")
    assert first.approved_by == "tester" and first.approved_at
    assert specs_for(settings, "acme") == [first, second]
    assert specs_for(registry, "acme")[1].quoting == "all"
    with pytest.raises(Refused, match=r"already has an approved spec for sis_hr_user_info\.txt"):
        approve_spec(registry, "acme", core)
    with pytest.raises(NotFound, match="no account named 'nobody'"):
        approve_spec(registry, "nobody", core)
    assert remove_spec(registry, "acme", "custom_fields.csv") == second
    assert specs_for(settings, "acme") == [first]
    with pytest.raises(NotFound, match=re.escape("approved: sis_hr_user_info.txt")):
        remove_spec(registry, "acme", "custom_fields.csv")
    actions = [(e.action, e.detail.get("file_name")) for e in registry.audit_trail("acme")]
    assert actions[-3:] == [
        ("spec.approve", "sis_hr_user_info.txt"),
        ("spec.approve", "custom_fields.csv"),
        ("spec.remove", "custom_fields.csv"),
    ]


def test_two_specs_that_would_share_a_table_are_refused(tmp_path: Path, registry: Registry) -> None:
    approve_spec(registry, "acme", write_people(tmp_path / "data.txt", 2))
    with pytest.raises(Refused, match="would load into table sis_acme_data"):
        approve_spec(registry, "acme", write_people(tmp_path / "data.csv", 2))


def test_cli_approve_show_remove(tmp_path: Path, ingestctl) -> None:
    ingestctl("account", "create", "acme", check=True)
    sample = write_people(tmp_path / "sis_hr_user_info.txt", 4)
    approved = ingestctl("spec", "approve", "acme", str(sample), "--key", "UUUID", check=True)
    assert approved.stdout.splitlines() == [
        "approved sis_hr_user_info.txt for acme: tab-delimited, LF line ends, no quotes, UTF-8, "
        "5 columns, key UUUID",
        "loads into table sis_acme_sis_hr_user_info",
    ]
    custom = write_people(tmp_path / "x.csv", 2, delimiter=";")
    as_json = ingestctl("spec", "approve", "acme", str(custom), "--as", "custom.csv", "--json")
    assert json.loads(as_json.stdout)["delimiter"] == ";"

    shown = json.loads(ingestctl("spec", "show", "acme", "--json", check=True).stdout)
    assert [s["file_name"] for s in shown] == ["sis_hr_user_info.txt", "custom.csv"]
    assert shown[0] | {"approved_at": "", "approved_by": ""} == {
        "account": "acme",
        "file_name": "sis_hr_user_info.txt",
        "encoding": "utf-8",
        "bom": False,
        "delimiter": "\t",
        "terminator": "\n",
        "quoting": "none",
        "columns": list(COLUMNS),
        "key_column": "UUUID",
        "approved_at": "",
        "approved_by": "",
        "table": "sis_acme_sis_hr_user_info",
    }
    text = ingestctl("spec", "show", "acme", check=True).stdout
    assert "columns     UUUID, First_Name, Last_Name, Email, Campus" in text
    assert "delimiter   semicolon" in text

    bad = write(tmp_path / "bad.txt", "UUUID\tFirst Name\nA\tB\n")
    refused = ingestctl("spec", "approve", "acme", str(bad))
    assert refused.returncode == 1
    assert refused.stdout == ""
    assert refused.stderr.splitlines() == [
        "ingestctl: header column 2: column name 'First Name' contains a space; accepted: "
        "A-Z, a-z, 0-9 and '_', starting with a letter or '_', no SQL reserved words"
    ]

    removed = ingestctl("spec", "remove", "acme", "custom.csv", check=True)
    assert removed.stdout.strip() == "removed the approved format of custom.csv from acme"
    again = ingestctl("spec", "remove", "acme", "custom.csv")
    assert again.returncode == 1 and "has no approved spec for custom.csv" in again.stderr
    shown = json.loads(ingestctl("spec", "show", "acme", "--json", check=True).stdout)
    assert [s["file_name"] for s in shown] == ["sis_hr_user_info.txt"]


# -- names -------------------------------------------------------------------------------


def test_match_spec_is_exact() -> None:
    specs = [make_spec(), make_spec(file_name="custom.csv")]
    assert match_spec(specs, "custom.csv") is specs[1]
    assert match_spec(specs, "Custom.csv") is None
    assert match_spec([], "custom.csv") is None


@pytest.mark.parametrize(
    ("file_name", "hint"),
    [
        ("SIS_HR_USER_INFO.txt", "did you mean sis_hr_user_info.txt? (the name differs in "
         "upper/lower case; it must be exactly the approved name every day)"),
        ("sis_hr_user_info.csv", "did you mean sis_hr_user_info.txt? (the name differs in its "
         "extension, .csv instead of .txt;"),
        ("sis_hr_user_info_20261123.txt", "did you mean sis_hr_user_info.txt? (the name differs "
         "in a date stamp;"),
        ("Sis_hr_user_info-2026-11-23.CSV", "did you mean sis_hr_user_info.txt? (the name "
         "differs in a date stamp, its extension, .CSV instead of .txt and upper/lower case;"),
        ("custom_fields.txt", "did you mean custom_fields.csv? (the name differs in its "
         "extension, .txt instead of .csv;"),
        ("sis_hr_user_inf.txt", "did you mean sis_hr_user_info.txt? (approved names: "
         "sis_hr_user_info.txt, custom_fields.csv)"),
        ("payroll.xlsx", "approved names: sis_hr_user_info.txt, custom_fields.csv"),
    ],
)  # fmt: skip
def test_closest_spec_hint(file_name: str, hint: str) -> None:
    specs = [make_spec(), make_spec(file_name="custom_fields.csv")]
    assert closest_spec_hint(specs, file_name).startswith(hint)


@pytest.mark.parametrize(
    ("file_name", "hint"),
    [
        ("re\u0301sume\u0301.txt", "did you mean r\u00e9sum\u00e9.txt? (the name differs in its "
         "Unicode form, NFD (decomposed accents, as macOS may write them) instead of NFC "
         "(composed accents): the names look the same but are different characters; it must "
         "be exactly the approved name every day)"),
        ("Re\u0301sume\u0301.CSV", "did you mean r\u00e9sum\u00e9.txt? (the name differs in its "
         "Unicode form, NFD (decomposed accents, as macOS may write them) instead of NFC "
         "(composed accents): the names look the same but are different characters, its "
         "extension, .CSV instead of .txt and upper/lower case;"),
        ("resume.txt", "did you mean r\u00e9sum\u00e9.txt? (approved names:"),
    ],
)  # fmt: skip
def test_closest_spec_hint_names_a_different_unicode_form(file_name: str, hint: str) -> None:
    """Two names that look identical: the hint says how they differ (NFC vs NFD)."""
    specs = [make_spec(), make_spec(file_name="r\u00e9sum\u00e9.txt")]
    assert closest_spec_hint(specs, file_name).startswith(hint)


def test_closest_spec_hint_without_specs() -> None:
    assert "no file format is approved" in closest_spec_hint([], "x.txt")


def test_table_names_are_safe_stable_and_short() -> None:
    assert table_name(make_spec()) == "sis_acme_sis_hr_user_info"
    assert table_name(make_spec(account="a-b", file_name="My File (2).TXT")) == "sis_a_b_my_file_2"
    long = make_spec(account="a" * 32, file_name="very_long_file_name_indeed.txt")
    name = table_name(long)
    assert len(name) <= 40 and name == table_name(long)
    assert name != table_name(make_spec(account="a" * 32, file_name="very_long_file_name_2.txt"))
    assert all(c.isalnum() or c == "_" for c in name)


@pytest.mark.parametrize(
    ("account", "file_name"),
    [("pool", "applicants.txt"), ("loads", "_.txt"), ("-", "_.txt"), ("ingest", "x.txt"),
     ("a" * 32, "__ingest__loads__" * 10 + ".txt")],
)  # fmt: skip
def test_table_names_stay_out_of_the_service_and_staging_names(
    account: str, file_name: str
) -> None:
    """Data tables start with "sis" (service tables: SQLite "ingest_*", PostgreSQL their own
    schema) and hold no "__" (staging tables and key indexes end in "__staging", "__key")."""
    name = table_name(make_spec(account=account, file_name=file_name))
    assert name.startswith("sis") and "__" not in name
    assert re.fullmatch(r"[a-z0-9_]+", name) and len(name) <= 40


def test_a_refused_approval_leaves_no_audit_event(settings) -> None:
    """An approval is audited; a refused second approval adds no spec and no audit event."""
    from ingest_core.registry import Registry
    from loader.approval import approve_spec
    from loader.spec import specs_for

    registry = Registry(settings, actor="test")
    registry.create_account("uni")
    sample = settings.data_root / "sis_hr_user_info.txt"
    sample.write_bytes(b"person_id\tname\r\nA1\tAda\r\n")
    approve_spec(registry, "uni", sample)
    before = registry.audit_trail("uni")
    with pytest.raises(Refused):
        approve_spec(registry, "uni", sample)
    assert registry.audit_trail("uni") == before
    assert [e.action for e in before] == ["account.create", "spec.approve"]
    assert len(specs_for(registry, "uni")) == 1


@pytest.mark.parametrize("bom", [b"", b"\xff\xfe"])
def test_a_utf16_sample_is_refused_as_utf16(tmp_path: Path, bom: bytes) -> None:
    sample = tmp_path / "s.txt"
    sample.write_bytes(bom + "person_id\tname\nA1\tAda\n".encode("utf-16-le"))
    with pytest.raises(Refused, match=r"the file is UTF-16 .*not UTF-8"):
        detect_spec(sample, "acme", None, None)
