"""Connections: where to push, how to log in, what to send, when, and who to tell.

A connection lives in the state file; its password lives in ``secrets/NAME.password`` (0600),
the password of its ``--db-url`` in ``secrets/NAME.db-password`` (0600; the state file keeps the
URL without it) and its key pair in ``keys/NAME`` (0600) and ``keys/NAME.pub``. No secret is
ever printed, logged or mailed: a change to one shows up as "changed". Every create, edit and
delete is mailed to the connection's addresses and logged.

The checks of what an export produced (``allow_empty``, ``min_line_share``) live in
``exports/NAME.json`` and the line count of the last successful transfer in
``exports/NAME.sent.json`` beside the state file (0600 files in a 0700 folder).
"""

from __future__ import annotations

import dataclasses
import glob
import ipaddress
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

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
# Settings kept beside the state file (exports/NAME.json), not in a state.db column.
EXPORT_CHECK_FIELDS = ("allow_empty", "min_line_share")
# Known about the connection, never set by an operator: not stored with the settings.
NOT_SETTINGS = ("last_sent_lines",)
DB_URL_EXAMPLES = "postgresql+psycopg://user:password@host/dbname or sqlite:////path/to/file.db"


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
    # An export that produces nothing is sent (and counted a success) only when this is on.
    allow_empty: bool = False
    # Fail an export with fewer lines than this share of the last successful transfer's
    # (0.5: half); 0 turns the check off.
    min_line_share: float = 0.0
    # The line count of the last successful transfer (None: not known yet).
    last_sent_lines: int | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Connection:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in row.items() if k in names}
        values["notify"] = json.loads(row.get("notify") or "[]")
        return cls(**values)

    def to_row(self) -> dict[str, Any]:
        """The state file's columns: no export checks, no password in the database URL."""
        row = dataclasses.asdict(self)
        for name in (*EXPORT_CHECK_FIELDS, *NOT_SETTINGS):
            row.pop(name)
        row["notify"] = json.dumps(self.notify)
        row["source_url"] = split_url_password(self.source_url)[0]
        return row

    def schedule(self, agent: Agent) -> Frequency:
        return parse_frequency(self.frequency, agent.settings.zone)

    def public_view(self) -> dict[str, Any]:
        """Every setting, safe to print or mail (a password in a database URL is masked)."""
        view = dataclasses.asdict(self)
        for name in NOT_SETTINGS:
            view.pop(name)
        view["source_url"] = mask_url(self.source_url)
        view["delimiter"] = delimiter_name(self.delimiter)
        return view


def _parse_url(url: str) -> URL | None:
    try:
        return make_url(url)
    except (ArgumentError, ValueError):
        return None


def mask_url(url: str | None) -> str | None:
    if not url:
        return url
    parsed = _parse_url(url)
    return parsed.render_as_string(hide_password=True) if parsed else "(unparseable URL)"


def split_url_password(url: str | None) -> tuple[str | None, str | None]:
    """(the URL without its password, the password); the URL as it is when it has none."""
    parsed = _parse_url(url) if url else None
    if parsed is None or parsed.password is None:
        return url, None
    return parsed._replace(password=None).render_as_string(hide_password=False), str(
        parsed.password
    )


def join_url_password(url: str | None, password: str | None) -> str | None:
    parsed = _parse_url(url) if url and password is not None else None
    if parsed is None:
        return url
    return parsed.set(password=password).render_as_string(hide_password=False)


def host_port(host: str, port: int) -> str:
    """``host:port`` as a person writes it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def matching_files(pattern: str) -> list[Path]:
    """The files (not folders) a ``--file`` path or glob matches now."""
    return [Path(p) for p in glob.glob(os.path.expanduser(pattern)) if Path(p).is_file()]


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
    check_host(conn.host)
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
    if conn.source_url:
        check_db_url(conn.source_url)
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
    if not 0 <= conn.min_line_share <= 1:
        raise Refused(
            f"{conn.min_line_share:g} is not a line share; accepted: 0 (off) to 1, "
            "e.g. 0.5 for half the lines of the last successful transfer"
        )
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


def check_host(host: str) -> None:
    """Refuse what is not a host name or IP address alone (a port, a user, a URL in it)."""
    generic = f"{host!r} is not a host; accepted: a host name or IP address"
    if not host or any(c.isspace() for c in host):
        raise Refused(generic)
    if "://" in host:
        raise Refused(
            f"{host!r} is not a host: give the host name alone (no sftp://), the port with "
            "--port and the folder with --path"
        )
    if "@" in host:
        raise Refused(f"{host!r} is not a host: give the user name with --user and the host alone")
    bracketed = re.fullmatch(r"\[([^\]]*)\](?::(\d*))?", host)
    if bracketed:
        address, port = bracketed.groups()
        if port:
            raise Refused(
                f"{host!r} has a port in it: give the host alone (--host {address}) "
                f"and the port with --port {port}"
            )
        raise Refused(f"{host!r}: give an IPv6 address without brackets (--host {address})")
    if ":" in host:
        with_port = re.fullmatch(r"([^:]+):(\d+)", host)
        if with_port:
            name, port = with_port.groups()
            raise Refused(
                f"{host!r} has a port in it: give the host alone (--host {name}) "
                f"and the port with --port {port}"
            )
        try:
            ipaddress.ip_address(host)  # an IPv6 address
        except ValueError:
            raise Refused(generic) from None
        return
    if not re.fullmatch(r"[\w.-]+", host):
        raise Refused(generic)


def check_db_url(url: str) -> None:
    """Refuse a database URL SQLAlchemy cannot read or whose database type it does not know."""
    parsed = _parse_url(url)
    if parsed is None:
        raise Refused(f"the --db-url is not a database URL; accepted: {DB_URL_EXAMPLES}")
    try:
        parsed.get_dialect()
    except NoSuchModuleError:
        raise Refused(
            f"the --db-url names the database type {parsed.drivername!r}, which this agent "
            f"does not know; accepted: {DB_URL_EXAMPLES}"
        ) from None


def warnings_for(conn: Connection) -> list[str]:
    """What is saved but will fail a run unless something changes before then."""
    notes = []
    if conn.source_kind == "file" and conn.source_path and not matching_files(conn.source_path):
        notes.append(
            f"no file matches {conn.source_path} today: the connection is saved, but its runs "
            "fail until a file matches"
        )
    parsed = None
    if conn.source_kind == "query" and conn.source_url:
        parsed = _parse_url(conn.source_url)
    if parsed is not None:
        try:
            parsed.get_dialect().import_dbapi()
        except ImportError as exc:
            notes.append(
                f"the database driver for {parsed.drivername} is not installed here ({exc}): "
                "the connection is saved, but its runs fail until it is installed"
            )
        except NoSuchModuleError:
            pass  # refused by validate
    return notes


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


def db_password_path(agent: Agent, name: str) -> Path:
    return agent.settings.secret_dir / f"{name}.db-password"


def store_db_password(agent: Agent, name: str, url: str | None) -> None:
    """Keep the password of the database URL in a 0600 file (none in the URL: no file)."""
    password = split_url_password(url)[1]
    final = db_password_path(agent, name)
    if password is None:
        final.unlink(missing_ok=True)
        return
    temp = final.with_name(f".{final.name}.{secrets.token_hex(4)}")
    replace_file(final, [password.encode("utf-8")], temp, mode=0o600)


def read_db_password(agent: Agent, name: str) -> str | None:
    try:
        return db_password_path(agent, name).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


# -- export checks and the last transfer's line count (files beside the state file) ----------


def _exports_dir(agent: Agent) -> Path:
    folder = agent.settings.state_dir / "exports"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def _write_json(path: Path, value: dict[str, Any]) -> None:
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    replace_file(path, [json.dumps(value).encode("utf-8")], temp, mode=0o600)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def export_checks_path(agent: Agent, name: str) -> Path:
    return _exports_dir(agent) / f"{name}.json"


def sent_lines_path(agent: Agent, name: str) -> Path:
    return _exports_dir(agent) / f"{name}.sent.json"


def store_export_checks(agent: Agent, conn: Connection) -> None:
    _write_json(
        export_checks_path(agent, conn.name),
        {k: getattr(conn, k) for k in EXPORT_CHECK_FIELDS},
    )


def store_sent_lines(agent: Agent, name: str, lines: int) -> None:
    """Remember the line count of a successful transfer (the next run compares with it)."""
    _write_json(sent_lines_path(agent, name), {"lines": lines, "at": agent.now().isoformat()})


def read_sent_lines(agent: Agent, name: str) -> int | None:
    lines = _read_json(sent_lines_path(agent, name)).get("lines")
    return lines if isinstance(lines, int) and not isinstance(lines, bool) else None


def _complete(agent: Agent, row: dict[str, Any]) -> dict[str, Any]:
    """A state row with what is kept beside it: the database password, the export checks and
    the last transfer's line count. A password an older version left in the state file moves
    to ``secrets/`` here."""
    name = row["name"]
    url, inline = split_url_password(row.get("source_url"))
    if inline is not None:
        store_db_password(agent, name, row["source_url"])
        agent.state.update(name, source_url=url)
        autocommit = agent.state.engine.execution_options(isolation_level="AUTOCOMMIT")
        with autocommit.connect() as db:  # no copy left in the file's free pages
            db.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            db.exec_driver_sql("VACUUM")
    full = dict(row)
    full["source_url"] = join_url_password(url, read_db_password(agent, name))
    checks = _read_json(export_checks_path(agent, name))
    if isinstance(checks.get("allow_empty"), bool):
        full["allow_empty"] = checks["allow_empty"]
    share = checks.get("min_line_share")
    if isinstance(share, int | float) and not isinstance(share, bool):
        full["min_line_share"] = float(share)
    full["last_sent_lines"] = read_sent_lines(agent, name)
    return full


def all_rows(agent: Agent) -> list[dict[str, Any]]:
    return [_complete(agent, row) for row in agent.state.all()]


def key_fingerprint(agent: Agent, name: str) -> str | None:
    import asyncssh

    public = Path(f"{key_path(agent, name)}.pub")
    if not public.exists():
        return None
    return asyncssh.read_public_key(str(public)).get_fingerprint("sha256")


# -- create, edit, delete --------------------------------------------------------------------


def get(agent: Agent, name: str) -> Connection:
    return Connection.from_row(get_row(agent, name))


def get_row(agent: Agent, name: str) -> dict[str, Any]:
    """The state row, completed with the database password and the export checks."""
    row = agent.state.get(name)
    if row is None:
        raise NotFound(f"no connection named {name!r} (see 'ingest-push connection list')")
    return _complete(agent, row)


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
    store_db_password(agent, conn.name, conn.source_url)
    store_export_checks(agent, conn)
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
    if split_url_password(old.source_url)[1] != split_url_password(new.source_url)[1]:
        changes.append(("database password", "(hidden)", "changed"))
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
    store_db_password(agent, name, new.source_url)
    store_export_checks(agent, new)
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
    db_password_path(agent, name).unlink(missing_ok=True)
    # The last transfer's line count stays, like the run history (a connection made again
    # under this name resumes from its last successful transfer).
    export_checks_path(agent, name).unlink(missing_ok=True)
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
