"""An asyncssh client's default download asks for sparse ranges (ranges@asyncssh.com)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncssh
from server_harness import RunningServer, write_random


def test_asyncssh_get_with_sparse_ranges_downloads_every_byte(
    server: RunningServer, alpha_key: Path, tmp_path: Path
) -> None:
    folder = server.folder("alpha")
    data = write_random(folder / "download_me.bin", 3 * 1024 * 1024 + 17)
    (folder / "sis_loader.log").write_text("2026-11-23T03:00:00-05:00 NO FILE - none\n")

    async def fetch() -> None:
        async with (
            asyncssh.connect(
                server.host,
                server.port,
                username="alpha",
                client_keys=[str(alpha_key)],
                known_hosts=None,
                agent_path=None,
            ) as conn,
            conn.start_sftp_client() as sftp,
        ):
            await sftp.get("download_me.bin", str(tmp_path / "got.bin"))  # sparse=True default
            await sftp.get("sis_loader.log", str(tmp_path / "got.log"))

    asyncio.run(asyncio.wait_for(fetch(), 60))
    assert (tmp_path / "got.bin").read_bytes() == data
    assert (tmp_path / "got.log").read_text().endswith("NO FILE - none\n")
