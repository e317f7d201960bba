"""ingestctl init: folders, control DB and host keys; safe to run again."""

from __future__ import annotations

import argparse

from ingest_core.console import print_escaped, print_json, print_table
from ingest_core.db import open_control_db
from ingest_core.folders import ensure_base_folders
from ingest_core.settings import Settings
from ingest_server.host_keys import HostKeyInfo, ensure_host_keys


def initialize(settings: Settings) -> list[HostKeyInfo]:
    """Create everything a first start needs; existing keys and data are never replaced."""
    ensure_base_folders(settings)
    open_control_db(settings.control_db_url)
    return ensure_host_keys(settings.server.host_key_dir)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "init",
        help="create folders, the control DB and host keys (idempotent)",
        description="Create the data, log and key folders, the control database "
        "(schema migrated to the newest revision) and the server's host keys "
        "(ed25519 and RSA 4096, mode 0600). Existing keys are never replaced.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ctx) -> int:
    keys = initialize(ctx.settings)
    if args.json:
        print_json({"data_root": str(ctx.settings.data_root), "host_keys": keys})
        return 0
    print_escaped(f"settings:  {ctx.settings.source}")
    print_escaped(f"data root: {ctx.settings.data_root}")
    print_escaped(f"logs:      {ctx.settings.log_dir}")
    print_escaped("host keys (give these fingerprints to client institutions):")
    print_table(
        [(k.algorithm, k.bits, k.fingerprint, "new" if k.created else "kept") for k in keys],
        ["type", "bits", "fingerprint", "status"],
    )
    return 0
