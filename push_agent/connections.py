"""Connections: where to push, how to log in, what to send, when, and who to tell.

A connection lives in the state file; its password lives in ``secrets/NAME.password`` (0600)
and its key pair in ``keys/NAME`` (0600) and ``keys/NAME.pub``. Neither secret is ever printed,
logged or mailed: a change to one shows up as "changed". Every create, edit and delete is
mailed to the connection's addresses and logged.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import secrets
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from ingest_core.client_keys import generate_client_keypair
from ingest_core.durable_files import replace_file
from ingest_core.errors import NotFound, Refused
from ingest_core.schedule import Frequency, parse_frequency
from push_agent.agent import Agent
from push_agent.notify import mail_change, operator_name

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
AUTH_METHODS = ("password", "key")
SOURCE_KINDS = ("file", "command", "query", "none")
ROW_TERMINATORS = {"lf": "\n", "crlf": "\r\n"}
QUOTING = ("minimal", "all", "none")
DELIMITER_NAMES = {"tab": "\t", "comma": ",", "pipe": "|", "semicolon": ";"}

# Fields whose change means the last Test and Save no longer proves anything.
RETEST_FIELDS = ("host", "port", "remote_dir", "username", "auth", "bind_address")
# Fields whose change means a different server: the pinned fingerprint no longer applies.
REPIN_FIELDS = ("host", "port")
NEEDS_PASSWORD = "password auth needs a password (prompt, --password-stdin or --password-file)"


@dataclass
class Connection:
    """One push destination and what is sent there (the settings part of a state row)."""

    name: str
    host: str
    port: int = 22
    remote_dir: str = "."
    username: str = ""
    auth: str = "password"
    frequency: str = "daily 02:00"
    source_kind: str = "file"
    source_path: str | None = None
    source_command: str | None = None
    source_url: str | None = None
    source_query: str | None = None
    delimiter: str = ","
    header: bool = True
    row_terminator: str = "crlf"
    quoting: str = "minimal"
    remote_name: str | None = None
    pool_remote: str | None = None
    pool_local: str | None = None
    verify_fingerprint: bool = True
    since_initial: str = ""
    notify: list[str] = field(default_factory=list)
    bind_address: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Connection:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in row.items() if k in names}
        values["notify"] = json.loads(row.get("notify") or "[]")
        return cls(**values)

    def to_row(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        row["notify"] = json.dumps(self.notify)
        return row

    def schedule(self, agent: Agent) -> Frequency:
        return parse_frequency(self.frequency, agent.settings.zone)

    def public_view(self) -> dict[str, Any]:
        """Every setting, safe to print or mail (a password in a database URL is masked)."""
        view = dataclasses.asdict(self)
        view["source_url"] = mask_url(self.source_url)
        view["delimiter"] = delimiter_name(self.delimiter)
        return view


def mask_url(url: str | None) -> str | None:
    if not url:
        return url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(unparseable URL)"


def delimiter_name(delimiter: str) -> str:
    for name, char in DELIMITER_NAMES.items():
        if char == delimiter:
            return name
    return delimiter


def parse_delimiter(text: str) -> str:
    char = DELIMITER_NAMES.get(text.lower(), text)
    if len(char) != 1 or char in '\r\n"':
        raise Refused(
            f"{text!r} is not a delimiter; accepted: tab, comma, pipe, semicolon or one character"
        )
    return char


def validate(conn: Connection, agent: Agent) -> None:
    """Refuse a connection that could never work, with one line saying what is accepted."""
    if not NAME_RE.match(conn.name):
        raise Refused(
            f"{conn.name!r} is not a connection name; accepted: letters, digits, _ . - (max 64)"
        )
    if not conn.host or any(c.isspace() for c in conn.host):
        raise Refused(f"{conn.host!r} is not a host; accepted: a host name or IP address")
    if not 0 < conn.port < 65536:
        raise Refused(f"{conn.port} is not a port; accepted: 1-65535")
    if not conn.username:
        raise Refused("a user name is required (--user)")
    if not conn.remote_dir:
        raise Refused("a remote path is required (--path)")
    if conn.auth not in AUTH_METHODS:
        raise Refused(f"{conn.auth!r} is not an auth method; accepted: password, key")
    conn.schedule(agent)
    if conn.source_kind not in SOURCE_KINDS:
        raise Refused(f"{conn.source_kind!r} is not a source; accepted: {', '.join(SOURCE_KINDS)}")
    needs = {
        "file": ("source_path", "--file"),
        "command": ("source_command", "--command"),
        "query": ("source_query", "--query"),
    }
    if conn.source_kind in needs:
        attr, flag = needs[conn.source_kind]
        if not getattr(conn, attr):
            raise Refused(f"a {conn.source_kind} source needs {flag}")
    if conn.source_kind == "query" and not conn.source_url:
        raise Refused("a query source needs --db-url (a SQLAlchemy URL)")
    if conn.source_kind in ("command", "query") and not conn.remote_name:
        raise Refused(f"a {conn.source_kind} source needs --remote-name (the file name to send)")
    if conn.remote_name and ("/" in conn.remote_name or conn.remote_name.startswith(".")):
        raise Refused(
            f"{conn.remote_name!r} is not a remote file name; accepted: a plain visible name"
        )
    if bool(conn.pool_remote) != bool(conn.pool_local):
        raise Refused("a pool pickup needs both --pool-remote and --pool-local")
    if conn.source_kind == "none" and not conn.pool_remote:
        raise Refused("a connection that sends nothing must pick up a pool file (--pool-remote)")
    parse_delimiter(conn.delimiter)
    if conn.row_terminator not in ROW_TERMINATORS:
        raise Refused(f"{conn.row_terminator!r} is not a row terminator; accepted: lf, crlf")
    if conn.quoting not in QUOTING:
        raise Refused(f"{conn.quoting!r} is not a quoting rule; accepted: {', '.join(QUOTING)}")
    try:
        date.fromisoformat(conn.since_initial)
    except ValueError:
        raise Refused(f"{conn.since_initial!r} is not a date; accepted: YYYY-MM-DD") from None
    for address in conn.notify:
        if "@" not in address or any(c.isspace() for c in address):
            raise Refused(f"{address!r} is not an e-mail address")
    if conn.bind_address:
        try:
            ipaddress.ip_address(conn.bind_address)
        except ValueError:
            raise Refused(f"{conn.bind_address!r} is not a local IP address to bind to") from None


# -- secrets ---------------------------------------------------------------------------------


def password_path(agent: Agent, name: str) -> Path:
    return agent.settings.secret_dir / f"{name}.password"


def key_path(agent: Agent, name: str) -> Path:
    return agent.settings.key_dir / name


def store_password(agent: Agent, name: str, password: str) -> None:
    """Write the password to a 0600 file, atomically (never a moment with looser mode)."""
    if not password or "\n" in password.strip("\n"):
        raise Refused("the password must be one non-empty line")
    final = password_path(agent, name)
    temp = final.with_name(f".{final.name}.{secrets.token_hex(4)}")
    replace_file(final, [password.strip("\n").encode("utf-8")], temp, mode=0o600)


def read_password(agent: Agent, name: str) -> str | None:
    try:
        return password_path(agent, name).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def key_fingerprint(agent: Agent, name: str) -> str | None:
    import asyncssh

    public = Path(f"{key_path(agent, name)}.pub")
    if not public.exists():
        return None
    return asyncssh.read_public_key(str(public)).get_fingerprint("sha256")


# -- create, edit, delete --------------------------------------------------------------------


def get(agent: Agent, name: str) -> Connection:
    row = agent.state.get(name)
    if row is None:
        raise NotFound(f"no connection named {name!r} (see 'ingest-push connection list')")
    return Connection.from_row(row)


def get_row(agent: Agent, name: str) -> dict[str, Any]:
    row = agent.state.get(name)
    if row is None:
        raise NotFound(f"no connection named {name!r} (see 'ingest-push connection list')")
    return row


def add(agent: Agent, conn: Connection, password: str | None = None) -> Connection:
    if agent.state.get(conn.name) is not None:
        raise Refused(f"a connection named {conn.name!r} exists: edit it or choose another name")
    if not conn.since_initial:
        conn.since_initial = agent.now().astimezone(agent.settings.zone).date().isoformat()
    validate(conn, agent)
    if conn.auth == "password" and password is None:
        raise Refused(NEEDS_PASSWORD)
    now = agent.now()
    row = conn.to_row()
    row.update(created_at=now, updated_at=now, schedule_anchor=now)
    if password is not None:
        store_password(agent, conn.name, password)
    agent.state.insert(row)
    changes = [(k, None, v) for k, v in conn.public_view().items() if v not in (None, [], "")]
    if password is not None:
        changes.append(("password", None, "set"))
    _announce(agent, conn, "created", changes)
    return conn


def edit(
    agent: Agent, name: str, updates: dict[str, Any], password: str | None = None
) -> list[tuple[str, Any, Any]]:
    """Apply ``updates`` (field -> new value); returns what changed (never secrets)."""
    old = get(agent, name)
    new = dataclasses.replace(old, **updates)
    validate(new, agent)
    before, after = old.public_view(), new.public_view()
    changes = [(k, before[k], after[k]) for k in after if before[k] != after[k]]
    if password is not None:
        changes.append(("password", "(hidden)", "changed"))
    if not changes:
        raise Refused(f"nothing to change in {name!r}: give at least one new setting")
    if new.auth == "password" and password is None and read_password(agent, name) is None:
        raise Refused(NEEDS_PASSWORD)
    if password is not None:
        store_password(agent, name, password)
    if new.auth == "key":  # a password no longer used is not kept on disk
        password_path(agent, name).unlink(missing_ok=True)
    changed = {k for k, _, _ in changes}
    extra: dict[str, Any] = {"updated_at": agent.now()}
    if changed & {*RETEST_FIELDS, "password"}:
        extra["test_passed_at"] = None
    if changed & set(REPIN_FIELDS):
        extra["pinned_fingerprint"] = None
        extra["seen_fingerprint"] = None
    if "frequency" in changed:
        extra["schedule_anchor"] = agent.now()
    row = new.to_row()
    row.pop("name")
    agent.state.update(name, **row, **extra)
    _announce(agent, new, "edited", changes)
    return changes


def delete(agent: Agent, name: str) -> None:
    """Delete the connection, its password and its key; run history stays (see module doc)."""
    conn = get(agent, name)
    agent.state.delete(name)
    password_path(agent, name).unlink(missing_ok=True)
    for path in (key_path(agent, name), Path(f"{key_path(agent, name)}.pub")):
        path.unlink(missing_ok=True)
    _announce(agent, conn, "deleted", [])


def _announce(
    agent: Agent, conn: Connection, action: str, changes: list[tuple[str, Any, Any]]
) -> None:
    who = operator_name()
    when = agent.now()
    agent.log.info(
        f"connection_{action}",
        connection=conn.name,
        by=who,
        changed=[k for k, _, _ in changes],
    )
    mail_change(agent, conn.name, conn.notify, action, who, when, changes)


# -- keys ------------------------------------------------------------------------------------


def generate_key(agent: Agent, name: str, regenerate: bool = False) -> tuple[str, str]:
    """Make the connection's 4096-bit RSA key; returns (public line, fingerprint)."""
    conn = get(agent, name)
    path = key_path(agent, name)
    had_key = path.exists()
    if had_key and not regenerate:
        raise Refused(
            f"{name!r} already has a key ({key_fingerprint(agent, name)}); the public key is shown "
            f"only once: use 'ingest-push key regenerate {name}' to replace it"
        )
    if regenerate and not had_key:
        raise Refused(f"{name!r} has no key yet: use 'ingest-push key generate {name}'")
    old_fingerprint = key_fingerprint(agent, name)
    pair = generate_client_keypair(path, comment=f"ingest-push:{name}", overwrite=regenerate)
    agent.state.update(name, test_passed_at=None, updated_at=agent.now())
    action = "key_regenerated" if regenerate else "key_generated"
    agent.log.info(action, connection=name, fingerprint=pair.fingerprint, by=operator_name())
    mail_change(
        agent,
        name,
        conn.notify,
        "edited",
        operator_name(),
        agent.now(),
        [("client key", old_fingerprint, pair.fingerprint)],
    )
    return pair.public_line, pair.fingerprint
