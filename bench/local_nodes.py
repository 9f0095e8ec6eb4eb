"""What the process-mode benches share: the worker processes of a cluster file, started again on fresh
ports when a node dies before it is ready (a port taken between choosing it and binding it)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from splitexit.config import ClusterSpec
from splitexit.control.local_cluster import LocalCluster
from splitexit.errors import ClusterError

ATTEMPTS = 3


def start_local_cluster(write_cluster: Callable[[], tuple[Path, ClusterSpec]], workdir: Path
                        ) -> tuple[LocalCluster, ClusterSpec, int]:
    """Start the workers of the file ``write_cluster`` writes (fresh ports each call); show a failed
    node's log and try again. Returns the started cluster, its spec and the attempts it took."""
    for attempt in range(1, ATTEMPTS + 1):
        path, cluster = write_cluster()
        local = LocalCluster(path, cluster, log_dir=workdir, cache_root=workdir / "stages")
        try:
            local.start()
            return local, cluster, attempt
        except ClusterError as exc:
            logs = "\n".join(f"--- {log.name}:\n{log.read_text(errors='replace')[-2000:]}"
                             for log in sorted(workdir.glob("*.log")))
            print(f"node start failed (attempt {attempt} of {ATTEMPTS}): {exc}\n{logs}", file=sys.stderr)
            if attempt == ATTEMPTS:
                raise
    raise AssertionError("unreachable")
