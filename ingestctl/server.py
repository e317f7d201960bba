"""ingestctl server: run the SFTP/SCP server alone, in the foreground, until SIGTERM."""

from __future__ import annotations

import argparse

from ingest_server.server import run_server


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
    return run_server(ctx.settings)
