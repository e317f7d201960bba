"""CPU time and memory of a server's whole process tree, read from /proc.

A forking server (sshd: a listener, then a monitor and a user process per connection) spends
most of its CPU in children that come and go, so the figure that compares with a one-process
server is the sum over the tree. A child that has exited and been waited for is still counted:
its time is in its parent's cutime/cstime, so "live processes' own + children's time" is a
monotonic total for the tree as long as the root lives.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    cpu_seconds: float  # utime + stime + cutime + cstime
    rss_bytes: int


def _read_stat(pid: int) -> ProcStat | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may hold spaces: fields start after the last ')'.
    rest = raw[raw.rfind(")") + 2 :].split()
    ticks = sum(int(rest[i]) for i in (11, 12, 13, 14))
    return ProcStat(
        pid=pid,
        ppid=int(rest[1]),
        cpu_seconds=ticks / CLOCK_TICKS,
        rss_bytes=int(rest[21]) * PAGE_SIZE,
    )


def _all_stats() -> dict[int, ProcStat]:
    stats = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _read_stat(int(entry.name))
            if stat is not None:
                stats[stat.pid] = stat
    return stats


def tree(root_pid: int) -> list[ProcStat]:
    """The root and every live descendant (empty if the root is gone)."""
    stats = _all_stats()
    if root_pid not in stats:
        return []
    children: dict[int, list[int]] = {}
    for stat in stats.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    found, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        found.append(stats[pid])
        todo.extend(children.get(pid, []))
    return found


def tree_cpu_seconds(root_pid: int) -> float:
    return sum(stat.cpu_seconds for stat in tree(root_pid))


def tree_rss_bytes(root_pid: int) -> int:
    return sum(stat.rss_bytes for stat in tree(root_pid))


def pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages split between the processes that share them."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def tree_pss_bytes(root_pid: int) -> int:
    return sum(pss_bytes(stat.pid) for stat in tree(root_pid))


def descendants(root_pid: int) -> list[int]:
    """Live descendants, deepest last (kill them after the root so none is re-spawned)."""
    return [stat.pid for stat in tree(root_pid) if stat.pid != root_pid]
