"""A server worker process: SSH sessions on the sockets the listener hands it.

Started by ``worker_pool.WorkerPool`` as ``python -m ingest_server.worker FD`` with the
settings (pickled) on stdin and its end of the control channel as FD. The listener keeps the
IP gate, the connection limits and the defender, so they count across all workers; a worker
only runs asyncssh. SIGTERM, SIGINT, a ``stop`` message or the listener going away all make
it drain its sessions (the shutdown grace) and exit 0. It answers the listener's pings from
its event loop, so a stuck loop shows.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import sys

from ingest_core.lifecycle import loop_name, run_until_signalled
from ingest_core.settings import Settings
from ingest_core.structured_log import get_logger
from ingest_server.session_host import SessionHost
from ingest_server.worker_channel import ControlChannel, Message


class Worker:
    """One worker's life: say ready, serve what arrives, drain on stop."""

    def __init__(self, settings: Settings, channel: ControlChannel):
        self.settings = settings
        self.channel = channel
        self.audit = get_logger(settings.log_dir, "server", pid=os.getpid())
        self.stop = asyncio.Event()
        self.host: SessionHost | None = None

    async def run(self, stop: asyncio.Event) -> None:
        self.stop = stop
        self.host = SessionHost(self.settings, self.audit, self._failed)
        self.channel.watch(self._message, stop.set)  # listener gone: drain and exit
        self.audit.info("worker.started", event_loop=loop_name(asyncio.get_running_loop()))
        self._send({"ready": os.getpid()})
        await stop.wait()
        self.channel.unwatch()
        await self.host.shut_down()
        self.audit.info("worker.stopped")

    def _message(self, message: Message, sock: socket.socket | None) -> None:
        if sock is not None and self.host is not None:
            self.host.start(sock, str(message.get("address", "")), self._closed)
        elif sock is not None:
            sock.close()
        elif message.get("stop"):
            self.stop.set()
        elif "ping" in message:
            self._send({"pong": message["ping"]})

    def _closed(self, address: str) -> None:
        self._send({"closed": address})

    def _failed(self, address: str, unknown_user: bool) -> None:
        self._send({"failed": address, "unknown_user": unknown_user})

    def _send(self, message: Message) -> None:
        try:
            self.channel.send(message)
        except OSError as exc:  # the listener is gone (it then counts nothing anyway)
            self.audit.debug("worker.report_lost", message=message, error=str(exc))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    settings: Settings = pickle.loads(sys.stdin.buffer.read())
    channel = ControlChannel(socket.socket(fileno=int(args[0])))
    worker = Worker(settings, channel)
    try:
        run_until_signalled(worker.run, event_loop=settings.server.event_loop)
    except Exception as exc:  # one line for the operator; the listener decides what next
        error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        worker.audit.error("worker.failed", error=error)
        print(f"ingest-server worker {os.getpid()}: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
