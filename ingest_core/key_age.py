"""How old a client key is and when it expires (``[keys] max_age_days``).

Worked out here only, so ``ingestctl key list``, ``ingestctl status``, the login check and
the reminder mails always agree on a key's age, its expiry and which reminder is due.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo

# Days before expiry when the operators and the account's contacts are reminded, latest last.
REMINDER_DAYS = (30, 7, 1)
# A key this close to its expiry is shown as expiring soon.
EXPIRES_SOON_DAYS = 30

NEVER = "never"  # keys do not expire (max_age_days = 0)
VALID = "ok"
EXPIRES_SOON = "expires soon"
EXPIRED = "expired"

DAY = timedelta(days=1)


@dataclass(frozen=True)
class KeyAge:
    """One key's age and expiry at one instant."""

    age_days: int  # whole days since the key was added
    expires_at: datetime | None  # None: keys do not expire
    days_left: int | None  # whole days until expiry, rounded up (0 once expired); None: never
    expiry: str  # NEVER, VALID, EXPIRES_SOON or EXPIRED

    @property
    def expired(self) -> bool:
        return self.expiry == EXPIRED

    @property
    def reminder_due(self) -> int | None:
        """The most urgent reminder the key has reached (30, 7 or 1 days before expiry);
        None before the first one, once expired, or when keys do not expire."""
        if self.days_left is None or self.expired:
            return None
        reached = [days for days in REMINDER_DAYS if self.days_left <= days]
        return min(reached) if reached else None


def key_age(added_at: datetime, max_age_days: int, now: datetime) -> KeyAge:
    """The age and expiry of a key added at ``added_at`` (both instants timezone-aware).
    A key expires ``max_age_days`` days to the second after it was added (whole seconds, as
    every listing shows the times); 0 turns expiry off."""
    added_at = added_at.replace(microsecond=0)
    age_days = max(0, (now - added_at) // DAY)
    if max_age_days <= 0:
        return KeyAge(age_days, None, None, NEVER)
    expires_at = added_at + timedelta(days=max_age_days)
    left = expires_at - now
    if left <= timedelta(0):
        return KeyAge(age_days, expires_at, 0, EXPIRED)
    days_left = math.ceil(left / DAY)
    expiry = EXPIRES_SOON if left <= timedelta(days=EXPIRES_SOON_DAYS) else VALID
    return KeyAge(age_days, expires_at, days_left, expiry)


def expiry_text(expires_at: datetime | str | None, expiry: str, zone: tzinfo) -> str:
    """A key's expiry as the tables show it: ``never``, the local date, the date with
    ``(soon)``, or ``expired`` and the date."""
    if expires_at is None:
        return NEVER
    when = datetime.fromisoformat(expires_at) if isinstance(expires_at, str) else expires_at
    day = when.astimezone(zone).date().isoformat()
    if expiry == EXPIRED:
        return f"expired {day}"
    if expiry == EXPIRES_SOON:
        return f"{day} (soon)"
    return day
