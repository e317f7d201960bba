#!/usr/bin/env python3
"""Benchmark HAProxy (the shipped deploy/haproxy.cfg) in front of two sis-ingest nodes.

Two nodes (``ingestctl server``, each with its own data root on this machine) and one
``haproxy`` on loopback; every figure is measured both ways in the same run, alternating
rounds, and reported as a ratio:

- one upload (1 GiB by default) with OpenSSH ``sftp -b``: through HAProxy (to either node)
  against straight to node1; MB/s (median) and CPU seconds per GiB of the whole path
  (nodes + HAProxy);
- ``--concurrent`` (20) concurrent uploads: aggregate MB/s through HAProxy to the two nodes
  against the same uploads straight to node1 alone.

HAProxy runs the shipped config with only addresses, ports, the stats socket and the log
target replaced (tests/cluster/haproxy_harness.py), and its per-address limits raised: every
client here is 127.0.0.1 (as bench_servers.BENCH_LIMITS raises the nodes' own). HAProxy
connects from 127.0.0.10, the nodes' ``[server] proxy_protocol_from``; the direct clients
come from 127.0.0.1, so the same node serves both ways.

On one machine the client, HAProxy and both nodes share the cores: the two-node figure says
what the balancer costs, not what a second machine would add.
Run: ``.venv/bin/python bench/cluster_bench.py [--size-mib 1024] [--rounds 3]``.
MB means 10^6 bytes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import proc_tree
from bench_servers import BenchError, BenchServer, IngestServer, free_port, make_key
from server_bench import (
    GIB,
    MB,
    MIB,
    Run,
    alternate,
    make_file,
    median,
    ratio,
    say,
    settle_cpu,
    sigterm_as_interrupt,
    use_project_python,
)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "cluster"))

from haproxy_harness import (  # noqa: E402
    BALANCER_ADDRESS,
    SHIPPED_CONFIG,
    Backend,
    HAProxy,
    haproxy_binary,
    render_haproxy_config,
)

# Every bench client is 127.0.0.1: the balancer's per-address rules would refuse the 11th.
BENCH_PER_ADDRESS = 10_000


class Direct(BenchServer):
    """Node1 reached straight, without the balancer."""

    label = "direct"

    def __init__(self, node: IngestServer) -> None:
        super().__init__()
        self.node = node
        self.port = node.port
        self.user = node.user
        self.upload_dir = node.upload_dir

    def cpu_seconds(self) -> float:
        return self.node.cpu_seconds()

    def stop(self) -> None:  # the node is stopped on its own
        pass


class Balanced(BenchServer):
    """HAProxy's frontend: the uploads land on either node."""

    label = "haproxy"

    def __init__(self, haproxy: HAProxy, nodes: list[IngestServer]) -> None:
        super().__init__()
        self.haproxy = haproxy
        self.nodes = nodes
        self.port = haproxy.port
        self.user = nodes[0].user

    def cpu_seconds(self) -> float:
        assert self.haproxy.process is not None
        own = proc_tree.tree_cpu_seconds(self.haproxy.process.pid)
        return own + sum(node.cpu_seconds() for node in self.nodes)

    def haproxy_cpu_seconds(self) -> float:
        assert self.haproxy.process is not None
        return proc_tree.tree_cpu_seconds(self.haproxy.process.pid)

    def clear_uploads(self) -> None:
        for node in self.nodes:
            node.clear_uploads()

    def find(self, name: str) -> Path | None:
        for node in self.nodes:
            assert node.upload_dir is not None
            if (node.upload_dir / name).is_file():
                return node.upload_dir / name
        return None

    def stop(self) -> None:
        self.haproxy.stop()


@dataclass
class Transfer:
    seconds: float
    cpu_seconds: float
    haproxy_cpu_seconds: float
    nbytes: int
    per_node: dict[str, int]

    @property
    def mb_s(self) -> float:
        return self.nbytes / MB / self.seconds


def uploads(run: Run, target: BenchServer, nodes: list[IngestServer], source: Path,
            count: int, tag: str) -> Transfer:  # fmt: skip
    """``count`` sftp uploads of ``source`` at once; wall time from start to the last exit;
    checks every file arrived whole, and counts which node got it."""
    for node in nodes:
        node.clear_uploads()
    names = [f"bench-{tag}-{i}.bin" for i in range(count)]
    batches = [run.batch([f"put {source} {name}"]) for name in names]
    timeout = 60 + count * source.stat().st_size / (20 * MB)
    cpu_before = settle_cpu(target)
    haproxy_before = target.haproxy_cpu_seconds() if isinstance(target, Balanced) else 0.0
    started = time.monotonic()
    procs = [run.clients.start(run.sftp(target, batch)) for batch in batches]
    for proc in procs:
        run.clients.finish(proc, timeout)
    seconds = time.monotonic() - started
    cpu = settle_cpu(target) - cpu_before
    haproxy_cpu = (
        target.haproxy_cpu_seconds() - haproxy_before if isinstance(target, Balanced) else 0.0
    )
    per_node = {node.label: 0 for node in nodes}
    size = source.stat().st_size
    for name in names:
        where = [n for n in nodes if n.upload_dir and (n.upload_dir / name).is_file()]
        if len(where) != 1 or (where[0].upload_dir / name).stat().st_size != size:  # type: ignore[operator]
            raise BenchError(f"{target.label}: {name} missing or wrong size after upload")
        per_node[where[0].label] += 1
    for node in nodes:
        node.clear_uploads()
    return Transfer(seconds, cpu, haproxy_cpu, count * size, per_node)


def measure(run: Run, targets: list[BenchServer], nodes: list[IngestServer]) -> dict:
    args = run.args
    results: dict = {t.label: {"single": [], "concurrent": []} for t in targets}
    big = make_file(run.workdir / "big.bin", args.size_mib * MIB)
    say("warm-up: one unmeasured upload each way")
    for target in targets:
        uploads(run, target, nodes, big, 1, "warmup")
    say(f"single upload: {args.size_mib} MiB x {args.rounds} rounds, alternating")
    for r, target in alternate(targets, args.rounds):
        t = uploads(run, target, nodes, big, 1, f"single{r}")
        gib = t.nbytes / GIB
        results[target.label]["single"].append(
            {"mb_s": t.mb_s, "cpu_s_per_gib": t.cpu_seconds / gib,
             "haproxy_cpu_s_per_gib": t.haproxy_cpu_seconds / gib}
        )  # fmt: skip
        say(
            f"  round {r + 1} {target.label:7}: {t.mb_s:7.1f} MB/s  {t.cpu_seconds / gib:5.2f} "
            f"CPU s/GiB ({t.haproxy_cpu_seconds / gib:.2f} haproxy)"
        )
    big.unlink()
    mid = make_file(run.workdir / "mid.bin", args.concurrent_mib * MIB)
    say(f"concurrent: {args.concurrent} x {args.concurrent_mib} MiB x {args.rounds} rounds")
    for r, target in alternate(targets, args.rounds):
        t = uploads(run, target, nodes, mid, args.concurrent, f"conc{r}")
        results[target.label]["concurrent"].append({"mb_s": t.mb_s, "per_node": t.per_node})
        say(f"  round {r + 1} {target.label:7}: {t.mb_s:7.1f} MB/s aggregate {t.per_node}")
    return results


def report(results: dict, args: argparse.Namespace) -> str:
    direct, balanced = results["direct"], results["haproxy"]

    def med(rows: list[dict], key: str) -> float:
        return median([row[key] for row in rows])

    single_d, single_h = med(direct["single"], "mb_s"), med(balanced["single"], "mb_s")
    cpu_d = med(direct["single"], "cpu_s_per_gib")
    cpu_h = med(balanced["single"], "cpu_s_per_gib")
    conc_d, conc_h = med(direct["concurrent"], "mb_s"), med(balanced["concurrent"], "mb_s")
    return "\n".join(
        [
            "| figure | straight to node1 | through HAProxy | ratio |",
            "|---|---|---|---|",
            f"| one {args.size_mib} MiB upload, median of {args.rounds} | {single_d:.1f} MB/s | "
            f"{single_h:.1f} MB/s | {ratio(single_h, single_d):.2f}x |",
            f"| CPU per GiB uploaded (nodes + HAProxy) | {cpu_d:.2f} s | {cpu_h:.2f} s "
            f"(HAProxy {med(balanced['single'], 'haproxy_cpu_s_per_gib'):.2f} s) | "
            f"{ratio(cpu_h, cpu_d):.2f}x |",
            f"| {args.concurrent} concurrent {args.concurrent_mib} MiB uploads, aggregate "
            f"(one node / two nodes) | {conc_d:.1f} MB/s | {conc_h:.1f} MB/s | "
            f"{ratio(conc_h, conc_d):.2f}x |",
        ]
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-mib", type=int, default=1024, help="single upload size (1024)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per figure (3)")
    p.add_argument("--concurrent", type=int, default=20, help="concurrent uploads (20)")
    p.add_argument("--concurrent-mib", type=int, default=50, help="size of each (50)")
    p.add_argument("--workers", type=int, default=0, help="each node's [server] workers")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_project_python()
    if haproxy_binary() is None:
        say("haproxy is not installed (deploy/install-system-deps.sh installs it)")
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="sis-cluster-bench-"))
    nodes: list[IngestServer] = []
    targets: list[BenchServer] = []
    run = None
    with sigterm_as_interrupt():
        try:
            say(f"work dir {workdir}; generating an RSA 4096 client key")
            key = make_key(workdir / "client_key", "rsa", 4096)
            run = Run(args, workdir, key)
            for name in ("node1", "node2"):
                node = IngestServer(
                    workdir,
                    key.with_suffix(".pub"),
                    args.workers,
                    settings=(
                        f'server.proxy_protocol_from = ["{BALANCER_ADDRESS}"]',
                        f'cluster.node_id = "{name}"',
                        f"admin.port = {free_port()}",
                    ),
                    label=name,
                )
                nodes.append(node)
                node.start()
                say(f"{name} on 127.0.0.1:{node.port} (pid {node.pid})")
            stats = workdir / "haproxy.sock"
            config = workdir / "haproxy.cfg"
            front = free_port()
            config.write_text(
                render_haproxy_config(
                    SHIPPED_CONFIG.read_text(encoding="utf-8"),
                    ("127.0.0.1", front),
                    [Backend(n.label, "127.0.0.1", n.port, _admin_port(n)) for n in nodes],
                    stats,
                    per_address_connections=BENCH_PER_ADDRESS,
                    per_address_rate=BENCH_PER_ADDRESS,
                )
            )
            haproxy = HAProxy(config, stats, "127.0.0.1", front, workdir / "haproxy.log")
            balanced = Balanced(haproxy, nodes)
            targets = [Direct(nodes[0]), balanced]
            haproxy.start()
            for node in nodes:
                haproxy.wait_for(node.label, up=True)
            say(f"haproxy on 127.0.0.1:{front} (pid {haproxy.process.pid})")  # type: ignore[union-attr]
            results = measure(run, targets, nodes)
            print(report(results, args))
            return 0
        except KeyboardInterrupt:
            say("interrupted: cleaning up")
            return 130
        except (BenchError, AssertionError, RuntimeError) as exc:
            say(f"failed: {exc}")
            return 1
        finally:
            if run is not None:
                run.clients.kill_all()
            for target in targets:
                target.stop()
            for node in nodes:
                node.stop()
            if args.keep:
                say(f"kept {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)


def _admin_port(node: IngestServer) -> int:
    text = next(s for s in node.settings if s.startswith("admin.port"))
    return int(text.partition("=")[2])


if __name__ == "__main__":
    sys.exit(main())
