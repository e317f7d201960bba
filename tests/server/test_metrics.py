"""Prometheus metrics: a real Prometheus scrapes the admin listener of a
real `ingestctl serve` with two workers while uploads and a load happen; promtool checks the
exposition and the shipped alerting rules; /healthz says whether the server serves."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import server_harness
from server_harness import INGESTCTL, REPO, RunningServer, free_port, sftp_batch, wait_until

from ingest_core import metrics

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
ALERTS = REPO / "deploy" / "prometheus-alerts.yml"
SAMPLE = "person_id\tfirst_name\tlast_name\r\nA1\tAda\tLovelace\r\nA2\tAlan\tTuring\r\n"
SPEC = "sis_hr_user_info.txt"
WAIT = 60.0

needs_prometheus = pytest.mark.skipif(
    not (PROMETHEUS and PROMTOOL),
    reason="needs the Debian package prometheus (deploy/install-system-deps.sh)",
)


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=20) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError as exc:  # not listening (yet)
        return 0, str(exc.reason)


class Prometheus:
    """A real Prometheus on loopback scraping one target every second, with our rules."""

    def __init__(self, workdir: Path, target: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {ALERTS}\n"
            "scrape_configs:\n  - job_name: sis-ingest\n"
            f"    static_configs:\n      - targets: ['{target}']\n",
            encoding="utf-8",
        )
        self.log = workdir / "prometheus.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [
                    str(PROMETHEUS),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=log,
                cwd=workdir,
            )
        self.url = f"http://127.0.0.1:{port}"

    def query(self, expr: str) -> list[dict[str, Any]]:
        code, body = http_get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        if code != 200:
            return []
        return json.loads(body)["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def wait_for(self, expr: str, expected: float) -> None:
        """Until the query gives ``expected`` (bounded; the scrape interval is 1 s)."""
        deadline = time.monotonic() + WAIT
        while (got := self.value(expr)) != expected:
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{expr}: expected {expected}, Prometheus says {got}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def serving(
    tmp_path: Path, alpha_key: Path
) -> Iterator[tuple[RunningServer, int, subprocess.Popen[bytes]]]:
    """`ingestctl serve` with 2 workers and the admin listener; a spec whose file waits in the
    folder and a nightly load "missed" while it was down, so the load runs at start."""
    from ingest_core.registry import Registry
    from loader.approval import approve_spec
    from loader.daemon import LOAD_JOB, write_last_done

    admin = free_port()
    running = server_harness.start_server(
        tmp_path / "srv",
        {
            "server": {"workers": 2},
            "admin": {"port": admin},
            "limits": {"max_file_bytes": 65536, "connection_rate_per_address": 0},
            "defender": {"score_bad_key": 3, "threshold": 6},
        },
        launch=False,
    )
    server_harness.add_account(running, "alpha", alpha_key, ips=("127.0.0.1", "127.0.0.2"))
    settings = running.settings()
    sample = tmp_path / SPEC
    sample.write_text(SAMPLE, encoding="utf-8")
    approve_spec(Registry(settings, actor="test"), "alpha", sample, key="person_id")
    folder = running.folder("alpha")
    (folder / ".ingest-upload-x").write_text(SAMPLE, encoding="utf-8")
    (folder / ".ingest-upload-x").rename(folder / SPEC)  # as the server lands an upload
    write_last_done(settings, LOAD_JOB, "2000-01-01")  # so the start catches up once
    env = {k: v for k, v in os.environ.items() if k != metrics.MULTIPROC_ENV}
    with open(running.workdir / "serve.log", "wb") as log:
        process = subprocess.Popen(
            [*INGESTCTL, "--config", str(running.config), "serve"],
            cwd=running.workdir,
            stdout=log,
            stderr=log,
            env={**env, "PYTHONPATH": str(REPO)},
        )
    try:
        wait_until(lambda: running.events("admin.started"), WAIT, "the admin listener")
        wait_until(lambda: running.events("server.started"), WAIT, "the server")
        yield running, admin, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@needs_prometheus
def test_prometheus_scrapes_every_process_of_the_node(
    serving: tuple[RunningServer, int, subprocess.Popen[bytes]],
    tmp_path: Path,
    alpha_key: Path,
    beta_key: Path,
) -> None:
    running, admin, process = serving
    prometheus = Prometheus(tmp_path / "prom", f"127.0.0.1:{admin}")
    try:
        prometheus.wait_for('up{job="sis-ingest"}', 1)
        code, health = http_get(f"http://127.0.0.1:{admin}/healthz")
        assert code == 200 and json.loads(health)["status"] == "serving"
        prometheus.wait_for("sis_ingest_serving", 1)

        # The load that runs at start, in the loader's child process.
        prometheus.wait_for('sis_ingest_loads_total{account="alpha",status="loaded"}', 1)
        prometheus.wait_for('sis_ingest_loaded_rows_total{account="alpha"}', 2)
        prometheus.wait_for("sis_ingest_load_duration_seconds_count", 1)
        prometheus.wait_for(f'sis_ingest_missed_runs{{account="alpha",spec="{SPEC}"}}', 0)
        last = prometheus.value(
            f'sis_ingest_last_successful_load_timestamp_seconds{{account="alpha",spec="{SPEC}"}}'
        )
        assert last is not None and abs(last - datetime.now(UTC).timestamp()) < 3600

        # Uploads, one after another: the listener hands them to its workers in turn.
        sizes = [1000, 2000, 3000, 4000]
        for number, size in enumerate(sizes):
            server_harness.write_random(tmp_path / f"upload_{number}.txt", size)
            put = f"put {tmp_path / f'upload_{number}.txt'}\n"
            sftp_batch(running, alpha_key, "alpha", put, check=True)
        received = running.events("file.received")
        assert len({e["pid"] for e in received}) == 2, "the uploads did not land on both workers"
        prometheus.wait_for("sum(sis_ingest_files_received_total)", len(sizes))
        prometheus.wait_for('sis_ingest_received_bytes_total{account="alpha"}', sum(sizes))
        prometheus.wait_for('sis_ingest_logins_succeeded_total{account="alpha"}', len(sizes))
        prometheus.wait_for('sis_ingest_unloaded_files{account="alpha"}', len(sizes))

        # A file over [limits] max_file_bytes: a limit hit, and the upload discarded.
        server_harness.write_random(tmp_path / "big.txt", 100_000)
        big = sftp_batch(running, alpha_key, "alpha", f"put {tmp_path / 'big.txt'}\n")
        assert big.returncode != 0
        prometheus.wait_for('sis_ingest_limits_hit_total{kind="max_file_bytes"}', 1)
        prometheus.wait_for('sis_ingest_uploads_discarded_total{reason="limit"}', 1)

        # Two sessions at once, one on each worker: the gauge adds up the live processes.
        held = [server_harness.login(running, alpha_key) for _ in range(2)]
        try:
            prometheus.wait_for("sis_ingest_active_sessions", 2)
        finally:
            for transport in held:
                transport.close()
        prometheus.wait_for("sis_ingest_active_sessions", 0)

        # A wrong key twice from 127.0.0.2: two failed logins, a ban, then a refusal.
        for _ in range(2):
            bad = sftp_batch(running, beta_key, "alpha", "ls\n", bind="127.0.0.2")
            assert bad.returncode != 0
        running.wait_for_event("defender.ban", timeout=WAIT, address="127.0.0.2")
        assert sftp_batch(running, alpha_key, "alpha", "ls\n", bind="127.0.0.2").returncode != 0
        prometheus.wait_for('sis_ingest_logins_failed_total{reason="key_not_registered"}', 2)
        prometheus.wait_for("sis_ingest_bans_total", 1)
        prometheus.wait_for('sis_ingest_connections_refused_total{reason="banned"}', 1)
        admitted = prometheus.value("sis_ingest_connections_admitted_total")
        assert admitted is not None and admitted >= len(sizes) + 5

        # The exposition itself: promtool's lint, our naming rules, no addresses, no file names.
        code, text = http_get(f"http://127.0.0.1:{admin}/metrics")
        assert code == 200
        check = subprocess.run(
            [str(PROMTOOL), "check", "metrics"], input=text, capture_output=True, text=True
        )
        assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr
        names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
        assert names and all(n.startswith("sis_ingest_") for n in names), names
        assert "127.0.0." not in text and "upload_" not in text and "big.txt" not in text
        # every rule loaded, and the node is not reported down
        rules = json.loads(http_get(f"{prometheus.url}/api/v1/rules")[1])["data"]["groups"]
        assert sum(len(g["rules"]) for g in rules) == 6
        assert prometheus.query('ALERTS{alertname="SisIngestNodeDown"}') == []
    finally:
        prometheus.stop()
    process.send_signal(signal.SIGTERM)
    assert process.wait(90) == 0, (running.workdir / "serve.log").read_text()[-2000:]


@needs_prometheus
def test_the_shipped_alerting_rules_pass_promtool() -> None:
    check = subprocess.run(
        [str(PROMTOOL), "check", "rules", str(ALERTS)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 6 rules found" in check.stdout


@pytest.fixture
def private_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo what an admin listener in this process does to the process (the multiprocess
    folder in the environment, prometheus_client's value class, our metric objects)."""
    from prometheus_client import values

    monkeypatch.setenv(metrics.MULTIPROC_ENV, "unset-after-the-test")
    monkeypatch.setattr(values, "ValueClass", values.ValueClass)
    monkeypatch.setattr(metrics, "_metrics", None)


def test_healthz_is_503_until_serving_and_metrics_read_every_process_file(
    tmp_path: Path, private_metrics: None
) -> None:
    from ingest_core.settings import settings_from_mapping
    from ingest_core.structured_log import get_logger
    from ingest_server.admin import AdminListener

    port = free_port()
    settings = settings_from_mapping(
        {"data_root": "var", "log_dir": "logs", "admin": {"port": port}}, tmp_path
    )
    settings.data_root.mkdir()
    from loader.feed_metrics import FeedCollector  # what the CLI gives the server

    collectors = [FeedCollector(settings)]
    listener = AdminListener(settings, get_logger(settings.log_dir, "server"), collectors)
    assert os.environ[metrics.MULTIPROC_ENV] == listener.folder
    # a worker's counts: another process writing into the same folder
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from ingest_core import metrics; metrics.file_received('alpha', 5); "
            "metrics.connection_refused('server full (3 connections)')",
        ],
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    metrics.file_received("alpha", 7)  # and this process's own
    state = {"serving": False}

    async def scenario() -> list[tuple[int, str]]:
        await listener.start(lambda: state["serving"])
        base = f"http://127.0.0.1:{port}"
        answers = [await asyncio.to_thread(http_get, f"{base}/healthz")]
        state["serving"] = True
        answers.append(await asyncio.to_thread(http_get, f"{base}/healthz"))
        answers.append(await asyncio.to_thread(http_get, f"{base}/metrics"))
        answers.append(await asyncio.to_thread(http_get, f"{base}/nothing"))
        await listener.stop()
        return answers

    unhealthy, healthy, scraped, missing = asyncio.run(scenario())
    assert unhealthy[0] == 503 and json.loads(unhealthy[1])["problems"] == ["not serving"]
    assert healthy[0] == 200 and json.loads(healthy[1]) == {"status": "serving", "problems": []}
    assert missing[0] == 404
    code, text = scraped
    assert code == 200
    assert 'sis_ingest_files_received_total{account="alpha"} 2.0' in text
    assert 'sis_ingest_received_bytes_total{account="alpha"} 12.0' in text
    assert 'sis_ingest_connections_refused_total{reason="server_full"} 1.0' in text
    assert "sis_ingest_serving 1.0" in text
    assert "sis_ingest_feed_metrics_up 1.0" in text


def test_missed_and_failed_runs_come_from_the_load_history(tmp_path: Path) -> None:
    from ingest_core.registry import Registry
    from ingest_core.settings import settings_from_mapping
    from loader.approval import approve_spec
    from loader.feed_metrics import FeedCollector
    from loader.sis_db import FAILED, LOADED, NO_FILE, REFUSED, open_sis_db

    settings = settings_from_mapping({"data_root": "var", "log_dir": "logs"}, tmp_path)
    settings.data_root.mkdir()
    registry = Registry(settings, actor="test")
    for name in ("alpha", "beta", "gone"):
        registry.create_account(name)
    (settings.data_root / "accounts" / "alpha").mkdir(parents=True, exist_ok=True)
    sample = tmp_path / SPEC
    sample.write_text(SAMPLE, encoding="utf-8")
    for name in ("alpha", "beta", "gone"):
        approve_spec(registry, name, sample)
    registry.set_status("gone", "disabled")
    (settings.data_root / "accounts" / "alpha" / "stray.txt").write_text("x")
    db = open_sis_db(settings.sis_db_url)

    def runs(account: str, *statuses: str) -> None:
        for status in statuses:
            db.record(account, SPEC, "t", status, "")

    runs("alpha", NO_FILE, LOADED, NO_FILE, REFUSED, FAILED)  # late 3 runs, failing 2
    runs("beta", LOADED, REFUSED, NO_FILE)  # late 2 runs, a no-file run ends the failures
    runs("gone", LOADED, NO_FILE, NO_FILE, NO_FILE)  # disabled: not reported

    found: dict[tuple[str, tuple[str, ...]], float] = {}
    for family in FeedCollector(settings).collect():
        for sample_ in family.samples:
            found[(sample_.name, tuple(sample_.labels.values()))] = sample_.value
    assert found[("sis_ingest_feed_metrics_up", ())] == 1
    assert found[("sis_ingest_missed_runs", ("alpha", SPEC))] == 3
    assert found[("sis_ingest_failed_runs", ("alpha", SPEC))] == 2
    assert found[("sis_ingest_missed_runs", ("beta", SPEC))] == 2
    assert found[("sis_ingest_failed_runs", ("beta", SPEC))] == 0
    assert found[("sis_ingest_unloaded_files", ("alpha",))] == 1
    assert ("sis_ingest_last_successful_load_timestamp_seconds", ("alpha", SPEC)) in found
    assert not any("gone" in labels for _name, labels in found)


@pytest.mark.parametrize(
    ("refusal", "reason"),
    [
        ("banned by the defender", "banned"),
        ("address not on any active account's allowlist", "not_allowed"),
        ("too many new connections from this address (10/s)", "rate_limited"),
        ("server full (200 connections)", "server_full"),
        ("too many connections from this address (10)", "per_address_limit"),
        ("registry unavailable", "registry_unavailable"),
        ("PROXY: bad header", "proxy_header"),
        ("no server worker available", "no_worker"),
        ("something new", "other"),
    ],
)
def test_refusals_are_counted_by_a_fixed_reason(refusal: str, reason: str) -> None:
    assert metrics.classify(refusal, metrics.REFUSAL_REASONS) == reason


def test_metric_calls_never_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> Any:
        raise OSError("the metrics folder is gone")

    monkeypatch.setattr(metrics, "_m", broken)
    calls: list[Callable[[], None]] = [
        lambda: metrics.file_received("alpha", 1),
        lambda: metrics.load_finished("alpha", "loaded", 1, 0.5),
        lambda: metrics.connection_refused("banned"),
    ]
    for call in calls:
        call()
