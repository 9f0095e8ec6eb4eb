"""What every command shares: ``-v``, ``--log-level`` and ``--log-json`` (before or after the command's name),
help that shows flags as flags, and the parsers of list- and shape-valued flags. One place, so that no
command repeats the logging setup.

Typer builds a command's options from its function's signature; these come from one template function
instead, which :class:`Command` and :class:`Group` add to every command and group they make. Each option's
callback records what was given in the context's ``meta`` (shared by a group and its subcommand) and sets
the logging up again, so ``splitexit -v run`` and ``splitexit run -v`` mean the same, and a level given
after the command's name wins over one given before it.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Optional

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from splitexit.errors import ConfigError
from splitexit.units import parse_shape

__all__ = ["LOG_FORMAT", "Command", "Group", "JsonFormatter", "LogLevel", "comma_ints", "comma_names",
           "configure_logging", "shape_flag"]

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
#: Where the options' callbacks keep what was given, in the context's ``meta``.
_META = "splitexit.logging"


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: for log collectors that parse lines, not prose."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: LogLevel = LogLevel.WARNING, *, as_json: bool = False) -> None:
    """Log records at ``level`` and above to stderr, as text or as JSON lines (replacing any earlier setup)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=getattr(logging, level.name), handlers=[handler], force=True)


def _given(key: str) -> Any:
    """The callback of option ``key``: remember a value given on the command line, then set logging up."""

    def remember(ctx: typer.Context, value: object) -> None:
        if ctx.resilient_parsing:
            return
        settings: dict[str, Any] = ctx.meta.setdefault(_META, {})
        if value:  # every default is falsy: a command's unset option keeps what its group was given
            settings[key] = value
        level = settings.get("level") or (LogLevel.INFO if settings.get("verbose") else LogLevel.WARNING)
        configure_logging(level, as_json=bool(settings.get("json")))

    return remember


def _logging_options(
    verbose: bool = typer.Option(False, "--verbose", "-v", callback=_given("verbose"),
                                 help="Log what happens to stderr (level info)"),
    log_level: Optional[LogLevel] = typer.Option(None, "--log-level", case_sensitive=False, callback=_given("level"),
                                                 metavar="LEVEL", help="debug, info, warning or error: log this level "
                                                 "and above to stderr (default: warning; info with -v)"),
    log_json: bool = typer.Option(False, "--log-json", callback=_given("json"),
                                  help="Log one JSON object per line (time, level, logger, message) instead of text"),
) -> None:
    """The template the shared options are built from (never called)."""


def _shared_options() -> list[Any]:
    """Fresh copies of the shared options, built by typer from :func:`_logging_options`'s signature."""
    template = typer.Typer(add_completion=False)
    template.command()(_logging_options)
    options = list(typer.main.get_command(template).params)
    for option in options:
        option.expose_value = False  # the command's function does not take them
    return options


def _as_flags(params: list[Any]) -> None:
    """Show on/off options as plain flags (without a metavar typer writes ``--json <bool>``), and an argument
    taking many values by its item (typer writes ``<list[Path]>``, we ``<path>...``)."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
        if isinstance(param, TyperArgument) and param.nargs == -1:
            shown = param.display_type_rich
            setattr(param, "display_type_rich",  # noqa: B010 - an instance's method, which mypy will not assign
                    lambda ctx, shown=shown: re.sub(r"<list\[(\w+)\]>", lambda m: f"<{m[1].lower()}>...",
                                                    shown(ctx) or ""))


class _SharedOptions:
    """The shared options on a command or group, and flags shown as flags (``--help`` too)."""

    params: list[Any]

    def __init__(self, *args: Any, **settings: Any) -> None:
        super().__init__(*args, **settings)
        self.params.extend(_shared_options())
        _as_flags(self.params)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        _as_flags([option])
        return option


class Command(_SharedOptions, TyperCommand):
    """Every command: the shared options after the command's name."""


class Group(_SharedOptions, TyperGroup):
    """Every group (``splitexit``, ``splitexit certs``): the shared options before the command's name too."""


def comma_names(text: str) -> list[str]:
    """``"Raw, fp16"`` -> ``["raw", "fp16"]``."""
    return [part.strip().lower() for part in text.split(",") if part.strip()]


def comma_ints(text: str, flag: str) -> list[int]:
    """``"1,8"`` -> ``[1, 8]``; anything else is one line naming ``flag``."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: write positive integers separated by commas, e.g. 1,8") from None


def shape_flag(text: str, flag: str) -> tuple[int, ...]:
    """``"3x224x224"`` -> ``(3, 224, 224)``; anything else is one line naming ``flag``."""
    try:
        return parse_shape(text)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def guarantee_flag(text: str | None, *, default: float, budget: float | None) -> float | None:
    """``--guarantee``: a probability in (0, 1), ``none``, or unset (``default``; nothing with --budget)."""
    if text is None:
        return None if budget is not None else default
    if budget is not None:
        raise ConfigError("--guarantee is about accuracy: it goes with --max-drop, not --budget")
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise ConfigError(f"--guarantee is a probability between 0 and 1 (e.g. 0.95) or `none`, not {text!r}")
    return value


TRUST_HELP = ("User code (module:factory or file.py:factory) the package names, as its model or its dataset, that "
              "this command may import; repeat for several")


def trust_option() -> list[str]:
    """``--trust-model``, the same on every command that loads a package."""
    return typer.Option([], "--trust-model", metavar="SPEC", help=TRUST_HELP)


def edge_option() -> str | None:
    """``--edge``, the same on every command that acts as one edge of a cluster file."""
    return typer.Option(None, "--edge", help="Which edge of the cluster file this is (when it declares several)")
