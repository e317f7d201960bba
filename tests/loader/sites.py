"""A deployment on SQLite or on PostgreSQL, driven through the real CLI (shared by the test
modules that run each finding on both databases)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from ingest_core.folders import account_folder
from ingest_core.settings import Settings

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@dataclass
class Site:
    """One deployment: its settings, its config file and its ``ingestctl``."""

    settings: Settings
    config: Path
    run: Callable[..., subprocess.CompletedProcess[str]]

    def ctl(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return self.run(*args, config=self.config, check=check)

    @property
    def is_sqlite(self) -> bool:
        return self.settings.sis_db_url.startswith("sqlite")

    def upload(self, account: str, name: str, content: bytes) -> Path:
        """Put a complete file in place the way the server does: temporary name, rename."""
        folder = account_folder(self.settings, account)
        temp = folder.upload_temp("test")
        temp.write_bytes(content)
        final = folder.root / name
        temp.rename(final)
        return final


def make_site(
    request: pytest.FixtureRequest,
    settings: Settings,
    config_file: Path,
    ingestctl: Callable[..., subprocess.CompletedProcess[str]],
) -> Site:
    """The test's deployment on the backend named by ``request.param``."""
    if request.param == "sqlite":
        return Site(settings, config_file, ingestctl)
    pg_url = request.getfixturevalue("pg_url")
    config = config_file.with_name("ingest-pg.toml")
    config.write_text(f'sis_db_url = "{pg_url}"\n' + config_file.read_text(), encoding="utf-8")
    return Site(settings.replace(sis_db_url=pg_url), config, ingestctl)
