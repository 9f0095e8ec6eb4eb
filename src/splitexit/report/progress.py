"""The one progress bar every long command shows on stderr (training epochs, profiling parts)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from splitexit.model.train import EpochResult

__all__ = ["epoch_description", "progress_bar"]


def progress_bar(console: Console, *, quiet: bool = False) -> Progress:
    """A bar with a description, done/total and elapsed time; ``quiet`` (JSON output) shows nothing."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=quiet, transient=False)


def epoch_description(result: EpochResult) -> str:
    """The training bar's text after an epoch: its loss and, where measured, each exit's validation accuracy."""
    text = f"training (loss {result.loss:.4f}"
    if result.accuracy is not None:
        text += ", validation " + " / ".join(f"{a:.1%}" for a in result.accuracy)
    return text + ")"
