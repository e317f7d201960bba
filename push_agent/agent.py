"""What every agent operation needs: settings, the open state file, the log, the clock."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ingest_core.schedule import utc_now
from ingest_core.structured_log import get_logger
from push_agent.settings import AgentSettings, log_folder, log_limits
from push_agent.state import State

LOG_COMPONENT = "push-agent"


@dataclass
class Agent:
    """One agent process's handles; ``now`` is injectable so schedules can be tested."""

    settings: AgentSettings
    state: State
    log: Any
    now: Callable[[], datetime] = field(default=utc_now)

    def close(self) -> None:
        self.state.close()


def private_dir(path: os.PathLike[str] | str) -> None:
    """Create a folder only the agent's user can enter (secrets, keys, state)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


def open_agent(
    settings: AgentSettings, now: Callable[[], datetime] = utc_now, echo: bool = False
) -> Agent:
    for folder in (
        settings.state_dir,
        settings.secret_dir,
        settings.key_dir,
        settings.lock_dir,
        settings.work_dir,
    ):
        private_dir(folder)
    state = State(settings.state_file)
    os.chmod(settings.state_file, 0o600)
    log = get_logger(log_folder(settings), LOG_COMPONENT, echo=echo, **log_limits(settings))
    return Agent(settings=settings, state=state, log=log, now=now)
