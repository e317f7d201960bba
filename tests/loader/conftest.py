"""Loader fixtures: an onboarded account with an approved spec, data files, an SMTP sink."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from types import SimpleNamespace

import pytest

from ingest_core.db import close_all
from ingest_core.folders import AccountFolder, account_folder
from ingest_core.registry import Registry
from ingest_core.settings import Settings
from loader.approval import approve_spec
from loader.sis_db import close_sis_dbs
from loader.spec import Spec

SPEC_FILE = "sis_hr_user_info.txt"
COLUMNS = ("UUUID", "first_name", "last_name", "email")


def data_text(rows: int, start: int = 0, tag: str = "") -> str:
    """A valid tab-delimited LF file with a header and ``rows`` unique rows."""
    lines = ["\t".join(COLUMNS)]
    lines += [
        f"U{i:07d}\tFirst{i}{tag}\tLast{i}\tu{i}@example.edu" for i in range(start, start + rows)
    ]
    return "\n".join(lines) + "\n"


def write_data(path: Path, rows: int, start: int = 0, tag: str = "") -> Path:
    path.write_text(data_text(rows, start, tag), encoding="utf-8", newline="")
    return path


def upload(folder: AccountFolder, name: str, text: str) -> Path:
    """Put a complete file in place the way the server does: hidden temp name, then rename."""
    tmp = folder.upload_temp("test")
    tmp.write_text(text, encoding="utf-8", newline="")
    final = folder.root / name
    tmp.rename(final)
    return final


@dataclass
class Onboarded:
    settings: Settings
    name: str
    folder: AccountFolder
    spec: Spec

    @property
    def data_file(self) -> Path:
        return self.folder.root / self.spec.file_name


@pytest.fixture(autouse=True)
def _close_sis_dbs() -> Iterator[None]:
    yield
    close_sis_dbs()
    close_all()


@pytest.fixture
def onboard(tmp_path: Path) -> Callable[..., Onboarded]:
    """Create an account with an approved spec (key column UUUID) in the given settings."""

    def make(settings: Settings, name: str = "acme", deferred_fetch: bool = False) -> Onboarded:
        registry = Registry(settings, actor="test")
        registry.create_account(name, institution="Test U", deferred_fetch=deferred_fetch)
        sample_dir = tmp_path / f"sample-{name}"
        sample_dir.mkdir()
        sample = write_data(sample_dir / SPEC_FILE, 3)
        spec = approve_spec(registry, name, sample, key="UUUID")
        return Onboarded(settings, name, account_folder(settings, name), spec)

    return make


@pytest.fixture
def kit() -> SimpleNamespace:
    """The helpers above, for test modules (a conftest cannot be imported by name)."""
    return SimpleNamespace(
        SPEC_FILE=SPEC_FILE,
        COLUMNS=COLUMNS,
        data_text=data_text,
        write_data=write_data,
        upload=upload,
    )


@pytest.fixture
def acme(settings: Settings, onboard: Callable[..., Onboarded]) -> Onboarded:
    return onboard(settings)


@pytest.fixture
def acme_pg(settings: Settings, pg_url: str, onboard: Callable[..., Onboarded]) -> Onboarded:
    return onboard(settings.replace(sis_db_url=pg_url))


class _Sink:
    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.arrived = threading.Condition()

    async def handle_DATA(self, server, session, envelope):
        with self.arrived:
            self.messages.append(message_from_bytes(envelope.original_content))
            self.arrived.notify_all()
        return "250 OK"

    def wait(self, count: int, timeout: float = 10.0) -> list[Message]:
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.messages) >= count, timeout)
            return list(self.messages)


@pytest.fixture
def smtp_sink() -> Iterator[tuple[_Sink, int]]:
    """A real SMTP server (aiosmtpd) on 127.0.0.1; yields (sink, port)."""
    from aiosmtpd.controller import Controller
    from conftest import free_port

    sink = _Sink()
    port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield sink, port
    finally:
        controller.stop()
