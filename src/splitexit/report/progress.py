"""The one progress bar every long command shows on stderr (training epochs, profiling parts)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["progress_bar"]


def progress_bar(console: Console, *, quiet: bool = False) -> Progress:
    """A bar with a description, done/total and elapsed time; ``quiet`` (JSON output) shows nothing."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=quiet, transient=False)
