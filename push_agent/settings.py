"""The agent's own settings, read once from TOML (separate from the server's ingest.toml).

Where the file comes from: ``--config PATH``, else ``$INGEST_PUSH_CONFIG``, else
``./ingest-push.toml`` if it exists, else built-in defaults. Relative paths are resolved against
the file's folder. Unknown keys and wrong types are refused like the server's settings.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ingest_core.errors import ConfigError
from ingest_core.settings import (
    SmtpSettings,
    build_table,
    find_config_file,
    read_config_file,
)

CONFIG_ENV = "INGEST_PUSH_CONFIG"
DEFAULT_CONFIG_NAME = "ingest-push.toml"
# The log folder: the agent's user and its group may read the logs, nobody else.
LOG_DIR_MODE = 0o750
LOG_FILE_MODE = 0o640


@dataclass(frozen=True)
class AgentLogSettings:
    """``push-agent.jsonl`` in ``log_dir``, rotated like the server's logs."""

    # The log is rotated when it reaches max_bytes; backups older files are kept
    # (push-agent.jsonl.1 ... .N). 0 for max_bytes: never rotated by the agent (logrotate).
    max_bytes: int = 16 * 1024**2
    backups: int = 8
    # Below this much free space on the log folder's disk, info lines are counted instead of
    # written (warnings and errors still are); 0: always write.
    free_disk_reserve_bytes: int = 256 * 1024**2


@dataclass(frozen=True)
class AgentSettings:
    """Everything the agent needs, resolved once. Paths are absolute."""

    # The state folder holds state.db, secrets/ (passwords, 0600), keys/, locks/, work/.
    state_dir: Path = Path("push-state")
    log_dir: Path = Path("logs")
    timezone: str = "America/New_York"
    connect_timeout: float = 20.0
    # Bounded retries inside one run, for transient failures only (unreachable, interrupted).
    retries: int = 2
    retry_backoff: float = 10.0
    command_timeout: float = 3600.0
    # How often the daemon looks at the clock while waiting for the next run.
    daemon_step: float = 30.0
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    logs: AgentLogSettings = field(default_factory=AgentLogSettings)
    source: str = "built-in defaults"

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.db"

    @property
    def secret_dir(self) -> Path:
        return self.state_dir / "secrets"

    @property
    def key_dir(self) -> Path:
        return self.state_dir / "keys"

    @property
    def lock_dir(self) -> Path:
        return self.state_dir / "locks"

    @property
    def work_dir(self) -> Path:
        return self.state_dir / "work"


def load_agent_settings(path: str | os.PathLike[str] | None = None) -> AgentSettings:
    """Find and read the agent's config file (or take the defaults) and resolve every path."""
    chosen = find_config_file(path, CONFIG_ENV, DEFAULT_CONFIG_NAME)
    if chosen is None:
        return resolve_agent_settings(AgentSettings(), Path.cwd(), "built-in defaults")
    raw = read_config_file(chosen)
    if "source" in raw:  # where the settings came from, not a setting
        raise ConfigError(f"{chosen}: source: unknown setting")
    built = build_table(AgentSettings, raw, str(chosen), "")
    return resolve_agent_settings(built, chosen.resolve().parent, str(chosen))


def resolve_agent_settings(settings: AgentSettings, base: Path, source: str) -> AgentSettings:
    """Make paths absolute against ``base`` and check what types alone cannot."""

    def absolute(p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    resolved = dataclasses.replace(
        settings,
        state_dir=absolute(settings.state_dir),
        log_dir=absolute(settings.log_dir),
        source=source,
    )
    try:
        ZoneInfo(resolved.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"{source}: timezone: expected an IANA time zone such as America/New_York, "
            f"got {resolved.timezone!r}"
        ) from None
    for key in ("connect_timeout", "command_timeout", "daemon_step"):
        if getattr(resolved, key) <= 0:
            raise ConfigError(f"{source}: {key}: expected a positive number of seconds")
    if resolved.retries > 10:
        raise ConfigError(f"{source}: retries: expected 0 to 10, got {resolved.retries}")
    return resolved


def log_limits(settings: AgentSettings) -> dict[str, int]:
    """The keyword arguments of ``get_logger`` that come from ``[logs]``."""
    return {
        "max_bytes": settings.logs.max_bytes,
        "backups": settings.logs.backups,
        "disk_reserve": settings.logs.free_disk_reserve_bytes,
    }


def log_folder(settings: AgentSettings) -> Path:
    """The log folder, created 0750; when it is the agent's own, made 0750 and its logs 0640
    (an older version left them readable by every user)."""
    folder = settings.log_dir
    folder.mkdir(mode=LOG_DIR_MODE, parents=True, exist_ok=True)
    mine = os.geteuid()
    try:
        if folder.stat().st_uid == mine:
            os.chmod(folder, LOG_DIR_MODE)
        for log in folder.glob("*.jsonl*"):
            info = log.lstat()
            if stat.S_ISREG(info.st_mode) and info.st_uid == mine and info.st_mode & 0o137:
                os.chmod(log, LOG_FILE_MODE)
    except OSError:  # a shared log folder someone else manages: leave its modes alone
        pass
    return folder
