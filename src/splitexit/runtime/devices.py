"""Where a member's stage computes, and the one place tensors move between the wire (CPU) and that device.

A node's ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``) and ``dtype`` (``fp32``, ``bf16``,
``fp16``) are checked when it starts, as Petals does: an explicit device that is not there fails at once,
naming it and what is available (no silent fall back to the CPU); fp16 on a CPU is refused (CPU kernels for
it are slow or missing: bf16 is the CPU's half precision). ``auto`` takes the first accelerator, else the CPU.

Compute runs under autocast in the chosen dtype; what goes on the wire is always on the CPU, contiguous and
of the dtype the cut declares (:func:`to_wire`), whatever the device and compute dtype. With ``pin_memory``
(CUDA only) a node reads each large payload from the socket straight into page-locked memory
(:meth:`ComputeDevice.payload_buffer`; torch's caching host allocator reuses the blocks) and copies batches to
the GPU on a side stream, which the compute stream waits for (:func:`to_device`). No other module
names a device: ``tests/unit/runtime/test_devices.py`` fails on ``.cuda()`` or a ``"cuda"`` literal
elsewhere in ``src/``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from splitexit.errors import ClusterError
from splitexit.model.stages import Stage, batch_buckets
from splitexit.tensors import TensorInfo

__all__ = ["CPU", "ComputeDevice", "available", "choose_device", "to_device", "to_wire"]

_CUDA = "cuda"
Module = TypeVar("Module", bound=torch.nn.Module)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ComputeDevice:
    """A member's compute device and dtype, checked against this machine."""

    device: torch.device
    dtype: torch.dtype
    compile: str = "off"  # torch.compile mode: off, default, reduce-overhead
    pin_memory: bool = False  # page-locked receive buffers and side-stream copies (CUDA only)

    @property
    def name(self) -> str:
        """``cpu``, ``cuda:0``, ``mps`` (with ``/bf16`` or ``/fp16`` when not fp32): what Health reports."""
        precision = {torch.bfloat16: "/bf16", torch.float16: "/fp16"}.get(self.dtype, "")
        return f"{self.device}{precision}"

    def move(self, module: torch.nn.Module) -> None:
        """Put ``module``'s weights on the device (on the CPU, where they are loaded, nothing moves)."""
        if self.device.type != "cpu":
            module.to(self.device)

    def copy_for(self, module: Module) -> Module:
        """``module`` itself on the CPU; elsewhere a copy of it on the device, so that a caller's model (the
        edge's, which the coordinator also cuts into stage files) stays where it is."""
        if self.device.type == "cpu":
            return module
        return copy.deepcopy(module).to(self.device)

    def prepared(self, stage: Stage, max_batch: int) -> Stage:
        """The stage as it runs here: itself, or (with ``compile``) its compiled twin, padded to
        :func:`~splitexit.model.stages.batch_buckets` of ``max_batch`` and compiled at every size now.
        Minutes of CPU for a large model: call it in a worker thread."""
        if self.compile == "off":
            return stage
        buckets = batch_buckets(max_batch)
        mode = None if self.compile == "default" else self.compile
        twin = stage.compiled(lambda module: torch.compile(module, mode=mode, dynamic=False), buckets)
        with torch.inference_mode(), self.autocast():
            twin.warm_up(buckets, self.device)
        self.synchronize()
        return twin

    @property
    def payload_buffer(self) -> Callable[[int], memoryview] | None:
        """What a node reads large payloads into: page-locked memory with ``pin_memory`` (so the batch decoded
        from it goes to the GPU without another copy), else None: the frame reader's own buffers."""
        return _pinned_buffer if self.pin_memory else None

    def synchronize(self) -> None:
        """Wait for the device's queued work (GPU kernels run asynchronously): compute is timed to here."""
        if self.device.type == _CUDA:
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Compute in ``dtype`` where autocast applies (matmuls, convolutions); fp32: nothing changes."""
        if self.dtype == torch.float32:
            yield
            return
        with torch.autocast(self.device.type, dtype=self.dtype):
            yield


#: Where a member computes unless told otherwise (and every in-process chain of the tests).
CPU = ComputeDevice(torch.device("cpu"), torch.float32)


def available() -> list[str]:
    """The devices this machine has, as a cluster file names them."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"{_CUDA}:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def choose_device(device: str, dtype: str, *, member: str, compile: str = "off",
                  pin_memory: bool = False) -> ComputeDevice:
    """The checked device and dtype of ``member`` (ClusterError, naming the member, the device and what is
    here). ``pin_memory`` with ``auto`` applies only where auto finds a GPU; asked of another device, it
    is an error."""
    here = available()
    if device == "auto":
        chosen = next((d for d in here if d != "cpu"), "cpu")
    else:
        chosen = f"{_CUDA}:0" if device == _CUDA else device
        if chosen not in here:
            raise ClusterError(f"{member} asks for device {device}, which this machine does not have (it has "
                               f"{', '.join(here)}): change `device` of {member} in the cluster file, or use auto")
    torch_dtype = _DTYPES[dtype]
    if torch_dtype == torch.float16 and chosen == "cpu":
        raise ClusterError(f"{member} asks for dtype fp16 on the CPU, which computes it slowly or not at all: "
                           "use bf16 (or fp32) there, or a GPU device")
    if compile == "reduce-overhead" and not chosen.startswith(_CUDA):
        raise ClusterError(f"{member} asks for compile: reduce-overhead (CUDA graphs) on {chosen}: use compile: "
                           "default there, or a CUDA device")
    on_gpu = chosen.startswith(_CUDA)
    if pin_memory and not on_gpu and device != "auto":
        raise ClusterError(f"{member} asks for pin_memory on {chosen}: page-locked memory speeds up copies to a "
                           "CUDA device only; remove `pin_memory`, or use a CUDA device")
    return ComputeDevice(torch.device(chosen), torch_dtype, compile, pin_memory and on_gpu)


def to_device(tensors: Sequence[torch.Tensor], compute: ComputeDevice) -> tuple[torch.Tensor, ...]:
    """Received (CPU) tensors onto the compute device; on the CPU they stay as they are.

    With ``pin_memory`` the copies run on a side stream the compute stream then waits for; a tensor not
    already in page-locked memory (a small payload, the edge's caller's input) is staged through a pinned
    block first. The CPU tensors must live until the batch's compute is synchronised, as the executor's do.
    """
    if compute.device.type == "cpu":
        return tuple(tensors)
    if not compute.pin_memory:
        return tuple(t.to(compute.device, non_blocking=True) for t in tensors)
    side, computing = _copy_stream(compute.device), torch.cuda.current_stream(compute.device)
    side.wait_stream(computing)  # memory the caching allocator hands the copies may have just been freed there
    with torch.cuda.stream(side):
        moved = tuple((t if t.is_pinned() else t.pin_memory()).to(compute.device, non_blocking=True)
                      for t in tensors)
    computing.wait_stream(side)
    for tensor in moved:
        tensor.record_stream(computing)  # allocated on the side stream, used on the compute stream
    return moved


def _pinned_buffer(size: int) -> memoryview:
    return torch.empty(size, dtype=torch.uint8, pin_memory=True).numpy().data  # the view keeps the tensor alive


@functools.cache
def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def to_wire(tensors: Sequence[torch.Tensor], infos: Sequence[TensorInfo]) -> tuple[torch.Tensor, ...]:
    """Tensors to send on: on the CPU, contiguous, each in the dtype its cut declares (autocast may have
    produced bf16 or fp16, or left them on a GPU)."""
    out = []
    for tensor, info in zip(tensors, infos, strict=True):
        if tensor.device.type != "cpu" or tensor.dtype != info.dtype:
            tensor = tensor.to("cpu", dtype=info.dtype)
        out.append(tensor.contiguous())
    return tuple(out)
