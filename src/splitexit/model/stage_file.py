"""Stage files: the part of a package one node needs, shipped once and addressed by its sha256.

A stage file is safetensors bytes: the weights of the segments and exit heads between two cuts, with
the package's model.yaml and the two cuts in its metadata. A node rebuilds the model from that spec out of
code it already has (a built-in or a torchvision name) or, for a user's model, from the backbone graph the
metadata carries (``graph_file.py``: PyTorch's own layers and operators only); a user model whose graph
could not be written needs its ``module:factory`` on the node, trusted. The node loads these weights into
the stage's part and runs only that part; the rest stays zero or initial and is never called. Nothing is
unpickled and no code travels.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Collection
from dataclasses import dataclass

import torch
import yaml
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from splitexit.config import NEVER, ExitPolicy, PackageSpec, describe_validation_error
from splitexit.cuts import Boundary, Cut, cut_from_json
from splitexit.errors import IntegrityError, PackageError
from splitexit.model.exits import EarlyExitNet
from splitexit.model.graph_file import GraphNotShippable, graph_from_json, graph_json
from splitexit.model.importing import is_import_spec, is_trusted
from splitexit.model.package import apply_spec_settings, input_example, package_spec, rebuild
from splitexit.model.stages import Stage

__all__ = ["LoadedStage", "load_stage_file", "sha256_hex", "stage_file", "without_exits"]

STAGE_FORMAT = "splitexit.stage/3"  # 2: cuts are ids, "input" or "output"; 3: user models carry "graph"
_METADATA = "splitexit"
_BACKBONE = "backbone."
_HEADS = "heads."


@dataclass(frozen=True)
class LoadedStage:
    net: EarlyExitNet
    stage: Stage
    spec: PackageSpec


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stage_file(net: EarlyExitNet, start: Cut, end: Cut, *,
               disabled_exits: Collection[int] = ()) -> bytes:
    """The weights (and spec) a node needs to run ``net.stage(start, end)``; ``disabled_exits`` are written
    as never firing, so the node does not even run their heads."""
    if net.source is None:
        raise PackageError("nodes rebuild the model by name, so this net needs one: build it with "
                           "EarlyExitNet.from_model(..., source=ModelSource(name=...)) or load it from a package")
    stage = net.stage(start, end)
    tensors = {}
    for part in stage.parts:
        for key, value in part.segment.state_dict().items():
            tensors[_BACKBONE + key] = value.detach().contiguous()
    for index in _head_indices(net, stage):
        for key, value in net.heads[index].state_dict().items():
            tensors[f"{_HEADS}{index}.{key}"] = value.detach().contiguous()
    spec = package_spec(net, weights_sha256=net.weights_sha256 or _state_sha256(net))
    if disabled_exits:
        spec = spec.model_copy(update={"policy": without_exits(net.policy, disabled_exits)})
    # One metadata entry: safetensors keeps metadata in a hash map, so several entries come out in any order
    # and the same stage would get a different sha256 each time.
    about = {"format": STAGE_FORMAT, "spec": yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=True),
             "start": str(start), "end": str(end)}
    if is_import_spec(net.source.name):
        try:
            about["graph"] = graph_json(net.graph.graph_module)
        except GraphNotShippable as exc:
            about["graph_missing"] = str(exc)
    return save_tensors(tensors, metadata={_METADATA: json.dumps(about, sort_keys=True)})


def load_stage_file(data: bytes, *, sha256: str, trusted_models: Collection[str] = ()) -> LoadedStage:
    """Verify ``data`` against ``sha256``, rebuild the model and load the stage's weights.

    A user model comes from the graph the file carries; only where it carries none is a ``module:factory``
    built, and only if it is in ``trusted_models``: the bytes come from the network, and must not choose
    which of the node's code gets imported.
    """
    if sha256_hex(data) != sha256:
        raise IntegrityError(f"stage file does not match its sha256 {sha256[:12]}…: it was corrupted or replaced "
                             "in transit; the node refuses it")
    try:
        tensors = load_tensors(data)
        metadata = _metadata(data)
    except (SafetensorError, ValueError) as exc:
        raise PackageError(f"stage file {sha256[:12]}… is not readable safetensors: {exc}") from exc
    if metadata.get("format") != STAGE_FORMAT:
        raise PackageError(f"stage file {sha256[:12]}… has format {metadata.get('format')!r}, expected {STAGE_FORMAT}")
    try:
        spec = PackageSpec.model_validate(yaml.safe_load(metadata.get("spec", "")))
        start, end = _cut_value(metadata.get("start", "")), _cut_value(metadata.get("end", ""))
    except (ValidationError, yaml.YAMLError, ValueError) as exc:
        detail = describe_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
        raise PackageError(f"stage file {sha256[:12]}… carries an invalid spec: {detail}") from exc
    where = f"stage file {sha256[:12]}…"
    graph_module = None
    if "graph" in metadata:
        graph_module = graph_from_json(metadata["graph"], where=where, input_shape=spec.input.shape,
                                       input_dtype=input_example(spec).dtype)
    elif is_import_spec(spec.model.name) and not is_trusted(spec.model.name, trusted_models):
        reason = metadata.get("graph_missing", "it carries no graph")[:300]
        raise PackageError(f"{where} is for the user model {spec.model.name!r} and carries no graph the node can "
                           f"rebuild ({reason}); its code is needed, so list it under `trusted_models:` in the "
                           "cluster file and install the file on the node if the nodes should build it")
    net = rebuild(spec, where=where, graph_module=graph_module)
    stage = net.stage(start, end)
    _load_stage_weights(net, stage, tensors, sha256)
    apply_spec_settings(net, spec)
    return LoadedStage(net, net.stage(start, end), spec)


def _load_stage_weights(net: EarlyExitNet, stage: Stage, tensors: dict, sha256: str) -> None:
    needed = {_BACKBONE + k for part in stage.parts for k in part.segment.state_dict()}
    needed |= {f"{_HEADS}{i}.{k}" for i in _head_indices(net, stage) for k in net.heads[i].state_dict()}
    if set(tensors) != needed:
        missing, extra = sorted(needed - set(tensors)), sorted(set(tensors) - needed)
        raise PackageError(f"stage file {sha256[:12]}… does not fit its stage (missing {missing[:3]}, unexpected "
                           f"{extra[:3]}): was it written by another splitexit or model version?")
    backbone = {k.removeprefix(_BACKBONE): v for k, v in tensors.items() if k.startswith(_BACKBONE)}
    heads = {k.removeprefix(_HEADS): v for k, v in tensors.items() if k.startswith(_HEADS)}
    for module, state in ((net.graph.graph_module, backbone), (net.heads, heads)):
        current = module.state_dict()
        for key, value in state.items():
            if current[key].shape != value.shape or current[key].dtype != value.dtype:
                raise PackageError(f"stage file {sha256[:12]}…: {key} is {tuple(value.shape)} {value.dtype}, the "
                                   f"model has {tuple(current[key].shape)} {current[key].dtype}")
        module.load_state_dict(state, strict=False)


def without_exits(policy: ExitPolicy, disabled: Collection[int]) -> ExitPolicy:
    """``policy`` with the given early exits never firing (a plan that leaves them out)."""
    return policy.model_copy(update={"thresholds": tuple(NEVER if i in disabled else t
                                                         for i, t in enumerate(policy.thresholds))})


def _state_sha256(net: EarlyExitNet) -> str:
    """A checksum of the weights of a net that was never saved (packages record their file's checksum)."""
    digest = hashlib.sha256()
    for module in (net.graph.graph_module, net.heads):
        for key, value in sorted(module.state_dict().items()):
            digest.update(key.encode())
            digest.update(value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _head_indices(net: EarlyExitNet, stage: Stage) -> list[int]:
    return [i for i in stage.exits if i < net.num_exits - 1]


def _metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's ``__metadata__`` (its format: 8-byte little-endian length, then JSON)."""
    if len(data) < 8:
        raise ValueError("too short")
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    about = json.loads((header.get("__metadata__") or {}).get(_METADATA, "{}"))
    if not isinstance(about, dict) or not all(isinstance(v, str) for v in about.values()):
        raise ValueError("its metadata is not a mapping of strings")
    return about


def _cut_value(text: str) -> Cut:
    """A cut as the metadata writes it (``str(cut)``); ValueError for anything else."""
    return cut_from_json(text if text in tuple(Boundary) else int(text))
