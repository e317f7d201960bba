#!/usr/bin/env python3
"""Benchmark sis-ingest's SFTP server against OpenSSH sshd (internal-sftp), in one run.

Both servers run on loopback with the same client key and aes128-gcm@openssh.com; every
figure is measured against both, alternating, and reported as a ratio from the same run,
next to the target of issue 3:

- one 1 GiB upload with OpenSSH ``sftp -b`` (median of N rounds): MB/s, ratio >= 0.9x;
- server CPU seconds per GiB uploaded, over the server's whole process tree: <= 1.3x sshd's;
- 10 concurrent 100 MiB uploads: aggregate MB/s, ratio >= 1.2x;
- 50 sequential ``sftp -b`` sessions each uploading a tiny file: sessions/s, ratio >= 3x,
  and server CPU per session;
- resident memory with 200 idle authenticated SFTP sessions: <= 50 KB per session (ours);
- resident memory with 200 sessions each holding 10 upload handles with 480 KiB written to
  each (below the 512 KiB write batch, so a server without a per-session budget of unflushed
  bytes keeps all of it in memory).

``--baseline-source DIR`` adds a second sis-ingest server, labelled ``before``, run from
another source tree (an older commit) in the same alternating rounds, so that a change's
cost is a ratio ours/before from one run (``--servers before,ours``).

Run as root (sshd must switch users): ``python bench/server_bench.py [--quick]``.
MB means 10^6 bytes. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import proc_tree
from bench_servers import (
    CIPHER,
    BenchError,
    BenchServer,
    IngestServer,
    OpenSshServer,
    make_key,
)

REPO = Path(__file__).resolve().parent.parent
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
MIB = 1024 * 1024
GIB = 1024 * MIB
MB = 1_000_000

TARGETS = {
    "single_mb_s": (">=", 0.9),
    "cpu_s_per_gib": ("<=", 1.3),
    "concurrent_mb_s": (">=", 1.2),
    "sessions_per_s": (">=", 3.0),
}
IDLE_TARGET_KB = 50.0
MEASUREMENTS = ("single", "concurrent", "sessions", "idle", "handles")
SERVER_LABELS = ("sshd", "before", "ours")  # table order; "after" is accepted for "ours"
# Sessions set up at once by the handles measurement: enough to fill the servers
# quickly, few enough that 2 cores running client and server keep up.
OPEN_CONCURRENCY = 20


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- running clients ---------------------------------------------------------------------------


class Clients:
    """Every client process started, so that an interrupt can stop them all."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen] = []

    def start(self, cmd: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.running.append(proc)
        return proc

    def finish(self, proc: subprocess.Popen, timeout: float) -> None:
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise BenchError(f"client did not finish within {timeout:.0f} s") from None
        finally:
            self.running.remove(proc)
        if proc.returncode != 0:
            raise BenchError(f"sftp exited {proc.returncode}: {err.decode(errors='replace')}")

    def kill_all(self) -> None:
        for proc in self.running:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.running.clear()


@dataclass
class Run:
    """One benchmark run's shared state."""

    args: argparse.Namespace
    workdir: Path
    key: Path
    clients: Clients = field(default_factory=Clients)
    batch_count: int = 0

    def batch(self, lines: list[str]) -> Path:
        self.batch_count += 1
        path = self.workdir / f"batch-{self.batch_count}.txt"
        path.write_text("\n".join(lines) + "\n")
        return path

    def sftp(self, server: BenchServer, batch: Path) -> list[str]:
        return [
            "sftp",
            "-q",
            "-b",
            str(batch),
            "-P",
            str(server.port),
            "-i",
            str(self.key),
            "-c",
            CIPHER,
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=20",
            f"{server.user}@127.0.0.1",
        ]


def settle_cpu(server: BenchServer, limit: float = 30.0) -> float:
    """The tree's CPU total once it stops moving: finishing work (closing, hashing) counts."""
    deadline = time.monotonic() + limit
    last = server.cpu_seconds()
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = server.cpu_seconds()
        if now - last < 0.005:  # idle (timers and housekeeping may still tick)
            return now
        last = now
    return last


def quiet_disk(server: BenchServer) -> None:
    """Remove earlier uploads and flush dirty pages so no run pays for the one before."""
    server.clear_uploads()
    os.sync()


# -- measurements ------------------------------------------------------------------------------


@dataclass
class Transfer:
    seconds: float
    cpu_seconds: float
    nbytes: int

    @property
    def mb_s(self) -> float:
        return self.nbytes / MB / self.seconds


def upload_parallel(run: Run, server: BenchServer, source: Path, count: int, tag: str) -> Transfer:
    """Start ``count`` sftp uploads of ``source`` at once; wall time from start to last exit."""
    quiet_disk(server)
    batches = [run.batch([f"put {source} bench-{tag}-{i}.bin"]) for i in range(count)]
    timeout = 60 + count * source.stat().st_size / (20 * MB)  # a floor of 20 MB/s
    cpu_before = settle_cpu(server)
    started = time.monotonic()
    procs = [run.clients.start(run.sftp(server, batch)) for batch in batches]
    for proc in procs:
        run.clients.finish(proc, timeout)
    seconds = time.monotonic() - started
    cpu = settle_cpu(server) - cpu_before
    check_uploaded(server, [f"bench-{tag}-{i}.bin" for i in range(count)], source.stat().st_size)
    server.clear_uploads()
    return Transfer(seconds, cpu, count * source.stat().st_size)


def check_uploaded(server: BenchServer, names: list[str], size: int) -> None:
    assert server.upload_dir is not None
    for name in names:
        path = server.upload_dir / name
        if not path.is_file() or path.stat().st_size != size:
            raise BenchError(f"{server.label}: {name} missing or wrong size after upload")


@dataclass
class Sessions:
    count: int
    seconds: float
    cpu_seconds: float
    client_cpu_seconds: float

    @property
    def per_s(self) -> float:
        return self.count / self.seconds

    @property
    def cpu_ms(self) -> float:
        return self.cpu_seconds / self.count * 1000

    @property
    def client_cpu_ms(self) -> float:
        return self.client_cpu_seconds / self.count * 1000


def sequential_sessions(
    run: Run, server: BenchServer, tiny: Path, count: int, tag: str
) -> Sessions:
    quiet_disk(server)
    batches = [run.batch([f"put {tiny} bench-{tag}-{i}.txt"]) for i in range(count)]
    cpu_before = settle_cpu(server)
    client_before = children_cpu_seconds()
    started = time.monotonic()
    for batch in batches:
        run.clients.finish(run.clients.start(run.sftp(server, batch)), 60)
    seconds = time.monotonic() - started
    client = children_cpu_seconds() - client_before
    cpu = settle_cpu(server) - cpu_before
    check_uploaded(server, [f"bench-{tag}-{i}.txt" for i in range(count)], tiny.stat().st_size)
    server.clear_uploads()
    return Sessions(count, seconds, cpu, client)


def children_cpu_seconds() -> float:
    """CPU of the client processes this benchmark has waited for (sftp and its ssh)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class IdleMemory:
    sessions: int
    rss_before: int
    rss_after: int
    pss_before: int
    pss_after: int
    processes_after: int

    @property
    def rss_kb_per_session(self) -> float:
        return (self.rss_after - self.rss_before) / 1000 / self.sessions

    @property
    def pss_kb_per_session(self) -> float:
        return (self.pss_after - self.pss_before) / 1000 / self.sessions


async def _connect(server: BenchServer, key: object) -> object:
    """One authenticated SSH connection from this process (asyncssh), on loopback."""
    import asyncssh

    return await asyncio.wait_for(
        asyncssh.connect(
            "127.0.0.1",
            server.port,
            username=server.user,
            client_keys=[key],
            known_hosts=None,
            encryption_algs=[CIPHER],
            agent_path=None,
            config=[],
        ),
        60,
    )


def _ignore_client_errors(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """After a failure is reported: connection errors of abandoned client tasks are expected."""
    import asyncssh

    if not isinstance(context.get("exception"), (OSError, asyncssh.Error)):
        loop.default_exception_handler(context)


async def _all_or_none(coroutines: list, opened: list) -> None:
    """Run the session openers; if one fails, cancel the rest (so none opens a session after
    the clean-up) and close every session opened so far before re-raising."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        # asyncssh's own tasks for the writes cut short would each log a traceback.
        asyncio.get_running_loop().set_exception_handler(_ignore_client_errors)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _close_idle(opened)
        raise


async def _open_idle(server: BenchServer, key: object, count: int) -> list:
    opened: list = []
    gate = asyncio.Semaphore(10)

    async def one() -> None:
        async with gate:
            conn = await _connect(server, key)
            sftp = await asyncio.wait_for(conn.start_sftp_client(), 60)
            opened.append((conn, sftp))
            if len(opened) % 50 == 0:
                say(f"  {server.label}: {len(opened)}/{count} idle sessions open")

    await _all_or_none([one() for _ in range(count)], opened)
    return opened


async def _close_idle(opened: list) -> None:
    for conn, sftp in opened:
        sftp.exit()
        conn.close()
    for conn, _ in opened:
        await conn.wait_closed()


def idle_memory(run: Run, server: BenchServer, count: int) -> IdleMemory:
    """Open ``count`` authenticated SFTP sessions and hold them while reading the tree's RSS."""
    import asyncssh

    key = asyncssh.read_private_key(run.key)

    async def measure() -> IdleMemory:
        await asyncio.sleep(1)
        rss_before = proc_tree.tree_rss_bytes(server.pid)
        pss_before = proc_tree.tree_pss_bytes(server.pid)
        opened = await _open_idle(server, key, count)
        try:
            await asyncio.sleep(2)  # let per-connection processes and buffers settle
            return IdleMemory(
                sessions=count,
                rss_before=rss_before,
                rss_after=proc_tree.tree_rss_bytes(server.pid),
                pss_before=pss_before,
                pss_after=proc_tree.tree_pss_bytes(server.pid),
                processes_after=len(proc_tree.tree(server.pid)),
            )
        finally:
            await _close_idle(opened)

    return asyncio.run(measure())


@dataclass
class HandleMemory(IdleMemory):
    handles_per_session: int
    bytes_per_handle: int
    open_seconds: float

    @property
    def held_bytes(self) -> int:
        """Upload bytes written and not yet closed, over all sessions."""
        return self.sessions * self.handles_per_session * self.bytes_per_handle


async def _open_handles(
    server: BenchServer, key: object, sessions: int, handles: int, data: bytes
) -> list:
    """``sessions`` connections, each with ``handles`` files open for writing and ``data``
    written to each (acknowledged by the server), OPEN_CONCURRENCY being set up at a time.
    Returns (connection, sftp client) pairs; on failure, closes what it opened."""
    opened: list = []
    ready: list[int] = []  # sessions whose handles are all open and written
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)

    async def one(number: int) -> None:
        async with gate:
            conn = await _connect(server, key)
            try:
                sftp = await asyncio.wait_for(conn.start_sftp_client(), 60)
            except BaseException:
                conn.close()
                raise
            opened.append((conn, sftp))
            for handle in range(handles):
                name = f"bench-handles-{number}-{handle}.bin"
                upload = await asyncio.wait_for(sftp.open(name, "wb"), 60)
                await asyncio.wait_for(upload.write(data), 60)  # left open on purpose
            ready.append(number)
            if len(ready) % 50 == 0:
                say(f"  {server.label}: {len(ready)}/{sessions} sessions holding handles")

    await _all_or_none([one(n) for n in range(sessions)], opened)
    return opened


def handle_memory(
    run: Run, server: BenchServer, sessions: int, handles: int, nbytes: int
) -> HandleMemory:
    """The server's memory while ``sessions`` sessions each hold ``handles`` unfinished
    uploads of ``nbytes``: what a server keeps per open upload (unwritten batches, buffers).
    The connections are then dropped without closing the files (the uploads are abandoned)."""
    import asyncssh

    key = asyncssh.read_private_key(run.key)
    data = os.urandom(nbytes)

    async def measure() -> HandleMemory:
        await asyncio.sleep(1)
        rss_before = proc_tree.tree_rss_bytes(server.pid)
        pss_before = proc_tree.tree_pss_bytes(server.pid)
        started = time.monotonic()
        opened = await _open_handles(server, key, sessions, handles, data)
        open_seconds = time.monotonic() - started
        try:
            await asyncio.sleep(2)  # let per-connection processes and buffers settle
            return HandleMemory(
                sessions=sessions,
                rss_before=rss_before,
                rss_after=proc_tree.tree_rss_bytes(server.pid),
                pss_before=pss_before,
                pss_after=proc_tree.tree_pss_bytes(server.pid),
                processes_after=len(proc_tree.tree(server.pid)),
                handles_per_session=handles,
                bytes_per_handle=nbytes,
                open_seconds=open_seconds,
            )
        finally:
            await _close_idle(opened)

    quiet_disk(server)
    try:
        return asyncio.run(measure())
    except (OSError, asyncssh.Error) as exc:  # a refusal (a budget?), a timeout, a lost link
        raise BenchError(f"{server.label}: holding upload handles failed: {exc!r}") from None
    finally:
        time.sleep(1)  # the server abandons the uploads (sshd's children exit)
        server.clear_uploads()


# -- profile -----------------------------------------------------------------------------------


def profile_upload(run: Run, server: BenchServer, source: Path, out: Path, py_spy: str) -> None:
    """One extra (unmeasured) upload under py-spy; writes collapsed stacks and a summary."""
    raw = out.with_suffix(".folded")
    spy = subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(server.pid),
            "--subprocesses",
            "--nonblocking",
            "--rate",
            "200",
            "--format",
            "raw",
            "--output",
            str(raw),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        time.sleep(2)  # py-spy attaches
        transfer = upload_parallel(run, server, source, 1, "profile")
        say(f"  profiled upload: {transfer.mb_s:.0f} MB/s (slowed by sampling)")
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
    if not raw.exists():
        err = spy.stderr.read().decode(errors="replace") if spy.stderr else ""
        say(f"  py-spy wrote nothing: {err.strip()[:300]}")
        return
    out.write_text(summarize_profile(raw))
    say(f"  profile: {raw} (collapsed stacks), summary {out}")


def summarize_profile(raw: Path, top: int = 20) -> str:
    """Self time per line and per function, inclusive time per function, from collapsed stacks."""
    own_line: Counter[str] = Counter()
    own_function: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # py-spy's first frames name the process and thread; idle samples are not recorded.
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        own_line[frames[-1]] += count
        functions = [_without_line(f) for f in frames]
        own_function[functions[-1]] += count
        for function in set(functions):
            inclusive[function] += count
    if not total:
        return "no samples\n"
    out = [f"samples: {total}"]
    for title, counter in (
        ("self time by line", own_line),
        ("self time by function", own_function),
        ("inclusive time by function", inclusive),
    ):
        out += ["", f"{title}:"]
        out += [f"{n / total:6.1%}  {f}" for f, n in counter.most_common(top)]
    return "\n".join(out) + "\n"


def _without_line(frame: str) -> str:
    """'write (pkg/mod.py:90)' -> 'write (pkg/mod.py)'."""
    head, sep, tail = frame.rpartition(":")
    return f"{head})" if sep and tail.rstrip(")").isdigit() else frame


# -- the run -----------------------------------------------------------------------------------


def make_file(path: Path, size: int) -> Path:
    """Random bytes (so nothing on the path can compress or deduplicate them)."""
    chunk = 8 * MIB
    with open(path, "wb") as handle:
        left = size
        while left > 0:
            handle.write(os.urandom(min(chunk, left)))
            left -= chunk
    return path


def alternate(servers: list[BenchServer], rounds: int) -> Iterator[tuple[int, BenchServer]]:
    """A B, B A, A B, ...: neither server always goes first (warm caches, thermal drift)."""
    for r in range(rounds):
        order = servers if r % 2 == 0 else list(reversed(servers))
        for server in order:
            yield r, server


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def measure(run: Run, servers: list[BenchServer]) -> dict:
    args = run.args
    results: dict = {s.label: {} for s in servers}
    big = run.workdir / "big.bin"
    if "single" in args.only or args.profile:
        say(f"writing a {args.size_mib} MiB file of random bytes")
        make_file(big, args.size_mib * MIB)
    if "single" in args.only:
        measure_single(run, servers, big, results)
    if "concurrent" in args.only:
        measure_concurrent(
            run, servers, make_file(run.workdir / "mid.bin", args.concurrent_mib * MIB), results
        )
    if "sessions" in args.only:
        measure_sessions(run, servers, results)
    if "idle" in args.only:
        measure_idle(run, servers, results)
    if "handles" in args.only:
        measure_handles(run, servers, results)
    ours = next((s for s in servers if s.label == "ours"), None)
    if args.profile and ours is not None:
        py_spy = args.py_spy or shutil.which("py-spy")
        if py_spy is None:
            say("profile: py-spy not found (pip install py-spy, or --py-spy PATH): skipped")
        else:
            say("profile: one more upload to ours under py-spy (not counted)")
            profile_upload(run, ours, big, Path(args.profile).resolve(), py_spy)
    return results


def measure_single(run: Run, servers: list[BenchServer], big: Path, results: dict) -> None:
    args = run.args
    # The first upload into a fresh server process is slower (heap growth, page faults): a
    # long-running server does not pay that, so each server gets one unmeasured upload first.
    say("warm-up: one unmeasured upload per server")
    for server in servers:
        upload_parallel(run, server, big, 1, "warmup")
    say(f"single upload: {args.size_mib} MiB x {args.rounds} rounds, alternating")
    for r, server in alternate(servers, args.rounds):
        t = upload_parallel(run, server, big, 1, f"single{r}")
        gib = t.nbytes / GIB
        results[server.label].setdefault("single", []).append(
            {"seconds": t.seconds, "mb_s": t.mb_s, "cpu_s_per_gib": t.cpu_seconds / gib}
        )
        say(
            f"  round {r + 1} {server.label:6}: {t.mb_s:7.1f} MB/s  "
            f"{t.cpu_seconds / gib:5.2f} CPU s/GiB  ({t.seconds:.2f} s)"
        )


def measure_concurrent(run: Run, servers: list[BenchServer], mid: Path, results: dict) -> None:
    args = run.args
    say(f"concurrent: {args.concurrent} x {args.concurrent_mib} MiB x {args.rounds} rounds")
    for r, server in alternate(servers, args.rounds):
        t = upload_parallel(run, server, mid, args.concurrent, f"conc{r}")
        results[server.label].setdefault("concurrent", []).append(
            {
                "seconds": t.seconds,
                "mb_s": t.mb_s,
                "cpu_s_per_gib": t.cpu_seconds / (t.nbytes / GIB),
            }
        )
        say(f"  round {r + 1} {server.label:6}: {t.mb_s:7.1f} MB/s aggregate ({t.seconds:.2f} s)")


def measure_sessions(run: Run, servers: list[BenchServer], results: dict) -> None:
    args = run.args
    tiny = run.workdir / "tiny.txt"
    tiny.write_text("sis-ingest benchmark: one small file per session\n")
    say(f"sessions: {args.sessions} sequential sftp -b sessions x {args.rounds} rounds")
    for r, server in alternate(servers, args.rounds):
        s = sequential_sessions(run, server, tiny, args.sessions, f"sess{r}")
        results[server.label].setdefault("sessions", []).append(
            {
                "seconds": s.seconds,
                "per_s": s.per_s,
                "cpu_ms": s.cpu_ms,
                "client_cpu_ms": s.client_cpu_ms,
            }
        )
        say(
            f"  round {r + 1} {server.label:6}: {s.per_s:6.2f} sessions/s  {s.cpu_ms:6.1f} ms "
            f"server CPU, {s.client_cpu_ms:6.1f} ms client CPU per session"
        )


def measure_idle(run: Run, servers: list[BenchServer], results: dict) -> None:
    say(f"idle memory: {run.args.idle} authenticated SFTP sessions held open")
    for server in servers:
        m = idle_memory(run, server, run.args.idle)
        results[server.label]["idle"] = {
            "sessions": m.sessions,
            "rss_before": m.rss_before,
            "rss_after": m.rss_after,
            "pss_before": m.pss_before,
            "pss_after": m.pss_after,
            "processes": m.processes_after,
            "rss_kb_per_session": m.rss_kb_per_session,
            "pss_kb_per_session": m.pss_kb_per_session,
        }
        say(
            f"  {server.label:6}: RSS {m.rss_before / MB:.1f} -> {m.rss_after / MB:.1f} MB "
            f"({m.rss_kb_per_session:.1f} KB/session; PSS {m.pss_kb_per_session:.1f} KB/session; "
            f"{m.processes_after} processes)"
        )


def measure_handles(run: Run, servers: list[BenchServer], results: dict) -> None:
    args = run.args
    say(
        f"handles: {args.handle_sessions} sessions x {args.handles_per_session} open uploads "
        f"x {args.handle_kib} KiB written, {OPEN_CONCURRENCY} sessions set up at a time"
    )
    for server in servers:
        m = handle_memory(
            run, server, args.handle_sessions, args.handles_per_session, args.handle_kib * 1024
        )
        results[server.label]["handles"] = {
            "sessions": m.sessions,
            "handles_per_session": m.handles_per_session,
            "bytes_per_handle": m.bytes_per_handle,
            "held_bytes": m.held_bytes,
            "open_seconds": m.open_seconds,
            "rss_before": m.rss_before,
            "rss_after": m.rss_after,
            "pss_before": m.pss_before,
            "pss_after": m.pss_after,
            "processes": m.processes_after,
            "rss_kb_per_session": m.rss_kb_per_session,
            "pss_kb_per_session": m.pss_kb_per_session,
        }
        say(
            f"  {server.label:6}: RSS {m.rss_before / MB:.1f} -> {m.rss_after / MB:.1f} MB "
            f"({m.rss_kb_per_session:.1f} KB/session; PSS {m.pss_kb_per_session:.1f} KB/session; "
            f"{m.held_bytes / MB:.0f} MB written to open handles; {m.processes_after} processes; "
            f"set up in {m.open_seconds:.1f} s)"
        )


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when either is missing or the denominator is 0."""
    if math.isnan(numerator) or math.isnan(denominator) or denominator == 0:
        return float("nan")
    return numerator / denominator


def summarize(results: dict) -> dict:
    """Medians per server, ratios ours/sshd (and ours/before), whether each target is met."""
    summary: dict = {}
    for label, res in results.items():
        single = res.get("single", [])
        handles = res.get("handles", {})
        summary[label] = {
            "single_mb_s": median([x["mb_s"] for x in single]),
            "single_mb_s_best": max((x["mb_s"] for x in single), default=float("nan")),
            "cpu_s_per_gib": median([x["cpu_s_per_gib"] for x in single]),
            "concurrent_mb_s": median([x["mb_s"] for x in res.get("concurrent", [])]),
            "concurrent_cpu_s_per_gib": median(
                [x["cpu_s_per_gib"] for x in res.get("concurrent", [])]
            ),
            "sessions_per_s": median([x["per_s"] for x in res.get("sessions", [])]),
            "cpu_ms_per_session": median([x["cpu_ms"] for x in res.get("sessions", [])]),
            "client_cpu_ms_per_session": median(
                [x["client_cpu_ms"] for x in res.get("sessions", [])]
            ),
            "idle_kb_per_session": res.get("idle", {}).get("rss_kb_per_session", float("nan")),
            "idle_pss_kb_per_session": res.get("idle", {}).get("pss_kb_per_session", float("nan")),
            "handles_rss_mb_before": handles.get("rss_before", math.nan) / MB,
            "handles_rss_mb": handles.get("rss_after", math.nan) / MB,
            "handles_kb_per_session": handles.get("rss_kb_per_session", math.nan),
            "handles_pss_kb_per_session": handles.get("pss_kb_per_session", math.nan),
        }
    if "before" in summary and "ours" in summary:
        summary["ratio_before"] = {
            k: ratio(summary["ours"][k], summary["before"][k]) for k in summary["ours"]
        }
    if "sshd" in summary and "ours" in summary:
        ratios = {k: ratio(summary["ours"][k], summary["sshd"][k]) for k in summary["ours"]}
        summary["ratio"] = ratios
        met: dict[str, bool | None] = {}
        for key, (op, target) in TARGETS.items():
            value = ratios[key]
            met[key] = (
                None if math.isnan(value) else (value >= target if op == ">=" else value <= target)
            )
        idle = summary["ours"]["idle_kb_per_session"]
        met["idle_kb_per_session"] = None if math.isnan(idle) else idle <= IDLE_TARGET_KB
        summary["target_met"] = met
    return summary


ROWS: list[tuple[str, str, str, Callable[[float], str]]] = [
    ("single_mb_s", "1 upload, median MB/s", ">= 0.9x", "{:.1f}".format),
    ("single_mb_s_best", "1 upload, best MB/s", "", "{:.1f}".format),
    ("cpu_s_per_gib", "server CPU s per GiB", "<= 1.3x", "{:.2f}".format),
    ("concurrent_mb_s", "concurrent, aggregate MB/s", ">= 1.2x", "{:.1f}".format),
    ("concurrent_cpu_s_per_gib", "concurrent, CPU s per GiB", "", "{:.2f}".format),
    ("sessions_per_s", "sequential sessions/s", ">= 3x", "{:.2f}".format),
    ("cpu_ms_per_session", "server CPU ms per session", "", "{:.1f}".format),
    ("client_cpu_ms_per_session", "client CPU ms per session", "", "{:.1f}".format),
    ("idle_kb_per_session", "idle session RSS KB", "<= 50 KB", "{:.1f}".format),
    ("idle_pss_kb_per_session", "idle session PSS KB", "", "{:.1f}".format),
    ("handles_rss_mb_before", "handles: server RSS MB, none open", "", "{:.1f}".format),
    ("handles_rss_mb", "handles: server RSS MB, all open", "", "{:.1f}".format),
    ("handles_kb_per_session", "handles: RSS KB per session", "", "{:.1f}".format),
    ("handles_pss_kb_per_session", "handles: PSS KB per session", "", "{:.1f}".format),
]


# Rows printed without ratios: a starting point, not a figure to compare.
NO_RATIO = {"handles_rss_mb_before"}


def table(summary: dict, args: argparse.Namespace, notes: list[str]) -> str:
    """Servers side by side; ours/sshd with the issue's targets, ours/before when measured."""
    labels = [label for label in SERVER_LABELS if label in summary]
    with_sshd, with_before = "ratio" in summary, "ratio_before" in summary
    header = ["figure", *labels]
    header += ["ours/sshd", "target", "met"] if with_sshd else []
    header += ["ours/before"] if with_before else []
    rows = []
    for key, title, target, fmt in ROWS:
        values = [summary[label][key] for label in labels]
        if all(math.isnan(v) for v in values):
            continue  # not measured in this run (--only)
        row = [title, *("-" if math.isnan(v) else fmt(v) for v in values)]
        if with_sshd:
            met = summary["target_met"].get(key)
            row += [
                "" if key in NO_RATIO else _times(summary["ratio"][key]),
                target,
                "" if met is None else ("yes" if met else "NO"),
            ]
        if with_before:
            row.append("" if key in NO_RATIO else _times(summary["ratio_before"][key]))
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    measured = {
        "single": f"{args.size_mib} MiB single x {args.rounds} rounds",
        "concurrent": f"{args.concurrent} x {args.concurrent_mib} MiB concurrent",
        "sessions": f"{args.sessions} sessions",
        "idle": f"{args.idle} idle",
        "handles": f"{args.handle_sessions} sessions x {args.handles_per_session} handles "
        f"of {args.handle_kib} KiB",
    }
    what = ", ".join(text for name, text in measured.items() if name in args.only)
    lines = [
        f"sis-ingest server benchmark ({time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} "
        f"CPUs, {what}; cipher {CIPHER}; MB = 10^6 bytes)",
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def _times(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-mib", type=int, default=1024, help="single upload size (1024)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per figure (3)")
    p.add_argument("--concurrent", type=int, default=10, help="concurrent uploads (10)")
    p.add_argument("--concurrent-mib", type=int, default=100, help="size of each (100)")
    p.add_argument("--sessions", type=int, default=50, help="sequential sessions (50)")
    p.add_argument("--idle", type=int, default=200, help="idle authenticated sessions (200)")
    p.add_argument(
        "--handle-sessions", type=int, default=200, help="sessions holding upload handles (200)"
    )
    p.add_argument(
        "--handles-per-session", type=int, default=10, help="open upload handles each (10)"
    )
    p.add_argument(
        "--handle-kib",
        type=int,
        default=480,
        help="KiB written to each handle (480: below the server's 512 KiB write batch)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="our server's [server] workers (0: leave the setting's default)",
    )
    p.add_argument(
        "--ours-setting",
        action="append",
        default=[],
        metavar="'KEY = VALUE'",
        help="a setting for our server: 'KEY = VALUE' for [server], e.g. 'fsync_uploads = "
        "false', or 'SECTION.KEY = VALUE', e.g. 'limits.max_handles_per_session = 32' "
        "(repeatable)",
    )
    p.add_argument(
        "--baseline-setting",
        action="append",
        default=[],
        metavar="'KEY = VALUE'",
        help="the same for the 'before' server (only settings its tree knows)",
    )
    p.add_argument(
        "--servers",
        default=None,
        help="which to run, of sshd,before,ours ('after' = ours): sshd,ours by default, "
        "and before too with --baseline-source",
    )
    p.add_argument(
        "--only",
        default=",".join(MEASUREMENTS),
        help=f"which measurements: {','.join(MEASUREMENTS)} (all)",
    )
    p.add_argument(
        "--sshd-default-kex",
        action="store_true",
        help="keep sshd's default key exchange (sntrup761) instead of ours (curve25519)",
    )
    p.add_argument(
        "--ours-source",
        metavar="DIR",
        default=str(REPO),
        help="run our server from this source tree (e.g. a 'git archive' of an older commit)",
    )
    p.add_argument(
        "--baseline-source",
        metavar="DIR",
        help="also run a server labelled 'before' from this tree, in the same rounds "
        "(ratios ours/before)",
    )
    p.add_argument("--quick", action="store_true", help="small sizes, one round: a smoke run")
    p.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    p.add_argument("--profile", metavar="FILE", help="py-spy our server on one extra upload")
    p.add_argument("--py-spy", metavar="PATH", help="py-spy executable (default: on PATH)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs) afterwards")
    args = p.parse_args(argv)
    if args.quick:
        args.size_mib, args.rounds = min(args.size_mib, 128), 1
        args.concurrent, args.concurrent_mib = min(args.concurrent, 4), min(args.concurrent_mib, 16)
        args.sessions, args.idle = min(args.sessions, 10), min(args.idle, 20)
        args.handle_sessions = min(args.handle_sessions, 20)
    if args.servers is None:
        args.servers = "sshd,before,ours" if args.baseline_source else "sshd,ours"
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    args.servers = {"ours" if n == "after" else n for n in names}
    if not args.servers or not args.servers <= set(SERVER_LABELS):
        p.error("--servers takes sshd,before,ours (or after for ours)")
    if "before" in args.servers and not args.baseline_source:
        p.error("--servers before needs --baseline-source DIR")
    args.only = {m.strip() for m in args.only.split(",")}
    if not args.only <= set(MEASUREMENTS):
        p.error(f"--only takes {','.join(MEASUREMENTS)}")
    for name in (
        "size_mib",
        "rounds",
        "concurrent",
        "concurrent_mib",
        "sessions",
        "idle",
        "handle_sessions",
        "handles_per_session",
        "handle_kib",
    ):
        if not 0 < getattr(args, name) <= 100_000:
            p.error(f"--{name.replace('_', '-')} must be a positive number")
    return args


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGINT both clean up the way Ctrl-C does."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    # A shell starts background jobs with SIGINT ignored; an interrupt must still clean up.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def use_project_python() -> None:
    """Re-run under the checkout's venv when started with a Python that lacks asyncssh."""
    try:
        import asyncssh  # noqa: F401
    except ImportError:
        if VENV_PYTHON.exists() and Path(sys.executable) != VENV_PYTHON:
            os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), *sys.argv])
        raise


def start_ours(
    run: Run,
    pub: Path,
    label: str,
    source: Path,
    settings: list[str],
    servers: list[BenchServer],
    notes: list[str],
) -> None:
    """Start one of our servers from ``source`` and add it to ``servers`` (which the caller
    stops, also after a failed start); a tree without a server gets a note instead."""
    server = IngestServer(run.workdir, pub, run.args.workers, source, tuple(settings), label)
    missing = server.available()
    if missing:
        notes.append(f"{label} not measured: {missing}")
        say(notes[-1])
        return
    servers.append(server)
    try:
        server.start()
    except BenchError as exc:
        raise BenchError(f"{label}: {exc}\n{server.log_tail()}") from None
    say(f"{label} listening on 127.0.0.1:{server.port} (pid {server.pid}) from {source}")
    wrong = server.runs_from_source()
    if wrong:
        raise BenchError(f"{label} does not run from {source}: {wrong}")
    if source != REPO or label != "ours":
        notes.append(f"{label} run from {source} (first on PYTHONPATH and its cwd, checked)")
    notes.append(f"{label}: [limits] for the bench: {'; '.join(server.raised)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_project_python()
    wanted = args.servers
    workdir = Path(tempfile.mkdtemp(prefix="sis-bench-"))
    servers: list[BenchServer] = []
    notes: list[str] = []
    run = None
    with sigterm_as_interrupt():
        try:
            say(f"work dir {workdir}; generating an RSA 4096 client key")
            key = make_key(workdir / "client_key", "rsa", 4096)
            run = Run(args, workdir, key)
            pub = key.with_suffix(".pub")
            if "sshd" in wanted:
                sshd = OpenSshServer(workdir, pub, same_algorithms=not args.sshd_default_kex)
                servers.append(sshd)
                sshd.start()
                say(f"sshd listening on 127.0.0.1:{sshd.port} (pid {sshd.pid})")
                notes.append(f"sshd offers {sshd.algorithms}; both offer {CIPHER} first")
            ours_trees = [
                ("before", args.baseline_source, args.baseline_setting),
                ("ours", args.ours_source, args.ours_setting),
            ]
            for label, source, settings in ours_trees:
                if label in wanted:
                    start_ours(run, pub, label, Path(source).resolve(), settings, servers, notes)
            if not servers:
                raise BenchError("no server to measure")
            for server in servers:
                notes.append(f"{server.label} CPU measured by {server.cpu_method}")
            load_before = os.getloadavg()[0]
            results = measure(run, servers)
            notes.append(
                f"load average (1 min) {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
                f"on {os.cpu_count()} CPUs: above ~0.5 other work competed with the benchmark"
            )
            summary = summarize(results)
            print(table(summary, args, notes))
            if args.json:
                Path(args.json).write_text(
                    json.dumps(
                        {
                            "args": {
                                k: sorted(v) if isinstance(v, set) else v
                                for k, v in vars(args).items()
                            },
                            "results": results,
                            "summary": summary,
                            "notes": notes,
                        },
                        indent=2,
                    )
                )
                say(f"JSON written to {args.json}")
            return 0
        except KeyboardInterrupt:
            say("interrupted: cleaning up")
            return 130
        except BenchError as exc:
            say(f"failed: {exc}")
            return 1
        finally:
            if run is not None:
                run.clients.kill_all()
            for server in servers:
                server.stop()
            if args.keep:
                say(f"kept {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
