"""The account registry: the one place accounts, their keys, allowed addresses and contacts change.

Every change runs in one transaction together with its audit event, so a refused or failed
change leaves nothing behind. Readers (the server at each connection) query the database
every time, so a change takes effect on the next connection without a restart.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ingest_core.db import (
    Account,
    AccountContact,
    AccountIp,
    AccountKey,
    AuditEvent,
    ControlDB,
    open_control_db,
    utcnow,
)
from ingest_core.errors import NotFound, Refused
from ingest_core.folders import account_folder, create_account_folder
from ingest_core.key_age import key_age
from ingest_core.policy import check_account_name, parse_address, parse_public_key
from ingest_core.settings import Settings

# One plain address: local part (dot-atoms of the characters RFC 5322 allows unquoted), "@",
# a domain of letters, digits and hyphens with at least one dot. No display name, no
# comments, no quoted local part: the address is used as it is in a To: header.
_LOCAL_PART = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_DOMAIN_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
MAX_EMAIL = 254

KEY_REMINDER = "key.reminder"  # the audit action that records one expiry reminder sent


def check_email(text: str) -> str:
    """``text`` as a contact address (its domain in lower case), or :class:`Refused` with one
    line saying what is accepted."""
    address = text.strip()
    accepted = "give one plain address such as it-team@example.edu (no name, no <>)"
    shown = json.dumps(address, ensure_ascii=True)
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise Refused(f"{shown} is not an e-mail address: {accepted}")
    if len(address) > MAX_EMAIL or len(local) > 64:
        raise Refused(f"{shown} is too long for an e-mail address (at most {MAX_EMAIL} characters)")
    if not _LOCAL_PART.match(local):
        raise Refused(f"{shown}: the part before @ holds characters not accepted here: {accepted}")
    labels = domain.rstrip(".").split(".") if domain != "." else [""]
    if len(labels) < 2 or not all(_DOMAIN_LABEL.match(label) for label in labels):
        raise Refused(
            f"{shown}: {domain!r} is not a mail domain (letters, digits, hyphens and dots, "
            f"such as example.edu): {accepted}"
        )
    return f"{local}@{'.'.join(labels).lower()}"


def current_actor() -> str:
    """The OS user making a change (and who they sudo'ed from, if they did)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid:{os.getuid()}"
    sudo = os.environ.get("SUDO_USER")
    return f"{user} (sudo by {sudo})" if sudo and sudo != user else user


@dataclass(frozen=True)
class KeyView:
    key_type: str
    bits: int
    fingerprint: str
    comment: str
    added_at: str
    age_days: int  # whole days since it was added
    expires_at: str | None  # None: keys do not expire ([keys] max_age_days = 0)
    expiry: str  # "never", "ok", "expires soon" or "expired" (see ingest_core.key_age)


@dataclass(frozen=True)
class AccountKeyDates:
    """One key of an active account, for the expiry reminders."""

    account: str
    fingerprint: str
    comment: str
    added_at: datetime


@dataclass(frozen=True)
class AccountView:
    name: str
    institution: str | None
    description: str | None
    status: str
    deferred_fetch: bool
    folder: str
    created_at: str
    updated_at: str
    keys: list[KeyView]
    ips: list[str]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ContactView:
    email: str
    added_at: str


@dataclass(frozen=True)
class AuditView:
    at: str
    actor: str
    account: str | None
    action: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class LoginView:
    """What the server needs at authentication: read fresh for every connection."""

    name: str
    active: bool
    public_keys: list[str]
    ips: frozenset[str]
    key_added: dict[str, datetime] = field(default_factory=dict)  # by public key line

    def key_expired(self, public_key: str, max_age_days: int, now: datetime | None = None) -> bool:
        """Is this registered key past ``[keys] max_age_days`` (refused at login)?"""
        added = self.key_added.get(public_key)
        return added is not None and key_age(added, max_age_days, now or utcnow()).expired


def _iso(value: datetime) -> str:
    return value.isoformat(timespec="seconds")


class Registry:
    """Accounts, keys, addresses and the audit trail, over one control DB."""

    def __init__(self, settings: Settings, db: ControlDB | None = None, actor: str | None = None):
        self.settings = settings
        self.db = db or open_control_db(settings.control_db_url)
        self.actor = actor or current_actor()

    # -- plumbing -------------------------------------------------------------------------

    @contextmanager
    def change(self) -> Iterator[Session]:
        """One transaction for a change and its audit event (other modules use it too)."""
        with self.db.session.begin() as session:
            yield session

    def audit(self, session: Session, account: str | None, action: str, **detail: Any) -> None:
        """Record who changed what, inside the change's own transaction."""
        session.add(
            AuditEvent(
                actor=self.actor,
                account=account,
                action=action,
                detail=json.dumps(detail, sort_keys=True, default=str),
            )
        )

    @staticmethod
    def _get(session: Session, name: str) -> Account:
        account = session.scalar(select(Account).where(Account.name == name))
        if account is None:
            raise NotFound(f"no account named {name!r} (see 'ingestctl account list')")
        return account

    def _key_view(self, key: AccountKey) -> KeyView:
        age = key_age(key.added_at, self.settings.keys.max_age_days, utcnow())
        return KeyView(
            key.key_type,
            key.bits,
            key.fingerprint,
            key.comment,
            _iso(key.added_at),
            age.age_days,
            _iso(age.expires_at) if age.expires_at is not None else None,
            age.expiry,
        )

    def _view(self, account: Account) -> AccountView:
        return AccountView(
            name=account.name,
            institution=account.institution,
            description=account.description,
            status=account.status,
            deferred_fetch=account.deferred_fetch,
            folder=str(account_folder(self.settings, account.name).root),
            created_at=_iso(account.created_at),
            updated_at=_iso(account.updated_at),
            keys=[self._key_view(k) for k in account.keys],
            ips=[ip.address for ip in account.ips],
        )

    # -- accounts -------------------------------------------------------------------------

    def create_account(
        self,
        name: str,
        institution: str | None = None,
        description: str | None = None,
        deferred_fetch: bool = False,
    ) -> AccountView:
        check_account_name(name)
        with self.change() as session:
            if session.scalar(select(Account.id).where(Account.name == name)) is not None:
                raise Refused(f"account {name!r} already exists (names are unique)")
            account = Account(
                name=name,
                institution=institution,
                description=description,
                status="active",
                deferred_fetch=deferred_fetch,
            )
            session.add(account)
            self.audit(
                session,
                name,
                "account.create",
                institution=institution,
                deferred_fetch=deferred_fetch,
            )
            session.flush()
            create_account_folder(self.settings, name)
            view = self._view(account)
        return view

    def list_accounts(self) -> list[AccountView]:
        with self.db.session() as session:
            accounts = session.scalars(select(Account).order_by(Account.name)).all()
            return [self._view(a) for a in accounts]

    def get_account(self, name: str) -> AccountView:
        with self.db.session() as session:
            return self._view(self._get(session, name))

    def set_status(self, name: str, status: str) -> AccountView:
        if status not in ("active", "disabled"):
            raise Refused(f"status {status!r} is not valid; accepted: active, disabled")
        with self.change() as session:
            account = self._get(session, name)
            if account.status != status:
                self.audit(
                    session,
                    name,
                    f"account.{'enable' if status == 'active' else 'disable'}",
                    before=account.status,
                    after=status,
                )
                account.status = status
                account.updated_at = utcnow()
            return self._view(account)

    def update_account(
        self,
        name: str,
        institution: str | None = None,
        description: str | None = None,
        deferred_fetch: bool | None = None,
    ) -> AccountView:
        with self.change() as session:
            account = self._get(session, name)
            changes: dict[str, Any] = {}
            for attr, value in (
                ("institution", institution),
                ("description", description),
                ("deferred_fetch", deferred_fetch),
            ):
                if value is not None and getattr(account, attr) != value:
                    changes[attr] = {"before": getattr(account, attr), "after": value}
                    setattr(account, attr, value)
            if changes:
                account.updated_at = utcnow()
                self.audit(session, name, "account.update", **changes)
            return self._view(account)

    def delete_account(self, name: str, purge: bool = False) -> AccountView:
        """Remove the account; its folder's files stay unless ``purge``."""
        with self.change() as session:
            account = self._get(session, name)
            view = self._view(account)
            contacts = [c.email for c in account.contacts]
            session.delete(account)
            self.audit(
                session,
                name,
                "account.delete",
                purge=purge,
                keys=[k.fingerprint for k in view.keys],
                ips=view.ips,
                contacts=contacts,
            )
        if purge:
            shutil.rmtree(account_folder(self.settings, name).root, ignore_errors=True)
        return view

    # -- keys -----------------------------------------------------------------------------

    def add_key(self, name: str, text: str) -> KeyView:
        parsed = parse_public_key(text, self.settings.keys)
        try:
            with self.change() as session:
                account = self._get(session, name)
                owner = session.scalar(
                    select(Account.name)
                    .join(AccountKey)
                    .where(AccountKey.fingerprint == parsed.fingerprint)
                )
                if owner == name:
                    raise Refused(
                        f"key {parsed.fingerprint} is already registered to this account: "
                        "nothing to add ('ingestctl key list' shows it)"
                    )
                if owner is not None:
                    raise Refused(
                        f"key {parsed.fingerprint} is already registered to another account; "
                        "each account needs its own key pair"
                    )
                key = AccountKey(
                    account=account,
                    key_type=parsed.key_type,
                    bits=parsed.bits,
                    fingerprint=parsed.fingerprint,
                    comment=parsed.comment,
                    public_key=parsed.openssh,
                )
                session.add(key)
                account.updated_at = utcnow()
                self.audit(
                    session,
                    name,
                    "key.add",
                    fingerprint=parsed.fingerprint,
                    key_type=parsed.key_type,
                    bits=parsed.bits,
                    comment=parsed.comment,
                )
                session.flush()
                return self._key_view(key)
        except IntegrityError:
            raise Refused(f"key {parsed.fingerprint} is already registered") from None

    def list_keys(self, name: str) -> list[KeyView]:
        return self.get_account(name).keys

    def remove_key(self, name: str, fingerprint: str) -> KeyView:
        wanted = fingerprint.strip()
        if wanted and not wanted.startswith("SHA256:"):
            wanted = f"SHA256:{wanted}"
        with self.change() as session:
            account = self._get(session, name)
            for key in account.keys:
                if key.fingerprint == wanted:
                    view = self._key_view(key)
                    account.keys.remove(key)
                    account.updated_at = utcnow()
                    self.audit(session, name, "key.remove", fingerprint=wanted)
                    return view
        raise NotFound(f"account {name!r} has no key {wanted} (see 'ingestctl key list {name}')")

    # -- addresses ------------------------------------------------------------------------

    def add_ip(self, name: str, text: str) -> tuple[str, str | None]:
        """Add one allowed address; returns it normalized and a warning, if any."""
        parsed = parse_address(text)
        limit = self.settings.ips.max_per_account
        with self.change() as session:
            account = self._get(session, name)
            current = [ip.address for ip in account.ips]
            if parsed.address in current:
                raise Refused(f"{parsed.address} is already allowed for {name!r}")
            if len(current) >= limit:
                raise Refused(
                    f"account {name!r} already has {len(current)} addresses, the most allowed "
                    f"is {limit}: remove one first ('ingestctl ip remove {name} ADDRESS')"
                )
            account.ips.append(AccountIp(address=parsed.address))
            account.updated_at = utcnow()
            self.audit(session, name, "ip.add", address=parsed.address)
        return parsed.address, parsed.warning

    def remove_ip(self, name: str, text: str) -> str:
        parsed = parse_address(text)
        with self.change() as session:
            account = self._get(session, name)
            for ip in account.ips:
                if ip.address == parsed.address:
                    account.ips.remove(ip)
                    account.updated_at = utcnow()
                    self.audit(session, name, "ip.remove", address=parsed.address)
                    return parsed.address
        raise NotFound(
            f"{parsed.address} is not allowed for {name!r} (see 'ingestctl ip list {name}')"
        )

    def list_ips(self, name: str) -> list[str]:
        return self.get_account(name).ips

    # -- contacts -------------------------------------------------------------------------

    def add_contact(self, name: str, text: str) -> str:
        """Add one address that receives the account's alerts; returns it as stored."""
        email = check_email(text)
        with self.change() as session:
            account = self._get(session, name)
            for contact in account.contacts:
                if contact.email.lower() == email.lower():
                    raise Refused(
                        f"{contact.email} is already a contact of {name!r}: nothing to add"
                    )
            account.contacts.append(AccountContact(email=email))
            account.updated_at = utcnow()
            self.audit(session, name, "contact.add", email=email)
        return email

    def remove_contact(self, name: str, text: str) -> str:
        wanted = text.strip().lower()
        with self.change() as session:
            account = self._get(session, name)
            for contact in account.contacts:
                if contact.email.lower() == wanted:
                    account.contacts.remove(contact)
                    account.updated_at = utcnow()
                    self.audit(session, name, "contact.remove", email=contact.email)
                    return contact.email
        raise NotFound(
            f"{text.strip()!r} is not a contact of {name!r} (see 'ingestctl contact list {name}')"
        )

    def list_contacts(self, name: str) -> list[ContactView]:
        with self.db.session() as session:
            account = self._get(session, name)
            return [ContactView(c.email, _iso(c.added_at)) for c in account.contacts]

    def contact_emails(self, name: str) -> list[str]:
        """The addresses the account's alerts go to besides the operators ([] if none, or
        if the account no longer exists)."""
        with self.db.session() as session:
            return list(
                session.scalars(
                    select(AccountContact.email)
                    .join(Account)
                    .where(Account.name == name)
                    .order_by(AccountContact.id)
                )
            )

    # -- audit ----------------------------------------------------------------------------

    def record(self, account: str | None, action: str, **detail: Any) -> None:
        """Audit an operator action made outside this class (specs, unbans, loads forced)."""
        with self.change() as session:
            self.audit(session, account, action, **detail)

    def audit_trail(self, name: str | None = None, limit: int = 200) -> list[AuditView]:
        with self.db.session() as session:
            query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
            if name is not None:
                query = query.where(AuditEvent.account == name)
            events = list(reversed(session.scalars(query).all()))
            return [
                AuditView(_iso(e.at), e.actor, e.account, e.action, json.loads(e.detail))
                for e in events
            ]

    # -- key expiry reminders ----------------------------------------------------------------

    def active_account_keys(self) -> list[AccountKeyDates]:
        """Every key of every active account (a disabled account logs in with none)."""
        with self.db.session() as session:
            rows = session.execute(
                select(
                    Account.name, AccountKey.fingerprint, AccountKey.comment, AccountKey.added_at
                )
                .join(AccountKey)
                .where(Account.status == "active")
                .order_by(Account.name, AccountKey.id)
            ).all()
            return [AccountKeyDates(*row) for row in rows]

    def record_key_reminder(
        self, account: str, fingerprint: str, expires_at: datetime, days: int, messages: int
    ) -> None:
        """Remember that the ``days``-before-expiry reminder of this key (for this expiry)
        went out (``messages``: to the operators, the contacts, or both)."""
        self.record(
            account,
            KEY_REMINDER,
            fingerprint=fingerprint,
            expires_at=_iso(expires_at),
            days=days,
            messages=messages,
        )

    def key_reminders_sent(self) -> set[tuple[str, str, int]]:
        """(fingerprint, expiry as recorded, days) of every expiry reminder sent (``key.reminder``
        audit events), so each goes out once even when the loader runs again: see
        :meth:`key_reminder_sent`."""
        with self.db.session() as session:
            details = session.scalars(
                select(AuditEvent.detail).where(AuditEvent.action == KEY_REMINDER)
            ).all()
        sent = set()
        for text in details:
            detail = json.loads(text)
            sent.add((str(detail["fingerprint"]), str(detail["expires_at"]), int(detail["days"])))
        return sent

    @staticmethod
    def key_reminder_sent(
        sent: set[tuple[str, str, int]], fingerprint: str, expires_at: datetime, days: int
    ) -> bool:
        """Is the reminder (or a later one) for this key and expiry among ``sent``?"""
        expiry = _iso(expires_at)
        return any(f == fingerprint and e == expiry and d <= days for f, e, d in sent)

    # -- server-side lookups ----------------------------------------------------------------

    def login_view(self, name: str) -> LoginView | None:
        with self.db.session() as session:
            account = session.scalar(select(Account).where(Account.name == name))
            if account is None:
                return None
            return LoginView(
                name=account.name,
                active=account.active,
                public_keys=[k.public_key for k in account.keys],
                ips=frozenset(ip.address for ip in account.ips),
                key_added={k.public_key: k.added_at for k in account.keys},
            )

    def is_allowed_anywhere(self, address: str) -> bool:
        """Is ``address`` on the allowlist of at least one active account (the IP gate)?"""
        with self.db.session() as session:
            found = session.scalar(
                select(AccountIp.id)
                .join(Account)
                .where(AccountIp.address == address, Account.status == "active")
                .limit(1)
            )
            return found is not None
