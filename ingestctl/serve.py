"""ingestctl serve: the product's main job, the SFTP/SCP server and the loader's scheduler.

Both run in one process on one event loop; neither imports the other. The loader keeps its
heavy work off the loop (see loader/daemon.py), so transfers keep flowing during a load.
SIGTERM or SIGINT (Ctrl-C) stops both quietly: the server drains uploads for its grace period,
the loader finishes or abandons its current step safely.

"serving ..." is printed once the port is listening, never before; a port that cannot be
bound is one line naming the setting that changes it, and so is a SQLite control DB whose
data root another node uses (``ingest_core.nodes``). A first start with no account says
which command starts onboarding.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from ingest_core.console import print_escaped
from ingest_core.errors import IngestError
from ingest_core.lifecycle import run_until_signalled
from ingest_core.nodes import claim_data_root
from ingest_core.settings import Settings
from ingestctl.init import initialize

# What socket.create_server raises when the address or port cannot be had.
BIND_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})


class CannotListen(IngestError):
    """The server's address or port cannot be bound (exit 1)."""


def bind_refusal(exc: OSError, settings: Settings) -> CannotListen:
    """One line: where, why, and the setting that changes it, in the file that holds it."""
    server = settings.server
    why = {
        errno.EADDRINUSE: "the port is already in use (another sis-ingest or another program "
        "listens there)",
        errno.EADDRNOTAVAIL: "this machine has no such address",
        errno.EACCES: "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    if settings.source == "built-in defaults":
        where = f"a new {Path.cwd() / 'ingest.toml'} (the built-in defaults are in use now)"
    else:
        where = str(Path(settings.source).resolve())
    return CannotListen(
        f"cannot listen on {server.host}:{server.port}: {why}; choose another port with "
        f"`[server] port` (and the address with `[server] host`) in {where}"
    )


def is_bind_error(exc: BaseException, listening: bool) -> bool:
    return (
        not listening
        and isinstance(exc, OSError)
        and exc.errno in BIND_ERRNOS
        and exc.filename is None
    )


async def serve_all(
    settings: Settings, stop: asyncio.Event, on_listening: Callable[[int], None] | None = None
) -> None:
    """The server and the loader until ``stop``; ``on_listening(port)`` once the server
    listens. A port that cannot be bound raises :class:`CannotListen`."""
    from ingest_server.server import Server
    from loader.daemon import LoaderDaemon
    from loader.feed_metrics import FeedCollector

    claim_data_root(settings)  # a shared SQLite data root: refused before the loader starts
    server = Server(settings, collectors=[FeedCollector(settings)])
    tasks = [
        asyncio.create_task(server.serve(stop), name="server"),
        asyncio.create_task(LoaderDaemon(settings).run(stop), name="loader"),
    ]
    listening = asyncio.create_task(server.listening.wait())
    try:
        await asyncio.wait([listening, tasks[0]], return_when=asyncio.FIRST_COMPLETED)
        if server.listening.is_set() and on_listening is not None:
            on_listening(server.port)
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            exc = task.exception()
            if exc is not None:
                stop.set()
                if is_bind_error(exc, server.listening.is_set()):
                    raise bind_refusal(exc, settings) from None  # type: ignore[arg-type]
                raise exc
    finally:
        listening.cancel()
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


def run_all(settings: Settings, on_listening: Callable[[int], None] | None = None) -> int:
    run_until_signalled(
        lambda stop: serve_all(settings, stop, on_listening), event_loop=settings.server.event_loop
    )
    return 0


def ingestctl_command(config: str | None = None) -> str:
    """How the operator runs this very ingestctl from here: ``ingestctl`` when that name on
    PATH is this one, else its path (``.venv/bin/ingestctl`` after `make run`); with
    ``--config`` when the settings came from one."""
    script = Path(sys.argv[0])
    command = "ingestctl"
    if script.name == "ingestctl":
        on_path = shutil.which("ingestctl")
        if not (on_path and Path(on_path).resolve() == script.resolve()):
            absolute = script.absolute()
            try:
                command = os.path.relpath(absolute) if absolute.is_relative_to(Path.cwd()) else ""
            except ValueError:
                command = ""
            command = command or str(absolute)
    if config:
        command += f" --config {Path(config).resolve()}"
    return command


def first_start_hint(ctx) -> str | None:
    """The one command that starts onboarding, while no account exists."""
    if ctx.registry.list_accounts():
        return None
    return (
        "no client accounts yet: start onboarding with "
        f"`{ingestctl_command(ctx.config)} account create NAME` "
        "(README: Onboarding a client account, step 1)"
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the SFTP/SCP server and the nightly loader together",
        description="The main job: the SFTP/SCP server and the loader's "
        "scheduler (nightly load, midnight pool file, on-arrival pre-check) in "
        "one process. Needs `ingestctl init` first (as `make run` and the systemd unit do); "
        "creates missing folders and host keys. Stops cleanly on SIGTERM or Ctrl-C.",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ctx) -> int:
    initialize(ctx.settings)
    settings = ctx.settings
    hint = first_start_hint(ctx)

    def listening(port: int) -> None:
        print_escaped(
            f"sis-ingest serving SFTP/SCP on {settings.server.host}:{port};"
            f" loader at {settings.schedule.loader_time}, pool at "
            f"{settings.schedule.pool_time} {settings.schedule.timezone}; "
            f"logs in {settings.log_dir}; Ctrl-C stops it",
            flush=True,
        )
        if hint:
            print_escaped(hint, flush=True)

    return run_all(settings, listening)
