"""Feed figures for Prometheus, read at scrape time from the databases and the folders.

The load history (the SIS database's ``loads`` table) and the approved specs (the control DB)
are shared by every node, so these figures are the same whichever node is scraped, and
right after a restart, a manual ``ingestctl loader run`` or a load on another node. Only
specs approved for active accounts are reported, so a removed account leaves no series
behind.

- ``sis_ingest_last_successful_load_timestamp_seconds{account,spec}``: when the spec last
  loaded (no series for a spec never loaded);
- ``sis_ingest_missed_runs{account,spec}``: runs since its last successful load that loaded
  nothing (no file, refused, failed or interrupted), 0 right after a load;
- ``sis_ingest_failed_runs{account,spec}``: the latest runs in a row whose file was refused
  or failed to load (a run with no file ends the streak);
- ``sis_ingest_unloaded_files{account}``: complete files waiting in the account's folder;
- ``sis_ingest_feed_metrics_up``: 1 if the above could be read, 0 if a database could not
  (the figures are then left out, and the scrape still answers).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import and_, case, func, select

from ingest_core.db import Account, FileSpec, open_control_db
from ingest_core.folders import account_folder
from ingest_core.settings import Settings
from ingest_core.structured_log import get_logger, log_limits
from loader.sis_db import FAILED, INTERRUPTED, LOADED, NO_FILE, REFUSED, RUNNING, open_sis_db

FAILING = (REFUSED, FAILED, INTERRUPTED)


def approved_specs(settings: Settings) -> dict[str, list[str]]:
    """Active accounts and the file names of their approved specs."""
    db = open_control_db(settings.control_db_url)
    found: dict[str, list[str]] = {}
    with db.session() as session:
        for name in session.scalars(select(Account.name).where(Account.status == "active")):
            found[name] = []
        rows = session.execute(
            select(Account.name, FileSpec.file_name)
            .join(FileSpec, FileSpec.account_id == Account.id)
            .where(Account.status == "active")
            .order_by(Account.name, FileSpec.id)
        )
        for account, spec in rows:
            found[account].append(spec)
    return found


def load_history(settings: Settings) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (account, spec): ``last_ok`` (datetime or None), ``missed`` and ``failing`` runs."""
    db = open_sis_db(settings.sis_db_url)
    loads = db.tables.loads
    marks = (
        select(
            loads.c.account,
            loads.c.spec_file,
            func.coalesce(func.max(case((loads.c.status == LOADED, loads.c.id))), 0).label("ok"),
            func.coalesce(
                func.max(case((loads.c.status.in_((LOADED, NO_FILE)), loads.c.id))), 0
            ).label("clean"),
        )
        .group_by(loads.c.account, loads.c.spec_file)
        .subquery()
    )
    same_spec = and_(loads.c.account == marks.c.account, loads.c.spec_file == marks.c.spec_file)
    counts = (
        select(
            loads.c.account,
            loads.c.spec_file,
            func.sum(case((and_(loads.c.id > marks.c.ok, loads.c.status != RUNNING), 1), else_=0)),
            func.sum(
                case((and_(loads.c.id > marks.c.clean, loads.c.status.in_(FAILING)), 1), else_=0)
            ),
        )
        .join(marks, same_spec)
        .group_by(loads.c.account, loads.c.spec_file)
    )
    last_ok = select(loads.c.account, loads.c.spec_file, loads.c.finished, loads.c.started).join(
        marks, loads.c.id == marks.c.ok
    )
    history: dict[tuple[str, str], dict[str, Any]] = {}
    with db.engine.connect() as conn:
        for account, spec, missed, failing in conn.execute(counts):
            history[(account, spec)] = {
                "last_ok": None,
                "missed": int(missed or 0),
                "failing": int(failing or 0),
            }
        for account, spec, finished, started in conn.execute(last_ok):
            entry = history.setdefault((account, spec), {"missed": 0, "failing": 0})
            entry["last_ok"] = finished or started
    return history


class FeedCollector(Collector):
    """The figures above, read at each scrape (blocking: scrape in a thread)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.log = get_logger(settings.log_dir, "server", **log_limits(settings))

    def describe(self) -> list[Any]:
        return []  # read at scrape time only, never at registration

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily(
            "sis_ingest_feed_metrics_up",
            "1 if the feed figures could be read from the databases at this scrape, else 0",
        )
        try:
            families = list(self._families())
        except Exception as exc:  # a database down must not break the scrape
            self.log.error("metrics.feeds_failed", error=f"{type(exc).__name__}: {exc}"[:500])
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> Iterator[Any]:
        specs = approved_specs(self.settings)
        history = load_history(self.settings)
        labels = ["account", "spec"]
        last_ok = GaugeMetricFamily(
            "sis_ingest_last_successful_load_timestamp_seconds",
            "When the spec's file last loaded (Unix time)",
            labels=labels,
        )
        missed = GaugeMetricFamily(
            "sis_ingest_missed_runs",
            "Runs since the spec's last successful load that loaded nothing",
            labels=labels,
        )
        failing = GaugeMetricFamily(
            "sis_ingest_failed_runs",
            "The latest runs in a row whose file was refused or failed to load",
            labels=labels,
        )
        waiting = GaugeMetricFamily(
            "sis_ingest_unloaded_files",
            "Complete files waiting in the account's folder (not loaded yet)",
            labels=["account"],
        )
        for account, files in specs.items():
            for spec in files:
                entry = history.get((account, spec), {})
                if entry.get("last_ok") is not None:
                    last_ok.add_metric([account, spec], entry["last_ok"].timestamp())
                missed.add_metric([account, spec], entry.get("missed", 0))
                failing.add_metric([account, spec], entry.get("failing", 0))
            waiting.add_metric(
                [account], len(account_folder(self.settings, account).candidate_files())
            )
        yield from (last_ok, missed, failing, waiting)
