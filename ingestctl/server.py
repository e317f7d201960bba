"""ingestctl server: run the SFTP/SCP server alone, in the foreground, until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio

from ingest_core.lifecycle import raise_open_file_limit, run_until_signalled
from ingestctl.serve import bind_refusal, is_bind_error


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "server",
        help="run the SFTP/SCP server (foreground; SIGTERM stops it gracefully)",
        description="Run the SFTP/SCP ingestion server alone: a listener process and "
        "server.workers session processes (default one per CPU). Host keys are made on first "
        "start if 'ingestctl init' did not make them; their fingerprints are logged. SIGTERM "
        "or Ctrl-C stops accepting, lets uploads in flight finish for server.shutdown_grace "
        "seconds, and exits 0.",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ctx) -> int:
    from ingest_server.server import Server
    from loader.feed_metrics import FeedCollector

    settings = ctx.settings
    raise_open_file_limit()  # every socket and open file is a descriptor
    server = Server(settings, collectors=[FeedCollector(settings)])

    async def serve(stop: asyncio.Event) -> None:
        try:
            await server.serve(stop)
        except OSError as exc:
            if is_bind_error(exc, server.listening.is_set()):
                raise bind_refusal(exc, settings) from None
            raise

    run_until_signalled(serve, event_loop=settings.server.event_loop)
    return 0
