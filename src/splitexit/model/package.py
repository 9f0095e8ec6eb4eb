"""Model packages: a directory with ``model.yaml`` (the spec), ``weights.safetensors`` and ``manifest.json``.

A package names its backbone (zoo name, torchvision name or ``module:factory``) instead of containing
code, so loading rebuilds the model from code the user trusts (user code only when named in
``trust_models``; see ``manifest.py``), re-traces it, checks that every exit still sits after the same
graph node, verifies the weights' sha256 and loads them with safetensors. Nothing is ever unpickled.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Collection, Sequence
from pathlib import Path

import torch
import torch.fx
import yaml
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from splitexit.config import (
    DataSplit,
    ExitSpec,
    ImageInput,
    InputSpec,
    PackageSpec,
    describe_validation_error,
)
from splitexit.errors import IntegrityError, PackageError, SplitExitError
from splitexit.model.exits import EarlyExitNet, output_classes
from splitexit.model.graph import ModelGraph, trace_model
from splitexit.model.manifest import MANIFEST_FILE, check_code, file_sha256, manifest_text, read_manifest
from splitexit.model.zoo import build_model

__all__ = ["MANIFEST_FILE", "SPEC_FILE", "WEIGHTS_FILE", "apply_spec_settings", "input_example", "load",
           "load_backbone_weights", "package_spec", "read_spec", "rebuild", "save"]

SPEC_FILE = "model.yaml"
WEIGHTS_FILE = "weights.safetensors"
_BACKBONE = "backbone."
_HEADS = "heads."
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def save(net: EarlyExitNet, path: str | os.PathLike[str], *, data: DataSplit | None = None,
         training: dict | None = None, calibration: dict | None = None, classes: Sequence[str] | None = None,
         images: ImageInput | None = None) -> Path:
    """Write ``net`` as a package directory (created if needed; existing package files are replaced).

    ``classes`` names the classes in index order; ``images`` is how image files are prepared for the net.
    """
    if net.source is None:
        raise PackageError("this net was built from a model object, so a package could not rebuild it. Pass "
                           "source=ModelSource(name='module:factory') to EarlyExitNet.from_model, or build the "
                           "model with splitexit.build_model.")
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {_BACKBONE + k: v.detach().clone().contiguous() for k, v in net.graph.graph_module.state_dict().items()}
    tensors.update({_HEADS + k: v.detach().clone().contiguous() for k, v in net.heads.state_dict().items()})
    weights = directory / WEIGHTS_FILE
    _atomic_write(weights, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "splitexit"}))
    spec = package_spec(net, weights_sha256=file_sha256(weights), data=data, training=training,
                        calibration=calibration, classes=classes, images=images)
    text = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    _atomic_write(directory / SPEC_FILE, lambda tmp: tmp.write_text(text))
    manifest = manifest_text(directory / SPEC_FILE, spec.model.name)
    _atomic_write(directory / MANIFEST_FILE, lambda tmp: tmp.write_text(manifest))
    net.weights_sha256 = spec.weights_sha256
    return directory


def package_spec(net: EarlyExitNet, *, weights_sha256: str, data: DataSplit | None = None,
                 training: dict | None = None, calibration: dict | None = None,
                 classes: Sequence[str] | None = None, images: ImageInput | None = None) -> PackageSpec:
    """The model.yaml contents that rebuild ``net`` (weights aside)."""
    return PackageSpec(
        model=net.source,  # callers check that the net has a source
        input=InputSpec(shape=net.input_shape, dtype=_dtype_name(net)),
        exits=tuple(ExitSpec(cut=c.id, after=c.after, head=h) for c, h in zip(net.exit_cuts, net.head_names)),
        policy=net.policy,
        cpu=net.cpu,
        data=data,
        weights_sha256=weights_sha256,
        training=training or {},
        calibration=calibration or {},
        classes=tuple(classes) if classes is not None else None,
        images=images,
    )


def read_spec(path: str | os.PathLike[str]) -> PackageSpec:
    """Read and validate a package's model.yaml (without loading weights)."""
    directory = Path(path)
    spec_file = directory / SPEC_FILE
    if not directory.is_dir():
        raise PackageError(f"no package at {directory}: create one with `splitexit train ... --out {directory}`")
    if not spec_file.is_file():
        raise PackageError(f"{spec_file} is missing; the package is incomplete. Re-run `splitexit train`.")
    try:
        raw = yaml.safe_load(spec_file.read_text())
    except yaml.YAMLError as exc:
        raise PackageError(f"{spec_file} is not valid YAML: {exc}") from exc
    try:
        return PackageSpec.model_validate(raw)
    except ValidationError as exc:
        raise PackageError(f"{spec_file} is not a valid splitexit package spec: "
                           f"{describe_validation_error(exc)}") from exc


def load(path: str | os.PathLike[str], *, trust_models: Collection[str] = ()) -> EarlyExitNet:
    """Verify, rebuild and load a package written by :func:`save`.

    A backbone from user code (``module:factory``, ``file.py:factory``) is imported only when it is in
    ``trust_models`` and its source file is the one the package was built from.
    """
    directory = Path(path)
    spec = read_spec(directory)
    manifest = read_manifest(directory, directory / SPEC_FILE)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise PackageError(f"{weights} is missing; the package is incomplete. Re-run `splitexit train`.")
    check_code(manifest, spec.model.name, trust_models, where=directory)
    if file_sha256(weights) != spec.weights_sha256:
        raise IntegrityError(f"{weights} does not match the sha256 recorded in {directory / SPEC_FILE}: the file was "
                             "changed or corrupted after the package was written. Restore it or re-run training.")
    net = rebuild(spec, where=str(directory))
    _load_weights(net, weights)
    return apply_spec_settings(net, spec)


def rebuild(spec: PackageSpec, *, where: str, graph_module: torch.fx.GraphModule | None = None) -> EarlyExitNet:
    """The net ``spec`` describes, with freshly initialised weights (``where`` names the source in errors).

    With ``graph_module`` (a backbone graph a stage file shipped) nothing is built from code: the graph is
    the backbone.
    """
    example = input_example(spec)
    try:
        if graph_module is None:
            graph = trace_model(build_model(spec.model.name, spec.model.num_classes), example)
        else:
            graph = ModelGraph(graph_module, example, tracer="shipped")
        cuts = [graph.cut(e.cut) for e in spec.exits]
    except SplitExitError as exc:
        raise PackageError(f"cannot rebuild the model of {where}: {exc}") from exc
    for exit_spec, cut in zip(spec.exits, cuts):
        if cut.after != exit_spec.after:
            raise PackageError(f"{where} was written for a different version of {spec.model.name!r}: exit at cut "
                               f"{cut.id} should follow node {exit_spec.after!r}, the model now has {cut.after!r} "
                               "there. Retrain with the installed version.")
    return EarlyExitNet(graph, cuts, num_classes=output_classes(graph, example), input_shape=spec.input.shape,
                        input_dtype=example.dtype, heads=[e.head for e in spec.exits], policy=spec.policy,
                        source=spec.model)


def input_example(spec: PackageSpec) -> torch.Tensor:
    """One zero input of the shape and dtype ``spec`` declares (a batch of one)."""
    return torch.zeros(1, *spec.input.shape, dtype=_DTYPES[spec.input.dtype])


def apply_spec_settings(net: EarlyExitNet, spec: PackageSpec) -> EarlyExitNet:
    """Apply the spec's CPU settings and checksum to a net whose weights are loaded; eval mode."""
    net.cpu = spec.cpu
    net.weights_sha256 = spec.weights_sha256
    if spec.cpu.memory_format == "channels_last":
        net.to(memory_format=torch.channels_last)
    return net.eval()


def load_backbone_weights(model: torch.nn.Module, path: str | os.PathLike[str]) -> None:
    """Load pretrained backbone weights from .safetensors, or from .pt/.pth with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise PackageError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise PackageError(f"cannot read weights from {path}: {type(exc).__name__}: {exc}. Give a .safetensors "
                           "file or a .pt/.pth state dict saved with torch.save(model.state_dict(), ...)") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PackageError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    # torch's own message lists every key over many lines; say what differs, a few of each, on one line
    shown, detail_chars = 3, 400

    def shape(tensor: torch.Tensor) -> str:
        return "x".join(map(str, tensor.shape)) or "a scalar"

    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [f"{k} is {shape(state[k])} in the file, {shape(v)} in the model" for k, v in expected.items()
                if k in state and state[k].shape != v.shape]
    problems = [f"{len(keys)} key{'s' if len(keys) > 1 else ''} {what}: {', '.join(keys[:shown])}"
                f"{', ...' if len(keys) > shown else ''}"
                for what, keys in (("missing from the file", missing), ("the model does not have", unexpected),
                                   ("of another shape", reshaped)) if keys]
    if problems:
        raise PackageError(f"weights in {path} do not fit the model: {'; '.join(problems)}. Were they saved from "
                           "this --model, with as many classes as the dataset has?")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())[:detail_chars]
        raise PackageError(f"weights in {path} do not fit the model: {detail}") from exc


def _load_weights(net: EarlyExitNet, weights: Path) -> None:
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise PackageError(f"{weights} is not a readable safetensors file: {exc}") from exc
    backbone = {k.removeprefix(_BACKBONE): v for k, v in tensors.items() if k.startswith(_BACKBONE)}
    heads = {k.removeprefix(_HEADS): v for k, v in tensors.items() if k.startswith(_HEADS)}
    stray = sorted(k for k in tensors if not k.startswith((_BACKBONE, _HEADS)))
    if stray:
        raise PackageError(f"{weights} has tensors that belong to no part of the net: {stray[:5]}")
    for part, module, state in (("backbone", net.graph.graph_module, backbone), ("heads", net.heads, heads)):
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            detail = " ".join(line.strip() for line in str(exc).splitlines()[1:])[:400]
            raise PackageError(f"{weights}: the {part} weights do not fit the model ({detail}). Was the package "
                               "written by another splitexit version, or for another model or number of "
                               "classes? Retrain it.") from exc


def _dtype_name(net: EarlyExitNet) -> str:
    for name, dtype in _DTYPES.items():
        if dtype == net.input_dtype:
            return name
    raise PackageError(f"inputs of dtype {net.input_dtype} cannot be packaged; use one of {', '.join(_DTYPES)}")


def _atomic_write(target: Path, write) -> None:  # noqa: ANN001 - callable(Path) -> None
    """Write through a temporary file in the same directory, then rename, so readers never see half a file."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
