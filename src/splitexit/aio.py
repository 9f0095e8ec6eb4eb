"""asyncio helpers every layer shares.

Python 3.11's ``asyncio.wait_for`` can swallow a cancellation that arrives just as the awaited call
completes (fixed in 3.12), so a loop cancelled once may carry on, and awaiting it would hang; :func:`stop`
cancels until the task has ended.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["stop"]

#: Seconds between cancellations of a task that has not ended yet.
RECANCEL_EVERY = 0.1


async def stop(*tasks: asyncio.Task[Any]) -> None:
    """Cancel ``tasks`` and wait until each has ended; what they ended with (an error too) is discarded."""
    pending = [task for task in tasks if not task.done()]
    while pending:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=RECANCEL_EVERY)
        pending = [task for task in pending if not task.done()]
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log "exception was never retrieved"
