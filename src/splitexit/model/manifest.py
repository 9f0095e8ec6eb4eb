"""A package's ``manifest.json``: what the package was written from, checked before any of its code runs.

``model.yaml`` records the weights' sha256; the manifest records model.yaml's own sha256 and, for a
backbone from the user's code (``module:factory``, ``file.py:factory``), the sha256 of that source file.
Loading checks, in this order: model.yaml is the one the package was written with; a backbone from user
code is one the caller trusts (``--trust-model``, ``trusted_models``); that code is the code the package
was built from. Only then is anything imported.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from pathlib import Path

from pydantic import ValidationError

from splitexit.config import describe_validation_error
from splitexit.config.package import CodeDigest, PackageManifest
from splitexit.errors import IntegrityError, PackageError
from splitexit.model.importing import code_file, is_import_spec, is_trusted

__all__ = ["MANIFEST_FILE", "check_code", "file_sha256", "manifest_text", "read_manifest"]

MANIFEST_FILE = "manifest.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_text(spec_file: Path, model_name: str) -> str:
    """The manifest for a package whose model.yaml is ``spec_file`` and whose backbone is ``model_name``."""
    code = None
    source = code_file(model_name) if is_import_spec(model_name) else None
    if source is not None:
        code = CodeDigest(file=str(source), sha256=file_sha256(source))
    manifest = PackageManifest(spec_sha256=file_sha256(spec_file), code=code)
    return json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n"


def read_manifest(directory: Path, spec_file: Path) -> PackageManifest:
    """The package's manifest, once it is known to describe ``spec_file`` as it is now."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise PackageError(f"{path} is missing: the package was written by an older splitexit, or is incomplete. "
                           "Retrain it with `splitexit train`.")
    try:
        manifest = PackageManifest.model_validate(json.loads(path.read_text()))
    except (ValueError, ValidationError) as exc:
        detail = describe_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
        raise PackageError(f"{path} is not a valid splitexit manifest: {detail}") from exc
    if file_sha256(spec_file) != manifest.spec_sha256:
        raise IntegrityError(f"{spec_file} does not match the sha256 recorded in {path}: model.yaml was changed "
                             "after the package was written. Restore it, or retrain; splitexit loads nothing from it.")
    return manifest


def check_code(manifest: PackageManifest, model_name: str, trusted: Collection[str], *, where: Path) -> None:
    """Refuse a backbone from user code that the caller does not trust, or that changed since packaging."""
    if not is_import_spec(model_name):
        return  # a built-in or torchvision name: code that came with the installed packages
    if not is_trusted(model_name, trusted):
        raise PackageError(f"{where} builds its model by importing {model_name!r}, code this command was not told "
                           f"to trust. If you wrote or checked that code, pass --trust-model {model_name} (Python: "
                           f"load(..., trust_models=[{model_name!r}])) or list it under `trusted_models:` in the "
                           "cluster file.")
    if manifest.code is None:
        return  # the code had no file to hash when the package was written (e.g. a module built into Python)
    source = code_file(model_name)
    if source is None:
        raise PackageError(f"{where} was built from {manifest.code.file}, and {model_name!r} now names no file. "
                           "Put the code back where it was, or retrain.")
    if file_sha256(source) != manifest.code.sha256:
        raise IntegrityError(f"{where} was built from {manifest.code.file} with sha256 {manifest.code.sha256[:12]}…, "
                             f"but {source} now has sha256 {file_sha256(source)[:12]}…: the code changed since the "
                             "package was written. Restore that code, or retrain the package with the new code.")
