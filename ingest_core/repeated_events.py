"""Identical events from one session, written once per time window with a count.

A client that opens and closes the same file in a loop would otherwise write one log line per
request (3.3 MB in 10 s seen). With a :class:`RepeatedEvents` per session, "412 downloads of
sis_loader.log in 60 s" is two lines: the first download as it happened, then one line with
the same event name and ``repeated=411``, ``window_seconds`` and the summed byte counts of
those 411. Summing the ``bytes`` of every ``file.download`` line still gives the total sent.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

# Keys one collapser remembers; beyond it the oldest is summarised at once (memory stays
# bounded whatever names a client asks for).
MAX_KEYS = 256


@dataclass
class _Pending:
    """What was seen of one (event, key) since its first line was written."""

    first_seen: float
    fields: dict[str, Any]
    repeated: int = 0
    sums: dict[str, int] = field(default_factory=dict)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class RepeatedEvents:
    """Collapses repeated identical events of one session (or any other scope) into counts.

    ``key`` says what makes two events the same (e.g. the file name); the first of a window is
    logged at once, the rest are counted. Summaries are written when the window has passed,
    noticed at the next call for any key, and by :meth:`flush` (call it at session end).
    """

    def __init__(
        self,
        logger: Any,
        window: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        sums: Iterable[str] | None = None,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self.logger = logger
        self.window = window
        self.clock = clock
        self.sums = None if sums is None else frozenset(sums)
        self.max_keys = max(1, max_keys)
        # Insertion order is first-seen order: the oldest window is always first.
        self._pending: dict[tuple[str, tuple[object, ...]], _Pending] = {}

    def info(self, event: str, key: tuple[object, ...], **fields: Any) -> None:
        """The first (event, key) in a window is logged at once; later identical ones are
        counted, and their numeric fields summed (every int field, or those named in
        ``sums``); the other fields of the summary are those of the first occurrence."""
        now = self.clock()
        self._write_expired(now)
        if self.window <= 0:
            self.logger.info(event, **fields)
            return
        pending = self._pending.get((event, key))
        if pending is None:
            self.logger.info(event, **fields)
            while len(self._pending) >= self.max_keys:
                oldest = next(iter(self._pending))
                self._write_summary(oldest, self._pending.pop(oldest), now)
            self._pending[(event, key)] = _Pending(first_seen=now, fields=dict(fields))
            return
        pending.repeated += 1
        for name, value in fields.items():
            if _is_count(value) and (self.sums is None or name in self.sums):
                pending.sums[name] = pending.sums.get(name, 0) + value

    def flush(self) -> None:
        """Write the pending summaries now (session end)."""
        now = self.clock()
        pending, self._pending = self._pending, {}
        for event_key, seen in pending.items():
            self._write_summary(event_key, seen, now)

    def _write_expired(self, now: float) -> None:
        while self._pending:
            oldest = next(iter(self._pending))
            if now - self._pending[oldest].first_seen < self.window:
                return
            self._write_summary(oldest, self._pending.pop(oldest), now)

    def _write_summary(
        self, event_key: tuple[str, tuple[object, ...]], seen: _Pending, now: float
    ) -> None:
        if not seen.repeated:
            return  # the first line said it all
        fields = dict(seen.fields)
        for name, value in seen.fields.items():
            if _is_count(value) and (self.sums is None or name in self.sums):
                fields[name] = 0  # the first occurrence's own count is on its own line
        fields.update(seen.sums)
        fields["repeated"] = seen.repeated
        fields["window_seconds"] = round(min(now - seen.first_seen, self.window), 3)
        self.logger.info(event_key[0], **fields)
