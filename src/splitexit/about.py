"""What this installation is: the splitexit version the metrics and run reports name."""

from __future__ import annotations

import functools
import importlib.metadata

__all__ = ["installed_version"]


@functools.cache
def installed_version() -> str:
    """The installed package's version; ``unknown`` when run from a source tree that was never installed."""
    try:
        return importlib.metadata.version("splitexit")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
