"""The JSON-lines logs stay bounded: rotation by size with several real processes writing one
file, reopening after an external rename (logrotate), reading across rotated files, the
free-disk reserve on a real small tmpfs, and modes that do not depend on the umask."""

from __future__ import annotations

import grp
import gzip
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, fill_disk

from ingest_core import structured_log
from ingest_core.structured_log import get_logger, log_files, read_events

# One writer process: commands on stdin, one "done" line per command on stdout.
WRITER = r"""
import sys
from pathlib import Path
from ingest_core.structured_log import get_logger
log_dir, writer, max_bytes, backups = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
log = get_logger(
    Path(log_dir), "server", max_bytes=max_bytes, backups=backups, disk_reserve=0, writer=writer
)
for command in sys.stdin:
    verb, *rest = command.split()
    if verb == "write":
        start, count = int(rest[0]), int(rest[1])
        for seq in range(start, start + count):
            log.info("test.line", seq=seq, padding="x" * (seq % 97))
    elif verb == "mark":
        log.info("test.mark", tag=rest[0])
    print("done", flush=True)
"""


class Writer:
    """A real process appending to ``server.jsonl`` through get_logger."""

    def __init__(self, log_dir: Path, name: str, max_bytes: int, backups: int) -> None:
        self.name = name
        self.process = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(log_dir), name, str(max_bytes), str(backups)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def wait_done(self) -> None:
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "done", f"{self.name} died"

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait(timeout=30)


def run_all(writers: list[Writer], command: str) -> None:
    for w in writers:
        w.send(command)
    for w in writers:
        w.wait_done()


def raw_lines(log_dir: Path) -> list[bytes]:
    lines: list[bytes] = []
    for path in log_files(log_dir, "server"):
        lines += path.read_bytes().splitlines()
    return lines


def test_three_processes_rotate_one_file_without_losing_or_splitting_a_line(
    tmp_path: Path,
) -> None:
    max_bytes, per_writer = 16 * 1024, 1500
    writers = [Writer(tmp_path, f"w{i}", max_bytes, backups=500) for i in range(3)]
    try:
        run_all(writers, f"write 0 {per_writer}")
        # One of them rotates again; then every one writes a mark: all land in the new file.
        writers[0].send("write 100000 200")
        writers[0].wait_done()
        run_all(writers, "mark after-rotation")
    finally:
        for w in writers:
            w.close()
    lines = raw_lines(tmp_path)
    events = [json.loads(line) for line in lines]  # every line is whole JSON
    seen = Counter((e["writer"], e["seq"]) for e in events if e["event"] == "test.line")
    for w in writers:
        assert all(seen[(w.name, seq)] == 1 for seq in range(per_writer)), w.name
    assert max(seen.values()) == 1
    files = log_files(tmp_path, "server")
    assert len(files) > 20  # it did rotate, many times
    for path in files:
        # A file is rotated once it reached max_bytes: at most a line per writer beyond it.
        assert path.stat().st_size < max_bytes + 3 * 400, path
    # Nobody kept writing into a file rotated away before it: every mark comes after the last
    # line of w0's second batch (the rotations it made), in reading order.
    order = read_events(tmp_path, "server")
    last_batch = max(i for i, e in enumerate(order) if e.get("seq") == 100199)
    marks = [i for i, e in enumerate(order) if e["event"] == "test.mark"]
    assert len(marks) == 3 and min(marks) > last_batch
    assert '"test.mark"' in (tmp_path / "server.jsonl").read_text()
    w0_seqs = [
        e["seq"] for e in order if e.get("writer") == "w0" and e.get("seq", per_writer) < per_writer
    ]
    assert w0_seqs == list(range(per_writer))  # read oldest first, across the rotated files


def test_rotation_keeps_at_most_backups_files(tmp_path: Path) -> None:
    writers = [Writer(tmp_path, f"w{i}", 8 * 1024, backups=3) for i in range(2)]
    try:
        run_all(writers, "write 0 2000")
    finally:
        for w in writers:
            w.close()
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert names == ["server.jsonl", "server.jsonl.1", "server.jsonl.2", "server.jsonl.3"]
    for line in raw_lines(tmp_path):
        json.loads(line)
    for path in tmp_path.glob("server.jsonl*"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_an_external_rename_is_noticed_without_a_signal(tmp_path: Path) -> None:
    """logrotate-style renames (with and without ``create``): lines written before the writer
    notices land in the renamed file, none is lost, and within a second it writes to the new
    one by itself."""
    current, first, second = (
        tmp_path / n for n in ("server.jsonl", "server.jsonl.1", "server.jsonl.2")
    )
    writer = Writer(tmp_path, "w", max_bytes=0, backups=0)
    try:
        run_all([writer], "mark before")
        os.rename(current, first)
        current.touch()  # `create`
        run_all([writer], "mark right-after")  # may still go to .1 (within the second)
        time.sleep(structured_log.REOPEN_CHECK_SECONDS + 0.2)
        run_all([writer], "mark later")
        assert '"later"' in current.read_text()
        os.rename(first, second)
        os.rename(current, first)  # `nocreate`: the writer makes the file again
        time.sleep(structured_log.REOPEN_CHECK_SECONDS + 0.2)
        run_all([writer], "mark recreated")
    finally:
        writer.close()
    tags = [e["tag"] for e in read_events(tmp_path, "server") if e["event"] == "test.mark"]
    assert tags == ["before", "right-after", "later", "recreated"]
    assert '"later"' in first.read_text()
    assert '"recreated"' in current.read_text()
    assert stat.S_IMODE(current.stat().st_mode) == 0o640


@pytest.mark.skipif(shutil.which("logrotate") is None, reason="logrotate is not installed")
def test_the_shipped_logrotate_file_with_a_running_writer(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    owner = f"{pwd.getpwuid(os.getuid()).pw_name} {grp.getgrgid(os.getgid()).gr_name}"
    config = (REPO / "deploy" / "sis-ingest.logrotate").read_text()
    config = config.replace("/var/log/sis-ingest", str(logs)).replace(
        "sis-ingest sis-ingest", owner
    )
    (tmp_path / "logrotate.conf").write_text(config)
    writer = Writer(logs, "w", max_bytes=0, backups=0)
    try:
        run_all([writer], "write 0 100")
        for rotation in (1, 2):
            subprocess.run(
                [
                    "logrotate",
                    "-f",
                    "-s",
                    str(tmp_path / "state"),
                    str(tmp_path / "logrotate.conf"),
                ],
                check=True,
                capture_output=True,
            )
            assert stat.S_IMODE((logs / "server.jsonl").stat().st_mode) == 0o640
            time.sleep(structured_log.REOPEN_CHECK_SECONDS + 0.2)
            run_all([writer], f"write {100 * rotation} 100")
    finally:
        writer.close()
    assert sorted(p.name for p in logs.iterdir() if not p.name.startswith(".")) == [
        "server.jsonl",
        "server.jsonl.1",
        "server.jsonl.2.gz",
    ]
    with gzip.open(logs / "server.jsonl.2.gz") as handle:
        assert b'"seq": 0,' in handle.read()
    assert '"seq": 200,' in (logs / "server.jsonl").read_text()  # reopened after each rotation
    seqs = [e["seq"] for e in read_events(logs, "server") if e["event"] == "test.line"]
    assert seqs == list(range(300))  # across .2.gz, .1 and the current file, oldest first


def test_read_events_skips_cut_lines_and_orders_rotated_files(tmp_path: Path) -> None:
    (tmp_path / "server.jsonl.10").write_text('{"event": "a"}\n')
    (tmp_path / "server.jsonl.2").write_text('{"event": "b"}\n{"event": "cut')
    with gzip.open(tmp_path / "server.jsonl.3.gz", "wt") as handle:
        handle.write('{"event": "a2"}\n')
    (tmp_path / "server.jsonl.1").write_text('{"event": "c"}\n["not an event"]\n')
    (tmp_path / "server.jsonl").write_text('{"event": "d\\u2028x"}\n')
    (tmp_path / "server.jsonl.old").write_text('{"event": "ignored"}\n')
    assert [e["event"] for e in read_events(tmp_path, "server")] == [
        "a",
        "a2",
        "b",
        "c",
        "d\u2028x",
    ]
    assert read_events(tmp_path, "nothing") == []


def test_an_exception_is_one_line(tmp_path: Path) -> None:
    log = get_logger(tmp_path, "server")
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        log.exception("connection.error", address="127.0.0.1")
    lines = (tmp_path / "server.jsonl").read_text().splitlines()
    assert len(lines) == 1
    assert "ValueError: bad" in json.loads(lines[0])["exception"]


def test_log_file_modes_do_not_depend_on_the_umask(tmp_path: Path) -> None:
    """0640 under umask 022 (would be 0644) and 077 (would be 0600), for a rotated file too."""
    script = (
        "import sys; from pathlib import Path; from ingest_core.structured_log import get_logger\n"
        "log = get_logger(Path(sys.argv[1]), 'server', max_bytes=2000, backups=2)\n"
        "for i in range(100): log.info('test.line', seq=i)\n"
    )
    for umask in (0o022, 0o077):
        folder = tmp_path / f"umask{umask:o}"
        subprocess.run(
            [sys.executable, "-c", script, str(folder)],
            check=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            preexec_fn=lambda umask=umask: os.umask(umask),
        )
        files = sorted(folder.glob("server.jsonl*"))
        assert len(files) == 3
        for path in files:
            assert stat.S_IMODE(path.stat().st_mode) == 0o640, (umask, path)


# -- the free-disk reserve, on a real 3 MB tmpfs ----------------------------------------------


def leave_free(mount: Path, wanted: int, filler: Path) -> None:
    """Grow or shrink ``filler`` so that about ``wanted`` bytes stay free on ``mount``."""
    filler.unlink(missing_ok=True)
    stats = os.statvfs(mount)
    free = stats.f_bavail * stats.f_frsize
    with open(filler, "wb") as handle:
        handle.write(b"\0" * max(free - wanted, 0))


def test_the_disk_reserve_drops_info_lines_first_and_says_so_when_space_returns(
    small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(structured_log, "DISK_CHECK_SECONDS", 0.0)
    logs = small_disk / "logs"
    filler = small_disk / "filler.bin"
    reserve = 2_000_000  # hard floor: 1 MB
    log = get_logger(logs, "server", max_bytes=0, disk_reserve=reserve)
    log.info("test.before")
    leave_free(small_disk, 1_500_000, filler)
    for i in range(10):
        log.info("file.download", seq=i)
    log.warning("limit.hit", limit="x")
    log.info("server.started", port=1)  # start/stop lines are kept
    leave_free(small_disk, 300_000, filler)  # below the hard floor: warnings go too
    log.warning("limit.hit", limit="y")
    log.error("worker.failed")
    filler.unlink()
    log.info("test.after")
    events = read_events(logs, "server")
    assert [e["event"] for e in events] == [
        "test.before",
        "log.paused",
        "limit.hit",
        "server.started",
        "log.resumed",
        "test.after",
    ]
    paused, resumed = events[1], events[4]
    assert paused["level"] == "warning" and paused["reserve_bytes"] == reserve
    assert resumed["dropped_lines"] == 12 and resumed["component"] == "server"
    assert events[2]["limit"] == "x"


def test_a_full_disk_costs_lines_not_the_service(
    small_disk: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """With no reserve configured, a really full disk (ENOSPC) is counted the same way, and
    no traceback per line floods stderr."""
    monkeypatch.setattr(structured_log, "DISK_CHECK_SECONDS", 0.0)
    logs = small_disk / "logs"
    log = get_logger(logs, "server", max_bytes=0, disk_reserve=0)
    log.info("test.before", padding="x" * 4000)
    filler = fill_disk(small_disk)
    for i in range(5):
        log.info("file.download", seq=i, padding="x" * 5000)
    filler.unlink()
    log.info("test.after")
    events = read_events(logs, "server")
    assert [e["event"] for e in events] == ["test.before", "log.resumed", "test.after"]
    assert events[1]["dropped_lines"] == 5
    assert "Traceback" not in capfd.readouterr().err
