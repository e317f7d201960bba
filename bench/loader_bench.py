"""Loader benchmark: validate + load + swap against the databases' own bulk import tools.

Generates an N-row x 20-column tab-delimited file (default 1,000,000 rows) and measures, in
the same run and on the same file:

- the validator alone (``loader.validate.validate_file``);
- the loader into SQLite (``loader.nightly.load_file``: validate + staging load + swap)
  against ``sqlite3 .import`` of the same file into a fresh table;
- the loader into PostgreSQL against ``psql \\copy`` of the same file into a fresh table;
- for comparison, the loader without a key column (no uniqueness check, no index) on both
  backends, and ``psql \\copy`` followed by the loader's key index (PostgreSQL): the loader
  builds that index and ``\\copy`` does not, so this is the like-for-like figure;
- the loader on a second load, of a slightly changed copy of the file (1% of the rows gone,
  2% changed in one column, 1% new), over the table the first one loaded: the load then
  compares the staged rows with the live ones by key (what changed), and the comparison's
  own time is reported as a share of that load's (target <= 25% at 1M rows), per database
  and in a summary at the end (medians over the rounds).

Each measurement runs in its own child process, so its peak memory (``ru_maxrss`` from
``os.wait4``) is its own. Targets: SQLite >= 0.6x ``.import``; PostgreSQL >= 1.0x, median of
5 rounds, of ``\\copy`` plus the same UNIQUE key index in one transaction (equal work: the
loader builds that index, plain ``\\copy`` does not); peak memory < 200 MB at 1M rows and
no growth with file size beyond the key index (run with ``--rows 5000000`` to see it).

    .venv/bin/python bench/loader_bench.py [--rows N] [--repeat N] [--no-postgres] [--no-sqlite]
        [--compare-only] [--shuffled] [--workdir DIR]

``--shuffled`` writes the rows in a fixed random order instead of key order (the changed
copy keeps that order, as a source system's next export would): the live table is then not
in key order, which the PostgreSQL comparison plans differently. ``--compare-only`` runs
just the changed file's load (after an untimed load of the original in the same database)
and prints the comparison's share.

On a shared machine use --repeat 3 or more: each step prints its best time (the least
disturbed) and its median, and each ratio is given on both.

PostgreSQL: the machine's cluster is started if needed (``pg_ctlcluster 15 main start``) and a
throw-away database is created and dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

COLUMNS = ("UUUID", *(f"Col_{i:02d}" for i in range(1, 20)))
ACCOUNT = "bench"
FILE_NAME = "sis_hr_user_info.txt"


def tty_progress(label: str, done: int, total: int) -> None:
    if sys.stderr.isatty():
        sys.stderr.write(f"\r  {label}: {done:,}/{total:,} rows ({100 * done // total}%)   ")
        sys.stderr.flush()


def tty_done() -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r" + " " * 70 + "\r")
        sys.stderr.flush()


def generate(path: Path, rows: int, shuffled: bool = False) -> None:
    """Realistic-looking rows: a UUUID key, names with spaces, e-mails, dates, codes.

    In key order (an export sorted by ID, as most are), or ``shuffled``: the same rows in
    a fixed random order (IDs exported by name, or in the order the source system keeps)."""
    step = 50_000
    order: list[int] | range = range(rows)
    if shuffled:
        order = list(order)
        random.Random(rows).shuffle(order)
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write("\t".join(COLUMNS) + "\n")
        for start in range(0, rows, step):
            lines = []
            for i in order[start : start + step]:
                k = i % 9973
                lines.append(
                    f"{uuid.UUID(int=i * 2654435761 % (1 << 128))}\tFirst{k}\tvan der Last{k}\t"
                    f"user{i}@example.edu\t19{70 + k % 30}-0{1 + k % 9}-1{k % 10}\tMain Campus\t"
                    f"Computer Science {k % 7}\tBSc\t{k % 5}\tFull time\t{k}\t"
                    f"+1 555 01{k:04d}\t{k % 50} Elm Street\tSpringfield\tIL\t627{k % 100:02d}\t"
                    f"US\tActive\t2026-0{1 + k % 9}-01\tnote {k}\n"
                )
            out.write("".join(lines))
            tty_progress("generating", min(start + step, rows), rows)
    tty_done()


# -- child processes --------------------------------------------------------------------------


def child_validate(path: Path) -> dict[str, object]:
    from loader.validate import validate_file

    start = time.perf_counter()
    report = validate_file(path, bench_spec())
    elapsed = time.perf_counter() - start
    return {"rows": report.rows, "seconds": elapsed, "ok": report.ok}


def generate_changed(source: Path, target: Path) -> tuple[int, int, int]:
    """A slightly changed copy of ``source``: of each 100 rows, 1 gone, 2 changed (one
    column), 1 new row added. Returns (added, removed, changed), what the load must count."""
    added = removed = changed = 0
    with (
        source.open(encoding="utf-8", newline="") as src,
        target.open("w", encoding="utf-8", newline="") as out,
    ):
        out.write(next(src))
        for i, line in enumerate(src):
            if i % 100 == 7:
                removed += 1
                continue
            key, rest = line.split("\t", 1)
            if i % 50 == 3:
                out.write(f"{key}\tchanged {rest}")
                changed += 1
            else:
                out.write(line)
            if i % 100 == 11:  # a key the original never has (it numbers from 0 up)
                out.write(f"{uuid.UUID(int=(1 << 127) + i)}\t{rest}")
                added += 1
    return added, removed, changed


def child_load(path: Path, sis_url: str, data_root: Path) -> dict[str, object]:
    from ingest_core.settings import settings_from_mapping
    from loader import sis_db
    from loader.nightly import load_file
    from loader.sis_db import open_sis_db

    compare_seconds = 0.0
    compare = sis_db.SisDB._compare

    def timed_compare(self, *args, **kwargs):  # the comparison's share of the load
        nonlocal compare_seconds
        start = time.perf_counter()
        try:
            return compare(self, *args, **kwargs)
        finally:
            compare_seconds += time.perf_counter() - start

    sis_db.SisDB._compare = timed_compare  # type: ignore[method-assign]

    settings = settings_from_mapping(
        {"data_root": str(data_root), "log_dir": str(data_root / "logs"), "sis_db_url": sis_url},
        data_root,
        "bench",
    )
    db = open_sis_db(sis_url)  # schema creation is not part of the load
    total = int(os.environ.get("BENCH_ROWS", "0")) or 1
    start = time.perf_counter()
    result = load_file(
        settings,
        bench_spec(),
        path,
        force=True,
        progress=lambda n: tty_progress("loading", n, total),
        db=db,
    )
    elapsed = time.perf_counter() - start
    tty_done()
    changes = result.changes
    return {"rows": result.rows, "seconds": elapsed, "ok": result.status == "loaded",
            "message": result.message, "compare_seconds": compare_seconds,
            "changes": [changes.added, changes.removed, changes.changed] if changes else None,
            }  # fmt: skip


def bench_spec():
    from loader.spec import Spec

    keyed = os.environ.get("BENCH_NO_KEY") != "1"
    return Spec(
        account=ACCOUNT,
        file_name=FILE_NAME,
        encoding="utf-8",
        bom=False,
        delimiter="\t",
        terminator="\n",
        quoting="none",
        columns=COLUMNS,
        key_column="UUUID" if keyed else None,
    )


# -- the parent -------------------------------------------------------------------------------


def run_child(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """Run a child; returns (wall seconds, peak RSS in KiB, stdout)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{out}")
    return elapsed, usage.ru_maxrss, out


def python_child(
    mode: str, *args: str, rows: int, keyed: bool = True
) -> tuple[dict[str, object], int]:
    env = {**os.environ, "BENCH_ROWS": str(rows), "PYTHONPATH": str(REPO)}
    env["BENCH_NO_KEY"] = "0" if keyed else "1"
    _, rss, out = run_child([sys.executable, __file__, "--child", mode, *args], env)
    return json.loads(out.strip().splitlines()[-1]), rss


def loader_child(
    data: Path,
    url: str,
    work: Path,
    rows: int,
    keyed: bool,
    changes: tuple[int, int, int] | None = None,
    compared: list[tuple[float, float]] | None = None,
) -> tuple[float, int]:
    """One load of ``data`` into ``url`` in a child process: (seconds, peak RSS in KiB).
    With ``changes``: the counts the load must report; its (comparison, load) seconds are
    appended to ``compared``."""
    result, rss = python_child("load", str(data), url, str(work), rows=rows, keyed=keyed)
    assert result["ok"], result
    if changes is not None:
        assert result["changes"] == list(changes), (result["changes"], changes)
    if compared is not None:
        compared.append((float(result["compare_seconds"]), float(result["seconds"])))
    return float(result["seconds"]), rss


Share = tuple[float, float, float]  # median share, median comparison s, median load s


def compare_share(label: str, compared: list[tuple[float, float]]) -> Share:
    """Print the comparison's time, and its share of the load's, over the rounds (best,
    median); returns the medians."""
    seconds = [c for c, _ in compared]
    shares = [c / total for c, total in compared]
    print(
        f"  comparison in {label}: {min(seconds):.2f} s (median {statistics.median(seconds):.2f}"
        f" s), {min(shares):.0%} of the load (median {statistics.median(shares):.0%}; "
        "target <= 25%)"
    )
    loads = [total for _, total in compared]
    return statistics.median(shares), statistics.median(seconds), statistics.median(loads)


def share_summary(rows: int, shares: dict[str, Share], rounds: int) -> None:
    """The comparison's share of the changed file's load, one line per database."""
    print(
        f"comparison's share of a {rows:,}-row load (the changed file's; median of {rounds}; "
        "target <= 25%):"
    )
    for name, (share, compare, load) in shares.items():
        verdict = "ok" if share <= 0.25 else "OVER TARGET"
        print(f"  {name:<11} {share:4.0%}  ({compare:.2f} s of {load:.2f} s)  {verdict}")


def sqlite_import(path: Path, db: Path) -> tuple[float, int]:
    """``sqlite3 .import`` into a fresh table (the header row names the columns)."""
    script = f".mode tabs\n.import {path} t\n"
    start = time.perf_counter()
    proc = subprocess.Popen(["sqlite3", str(db)], stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(script.encode())
    proc.stdin.close()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit("sqlite3 .import failed")
    return time.perf_counter() - start, usage.ru_maxrss


def pg_start() -> None:
    def ready() -> bool:
        return subprocess.run(["pg_isready", "-q"], capture_output=True).returncode == 0

    if not ready():
        subprocess.run(["pg_ctlcluster", "15", "main", "start"], capture_output=True)
        for _ in range(100):
            if ready():
                break
            time.sleep(0.1)
    if not ready():
        raise SystemExit("PostgreSQL did not start (pg_ctlcluster 15 main start)")
    if os.geteuid() == 0:
        user = os.environ.get("USER") or "root"
        subprocess.run(["su", "postgres", "-c", f"createuser -s {user}"], capture_output=True)


def psql_copy(path: Path, database: str, key_index: bool = False) -> tuple[float, int]:
    """``psql \\copy`` into a fresh table, in one transaction like the loader's; with
    ``key_index``, the loader's index on the key column too (same collation)."""
    cols = ", ".join(f'"{c}" text' + (' COLLATE "C"' if c == "UUUID" else "") for c in COLUMNS)
    index = 'CREATE UNIQUE INDEX copy_target_key ON copy_target ("UUUID");\n' if key_index else ""
    script = (
        f"BEGIN;\nCREATE TABLE copy_target ({cols});\n"
        f"\\copy copy_target FROM '{path}' WITH (FORMAT text, HEADER true)\n{index}COMMIT;\n"
    )
    start = time.perf_counter()
    proc = subprocess.Popen(
        ["psql", "-q", "-v", "ON_ERROR_STOP=1", "-d", database], stdin=subprocess.PIPE
    )
    assert proc.stdin is not None
    proc.stdin.write(script.encode())
    proc.stdin.close()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit("psql \\copy failed")
    return time.perf_counter() - start, usage.ru_maxrss


def mb(kib: int) -> str:
    return f"{kib / 1024:,.0f} MB"


def status(label: str) -> None:
    """Settle the disks (so one step's writeback does not slow the next), then say on a
    terminal what runs now (the result line overwrites it)."""
    os.sync()
    if sys.stderr.isatty():
        sys.stderr.write(f"\r  {label} ...")
        sys.stderr.flush()


def line(label: str, rows: int, seconds: float, rss_kib: int, note: str = "") -> None:
    tty_done()
    print(
        f"  {label:<38} {seconds:7.2f} s  {rows / seconds:>10,.0f} rows/s  "
        f"peak {mb(rss_kib):>7}{note}",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, help="where to put the file and the databases")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--no-sqlite", action="store_true", help="PostgreSQL only")
    parser.add_argument(
        "--repeat", type=int, default=1, help="run each step N times (best and median)"
    )
    parser.add_argument(
        "--compare-only",
        action="store_true",
        help="only the changed file's load and the comparison's share of it",
    )
    parser.add_argument(
        "--shuffled",
        action="store_true",
        help="rows in a random order instead of key order (the comparison's harder case)",
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        mode, *rest = args.child
        if mode == "validate":
            print(json.dumps(child_validate(Path(rest[0]))))
        elif mode == "generate":  # in a child: the shuffled order's list stays out of the
            # parent, whose size every later child starts from (and ru_maxrss counts)
            generate(Path(rest[0]), int(rest[2]), rest[3] == "shuffled")
            print(json.dumps(generate_changed(Path(rest[0]), Path(rest[1]))))
        else:
            print(json.dumps(child_load(Path(rest[0]), rest[1], Path(rest[2]))))
        return 0

    work = Path(args.workdir or tempfile.mkdtemp(prefix="loader-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / FILE_NAME
    rows = args.rows
    order = "a random order" if args.shuffled else "key order"
    print(
        f"loader benchmark: {rows:,} rows x {len(COLUMNS)} columns, tab-delimited, in {order}, "
        f"in {work}; best of {args.repeat}"
    )
    (work / "changed").mkdir(exist_ok=True)
    changed = work / "changed" / FILE_NAME  # the spec's name: a second night's file
    layout = "shuffled" if args.shuffled else "sorted"
    generated, _ = python_child("generate", str(data), str(changed), str(rows), layout, rows=rows)
    changes: tuple[int, int, int] = tuple(generated)  # type: ignore[assignment]
    print(f"  file: {data.stat().st_size / 1e6:,.0f} MB; CPUs: {os.cpu_count()}")
    print(f"  changed copy: {changes[0]:,} new, {changes[1]:,} gone, {changes[2]:,} changed")
    peaks: dict[str, int] = {}

    def rounds(steps: list[tuple[str, Callable[[], tuple[float, int]]]]) -> Times:
        """Run the steps in turn, ``--repeat`` rounds (interleaved, so a busy moment on the
        machine hits every step alike); print each step's best and median time and largest
        peak."""
        results: dict[str, list[tuple[float, int]]] = {label: [] for label, _ in steps}
        for _ in range(args.repeat):
            for label, measure in steps:
                status(label)
                results[label].append(measure())
        times: Times = {}
        for label, got in results.items():
            seconds = [s for s, _ in got]
            times[label] = (min(seconds), statistics.median(seconds))
            peaks[label] = max(rss for _, rss in got)
            note = f"  (median {times[label][1]:.2f} s)" if len(got) > 1 else ""
            line(label, rows, times[label][0], peaks[label], note)
        return times

    def validate() -> tuple[float, int]:
        result, rss = python_child("validate", str(data), rows=rows)
        assert result["ok"], result
        return float(result["seconds"]), rss

    if not args.compare_only:
        rounds([("validation only", validate)])

    shares: dict[str, Share] = {}
    if not args.no_sqlite:
        shares["SQLite"] = sqlite_rounds(
            work, data, rows, rounds, changed, changes, args.compare_only
        )
    if not args.no_postgres:
        shares["PostgreSQL"] = postgres_rounds(
            work, data, rows, rounds, changed, changes, args.compare_only
        )

    share_summary(rows, shares, args.repeat)
    loader_peaks = [rss for label, rss in peaks.items() if label.startswith("loader")]
    print(f"peak memory of the loader: {mb(max(loader_peaks))} (target < 200 MB at 1M rows)")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    else:
        shutil.rmtree(work / "changed", ignore_errors=True)
    return 0


Times = dict[str, tuple[float, float]]  # label -> (best, median) seconds
Rounds = Callable[[list[tuple[str, Callable[[], tuple[float, int]]]]], Times]


def ratio(label: str, times: Times, reference: str, ours: str, target: str = "") -> None:
    """How fast ``ours`` is against ``reference`` (above 1: faster), on best and median."""
    best = times[reference][0] / times[ours][0]
    median = times[reference][1] / times[ours][1]
    print(f"  ratio {label}: {best:.2f}x (median {median:.2f}x){target}")


def sqlite_rounds(
    work: Path,
    data: Path,
    rows: int,
    rounds: Rounds,
    changed: Path,
    changes: tuple[int, int, int],
    compare_only: bool = False,
) -> Share:
    """The loader, then the CLI's .import into a fresh database file."""
    version = subprocess.run(["sqlite3", "--version"], capture_output=True, text=True).stdout
    print(f"SQLite ({version.split()[0]})")

    def fresh(name: str) -> Path:
        for old in work.glob(f"{name}*"):
            old.unlink()
        return work / name

    def sqlite_load(db: Path, keyed: bool = True) -> tuple[float, int]:
        return loader_child(data, f"sqlite:///{db}", work, rows, keyed)

    compared: list[tuple[float, float]] = []

    def second_load() -> tuple[float, int]:
        """The changed copy over the table "loader again" left (the original's rows; loaded
        here, not timed, with --compare-only)."""
        if compare_only:
            sqlite_load(fresh("sis.db"))
        url = f"sqlite:///{work / 'sis.db'}"
        return loader_child(changed, url, work, rows, True, changes, compared)

    loader, again, second, no_key, imported = (
        "loader (validate+load+swap)",
        "loader again (replaces the loaded table)",
        "loader, changed file (+ comparison)",
        "loader, no key column (no index)",
        "sqlite3 .import (fresh table)",
    )
    if compare_only:
        rounds([(second, second_load)])
    else:
        times = rounds(
            [
                (loader, lambda: sqlite_load(fresh("sis.db"))),
                (again, lambda: sqlite_load(work / "sis.db")),
                (second, second_load),
                (no_key, lambda: sqlite_load(fresh("nokey.db"), False)),
                (imported, lambda: sqlite_import(data, fresh("i.db"))),
            ]
        )
        ratio("loader / .import", times, imported, loader, " (target >= 0.6x)")
        ratio("loader without key / .import", times, imported, no_key)
    share = compare_share("the changed file's load", compared)
    for old in work.glob("*.db*"):
        old.unlink()
    return share


def postgres_rounds(
    work: Path,
    data: Path,
    rows: int,
    rounds: Rounds,
    changed: Path,
    changes: tuple[int, int, int],
    compare_only: bool = False,
) -> Share:
    """The loader, then ``psql \\copy``, each into a new database."""
    pg_start()
    version = subprocess.run(
        ["psql", "-tAc", "SHOW server_version", "-d", "postgres"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    print(f"PostgreSQL ({version})")

    def in_fresh_database(measure: Callable[[str], tuple[float, int]]) -> tuple[float, int]:
        """Measure in a new, empty, checkpointed database, dropped afterwards."""
        name = f"loader_bench_{uuid.uuid4().hex[:8]}"
        subprocess.run(["createdb", name], check=True)
        subprocess.run(["psql", "-qc", "CHECKPOINT", "-d", name], capture_output=True)
        try:
            return measure(name)
        finally:
            subprocess.run(["dropdb", "--if-exists", "--force", name], capture_output=True)

    def pg_load(database: str, keyed: bool = True) -> tuple[float, int]:
        return loader_child(data, f"postgresql+psycopg:///{database}", work, rows, keyed)

    compared: list[tuple[float, float]] = []

    def second_load(database: str) -> tuple[float, int]:
        """The changed copy over the original, loaded first (not timed) in the same database;
        the live table analyzed in between, as autovacuum has done by the next night."""
        pg_load(database)
        subprocess.run(["psql", "-qc", "VACUUM ANALYZE", "-d", database], capture_output=True)
        subprocess.run(["psql", "-qc", "CHECKPOINT", "-d", database], capture_output=True)
        url = f"postgresql+psycopg:///{database}"
        return loader_child(changed, url, work, rows, True, changes, compared)

    loader, second, no_key, copied, indexed = (
        "loader (validate+load+swap)",
        "loader, changed file (+ comparison)",
        "loader, no key column (no index)",
        "psql \\copy (fresh table)",
        "psql \\copy + key index (like for like)",
    )
    if compare_only:
        rounds([(second, lambda: in_fresh_database(second_load))])
        return compare_share("the changed file's load", compared)
    times = rounds(
        [
            (loader, lambda: in_fresh_database(pg_load)),
            (second, lambda: in_fresh_database(second_load)),
            (no_key, lambda: in_fresh_database(lambda db: pg_load(db, False))),
            (copied, lambda: in_fresh_database(lambda db: psql_copy(data, db))),
            (indexed, lambda: in_fresh_database(lambda db: psql_copy(data, db, True))),
        ]
    )
    ratio("loader / (\\copy + UNIQUE key index)", times, indexed, loader, " (target >= 1.0x)")
    ratio("loader / \\copy (which builds no index)", times, copied, loader)
    ratio("loader without key / \\copy", times, copied, no_key)
    return compare_share("the changed file's load", compared)


if __name__ == "__main__":
    sys.exit(main())
