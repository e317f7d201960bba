"""An injected clock for nightly runs, shared by the loader tests."""

from __future__ import annotations

from datetime import datetime, timedelta, tzinfo


class Nights:
    """Night ``n`` is ``n`` days after the test started (set ``night`` to move on)."""

    def __init__(self, zone: tzinfo) -> None:
        self.start = datetime.now(zone)
        self.night = 0

    def __call__(self) -> datetime:
        return self.start + timedelta(days=self.night)
