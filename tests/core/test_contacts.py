"""`ingestctl contact add|remove|list`: an account's alert addresses, validated and audited."""

from __future__ import annotations

import json

import pytest

from ingest_core.errors import Refused
from ingest_core.registry import check_email


def test_contacts_are_added_listed_removed_and_audited(ingestctl):
    ingestctl("init", check=True)
    ingestctl("account", "create", "acme", check=True)

    added = ingestctl("contact", "add", "acme", "IT-Team@Acme.EDU")
    assert added.returncode == 0, added.stderr
    assert added.stdout == "added contact IT-Team@acme.edu to acme\n"
    ingestctl("contact", "add", "acme", "dba@acme.edu", check=True)

    listed = json.loads(ingestctl("contact", "list", "acme", "--json", check=True).stdout)
    assert [c["email"] for c in listed] == ["IT-Team@acme.edu", "dba@acme.edu"]
    assert all(c["added_at"] for c in listed)
    table = ingestctl("contact", "list", "acme", check=True).stdout
    assert "IT-Team@acme.edu" in table and "dba@acme.edu" in table

    again = ingestctl("contact", "add", "acme", "it-team@acme.edu")
    assert again.returncode == 1
    assert again.stderr == (
        "ingestctl: IT-Team@acme.edu is already a contact of 'acme': nothing to add\n"
    )

    removed = ingestctl("contact", "remove", "acme", "it-team@ACME.edu")
    assert removed.returncode == 0 and removed.stdout == (
        "removed contact IT-Team@acme.edu from acme\n"
    )
    missing = ingestctl("contact", "remove", "acme", "nobody@acme.edu")
    assert missing.returncode == 1 and "is not a contact of 'acme'" in missing.stderr
    none = ingestctl("contact", "list", "nope")
    assert none.returncode == 1 and "no account named 'nope'" in none.stderr

    audit = json.loads(ingestctl("audit", "acme", "--json", check=True).stdout)
    changes = [(e["action"], e["detail"]) for e in audit if e["action"].startswith("contact.")]
    assert changes == [
        ("contact.add", {"email": "IT-Team@acme.edu"}),
        ("contact.add", {"email": "dba@acme.edu"}),
        ("contact.remove", {"email": "IT-Team@acme.edu"}),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "it-team",
        "it-team@",
        "@acme.edu",
        "IT Team <it@acme.edu>",
        "it team@acme.edu",
        "it@acme",
        "it@acme..edu",
        "it@-acme.edu",
        "it@acme.edu\nBcc: x@evil.example",
        "it@acme.edu,other@acme.edu",
        "a" * 65 + "@acme.edu",
        "it@" + "a" * 250 + ".edu",
    ],
)
def test_addresses_that_are_not_one_plain_address_are_refused_in_one_line(text):
    with pytest.raises(Refused) as refused:
        check_email(text)
    message = str(refused.value)
    assert "\n" not in message and message


def test_a_refused_address_is_one_line_on_the_command_line(ingestctl):
    ingestctl("init", check=True)
    ingestctl("account", "create", "acme", check=True)
    bad = ingestctl("contact", "add", "acme", "IT Team <it@acme.edu>")
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1 and "no name, no <>" in bad.stderr
    assert json.loads(ingestctl("contact", "list", "acme", "--json").stdout) == []
