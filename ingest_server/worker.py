"""A server worker process: SSH sessions on the sockets the listener hands it.

Started by ``worker_pool.WorkerPool`` as ``python -m ingest_server.worker FD`` with the
settings (pickled) on stdin and its end of the control channel as FD. The listener keeps the
IP gate, the connection limits and the defender, so they count across all workers; a worker
only runs asyncssh. SIGTERM, SIGINT, a ``stop`` message or the listener going away all make
it drain its sessions (the shutdown grace) and exit 0. It answers the listener's pings from
its event loop, so a stuck loop shows.

Every connection handed over is answered with exactly one ``closed`` (its number), also
when its socket never arrived (this process at its file-descriptor limit): otherwise the
listener would count it forever. Sessions per account and quota reservations are asked of
the listener through a ``RemoteLedger``, so they count across all workers.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import sys

from ingest_core.journal import JournalWriter, start_journal, stop_journal
from ingest_core.lifecycle import loop_name, raise_open_file_limit, run_until_signalled
from ingest_core.settings import Settings
from ingest_core.structured_log import get_logger, log_limits
from ingest_server.ledger import RemoteLedger
from ingest_server.session_host import SessionHost
from ingest_server.worker_channel import ControlChannel, Message


class Worker:
    """One worker's life: say ready, serve what arrives, drain on stop."""

    def __init__(self, settings: Settings, channel: ControlChannel):
        self.settings = settings
        self.channel = channel
        self.audit = get_logger(settings.log_dir, "server", pid=os.getpid(), **log_limits(settings))
        self.stop = asyncio.Event()
        self.host: SessionHost | None = None
        self.ledger = RemoteLedger(channel.send)
        self.journal: JournalWriter | None = None

    async def run(self, stop: asyncio.Event) -> None:
        self.stop = stop
        self.journal = start_journal(self.settings, self.audit, prune=False)
        self.host = SessionHost(self.settings, self.audit, self._failed, self.ledger)
        self.channel.watch(self._message, self._listener_gone)
        self.audit.info("worker.started", event_loop=loop_name(asyncio.get_running_loop()))
        self._send({"ready": os.getpid()})
        await stop.wait()
        # Still reading while the sessions drain: the ledger's answers arrive this way (new
        # connections are refused and reported closed by the host meanwhile).
        await self.host.shut_down()
        self.channel.unwatch()
        if self.journal is not None:
            await asyncio.to_thread(stop_journal, self.settings, self.journal)
        self.audit.info("worker.stopped")

    def _listener_gone(self) -> None:
        """The listener exited: refuse what waits on it, drain and exit."""
        self.ledger.listener_gone()
        self.stop.set()

    def _message(self, message: Message, sock: socket.socket | None) -> None:
        if "connection" in message:
            self._connection(message, sock)
        elif sock is not None:  # a socket with any other message: not ours to serve
            sock.close()
        elif "ledger_reply" in message:
            self.ledger.answer(message)
        elif message.get("stop"):
            self.stop.set()
        elif "ping" in message:
            self._send({"pong": message["ping"]})

    def _connection(self, message: Message, sock: socket.socket | None) -> None:
        """Serve a handed-over connection; whatever fails, the listener hears it closed."""
        number = message["connection"]
        address = str(message.get("address", ""))
        if sock is None:
            # MSG_CTRUNC: at the file-descriptor limit the kernel dropped (and closed) it.
            self.audit.error(
                "connection.handover_failed",
                address=address,
                reason="socket not received (too many open files in this worker)",
            )
            self._send({"closed": number})
            return
        if self.host is None:
            sock.close()
            self._send({"closed": number})
            return
        try:
            self.host.start(sock, address, lambda _address: self._send({"closed": number}))
        except Exception as exc:  # the listener must still hear it; the others go on
            sock.close()
            self.audit.exception("connection.handover_failed", address=address, error=repr(exc))
            self._send({"closed": number})

    def _failed(self, address: str, unknown_user: bool) -> None:
        self._send({"failed": address, "unknown_user": unknown_user})

    def _send(self, message: Message) -> None:
        try:
            self.channel.send(message)
        except OSError as exc:  # the listener is gone (it then counts nothing anyway)
            self.audit.debug("worker.report_lost", message=message, error=str(exc))


def main(argv: list[str] | None = None) -> int:
    raise_open_file_limit()  # every socket and open file is a descriptor
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
