"""Exact CPU time of a server and every process it ever forked, through a cgroup of its own.

Summing /proc/PID/stat over a process tree loses the time of children whose parent exits
without waiting for them (sshd's [priv] monitor does not reap its session process), and
sampling loses short-lived ones. A cgroup counts every task that ever ran in it, so the server
is started inside a fresh cgroup (its children inherit it) and the group's usage is read.
Root and a writable cgroup hierarchy are needed; without them :func:`create` returns None and
the caller falls back to the /proc tree sum.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

# (folder holding child groups, usage file, how to turn its text into seconds)
_HIERARCHIES = (
    (Path("/sys/fs/cgroup/unified"), "cpu.stat", "usec"),
    (Path("/sys/fs/cgroup"), "cpu.stat", "usec"),
    (Path("/sys/fs/cgroup/cpuacct"), "cpuacct.usage", "nsec"),
)


class CpuAccount:
    """One cgroup; :meth:`wrap` makes a command start inside it."""

    def __init__(self, path: Path, usage_file: str, unit: str) -> None:
        self.path = path
        self.usage_file = usage_file
        self.unit = unit

    @property
    def kind(self) -> str:
        return f"cgroup {self.path}"

    def wrap(self, cmd: list[str]) -> list[str]:
        """Join the group, then exec the command (so the server's pid is the shell's)."""
        procs = self.path / "cgroup.procs"
        return ["/bin/sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *cmd]

    def seconds(self) -> float:
        text = (self.path / self.usage_file).read_text()
        if self.unit == "nsec":
            return int(text.strip()) / 1e9
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name == "usage_usec":
                return int(value) / 1e6
        raise RuntimeError(f"no usage_usec in {self.path / self.usage_file}")

    def remove(self) -> None:
        """Delete the group once empty (moving stragglers to the parent group first)."""
        parent_procs = self.path.parent / "cgroup.procs"
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                pids = (self.path / "cgroup.procs").read_text().split()
                for pid in pids:
                    with contextlib.suppress(OSError):
                        parent_procs.write_text(pid)
                time.sleep(0.1)


def create(name: str) -> CpuAccount | None:
    """A new, empty cgroup named ``name`` in the first hierarchy that accepts one."""
    if os.geteuid() != 0:
        return None
    for base, usage_file, unit in _HIERARCHIES:
        if not (base / usage_file).exists() and not (base / "cgroup.procs").exists():
            continue
        path = base / name
        try:
            path.mkdir()
        except OSError:
            continue
        if (path / usage_file).exists():
            return CpuAccount(path, usage_file, unit)
        with contextlib.suppress(OSError):
            path.rmdir()
    return None
