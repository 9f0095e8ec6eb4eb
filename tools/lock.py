"""Write requirements.lock (every package `pip install -e '.[dev]'` resolves to, with its sha256), or say
whether this machine is the kind the lock was written for.

    python tools/lock.py write      # `make lock`: resolve with pip (nothing is installed) and write the lock
    python tools/lock.py matches    # exit 0 when the lock's platform and Python are this machine's

The lock is what CI installs (`pip install --require-hashes`), so a release published later, or a file
replaced on an index, cannot change what the tests ran against. Users elsewhere install from the ranges
in pyproject.toml; `make` falls back to them on a machine the lock was not written for.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
PROJECT = "splitexit"


def machine() -> str:
    """What a lock is valid for: OS, CPU and the Python it was resolved with (wheels differ by each)."""
    return f"{platform.system()}-{platform.machine()} cp{sys.version_info.major}{sys.version_info.minor}"


def write() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                        "--report", str(report), "-e", f"{ROOT}[dev]"], check=True)
        resolved = json.loads(report.read_text())["install"]
    lines = [f"# machine: {machine()}",
             "# written by `make lock` (tools/lock.py) from pyproject.toml's dependencies and its [dev] extra;",
             "# CI installs exactly this with --require-hashes. Edit pyproject.toml, then run `make lock`.", ""]
    for package in sorted(resolved, key=lambda p: p["metadata"]["name"].lower()):
        name, version = package["metadata"]["name"], package["metadata"]["version"]
        if name == PROJECT:
            continue
        digest = package["download_info"]["archive_info"]["hashes"]["sha256"]
        lines.append(f"{name}=={version} \\\n    --hash=sha256:{digest}")
    LOCK.write_text("\n".join(lines) + "\n")
    print(f"wrote {LOCK} ({len(lines) - 4} packages, {machine()})")


def matches() -> bool:
    first = LOCK.read_text().splitlines()[0] if LOCK.is_file() else ""
    return first == f"# machine: {machine()}"


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "write":
        write()
    elif command == "matches":
        sys.exit(0 if matches() else 1)
    else:
        sys.exit(__doc__)
