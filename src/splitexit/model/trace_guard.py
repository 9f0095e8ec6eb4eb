"""One process-wide guard between tracing a model and running modules in other threads.

torch.fx (and torch.export) patch ``torch.nn.Module.__call__`` for the whole process while they trace. A
module that runs in another thread meanwhile is recorded instead of run and fails with ``NameError: module
is not installed as a submodule``. A node does both at once when it loads the stage of a new plan (tracing
the model it rebuilds) while it serves the current one. So tracing holds this guard exclusively, and whatever
runs modules holds it shared — stage compute, the interpreter that measures a freshly traced graph's
shapes and FLOPs, a node timing the model for `splitexit profile --cluster`: those run side by side, a
trace waits for them, and they wait for it (a waiting trace goes first, so a busy node still loads its next
stage). Not re-entrant: a holder must not ask again.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["TRACE_GUARD", "SharedExclusiveLock"]


class SharedExclusiveLock:
    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._sharing = 0
        self._exclusive = False
        self._waiting_exclusive = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: not self._exclusive and not self._waiting_exclusive)
            self._sharing += 1
        try:
            yield
        finally:
            with self._condition:
                self._sharing -= 1
                self._condition.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._condition:
            self._waiting_exclusive += 1
            self._condition.wait_for(lambda: not self._exclusive and not self._sharing)
            self._waiting_exclusive -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._condition:
                self._exclusive = False
                self._condition.notify_all()


#: Held exclusively by `graph.trace_model`; shared by whatever runs modules (see the module docstring).
TRACE_GUARD = SharedExclusiveLock()
