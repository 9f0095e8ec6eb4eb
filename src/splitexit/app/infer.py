"""`splitexit infer`: image files in, class names out, answered by the net here or by a running cluster."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from splitexit.config import ClusterSpec, ImageInput, PackageSpec
from splitexit.config.load import load_cluster
from splitexit.control.edge import Entry
from splitexit.errors import DataError
from splitexit.model.cpu import apply_threads
from splitexit.model.exits import EarlyExitNet
from splitexit.model.images import read_image
from splitexit.model.package import load, read_spec
from splitexit.runtime.records import RequestRecord

__all__ = ["ImageAnswer", "infer_images"]

#: The node named in answers computed in this process, without a cluster.
HERE = "local"


@dataclass(frozen=True)
class ImageAnswer:
    """What the net said about one image file (``error`` set, and the rest empty, when the cluster failed it)."""

    image: str
    prediction: int | None
    name: str | None
    confidence: float | None
    exit: int | None
    node: str
    latency_ms: float
    error: str | None = None


def infer_images(package: Path, images: Sequence[Path], *, cluster_file: Path | None = None,
                 trust_models: Sequence[str] = (), edge: str | None = None) -> list[ImageAnswer]:
    """Answer each image, in order: here, or with ``cluster_file`` through its running workers (the file's
    layout: ``ends_at``, or exits spread over the tiers). Every image is read before any is sent, so a bad
    file stops the command before it has done anything. ``edge``: which of the file's edges this is."""
    cluster = load_cluster(cluster_file).for_edge(edge) if cluster_file is not None else None
    trusted = (*trust_models, *(cluster.trusted_models if cluster else ()))
    spec = read_spec(package)
    net = load(package, trust_models=trusted)
    apply_threads(net.cpu)
    prepare = _image_input(package, spec)
    inputs = [read_image(path, prepare) for path in images]
    if cluster is None:
        records = [_here(net, x, index) for index, x in enumerate(inputs)]
    else:
        records = asyncio.run(_through(net, cluster, inputs))
    return [_answer(record, str(path), spec.classes) for record, path in zip(records, images)]


def _image_input(package: Path, spec: PackageSpec) -> ImageInput:
    """How the package's images are prepared, checked against the input the net takes."""
    if spec.images is None:
        raise DataError(f"{package} was not trained on image files, so it does not say how to prepare them; "
                        "train it with --data folder:PATH (see `splitexit train --help`)")
    shape = (spec.images.channels, spec.images.size, spec.images.size)
    if shape != tuple(spec.input.shape):
        raise DataError(f"{package} prepares images as {shape} but its model takes {tuple(spec.input.shape)}; "
                        "the package is inconsistent: train it again")
    return spec.images


def _here(net: EarlyExitNet, x: torch.Tensor, index: int) -> RequestRecord:
    started = time.perf_counter()
    result = net.infer(x.unsqueeze(0))
    latency_ms = (time.perf_counter() - started) * 1e3
    return RequestRecord(index, index, int(result.prediction[0]), int(result.exit[0]), HERE,
                         float(result.confidence[0]), None, latency_ms)


async def _through(net: EarlyExitNet, cluster: ClusterSpec, inputs: list[torch.Tensor]) -> list[RequestRecord]:
    entry = Entry(net, cluster)
    try:
        await entry.start()
        # one at a time: each latency is that image's alone
        return [await entry.infer(x, index=index) for index, x in enumerate(inputs)]
    finally:
        await entry.close()


def _answer(record: RequestRecord, image: str, classes: tuple[str, ...] | None) -> ImageAnswer:
    name = classes[record.prediction] if classes and record.prediction is not None \
        and 0 <= record.prediction < len(classes) else None
    return ImageAnswer(image, record.prediction, name, record.confidence, record.exit, record.node,
                       record.latency_ms, record.error)
