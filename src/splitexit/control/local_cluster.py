"""Start every worker of a cluster file as a local process, wait until all are ready, stop them all.

Workers start empty (the entry's coordinator assigns and ships their stages), so all of them start at
once. Each child is told this process's pid (``--die-with-parent``) and sets ``PR_SET_PDEATHSIG``
itself, after exec (Linux): if this process dies, even by SIGKILL, the kernel sends the child SIGTERM, so
no node is left orphaned. (Doing it in ``preexec_fn`` would fork a process that may already run gRPC
threads, which is unsafe.) ``stop()`` sends SIGTERM (the nodes drain
in-flight work) and kills whatever has not exited after a grace period.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from splitexit.config import ClusterSpec
from splitexit.config.load import require_token
from splitexit.errors import ClusterError

__all__ = ["LocalCluster", "die_with_parent", "free_port"]

logger = logging.getLogger(__name__)

READY_TIMEOUT = 120.0
STOP_GRACE = 10.0
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for clusters made up on the spot: demo, tests)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def die_with_parent(parent: int) -> None:
    """In a node process: get SIGTERM when ``parent`` dies; exit now if it is already gone."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        logger.info("PR_SET_PDEATHSIG is not available here; the node will outlive a killed `up`")
    if os.getppid() != parent:
        raise SystemExit(f"parent process {parent} is gone; not starting")


class LocalCluster:
    """The worker processes of ``cluster`` on this machine (the edge is the caller's own process)."""

    def __init__(self, cluster_file: Path, cluster: ClusterSpec, *, log_dir: Path | None = None,
                 cache_root: Path | None = None, verbose: bool = False):
        self.cluster_file, self.cluster = cluster_file, cluster
        self.log_dir = log_dir
        self.cache_root = cache_root
        self.verbose = verbose
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, timeout: float = READY_TIMEOUT) -> None:
        """Start every worker; return when each has printed its ready line (each needs the cluster token)."""
        require_token(self.cluster_file, self.cluster)
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for node in self.cluster.workers:
                self.launch(node.name)
            for node in self.cluster.workers:
                self.wait_ready(node.name, timeout)
        except BaseException:
            self.stop()
            raise

    def launch(self, name: str, *extra: str) -> subprocess.Popen:
        """Start worker ``name`` (``extra``: more `splitexit node` options); see :meth:`wait_ready`."""
        command = [sys.executable, "-m", "splitexit", *(["--verbose"] if self.verbose else []), "node",
                   "--cluster", str(self.cluster_file), "--name", name, "--die-with-parent", str(os.getpid()),
                   *(["--cache", str(self.cache_root / name)] if self.cache_root else []), *extra]
        stderr = open(self.log_dir / f"{name}.log", "ab") if self.log_dir else subprocess.DEVNULL  # noqa: SIM115
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL,
                                   text=True)
        self.processes[name] = process
        return process

    def wait_ready(self, name: str, timeout: float = READY_TIMEOUT) -> None:
        process = self.processes[name]
        line = _read_line(process, timeout)
        if not line.startswith(f"ready {name}"):
            code = process.poll()
            where = f" (log: {self.log_dir / f'{name}.log'})" if self.log_dir else ""
            what = f"exited with code {code} before it was ready" if code is not None \
                else f"did not become ready within {timeout:.0f} s"
            raise ClusterError(f"node {name} {what}{where}. Run `splitexit node --cluster {self.cluster_file} "
                               f"--name {name}` to see why.")
        logger.info("node %s ready (pid %d)", name, process.pid)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM every worker (they drain), then SIGKILL any still running after ``grace`` seconds."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for name, process in self.processes.items():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("node %s did not stop within %.0f s; killing it", name, grace)
                process.kill()
                process.wait()
        self.processes.clear()

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _read_line(process: subprocess.Popen, timeout: float) -> str:
    """The child's first stdout line, or '' after ``timeout`` seconds or if it exits first."""
    result: list[str] = []
    stdout = process.stdout
    assert stdout is not None  # launched with stdout=PIPE
    reader = threading.Thread(target=lambda: result.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0].strip() if result else ""
