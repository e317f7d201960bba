"""The agent's own settings, read once from TOML (separate from the server's ingest.toml).

Where the file comes from: ``--config PATH``, else ``$INGEST_PUSH_CONFIG``, else
``./ingest-push.toml`` if it exists, else built-in defaults. Relative paths are resolved against
the file's folder. Unknown keys and wrong types are refused like the server's settings.
"""

from __future__ import annotations

import dataclasses
import os
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
    built = build_table(AgentSettings, read_config_file(chosen), str(chosen), "")
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
