"""requirements.lock (what CI installs, hashes checked) agrees with pyproject.toml (what users install from)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def locked() -> dict[str, str]:
    text = (ROOT / "requirements.lock").read_text()
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+) \\\n    --hash=sha256:[0-9a-f]{64}$", text, flags=re.MULTILINE)
    return {canonicalize_name(name): version for name, version in pins}


def test_every_dependency_is_locked_at_a_version_its_range_allows() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    pins = locked()
    stale = [f"{r} (locked: {pins.get(canonicalize_name(r.name), 'absent')})" for r in declared
             if canonicalize_name(r.name) not in pins or pins[canonicalize_name(r.name)] not in r.specifier]
    assert not stale, f"run `make lock`: requirements.lock does not satisfy pyproject.toml for {stale}"


def test_every_pin_has_a_hash() -> None:
    text = (ROOT / "requirements.lock").read_text()
    entries = [line for line in text.splitlines() if "==" in line]
    assert len(entries) == len(locked()) > 50
