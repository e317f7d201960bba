"""ingestctl serve: the product's main job, the SFTP/SCP server and the loader's scheduler.

Both run in one process on one event loop; neither imports the other. The loader keeps its
heavy work off the loop (see loader/daemon.py), so transfers keep flowing during a load.
SIGTERM or SIGINT stops both: the server drains uploads for its grace period, the loader
finishes or abandons its current step safely.
"""

from __future__ import annotations

import argparse
import asyncio

from ingest_core.console import print_escaped
from ingest_core.lifecycle import run_until_signalled
from ingest_core.settings import Settings
from ingestctl.init import initialize


async def serve_all(settings: Settings, stop: asyncio.Event) -> None:
    from ingest_server.server import Server
    from loader.daemon import LoaderDaemon

    tasks = [
        asyncio.create_task(Server(settings).serve(stop), name="server"),
        asyncio.create_task(LoaderDaemon(settings).run(stop), name="loader"),
    ]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                stop.set()
                raise task.exception()  # type: ignore[misc]
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


def run_all(settings: Settings) -> int:
    run_until_signalled(
        lambda stop: serve_all(settings, stop), event_loop=settings.server.event_loop
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the SFTP/SCP server and the nightly loader together",
        description="The main job: the SFTP/SCP server and the loader's "
        "scheduler (nightly load, midnight pool file, on-arrival pre-check) in "
        "one process. Creates folders and host keys first if missing. Stops "
        "cleanly on SIGTERM or Ctrl-C.",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ctx) -> int:
    initialize(ctx.settings)
    print_escaped(
        f"sis-ingest serving SFTP/SCP on {ctx.settings.server.host}:{ctx.settings.server.port};"
        f" loader at {ctx.settings.schedule.loader_time}, pool at "
        f"{ctx.settings.schedule.pool_time} {ctx.settings.schedule.timezone}; "
        f"logs in {ctx.settings.log_dir}",
        flush=True,
    )
    return run_all(ctx.settings)
