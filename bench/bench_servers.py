"""The servers the benchmark compares, each started on a free loopback port in a temp dir.

- OpenSSH ``sshd`` from Debian's openssh-server with ``internal-sftp``, chrooted, for one
  dedicated system user (``benchsftp``), public key auth against a temp authorized_keys file.
- sis-ingest's own server (``ingestctl server``) with a fresh data root, one account, the same
  client key and 127.0.0.1 allowed; one or two of them ("ours", and "before" from another
  source tree), each running its own tree's packages.

All offer aes128-gcm@openssh.com. Every process started here is stopped by :meth:`stop`
(root first, then any descendant still alive), which the benchmark calls from ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cpu_account
import proc_tree

REPO = Path(__file__).resolve().parent.parent
SSHD = "/usr/sbin/sshd"
SSHD_USER = "benchsftp"
ACCOUNT = "bench"
CIPHER = "aes128-gcm@openssh.com"
# What both servers offer (sshd's own default order minus nothing; aes-gcm first, as ours).
CIPHERS = [
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes256-ctr",
    "aes192-ctr",
    "aes128-ctr",
]


class BenchError(RuntimeError):
    """A setup step failed; the message says which and why."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_banner(port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    """Wait until the port answers with an SSH identification string (or the server died)."""
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"server exited with status {process.returncode} while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.settimeout(2)
                if sock.recv(64).startswith(b"SSH-"):
                    return
                last_error = "connection closed before the banner"
        except OSError as exc:
            last_error = str(exc)
        time.sleep(0.2)
    raise BenchError(f"port {port} gave no SSH banner within {timeout:.0f} s ({last_error})")


def run_checked(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)
    if result.returncode != 0:
        raise BenchError(f"{' '.join(map(str, cmd))} failed: {result.stderr.strip()}")
    return result


def make_key(path: Path, key_type: str, bits: int | None = None) -> Path:
    cmd = ["ssh-keygen", "-q", "-t", key_type, "-N", "", "-C", "sis-bench", "-f", str(path)]
    if bits:
        cmd[4:4] = ["-b", str(bits)]
    run_checked(cmd)
    return path


class BenchServer:
    """What a measurement needs from a server: where to connect and its process tree."""

    label = "server"

    def __init__(self) -> None:
        self.port = 0
        self.user = ""
        self.process: subprocess.Popen | None = None
        self.upload_dir: Path | None = None
        self.cpu: cpu_account.CpuAccount | None = None
        self._log = None

    def _popen(self, cmd: list[str], log: Path, **kwargs: object) -> None:
        """Start the server inside its own CPU accounting group when the system allows one."""
        self.cpu = cpu_account.create(f"sis-bench-{os.getpid()}-{self.label}")
        self._log = open(log, "wb")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            self.cpu.wrap(cmd) if self.cpu else cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kwargs,
        )

    @property
    def cpu_method(self) -> str:
        return self.cpu.kind if self.cpu else "/proc tree sum (children's exits may be lost)"

    def cpu_seconds(self) -> float:
        """CPU used so far by the server and everything it forked."""
        if self.cpu is not None:
            return self.cpu.seconds()
        return proc_tree.tree_cpu_seconds(self.pid)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def clear_uploads(self) -> None:
        """Delete what the benchmark uploaded, so the disk and page cache do not fill up."""
        if self.upload_dir is None or not self.upload_dir.is_dir():
            return
        for entry in self.upload_dir.iterdir():
            if entry.is_file() and entry.name.startswith("bench-"):
                entry.unlink(missing_ok=True)

    def stop(self) -> None:
        """SIGTERM the root, wait a little, then SIGKILL it and every leftover descendant."""
        if self.process is None:
            return
        deadline = time.monotonic() + 5  # closed sessions' processes exit on their own
        while self.alive() and proc_tree.descendants(self.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        leftovers = proc_tree.descendants(self.process.pid) if self.alive() else []
        if self.cpu is not None:  # also orphans that were re-parented away from the tree
            leftovers += [int(p) for p in (self.cpu.path / "cgroup.procs").read_text().split()]
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        for pid in leftovers:  # sshd's per-connection children outlive the listener
            if pid != self.process.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.cpu is not None:
            self.cpu.remove()
            self.cpu = None


class OpenSshServer(BenchServer):
    """Debian's sshd with internal-sftp, chrooted, for the dedicated user ``benchsftp``."""

    label = "sshd"

    def __init__(self, workdir: Path, client_pub: Path, same_algorithms: bool = True) -> None:
        super().__init__()
        self.dir = workdir / "sshd"
        self.client_pub = client_pub
        self.same_algorithms = same_algorithms
        self.chroot: Path | None = None
        self.user = SSHD_USER

    def start(self) -> None:
        if not os.access(SSHD, os.X_OK):
            raise BenchError(f"{SSHD} not found: apt-get install openssh-server")
        if os.geteuid() != 0:
            raise BenchError("sshd needs root to switch users: run the benchmark as root")
        uid, gid = ensure_user(SSHD_USER)
        self.dir.mkdir(mode=0o755)
        os.chmod(self.dir.parent, 0o755)  # the user's monitor reads authorized_keys as that user
        for algorithm, bits in (("ed25519", None), ("rsa", 4096)):
            make_key(self.dir / f"ssh_host_{algorithm}_key", algorithm, bits)
        authorized = self.dir / "authorized_keys"
        shutil.copyfile(self.client_pub, authorized)
        os.chmod(authorized, 0o644)
        # Every component of a chroot path must be root-owned and not group/world-writable,
        # which rules out /tmp; /var/lib is, and sits on the same disk.
        self.chroot = Path(tempfile.mkdtemp(prefix="sis-bench-chroot-", dir="/var/lib"))
        os.chmod(self.chroot, 0o755)
        self.upload_dir = self.chroot / "upload"
        self.upload_dir.mkdir()
        os.chown(self.upload_dir, uid, gid)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.port = free_port()
        config = self.dir / "sshd_config"
        config.write_text(
            f"""Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.dir}/ssh_host_ed25519_key
HostKey {self.dir}/ssh_host_rsa_key
PidFile {self.dir}/sshd.pid
AuthorizedKeysFile {authorized}
StrictModes no
UsePAM no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
AllowUsers {SSHD_USER}
UseDNS no
MaxStartups 1000
MaxSessions 10
LoginGraceTime 60
X11Forwarding no
AllowTcpForwarding no
AllowAgentForwarding no
PermitTTY no
Compression no
PrintMotd no
LogLevel ERROR
Ciphers {",".join(CIPHERS)}
{self._algorithm_lines()}
Subsystem sftp internal-sftp
Match User {SSHD_USER}
    ChrootDirectory {self.chroot}
    ForceCommand internal-sftp -d /upload
"""
        )
        run_checked([SSHD, "-t", "-f", str(config)])
        self._popen([SSHD, "-D", "-e", "-f", str(config)], self.dir / "sshd.log")
        wait_for_banner(self.port, self.process)

    def _algorithm_lines(self) -> str:
        """Offer the key exchanges and MACs our server offers by default, as far as sshd has them.

        OpenSSH 9.2 picks sntrup761x25519 by default, which costs the CLIENT ~65 ms of CPU per
        connection (curve25519: ~16 ms all told) and would halve sshd's sessions/s for reasons
        that have nothing to do with the server. ``--sshd-default-kex`` keeps sshd's default.
        """
        if not self.same_algorithms:
            return ""
        sys.path.insert(0, str(REPO))
        from ingest_core.settings import DEFAULT_KEX, DEFAULT_MACS

        lines = []
        for keyword, query, ours in (
            ("KexAlgorithms", "kex", DEFAULT_KEX),
            ("MACs", "mac", DEFAULT_MACS),
        ):
            known = set(run_checked(["ssh", "-Q", query]).stdout.split())
            usable = [name for name in ours if name in known]
            if usable:
                lines.append(f"{keyword} {','.join(usable)}")
        return "\n".join(lines)

    @property
    def algorithms(self) -> str:
        return "same kex/MACs as ours" if self.same_algorithms else "sshd's default kex/MACs"

    def stop(self) -> None:
        super().stop()
        if self.chroot is not None:
            shutil.rmtree(self.chroot, ignore_errors=True)
            self.chroot = None


def ensure_user(name: str) -> tuple[int, int]:
    """Create the system user sshd logs in as (kept for later runs); returns (uid, gid)."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        run_checked(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--home-dir",
                "/upload",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ]
        )
        entry = pwd.getpwnam(name)
    # useradd leaves the password "!" (locked); sshd without PAM refuses locked accounts even
    # for key auth. "*" means "no password" without "locked".
    shadow = run_checked(["getent", "shadow", name]).stdout.split(":")
    if len(shadow) > 1 and shadow[1].startswith("!"):
        run_checked(["usermod", "-p", "*", name])
    return entry.pw_uid, entry.pw_gid


# [limits] our servers get for the benchmark, each with why: the measurements open hundreds of
# connections from one address and account, quickly, and upload GiB-sized files. A tree that
# does not know a setting (an older commit) is not given it. Every other setting, the
# per-session budgets included (handles, unflushed bytes, channels), keeps its default.
BENCH_LIMITS: dict[str, tuple[str, str]] = {
    "max_connections_total": ("0", "200 idle sessions at once"),
    "max_connections_per_address": ("0", "every client is 127.0.0.1"),
    "max_sessions_per_account": ("0", "every session is account 'bench'"),
    "connection_rate_per_address": ("0", "sequential sessions run at ~30/s"),
    "max_file_bytes": ("0", "1 GiB uploads"),
    "account_quota_bytes": ("0", "GiBs uploaded per run"),
}

# Run inside the source tree: which settings it knows (with defaults) and where it imports
# its packages from, so the benchmark can check it measures the tree it was given.
_PROBE = """
import dataclasses, json
import ingest_core, ingest_server, ingestctl
from ingest_core.settings import Settings
defaults = Settings()
sections = {
    f.name: {g.name: getattr(getattr(defaults, f.name), g.name)
             for g in dataclasses.fields(getattr(defaults, f.name))}
    for f in dataclasses.fields(defaults)
    if dataclasses.is_dataclass(getattr(defaults, f.name))
}
modules = {m.__name__: m.__file__ for m in (ingest_core, ingest_server, ingestctl)}
print(json.dumps({"sections": sections, "modules": modules}, default=str))
"""

_UPLOAD_DIR = """
import sys
from ingest_core.folders import account_folder
from ingest_core.settings import load_settings
print(account_folder(load_settings(sys.argv[1]), sys.argv[2]).root)
"""


def parse_setting(text: str) -> tuple[str, str, str]:
    """'KEY = VALUE' (a [server] setting) or 'SECTION.KEY = VALUE' -> (section, key, value)."""
    name, sep, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not name or not value:
        raise BenchError(f"setting {text!r}: expected 'KEY = VALUE' or 'SECTION.KEY = VALUE'")
    section, dot, key = name.rpartition(".")
    return (section if dot else "server"), key, value


class IngestServer(BenchServer):
    """sis-ingest's server, started the way an operator does: init, account, key, ip, server.

    ``label`` names it in the results ("ours" for the tree under test, "before" for a
    baseline tree); ``source`` is the tree whose packages it runs (first on PYTHONPATH, and
    the working directory, so ``python -m`` puts it first on sys.path too).
    """

    def __init__(
        self,
        workdir: Path,
        client_pub: Path,
        workers: int,
        source: Path = REPO,
        settings: tuple[str, ...] = (),
        label: str = "ours",
    ) -> None:
        super().__init__()
        self.label = label
        self.source = source
        self.dir = workdir / label
        self.client_pub = client_pub
        self.workers = workers
        self.settings = settings  # 'KEY = VALUE' ([server]) or 'SECTION.KEY = VALUE'
        self.user = ACCOUNT
        self.config = self.dir / "ingest.toml"
        self.known: dict[str, dict[str, object]] = {}
        self.raised: list[str] = []  # limits raised for the bench, as "key default -> value"

    def _ingestctl(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "ingestctl.main", "--config", str(self.config), *args]

    def _env(self) -> dict[str, str]:
        path = os.environ.get("PYTHONPATH")
        src = str(self.source)
        return {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{path}" if path else src}

    def _python(self, code: str, *args: str) -> str:
        """Run ``code`` with this tree's packages first; its stdout (BenchError if it fails)."""
        result = subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=self._env(),
            cwd=self.source,
        )
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no message"])[-1]
            raise BenchError(f"python in {self.source} failed: {last}")
        return result.stdout

    def available(self) -> str | None:
        """None if ``ingestctl server`` exists in the tree, else why not."""
        result = subprocess.run(
            [sys.executable, "-m", "ingestctl.main", "server", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            env=self._env(),
            cwd=self.source,
        )
        if result.returncode != 0:
            return (
                "'ingestctl server' does not exist yet (or fails): "
                + (result.stderr.strip().splitlines() or ["no message"])[-1]
            )
        return None

    def probe(self) -> None:
        """Read the tree's settings and check its packages are imported from the tree itself."""
        found = json.loads(self._python(_PROBE))
        self.known = found["sections"]
        for module, file in found["modules"].items():
            if not Path(file).resolve().is_relative_to(self.source):
                raise BenchError(f"{module} imports from {file}, not {self.source}")

    def _sections(self) -> dict[str, dict[str, str]]:
        """Every section's `key = value` text: ours, then the bench limits, then overrides."""
        sections: dict[str, dict[str, str]] = {
            "server": {
                "host": '"127.0.0.1"',
                "port": str(self.port),
                "host_key_dir": f'"{self.dir / "keys"}"',
            },
            "limits": {},
        }
        if self.workers:
            sections["server"]["workers"] = str(self.workers)
        self.raised = []
        for key, (value, why) in BENCH_LIMITS.items():
            if key in self.known.get("limits", {}):
                sections["limits"][key] = value
                self.raised.append(f"{key} {self.known['limits'][key]} -> {value} ({why})")
        for text in self.settings:
            section, key, value = parse_setting(text)
            if key not in self.known.get(section, {}):
                raise BenchError(f"{self.source} has no setting {section}.{key}")
            sections.setdefault(section, {})[key] = value
        return sections

    def start(self) -> None:
        self.dir.mkdir()
        self.port = free_port()
        self.probe()
        lines = [f'data_root = "{self.dir / "var"}"', f'log_dir = "{self.dir / "logs"}"']
        for section, values in self._sections().items():
            lines += ["", f"[{section}]", *(f"{k} = {v}" for k, v in values.items())]
        self.config.write_text("\n".join(lines) + "\n")
        for step in (
            ["init"],
            ["account", "create", ACCOUNT],
            ["key", "add", ACCOUNT, str(self.client_pub)],
            ["ip", "add", ACCOUNT, "127.0.0.1"],
        ):
            run_checked(self._ingestctl(*step), env=self._env(), cwd=self.source)
        self.upload_dir = Path(self._python(_UPLOAD_DIR, str(self.config), ACCOUNT).strip())
        log = self.dir / "server.log"
        self._popen(self._ingestctl("server"), log, env=self._env(), cwd=self.source)
        wait_for_banner(self.port, self.process)

    def runs_from_source(self) -> str | None:
        """None if every process of the server has the tree first on PYTHONPATH and as its
        working directory (what ``python -m`` puts first on sys.path), else which does not."""
        for stat in proc_tree.tree(self.pid):
            try:
                cwd = Path(os.readlink(f"/proc/{stat.pid}/cwd"))
                environ = Path(f"/proc/{stat.pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue  # exited meanwhile
            path = next((e[11:] for e in environ if e.startswith(b"PYTHONPATH=")), b"")
            first = path.decode(errors="replace").split(os.pathsep)[0]
            if cwd != self.source or Path(first) != self.source:
                return f"pid {stat.pid}: cwd {cwd}, PYTHONPATH starts with {first!r}"
        return None

    def log_tail(self, lines: int = 15) -> str:
        path = self.dir / "server.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
