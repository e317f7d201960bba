"""File names from outside: which ones the server refuses, which ones the loader cannot use,
and how any name is shown to people.

A folder can hold any name the filesystem allows: the server refuses bad names from clients,
but an operator can still copy one in. Python hands such a name over from ``os.fsdecode``
with each undecodable byte as a lone surrogate (U+DC80-U+DCFF), which cannot be encoded as
UTF-8 and would crash whoever writes it out. A name can also hold control characters: line
separators that split one log line into two (a forged entry) and escape sequences that
drive an operator's terminal. So names are checked here, and everything shown to a person
goes through :func:`escape_for_operator` first.
"""

from __future__ import annotations

import json
import re
import unicodedata

from ingest_core.folders import READ_ONLY_NAMES

# C0 (with TAB, LF and CR), DEL, C1 (with NEL U+0085), LINE and PARAGRAPH SEPARATOR: the
# characters no file name may hold. Every character str.splitlines() splits on is in here.
_CONTROL = "\x00-\x1f\x7f-\x9f\u2028\u2029"
# Lone surrogates: undecodable bytes of a name (os.fsdecode) or broken text.
_SURROGATE = "\ud800-\udfff"
# Bidirectional overrides and isolates: not refused in a name, but they reorder what a
# terminal shows, so an operator sees them as escapes too.
_BIDI = "\u202a-\u202e\u2066-\u2069"

_UNUSABLE = re.compile(f"[{_CONTROL}{_SURROGATE}]")
_CONTROL_ONLY = re.compile(f"[{_CONTROL}]")
_SURROGATE_ONLY = re.compile(f"[{_SURROGATE}]")
_NOT_SHOWN_AS_IS = re.compile(f"[{_CONTROL}{_SURROGATE}{_BIDI}]")

_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}

# Why the loader and the pre-check skip a file: what is wrong and what is accepted.
UNUSABLE_NAME_REASON = (
    "the file name is not usable: file names must be UTF-8 text without control characters "
    "(tabs, line breaks, escape codes)"
)


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for the byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def escape_for_operator(text: str) -> str:
    """``text`` safe to print or to write as one log line: control characters, line
    separators, bidi overrides and lone surrogates become visible escapes (``\\n``, ``\\x1b``,
    ``\\u2028``, and ``\\xff`` for an undecodable byte). Printable text is kept as is."""
    return _NOT_SHOWN_AS_IS.sub(_escape_one, text)


def escape_surrogates(text: str) -> str:
    """``text`` with only its lone surrogates made visible (``\\xff``): for JSON, which
    escapes control characters itself but cannot carry a lone surrogate to every reader."""
    return _SURROGATE_ONLY.sub(_escape_one, text)


def undecodable_or_control(name: str) -> bool:
    """True for a directory entry name the service will not use: it was not valid UTF-8 (it
    holds lone surrogates from os.fsdecode) or it holds a control character."""
    return _UNUSABLE.search(name) is not None


def client_name_refusal(name: bytes) -> str | None:
    """The one-line refusal the server sends a client for a name it must not create, or None.

    ``name`` is a file name or an SFTP path (its last part is compared with the service's
    own files). Refused: not valid UTF-8; any control character; a look-alike of a service
    file (``SIS_LOADER.LOG``, ``sis_loader.log ``) that a person could take for ours.
    """
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        return "file name is not valid UTF-8: use UTF-8 names"
    control = _CONTROL_ONLY.search(text)
    if control is not None:
        shown = escape_for_operator(control.group())
        return (
            f"file name contains a control character ({shown}): use names of printable "
            "characters only (no tabs, line breaks or escapes)"
        )
    base = text.rsplit("/", 1)[-1]
    folded = unicodedata.normalize("NFKC", base).strip().casefold()
    for service in sorted(READ_ONLY_NAMES):
        if base != service and folded == service.casefold():
            shown = json.dumps(base)  # ASCII: an odd space or letter shows as \uXXXX
            return (
                f"file name {shown} is too like the service's own file {service} (they "
                "differ only in case, spaces or character width): choose a different name"
            )
    return None
