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
- resident memory with 200 idle authenticated SFTP sessions: <= 50 KB per session (ours).

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
MEASUREMENTS = ("single", "concurrent", "sessions", "idle")


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


async def _open_idle(server: BenchServer, key: object, count: int) -> list:
    import asyncssh

    opened: list = []
    gate = asyncio.Semaphore(10)

    async def one() -> None:
        async with gate:
            conn = await asyncio.wait_for(
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
            sftp = await asyncio.wait_for(conn.start_sftp_client(), 60)
            opened.append((conn, sftp))
            if len(opened) % 50 == 0:
                say(f"  {server.label}: {len(opened)}/{count} idle sessions open")

    try:
        await asyncio.gather(*(one() for _ in range(count)))
    except BaseException:
        await _close_idle(opened)
        raise
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
            f"  round {r + 1} {server.label:4}: {t.mb_s:7.1f} MB/s  "
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
        say(f"  round {r + 1} {server.label:4}: {t.mb_s:7.1f} MB/s aggregate ({t.seconds:.2f} s)")


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
            f"  round {r + 1} {server.label:4}: {s.per_s:6.2f} sessions/s  {s.cpu_ms:6.1f} ms "
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
            f"  {server.label:4}: RSS {m.rss_before / MB:.1f} -> {m.rss_after / MB:.1f} MB "
            f"({m.rss_kb_per_session:.1f} KB/session; PSS {m.pss_kb_per_session:.1f} KB/session; "
            f"{m.processes_after} processes)"
        )


def summarize(results: dict) -> dict:
    """Medians per server, ratios ours/sshd, and whether each target is met."""
    summary: dict = {}
    for label, res in results.items():
        single = res.get("single", [])
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
        }
    if "sshd" in summary and "ours" in summary:
        ratios = {k: summary["ours"][k] / summary["sshd"][k] for k in summary["ours"]}
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
]


def table(summary: dict, args: argparse.Namespace, notes: list[str]) -> str:
    labels = [label for label in ("sshd", "ours") if label in summary]
    header = ["figure", *labels, "ours/sshd", "target", "met"]
    rows = []
    for key, title, target, fmt in ROWS:
        values = [summary[label][key] for label in labels]
        if all(math.isnan(v) for v in values):
            continue  # not measured in this run (--only)
        row = [title, *("-" if math.isnan(v) else fmt(v) for v in values)]
        if "ratio" in summary:
            ratio = summary["ratio"][key]
            row.append("-" if math.isnan(ratio) else f"{ratio:.2f}x")
            met = summary["target_met"].get(key)
            row += [target, "" if met is None else ("yes" if met else "NO")]
        else:
            row += ["", target, ""]
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        f"sis-ingest server benchmark ({time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} "
        f"CPUs, {args.size_mib} MiB single x {args.rounds} rounds, {args.concurrent} x "
        f"{args.concurrent_mib} MiB concurrent, {args.sessions} sessions, {args.idle} idle; "
        f"cipher {CIPHER}; MB = 10^6 bytes)",
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-mib", type=int, default=1024, help="single upload size (1024)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per figure (3)")
    p.add_argument("--concurrent", type=int, default=10, help="concurrent uploads (10)")
    p.add_argument("--concurrent-mib", type=int, default=100, help="size of each (100)")
    p.add_argument("--sessions", type=int, default=50, help="sequential sessions (50)")
    p.add_argument("--idle", type=int, default=200, help="idle authenticated sessions (200)")
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
        help="a [server] setting for our server, e.g. 'fsync_uploads = false' (repeatable)",
    )
    p.add_argument("--servers", default="sshd,ours", help="which to run: sshd,ours (both)")
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
    args.only = {m.strip() for m in args.only.split(",")}
    if not args.only <= set(MEASUREMENTS):
        p.error(f"--only takes {','.join(MEASUREMENTS)}")
    for name in ("size_mib", "rounds", "concurrent", "concurrent_mib", "sessions", "idle"):
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_project_python()
    wanted = {s.strip() for s in args.servers.split(",")}
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
            if "ours" in wanted:
                ours = IngestServer(
                    workdir,
                    pub,
                    args.workers,
                    Path(args.ours_source).resolve(),
                    tuple(args.ours_setting),
                )
                missing = ours.available()
                if missing:
                    notes.append(f"ours not measured: {missing}")
                    say(notes[-1])
                else:
                    servers.append(ours)
                    try:
                        ours.start()
                    except BenchError as exc:
                        raise BenchError(f"ours: {exc}\n{ours.log_tail()}") from None
                    say(f"ours listening on 127.0.0.1:{ours.port} (pid {ours.pid})")
                    if ours.source != REPO:
                        notes.append(f"ours run from {ours.source}")
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
