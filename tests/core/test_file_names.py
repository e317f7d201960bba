"""File names from outside: the server's refusals, the loader's test, the operator's escapes."""

from __future__ import annotations

import os

import pytest

from ingest_core.file_names import (
    client_name_refusal,
    escape_for_operator,
    escape_surrogates,
    undecodable_or_control,
)

NOT_UTF8 = os.fsdecode(b"\xff\xfe-x.txt")  # what os.listdir gives for such a name
# Every character str.splitlines() splits on: each would start a line of its own.
LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("a\tb\nc\rd", r"a\tb\nc\rd"),
        ("\x1b[31mred\x1b[0m", r"\x1b[31mred\x1b[0m"),
        ("\x00\x07\x7f", r"\x00\x07\x7f"),
        ("\x85\x9b", r"\x85\x9b"),
        ("x\u2028y\u2029z", r"x\u2028y\u2029z"),
        ("\u202eevil", r"\u202eevil"),  # a bidi override reorders what a terminal shows
        (NOT_UTF8, r"\xff\xfe-x.txt"),  # the original bytes, not a replacement character
        ("\ud800", r"\ud800"),
    ],
)
def test_controls_and_undecodable_bytes_become_visible_escapes(text: str, shown: str) -> None:
    assert escape_for_operator(text) == shown


def test_printable_text_stays_as_it_is() -> None:
    for text in ("sis_hr_user_info.txt", "résumé é.txt", "日本語.csv", 'a "b" \\c', " x "):
        assert escape_for_operator(text) == text


def test_any_text_escaped_is_one_printable_utf8_line() -> None:
    everything = "".join(chr(code) for code in range(0x110000))
    shown = escape_for_operator(everything)
    shown.encode("utf-8")  # no lone surrogate left
    assert len(shown.splitlines()) == 1
    assert not any(c in shown for c in LINE_BREAKS)
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in shown)
    assert escape_for_operator(shown) == shown  # escaping twice changes nothing


def test_json_keeps_controls_but_loses_lone_surrogates() -> None:
    assert escape_surrogates(NOT_UTF8 + "\x1b") == "\\xff\\xfe-x.txt\x1b"


@pytest.mark.parametrize(
    "name",
    [NOT_UTF8, "a\nb.txt", "a\rb", "tab\there", "\x1b[2J", "x\x7f", "x\x85", "x\u2028", "x\x9b"],
)
def test_names_the_loader_cannot_use(name: str) -> None:
    assert undecodable_or_control(name)


@pytest.mark.parametrize(
    "name", ["sis_hr_user_info.txt", "é.txt", "a b.txt", "SIS_LOADER.LOG", "\u202ex"]
)
def test_names_the_loader_can_use(name: str) -> None:
    assert not undecodable_or_control(name)


def _one_line(message: str | None) -> str:
    assert message is not None
    assert len(message.splitlines()) == 1 and message.isprintable()
    return message


@pytest.mark.parametrize("name", [b"\xff\xfe-x.txt", b"ok-\xc3.txt", b"\xed\xa0\x80.txt"])
def test_a_name_that_is_not_utf8_is_refused(name: bytes) -> None:
    assert _one_line(client_name_refusal(name)) == "file name is not valid UTF-8: use UTF-8 names"


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        (b"a\x1b[31m.txt", r"\x1b"),
        (b"a\nb.txt", r"\n"),
        (b"a\rb.txt", r"\r"),
        (b"a\tb.txt", r"\t"),
        (b"a\x7f.txt", r"\x7f"),
        ("a\x85.txt".encode(), r"\x85"),
        ("a\x9b.txt".encode(), r"\x9b"),
        ("a\u2028.txt".encode(), r"\u2028"),
        ("a\u2029.txt".encode(), r"\u2029"),
    ],
)
def test_a_name_with_a_control_character_is_refused(name: bytes, shown: str) -> None:
    message = _one_line(client_name_refusal(name))
    assert message.startswith(f"file name contains a control character ({shown}): ")
    assert "printable characters only" in message


@pytest.mark.parametrize(
    ("name", "service"),
    [
        (b"SIS_LOADER.LOG", "sis_loader.log"),
        (b"sis_loader.log ", "sis_loader.log"),
        (b" Sis_Loader.log", "sis_loader.log"),
        (b" applicant_pool.txt", "applicant_pool.txt"),
        (b"APPLICANT_POOL.TXT\xc2\xa0", "applicant_pool.txt"),  # a no-break space
        ("\uff33\uff29\uff33_loader.log".encode(), "sis_loader.log"),  # full-width letters
        (b"/upload/SIS_LOADER.LOG", "sis_loader.log"),  # an SFTP path: its last part counts
    ],
)
def test_a_look_alike_of_a_service_file_is_refused(name: bytes, service: str) -> None:
    message = _one_line(client_name_refusal(name))
    assert f"too like the service's own file {service}" in message
    assert message.endswith("only in case, spaces or character width): choose a different name")


@pytest.mark.parametrize(
    "name",
    [
        b"sis_hr_user_info.txt",
        "résumé.txt".encode(),
        b"with space.txt",
        b"sis_loader.log",  # the file itself: whether it may be written is decided elsewhere
        b"sis_loader.log.bak",
        b"my_applicant_pool.txt",
    ],
)
def test_ordinary_names_are_accepted(name: bytes) -> None:
    assert client_name_refusal(name) is None
