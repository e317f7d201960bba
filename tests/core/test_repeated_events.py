"""RepeatedEvents: a flood of identical events becomes a first line and a summary per window,
written to a real log file; time comes from a fake clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ingest_core.repeated_events import RepeatedEvents
from ingest_core.structured_log import get_logger, read_events


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def events(log_dir: Path) -> list[dict[str, Any]]:
    return [e for e in read_events(log_dir, "server") if e["event"].startswith("file.")]


def download(repeated: RepeatedEvents, name: str, sent: int = 100) -> None:
    repeated.info("file.download", (name,), account="alpha", name=name, bytes=sent)


def test_412_downloads_in_a_window_are_two_lines(tmp_path: Path) -> None:
    clock = FakeClock()
    repeated = RepeatedEvents(get_logger(tmp_path, "server"), 60.0, clock)
    for _ in range(412):
        download(repeated, "sis_loader.log")
        clock.now += 0.1
    assert len(events(tmp_path)) == 1  # the first at once, the rest counted
    clock.now = 1000.0 + 61
    download(repeated, "sis_loader.log", sent=7)  # a new window: the summary, then this one
    first, summary, again = events(tmp_path)
    assert first["bytes"] == 100 and "repeated" not in first
    assert summary["event"] == "file.download" and summary["name"] == "sis_loader.log"
    assert summary["repeated"] == 411 and summary["bytes"] == 411 * 100
    assert summary["window_seconds"] == 60.0 and summary["account"] == "alpha"
    assert again["bytes"] == 7 and "repeated" not in again


def test_different_keys_are_separate_and_flush_writes_what_is_pending(tmp_path: Path) -> None:
    clock = FakeClock()
    repeated = RepeatedEvents(get_logger(tmp_path, "server"), 60.0, clock)
    for _ in range(3):
        download(repeated, "a.txt")
        download(repeated, "b.txt", sent=5)
        repeated.info("file.removed", ("a.txt",), name="a.txt", bytes=1)
    clock.now += 10
    repeated.flush()  # session end, before the window is over
    repeated.flush()  # nothing twice
    lines = events(tmp_path)
    assert [(e["event"], e["name"], e.get("repeated")) for e in lines] == [
        ("file.download", "a.txt", None),
        ("file.download", "b.txt", None),
        ("file.removed", "a.txt", None),
        ("file.download", "a.txt", 2),
        ("file.download", "b.txt", 2),
        ("file.removed", "a.txt", 2),
    ]
    assert lines[3]["window_seconds"] == 10.0 and lines[4]["bytes"] == 10


def test_an_event_seen_once_has_no_summary(tmp_path: Path) -> None:
    clock = FakeClock()
    repeated = RepeatedEvents(get_logger(tmp_path, "server"), 60.0, clock)
    download(repeated, "once.txt")
    clock.now += 120
    download(repeated, "other.txt")
    repeated.flush()
    assert [e["name"] for e in events(tmp_path)] == ["once.txt", "other.txt"]


def test_memory_is_bounded_by_summarising_the_oldest_key(tmp_path: Path) -> None:
    """A client asking for ever new names: the collapser keeps at most max_keys of them."""
    clock = FakeClock()
    repeated = RepeatedEvents(get_logger(tmp_path, "server"), 60.0, clock, max_keys=3)
    for i in range(10):
        download(repeated, f"f{i}")
        download(repeated, f"f{i}")
    assert len(repeated._pending) == 3
    lines = events(tmp_path)
    summaries = [e["name"] for e in lines if "repeated" in e]
    assert summaries == [f"f{i}" for i in range(7)]  # oldest first, each with its count
    assert all(e["repeated"] == 1 for e in lines if "repeated" in e)


def test_only_the_named_fields_are_summed_and_a_zero_window_collapses_nothing(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    repeated = RepeatedEvents(get_logger(tmp_path, "server"), 60.0, clock, sums=("bytes",))
    for _ in range(3):
        repeated.info("file.download", ("x",), name="x", bytes=10, port=22, ok=True)
    repeated.flush()
    summary = events(tmp_path)[-1]
    assert (summary["bytes"], summary["port"], summary["ok"]) == (20, 22, True)
    plain = RepeatedEvents(get_logger(tmp_path, "other"), 0, clock)
    for _ in range(3):
        plain.info("file.download", ("x",), name="x")
    assert len(read_events(tmp_path, "other")) == 3
