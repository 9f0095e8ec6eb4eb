"""Resolve `module:attribute` and `path/to/file.py:attribute` specs to Python objects.

This is how users hand us their own models and datasets. It imports code the user named on the
command line or in a package they wrote; it never imports anything that arrived over a network.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Collection
from pathlib import Path

from splitexit.errors import ConfigError

__all__ = ["code_file", "import_object", "is_import_spec", "is_trusted"]


def is_import_spec(spec: str) -> bool:
    """True for `module:attr` and `file.py:attr` (but not for `folder:PATH` or `synthetic:...`)."""
    head, sep, attr = spec.rpartition(":")
    return bool(sep and head and attr.isidentifier() and (head.endswith(".py") or _looks_like_module(head)))


def is_trusted(spec: str, trusted: Collection[str]) -> bool:
    """Whether ``spec`` is one of ``trusted`` (file paths compared resolved, so `./m.py:f` is `m.py:f`)."""
    canonical = _canonical(spec)
    return any(_canonical(entry) == canonical for entry in trusted)


def _canonical(spec: str) -> str:
    location, _, attr = spec.rpartition(":")
    return f"{Path(location).expanduser().resolve()}:{attr}" if location.endswith(".py") else spec


def code_file(spec: str) -> Path | None:
    """The source file ``spec``'s code lives in, found without running it (None when it has no file)."""
    location, _, _ = spec.rpartition(":")
    if location.endswith(".py"):
        path = Path(location).expanduser().resolve()
        return path if path.is_file() else None
    try:  # finding a submodule imports its parent packages, so this runs only for trusted specs
        found = importlib.util.find_spec(location)
    except (ImportError, ValueError):
        return None
    origin = found.origin if found is not None else None
    return Path(origin) if origin and Path(origin).is_file() else None


def _looks_like_module(name: str) -> bool:
    return all(part.isidentifier() for part in name.split("."))


def import_object(spec: str, *, what: str) -> object:
    """Import the object named by ``spec``; ``what`` ("model factory", "dataset factory") shapes errors."""
    location, _, attr = spec.rpartition(":")
    if location.endswith(".py"):
        module = _import_file(Path(location), what=what)
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as exc:
            raise ConfigError(f"cannot import module {location!r} for the {what} {spec!r}: {exc}. "
                              "Check the name, or give a file path instead (path/to/file.py:factory).") from exc
    if not hasattr(module, attr):
        public = sorted(n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise ConfigError(f"{location} has no {attr!r} for the {what} {spec!r}; callables there: "
                          f"{', '.join(public[:20]) or '(none)'}")
    return getattr(module, attr)


def _import_file(path: Path, *, what: str) -> object:
    path = path.expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"the {what} file {path} does not exist")
    module_name = f"splitexit_user_{path.stem}_{abs(hash(str(path)))}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load {path} as a Python file for the {what}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise ConfigError(f"importing {path} for the {what} failed: {type(exc).__name__}: {exc}") from exc
    return module
