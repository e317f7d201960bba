"""One settings object for every part of sis-ingest, read once from TOML.

Where the file comes from: ``--config PATH``, else ``$INGEST_CONFIG``, else ``./ingest.toml``
if it exists, else ``/etc/sis-ingest/ingest.toml`` (the systemd unit's file; :data:`SYSTEM_CONFIG`,
``$INGEST_SYSTEM_CONFIG`` names another for tests) if it exists, else built-in defaults that
work in a checkout. Relative paths in a config file are resolved against the file's folder
(against the working directory for the defaults), so a service started from anywhere finds the
same folders.

Every section is a frozen dataclass; a new setting is one annotated field with a default.
Unknown keys and wrong types are refused with a :class:`ConfigError` naming the file, the key
and what was expected.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import socket
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ingest_core.errors import ConfigError
from ingest_core.lifecycle import EVENT_LOOPS

CONFIG_ENV = "INGEST_CONFIG"
DEFAULT_CONFIG_NAME = "ingest.toml"
# Where the systemd unit keeps the settings: found after ./ingest.toml, so `ingestctl` run from
# any folder of the server operates the running service's registry. $INGEST_SYSTEM_CONFIG names
# another path in its place (tests; never the real /etc).
SYSTEM_CONFIG = Path("/etc/sis-ingest/ingest.toml")
SYSTEM_CONFIG_ENV = "INGEST_SYSTEM_CONFIG"

_HHMM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")
_NODE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_UNSAFE_IN_NODE = re.compile(r"[^A-Za-z0-9._-]")

# Algorithm lists that reach 0 [fail] and 2 [warn] in ssh-audit while OpenSSH 9.2, PuTTY 0.78
# and curl/libssh2 1.10 still connect (design-notes section 3; tests/server/test_ssh_audit.py).
# The warnings: curve25519-sha256 is not post-quantum (asyncssh's one post-quantum exchange
# with X25519, mlkem768x25519, needs OpenSSH 9.9+; OpenSSH 9.2, PuTTY 0.78 and libssh2 1.10
# agree on curve25519), and plain hmac-sha2-256 (libssh2 1.10 has no ETM MAC and no AEAD
# cipher). curve25519-sha256@libssh.org is the same exchange under its old name; all three
# clients offer the standard name too (curl was tried with each alone), so it only cost a
# third warning.
DEFAULT_KEX = ["mlkem768x25519-sha256", "curve25519-sha256"]
DEFAULT_CIPHERS = [
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes256-ctr",
    "aes192-ctr",
    "aes128-ctr",
]
DEFAULT_MACS = [
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
    "umac-128-etm@openssh.com",
    "hmac-sha2-256",
]
DEFAULT_HOST_KEY_ALGS = ["ssh-ed25519", "rsa-sha2-512", "rsa-sha2-256"]

# [server] algorithm_profile. "strict" drops from the defaults what only libssh2 1.10 needs:
# plain (encrypt-and-MAC) hmac-sha2-256, ssh-audit's second warning. The CTR ciphers stay (no
# warning, and clients without AES-GCM such as paramiko and JSch use them); so does the
# ed25519 host key (libssh2 1.10 knows RSA host keys only as SHA-1 `ssh-rsa`, which we do not
# offer, but OpenSSH and PuTTY prefer ed25519 anyway).
ALGORITHM_PROFILES = ("compatible", "strict")
STRICT_MACS = [mac for mac in DEFAULT_MACS if mac != "hmac-sha2-256"]
# Per list: (its "compatible" default, its "strict" default).
PROFILE_DEFAULTS = {
    "kex_algs": (DEFAULT_KEX, DEFAULT_KEX),
    "encryption_algs": (DEFAULT_CIPHERS, DEFAULT_CIPHERS),
    "mac_algs": (DEFAULT_MACS, STRICT_MACS),
    "host_key_algs": (DEFAULT_HOST_KEY_ALGS, DEFAULT_HOST_KEY_ALGS),
}


@dataclass(frozen=True)
class ServerSettings:
    """The SSH listener: where it listens and what it offers."""

    host: str = "127.0.0.1"
    port: int = 2222
    host_key_dir: Path = Path("keys")
    server_version: str = "sis-ingest"
    login_timeout: float = 30.0
    max_auth_attempts: int = 6
    # RSA client signatures with SHA-1 (`ssh-rsa`) are refused unless this is true. Turn it
    # on only for clients that cannot do better: libssh2 1.10 (curl sftp://) signs that way.
    allow_sha1_rsa_signatures: bool = False
    allow_subfolders: bool = False
    # Uploads reach the disk (fsync of the file, then of the folder after the rename) before
    # the client hears "OK", so a power cut leaves the old file or the whole new one.
    fsync_uploads: bool = True
    kex_algs: list[str] = field(default_factory=lambda: list(DEFAULT_KEX))
    encryption_algs: list[str] = field(default_factory=lambda: list(DEFAULT_CIPHERS))
    mac_algs: list[str] = field(default_factory=lambda: list(DEFAULT_MACS))
    host_key_algs: list[str] = field(default_factory=lambda: list(DEFAULT_HOST_KEY_ALGS))
    # Worker processes for SSH sessions (the listener process admits and hands over);
    # 0: one per CPU, at most 8; 1: everything in one process.
    workers: int = 0
    # "auto": uvloop when installed (it is a dependency), else asyncio's loop; or either name.
    event_loop: str = "auto"
    # A worker that has not answered the listener's pings for this long (its event loop is
    # stuck) is killed and replaced.
    worker_heartbeat_timeout: float = 30.0
    shutdown_grace: float = 30.0
    # After SIGTERM, /healthz says 503 at once but new connections are still accepted this
    # many seconds, until a load balancer's health check has seen it (0: stop accepting at
    # once). Behind HAProxy: more than its check `inter` times `fall`.
    drain_seconds: float = 0.0
    # PROXY protocol v1/v2 is read only from these load balancer addresses.
    proxy_protocol_from: list[str] = field(default_factory=list)
    # "compatible": the default algorithm lists keep what libssh2 1.10 (curl sftp://) needs;
    # "strict": drops those extras (plain hmac-sha2-256) for fewer ssh-audit warnings. The
    # profile chooses every algorithm list left at its default (or copied unchanged from the
    # example config); a list written differently is used as written.
    algorithm_profile: str = "compatible"
    # SSH channels (SFTP/SCP sessions) one connection may have open at once (OpenSSH's
    # MaxSessions).
    max_channels_per_connection: int = 10
    # A logged-in connection with no channel, or no request on any channel, for this many
    # seconds is closed (0: never).
    idle_timeout: float = 600.0

    def worker_count(self) -> int:
        """How many session processes ``workers`` means on this machine."""
        return self.workers or min(os.cpu_count() or 1, 8)


@dataclass(frozen=True)
class LimitSettings:
    """Limits that keep one client from hurting the others (0 means no limit)."""

    max_connections_total: int = 200
    max_connections_per_address: int = 10
    max_file_bytes: int = 2 * 1024**3
    account_quota_bytes: int = 10 * 1024**3
    free_disk_reserve_bytes: int = 1024**3
    max_read_ahead_bytes: int = 8 * 1024**2
    # Files (uploads and downloads) one connection may hold open at once; 0: sized at start
    # from the process's file-descriptor limit (at most 64).
    max_handles_per_session: int = 0
    # Upload bytes one connection may hold in memory before they are written, across all
    # its open files: memory per session stays bounded whatever the client does.
    max_unflushed_bytes_per_session: int = 1024**2
    # Logged-in connections one account may have at once (across all workers).
    max_sessions_per_account: int = 10
    # New connections per second from one address (with a burst of connection_burst), refused
    # before the banner like the IP gate; counted across all workers.
    connection_rate_per_address: float = 10.0
    connection_burst: int = 10
    # A write may start at most this many bytes past the end of the file (no large holes).
    max_hole_bytes: int = 1024**2


@dataclass(frozen=True)
class DefenderSettings:
    """Brute-force scores per source address (SFTPGo's defender, in spirit)."""

    enabled: bool = True
    # Equal by default: a different weight would tell anyone on an allowed address which
    # account names exist.
    score_unknown_user: int = 3
    score_bad_key: int = 3
    threshold: int = 15
    window_seconds: int = 600
    ban_seconds: int = 1800


@dataclass(frozen=True)
class LogSettings:
    """The JSON-lines logs in ``log_dir``: bounded in size and repetition."""

    # A log file is rotated when it reaches max_bytes; backups older files are kept
    # (NAME.jsonl.1 ... NAME.jsonl.N). 0 for max_bytes: never rotated by us (logrotate).
    max_bytes: int = 64 * 1024**2
    backups: int = 8
    # Identical events from one session within this window are written once, with a count.
    repeat_window_seconds: float = 60.0


@dataclass(frozen=True)
class KeyPolicySettings:
    """Which client public keys an account may register (the integration asks for RSA 4096)."""

    min_rsa_bits: int = 4096
    accept_ed25519: bool = False
    # A key older than this many days is refused at login (reminders go out 30, 7 and 1
    # days before); 0: keys do not expire.
    max_age_days: int = 0


@dataclass(frozen=True)
class IpPolicySettings:
    """The allowlist rule: at most four single static addresses per account."""

    max_per_account: int = 4


@dataclass(frozen=True)
class ScheduleSettings:
    """When the nightly jobs run, in one named time zone."""

    timezone: str = "America/New_York"
    loader_time: str = "03:00"
    pool_time: str = "00:00"
    catch_up_missed_runs: bool = True


@dataclass(frozen=True)
class LoaderSettings:
    """Nightly loader rules."""

    min_row_share: float = 0.5
    max_reported_errors: int = 20
    log_retention_days: int = 400
    precheck: bool = True
    # A file left in an account folder without being loaded (a stray name, a refused file)
    # is deleted this many days after it arrived, with a warning line 7 days before; 0: kept.
    unloaded_file_retention_days: int = 30
    # Refuse a file that would remove more than this share of the keys loaded last time
    # (spec with a key column; --force loads it anyway); 0: off.
    max_removed_share: float = 0.0


@dataclass(frozen=True)
class AlertSettings:
    """When operators and an account's contacts are told that a feed stopped."""

    # A spec that has loaded before and then goes this many runs in a row (nightly or
    # manual) without a load is late: mailed once per streak, and again when it resumes.
    # 0: no late-feed alerts.
    missing_file_runs: int = 2


@dataclass(frozen=True)
class PoolSettings:
    """Where active applicant IDs come from: the SIS database table, or a SQL query."""

    source: str = "table"
    query_url: str = ""
    query: str = ""


@dataclass(frozen=True)
class SmtpSettings:
    """Operator e-mail; notifications are off while ``host`` is empty."""

    host: str = ""
    port: int = 25
    starttls: bool = False
    username: str = ""
    password_file: str = ""
    sender: str = "sis-ingest@localhost"
    recipients: list[str] = field(default_factory=list)
    timeout: float = 20.0


@dataclass(frozen=True)
class AdminSettings:
    """The admin HTTP listener in the server's listener process: ``GET /metrics``
    (Prometheus) and ``GET /healthz``. ``port`` 0: no admin listener."""

    host: str = "127.0.0.1"
    port: int = 9700


@dataclass(frozen=True)
class ClusterSettings:
    """Several nodes sharing one PostgreSQL and one data root (README "Several nodes")."""

    # This node's name in claims, journals and temporary upload names; "": the host name.
    node_id: str = ""
    # Journal rows (logins, refusals, files received, downloaded, renamed, removed) are
    # kept this many days.
    journal_retention_days: int = 90


@dataclass(frozen=True)
class Settings:
    """Everything, resolved once. Paths are absolute."""

    data_root: Path = Path("var")
    log_dir: Path = Path("logs")
    control_db_url: str = ""
    sis_db_url: str = ""
    server: ServerSettings = field(default_factory=ServerSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    defender: DefenderSettings = field(default_factory=DefenderSettings)
    logs: LogSettings = field(default_factory=LogSettings)
    keys: KeyPolicySettings = field(default_factory=KeyPolicySettings)
    ips: IpPolicySettings = field(default_factory=IpPolicySettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    loader: LoaderSettings = field(default_factory=LoaderSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    pool: PoolSettings = field(default_factory=PoolSettings)
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    source: str = "built-in defaults"

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.schedule.timezone)

    @property
    def node_id(self) -> str:
        """This node's name: ``[cluster] node_id``, else the host name made safe for file
        names and the 64-character node columns (:func:`safe_node_name`)."""
        return safe_node_name(self.cluster.node_id)

    def replace(self, **changes: typing.Any) -> Settings:
        return dataclasses.replace(self, **changes)


def safe_node_name(node: str) -> str:
    """``node`` as it goes into file names and node columns: letters, digits, '.', '_', '-'
    (anything else becomes '_'), at most 64, never "." or ".."; "" means this machine's host
    name. ``[cluster] node_id`` is already such a name; a host name may not be."""
    tag = _UNSAFE_IN_NODE.sub("_", node or socket.gethostname())[:64]
    return tag if tag.strip(".") else tag.replace(".", "_") or "node"


_TOP_KEYS = {"data_root", "log_dir", "control_db_url", "sis_db_url"}


def system_config_path() -> Path:
    """The system-wide settings file looked for after ``./ingest.toml``."""
    return Path(os.environ.get(SYSTEM_CONFIG_ENV) or SYSTEM_CONFIG)


def find_config_file(
    path: str | os.PathLike[str] | None,
    env_var: str,
    default_name: str,
    system_path: Path | None = None,
) -> Path | None:
    """``path``, else the file named by ``$env_var``, else ``./default_name`` if present, else
    ``system_path`` if given and present."""
    if path is not None:
        chosen = Path(path)
        if not chosen.is_file():
            raise ConfigError(f"{chosen}: config file not found (give an existing TOML file)")
        return chosen
    if os.environ.get(env_var):
        chosen = Path(os.environ[env_var])
        if not chosen.is_file():
            raise ConfigError(f"{chosen}: config file named by ${env_var} not found")
        return chosen
    if Path(default_name).is_file():
        return Path(default_name)
    if system_path is not None and system_path.is_file():
        return system_path
    return None


def read_config_file(path: Path) -> dict[str, typing.Any]:
    """The file's TOML table; unreadable or invalid TOML is one ConfigError line."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc})") from None


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Find and read the config file (or take the defaults) and resolve every path."""
    chosen = find_config_file(path, CONFIG_ENV, DEFAULT_CONFIG_NAME, system_config_path())
    if chosen is None:
        return _resolve(Settings(), Path.cwd(), "built-in defaults")
    settings = build_table(Settings, read_config_file(chosen), str(chosen), "")
    return _resolve(settings, chosen.resolve().parent, str(chosen))


def settings_from_mapping(
    raw: dict[str, typing.Any], base: Path, name: str = "<mapping>"
) -> Settings:
    """Build settings from an already-parsed table (tests and tools use this)."""
    return _resolve(build_table(Settings, raw, name, ""), base, name)


def _resolve(settings: Settings, base: Path, source: str) -> Settings:
    def absolute(p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    data_root = absolute(settings.data_root)
    control = settings.control_db_url or f"sqlite:///{data_root / 'control.db'}"
    sis = settings.sis_db_url or f"sqlite:///{data_root / 'sis.db'}"
    server = dataclasses.replace(
        settings.server,
        host_key_dir=absolute(settings.server.host_key_dir),
        **_profile_algorithms(settings.server),
    )
    resolved = dataclasses.replace(
        settings,
        data_root=data_root,
        log_dir=absolute(settings.log_dir),
        control_db_url=control,
        sis_db_url=sis,
        server=server,
        source=source,
    )
    _check_semantics(resolved, source)
    return resolved


def _profile_algorithms(server: ServerSettings) -> dict[str, list[str]]:
    """The algorithm lists ``algorithm_profile`` replaces: with "strict", each list still equal
    to its compatible default becomes its strict default. Comparing values rather than asking
    whether the key was written lets an operator copy the example config (which lists every
    default) and still switch profiles with one line."""
    if server.algorithm_profile != "strict":
        return {}
    return {
        key: list(strict)
        for key, (compatible, strict) in PROFILE_DEFAULTS.items()
        if getattr(server, key) == compatible
    }


def _check_semantics(s: Settings, source: str) -> None:
    def bad(key: str, expected: str, got: object) -> ConfigError:
        return ConfigError(f"{source}: {key}: expected {expected}, got {got!r}")

    if not 0 < s.server.port < 65536:
        raise bad("server.port", "a TCP port 1-65535", s.server.port)
    try:
        ipaddress.ip_address(s.server.host)
    except ValueError:
        if s.server.host not in ("localhost", ""):
            raise bad("server.host", "an IP address to listen on", s.server.host) from None
    try:
        ZoneInfo(s.schedule.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise bad(
            "schedule.timezone", "an IANA time zone such as America/New_York", s.schedule.timezone
        ) from None
    for key in ("loader_time", "pool_time"):
        value = getattr(s.schedule, key)
        if not _HHMM.match(value):
            raise bad(f"schedule.{key}", "a 24-hour time HH:MM", value)
    if s.keys.min_rsa_bits < 2048:
        raise bad("keys.min_rsa_bits", "at least 2048", s.keys.min_rsa_bits)
    if not 1 <= s.ips.max_per_account <= 64:
        raise bad("ips.max_per_account", "a number from 1 to 64", s.ips.max_per_account)
    if not 0.0 <= s.loader.min_row_share <= 1.0:
        raise bad("loader.min_row_share", "a share from 0.0 to 1.0", s.loader.min_row_share)
    if not 0.0 <= s.loader.max_removed_share <= 1.0:
        raise bad("loader.max_removed_share", "a share from 0.0 to 1.0", s.loader.max_removed_share)
    if s.pool.source not in ("table", "query"):
        raise bad("pool.source", '"table" or "query"', s.pool.source)
    if s.pool.source == "query" and not (s.pool.query_url and s.pool.query):
        raise bad("pool.query", 'query_url and query when pool.source is "query"', s.pool.query)
    for key in ("login_timeout", "shutdown_grace"):
        if getattr(s.server, key) <= 0:
            raise bad(f"server.{key}", "a positive number of seconds", getattr(s.server, key))
    if s.server.workers < 0:
        raise bad("server.workers", "0 (one per CPU) or a number of processes", s.server.workers)
    if s.server.worker_heartbeat_timeout <= 0:
        raise bad(
            "server.worker_heartbeat_timeout",
            "a number of seconds above 0",
            s.server.worker_heartbeat_timeout,
        )
    if s.server.algorithm_profile not in ALGORITHM_PROFILES:
        raise bad(
            "server.algorithm_profile",
            '"compatible" (works with curl/libssh2 1.10) or "strict" (fewer ssh-audit warnings)',
            s.server.algorithm_profile,
        )
    rate = s.limits.connection_rate_per_address
    if not (math.isfinite(rate) and rate >= 0):
        raise bad(
            "limits.connection_rate_per_address",
            "new connections per second from one address (0: no limit)",
            rate,
        )
    if rate > 0 and s.limits.connection_burst < 1:
        raise bad(
            "limits.connection_burst",
            "at least 1 (connections one address may open at once) while "
            "limits.connection_rate_per_address is above 0",
            s.limits.connection_burst,
        )
    if s.server.event_loop not in EVENT_LOOPS:
        raise bad("server.event_loop", '"auto", "uvloop" or "asyncio"', s.server.event_loop)
    if s.cluster.node_id and not _NODE_ID.match(s.cluster.node_id):
        raise bad(
            "cluster.node_id",
            "1-64 letters, digits, '.', '_' or '-' (or \"\" for the host name)",
            s.cluster.node_id,
        )
    for url_key in ("control_db_url", "sis_db_url"):
        url = getattr(s, url_key)
        if not url.startswith(("sqlite", "postgresql")):
            raise bad(url_key, "a sqlite:/// or postgresql+psycopg:// URL", url)


def build_table(cls: type, raw: object, source: str, prefix: str) -> typing.Any:
    """Check a parsed TOML table against a settings dataclass and build it (also used by
    the push agent's own config)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [{prefix.rstrip('.')}]: expected a table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    # Settings.source records where the settings came from; it is not a setting itself.
    names = {
        f.name for f in dataclasses.fields(cls) if not (cls is Settings and f.name == "source")
    }
    values: dict[str, typing.Any] = {}
    for key, value in raw.items():
        where = f"{prefix}{key}"
        if key not in names:
            accepted = ", ".join(sorted(names))
            raise ConfigError(f"{source}: {where}: unknown setting (accepted here: {accepted})")
        values[key] = _convert(hints[key], value, source, where)
    return cls(**values)


def _convert(hint: typing.Any, value: object, source: str, where: str) -> object:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{source}: {where}: expected {expected}, got {value!r}")

    if dataclasses.is_dataclass(hint):
        return build_table(hint, value, source, f"{where}.")
    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad("a whole number >= 0")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise bad("a number >= 0")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise bad("a folder path (string)")
        return Path(value)
    origin = typing.get_origin(hint)
    if origin in (list, types.GenericAlias) or origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
        return list(value)
    raise bad(str(hint))  # pragma: no cover - a new field type needs a converter
