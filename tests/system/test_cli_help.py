"""`splitexit COMMAND --help` for every command, as a user runs it: every option says what it does, flags
show as flags (no ``<bool>``), and every command takes the shared logging options."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

#: Metavars as typer prints them: ``<int>``, ``<path>``, or one of ours in capitals (``SPEC``, ``LEVEL``).
METAVAR = re.compile(r"^(<[^>]*>|[A-Z][A-Z_]*)$")
#: What typer appends to a help text; an option with only these has none.
ANNOTATION = re.compile(r"\[(default|required|env var)[^\]]*\]")
SHARED = ("--verbose", "--log-level", "--log-json", "--help")


def help_text(*command: str) -> str:
    result = subprocess.run([sys.executable, "-m", "splitexit", *command, "--help"], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "COLUMNS": "240"})
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    return result.stdout


def panel(text: str, title: str) -> list[list[str]]:
    """The first line of each row of a help panel, split into its columns (rich pads them with 2+ spaces)."""
    rows, inside = [], False
    for line in text.splitlines():
        if line.startswith("╭─ "):
            inside = line.startswith(f"╭─ {title} ")
        elif line.startswith("╰"):
            inside = False
        elif inside:
            cells = [cell for cell in re.split(r"\s{2,}", line.strip().strip("│").strip()) if cell]
            if cells and cells[0] == "*":
                cells = cells[1:]
            rows.append(cells)
    return rows


def all_helps(*group: str, text: str | None = None) -> dict[tuple[str, ...], str]:
    """The help of ``group`` and of every command under it, subgroups included, found from the groups' own help
    (two at a time: each is a process that imports torch)."""
    text = help_text(*group) if text is None else text
    names = [(*group, cells[0]) for cells in panel(text, "Commands") if cells and re.fullmatch(r"[a-z-]+", cells[0])]
    with ThreadPoolExecutor(2) as pool:
        texts = list(pool.map(lambda name: help_text(*name), names))
    found = {group: text}
    for name, sub in zip(names, texts):
        found.update(all_helps(*name, text=sub) if "╭─ Commands " in sub else {name: sub})
    return found


def missing_help(text: str) -> list[str]:
    """Options whose row has a name and maybe a metavar, but no words of help."""
    bare = []
    for cells in panel(text, "Options"):
        if not cells or not cells[0].startswith("--"):
            continue  # a wrapped help text's second line
        words = [c for c in cells if not c.startswith("-") and not METAVAR.match(c)]
        if not ANNOTATION.sub("", " ".join(words)).strip():
            bare.append(cells[0])
    return bare


@pytest.fixture(scope="module")
def helps() -> dict[tuple[str, ...], str]:
    return all_helps()


@pytest.mark.slow
def test_every_command_is_found(helps: dict[tuple[str, ...], str]) -> None:
    found = {" ".join(name) for name in helps}
    assert {"train", "calibrate", "eval", "cuts", "models", "profile", "plan", "demo", "node", "up", "run", "etcd",
            "certs init", "certs issue"} <= found, found


@pytest.mark.slow
def test_every_option_of_every_command_has_help(helps: dict[tuple[str, ...], str]) -> None:
    bare = {" ".join(name) or "splitexit": missing for name, text in helps.items() if (missing := missing_help(text))}
    assert not bare, f"options without help text: {bare}"


@pytest.mark.slow
def test_flags_show_as_flags_and_lists_by_their_items(helps: dict[tuple[str, ...], str]) -> None:
    for name, text in helps.items():
        assert "<bool>" not in text and "<list[" not in text, f"splitexit {' '.join(name)} --help:\n{text}"


@pytest.mark.slow
def test_every_command_takes_the_shared_logging_options(helps: dict[tuple[str, ...], str]) -> None:
    for name, text in helps.items():
        options = {cells[0] for cells in panel(text, "Options") if cells and cells[0].startswith("--")}
        assert set(SHARED) <= options, f"splitexit {' '.join(name)}: {sorted(options)}"


def test_the_checks_see_a_bare_option_and_a_bool() -> None:
    """The parsing above would pass on no rows at all: show it finds what it looks for."""
    text = ("╭─ Options ─╮\n│ *  --model  -m  <str>  [required]  │\n│    --epochs  <int>  Passes [default: 30]  │\n"
            "│    --json  <bool>  │\n│    --trust-model  SPEC  User code  │\n╰───╯\n")
    assert missing_help(text) == ["--model", "--json"]
