"""Devices without a GPU: the checks a node makes at start (with torch's CUDA answers patched), bf16 autocast on
the CPU keeping digits' top-1, what goes on the wire (CPU, contiguous, declared dtype), and no device named
outside runtime/devices.py."""

from __future__ import annotations

import asyncio
import copy
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from splitexit import EarlyExitNet, ModelSource, build_model, load_dataset
from splitexit.config import ClusterSpec, TrainConfig
from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT, Cut
from splitexit.errors import ClusterError
from splitexit.model.stages import batch_buckets
from splitexit.model.train import train
from splitexit.runtime.devices import CPU, ComputeDevice, available, choose_device, to_wire
from splitexit.runtime.executor import StageExecutor, StageReply
from splitexit.runtime.node import Node
from splitexit.runtime.node_profile import time_model
from splitexit.tensors import TensorInfo
from support import digits_net

SRC = Path(__file__).resolve().parents[3] / "src" / "splitexit"


@pytest.fixture()
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch says this machine has two CUDA devices (nothing is put on them in these tests)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_auto_and_cpu_are_the_cpu_here() -> None:
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("this machine has an accelerator: auto picks it")
    assert available() == ["cpu"]
    assert choose_device("auto", "fp32", member="node a") == CPU
    assert choose_device("cpu", "bf16", member="node a").name == "cpu/bf16"


def test_an_absent_device_fails_at_once_naming_it_and_what_there_is() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ClusterError, match=r"node cloud1 asks for device cuda, which this machine does not have "
                                           r"\(it has cpu\)"):
        choose_device("cuda", "fp32", member="node cloud1")


def test_with_two_gpus_auto_takes_the_first_and_an_index_past_them_fails(two_gpus: None) -> None:
    assert available()[:3] == ["cpu", "cuda:0", "cuda:1"]
    assert choose_device("auto", "fp16", member="node a").name == "cuda:0/fp16"
    assert choose_device("cuda", "bf16", member="node a").device == torch.device("cuda", 0)
    assert choose_device("cuda:1", "fp32", member="node a").device == torch.device("cuda", 1)
    with pytest.raises(ClusterError, match=r"device cuda:2, which this machine does not have \(it has cpu, "
                                           r"cuda:0, cuda:1"):
        choose_device("cuda:2", "fp32", member="node a")


def test_pin_memory_is_for_cuda_devices_and_auto_pins_only_where_it_finds_one() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ClusterError, match=r"node a asks for pin_memory on cpu: page-locked memory speeds up "
                                           r"copies to a CUDA device only"):
        choose_device("cpu", "fp32", member="node a", pin_memory=True)
    unpinned = choose_device("auto", "fp32", member="node a", pin_memory=True)
    assert unpinned == CPU and unpinned.payload_buffer is None  # the frame reader's own buffers


def test_pin_memory_on_a_gpu_reads_payloads_into_pinned_buffers(two_gpus: None) -> None:
    pinned = choose_device("cuda:1", "fp32", member="node a", pin_memory=True)
    assert pinned.pin_memory and pinned.payload_buffer is not None
    assert choose_device("auto", "fp32", member="node a", pin_memory=True).pin_memory
    assert choose_device("cuda", "fp32", member="node a").payload_buffer is None


def test_fp16_on_the_cpu_is_refused() -> None:
    with pytest.raises(ClusterError, match="fp16 on the CPU.*use bf16"):
        choose_device("cpu", "fp16", member="the edge edge")


def test_the_cluster_file_names_the_choices() -> None:
    with pytest.raises(ValueError, match="device 'gpu' is none of auto, cpu, cuda, cuda:N"):
        ClusterSpec.model_validate({"nodes": [{"name": "edge", "role": "edge", "device": "gpu"}]})
    with pytest.raises(ValueError, match="dtype"):
        ClusterSpec.model_validate({"nodes": [{"name": "edge", "role": "edge", "dtype": "int4"}]})


def test_a_node_checks_its_device_when_it_is_made_and_health_names_it(tmp_path: Path) -> None:
    def cluster(**cloud1: str | bool) -> ClusterSpec:
        return ClusterSpec.model_validate({"nodes": [{"name": "edge", "role": "edge"},
                                                     {"name": "cloud1", "address": "127.0.0.1:1", **cloud1}]})
    with pytest.raises(ClusterError, match="node cloud1 asks for dtype fp16 on the CPU"):
        Node(cluster(device="cpu", dtype="fp16"), "cloud1", cache_dir=tmp_path)
    with pytest.raises(ClusterError, match="node cloud1 asks for pin_memory on cpu"):
        Node(cluster(device="cpu", pin_memory=True), "cloud1", cache_dir=tmp_path)
    node = Node(cluster(device="cpu", dtype="bf16"), "cloud1", cache_dir=tmp_path)
    assert asyncio.run(node.health()).device == "cpu/bf16"


def test_what_goes_on_the_wire_is_cpu_contiguous_and_of_the_declared_dtype() -> None:
    computed = torch.randn(4, 6, 3, dtype=torch.bfloat16).transpose(1, 2)  # bf16 and not contiguous
    (wire,) = to_wire((computed,), (TensorInfo("x", (3, 6), torch.float32),))
    assert wire.device.type == "cpu" and wire.dtype == torch.float32 and wire.is_contiguous()
    assert torch.equal(wire, computed.float())


@pytest.fixture(scope="module")
def digits() -> tuple[EarlyExitNet, torch.Tensor]:
    """digits_cnn trained for a few epochs (about 95% top-1), and 200 digits to run it on."""
    loaded = load_dataset("digits")
    x = torch.stack([loaded.dataset[i][0] for i in range(len(loaded.dataset))])  # type: ignore[arg-type]
    net = EarlyExitNet.from_model(build_model("digits_cnn"), x[:1], source=ModelSource(name="digits_cnn"))
    train(net, loaded.dataset, TrainConfig(epochs=4))
    return net.eval(), x[-200:]


def test_bf16_autocast_on_the_cpu_keeps_the_top_1(digits: tuple[EarlyExitNet, torch.Tensor]) -> None:
    """The whole model as one stage, in fp32 and in bf16: the same digit for at least 99 in 100; a first stage
    in bf16 forwards float32, as its cut declares."""
    net, x = digits
    bf16 = choose_device("cpu", "bf16", member="node a")

    async def run(start: Cut, end: Cut, compute: ComputeDevice) -> StageReply:
        executor: StageExecutor = StageExecutor(net.stage(start, end), compute=compute)
        try:
            return await executor.run((x,))
        finally:
            await executor.close()

    whole = [a.prediction for a in asyncio.run(run(MODEL_INPUT, MODEL_OUTPUT, CPU)).answers]
    halved = [a.prediction for a in asyncio.run(run(MODEL_INPUT, MODEL_OUTPUT, bf16)).answers]
    assert len(whole) == len(halved) == len(x)
    assert sum(a == b for a, b in zip(whole, halved)) >= 0.99 * len(x), "bf16 changed more than 1 digit in 100"
    labels = load_dataset("digits").dataset
    assert sum(p == int(labels[len(labels) - len(x) + i][1]) for i, p in enumerate(halved)) > 0.8 * len(x)  # type: ignore[arg-type]
    first = asyncio.run(run(MODEL_INPUT, net.exit_cuts[0].id, bf16)).onward
    assert first is not None
    (forward,) = first.forward
    assert forward.dtype == torch.float32 and forward.is_contiguous(), "the wire keeps the cut's float32"


def test_no_module_but_devices_names_a_device() -> None:
    """One module owns placement: `.cuda()` or a "cuda" literal anywhere else in src/ fails this test."""
    named = re.compile(r"\.cuda\(|[\"']cuda(:\d+)?[\"']")
    offenders = [f"{path.relative_to(SRC)}:{number}: {line.strip()}"
                 for path in sorted(SRC.rglob("*.py")) if path.name != "devices.py"
                 for number, line in enumerate(path.read_text().splitlines(), 1) if named.search(line)]
    assert not offenders, offenders


def test_a_node_times_its_model_in_its_own_dtype(digits: tuple[EarlyExitNet, torch.Tensor]) -> None:
    net, _ = digits
    cuts = [c.id for c in net.exit_cuts]
    timed = time_model(net, cuts, (1, 2), 2, choose_device("cpu", "bf16", member="node a"))
    assert len(timed.segments) == len(cuts) + 1 and len(timed.heads) == net.num_exits
    assert all(t.seconds[2].median > 0 for t in timed.segments)


@pytest.mark.parametrize("model, shape", [("digits_cnn", (1, 8, 8)), ("resnet18", (3, 64, 64)),
                                          ("mobilenet_v3_small", (3, 64, 64))])
def test_every_segment_has_the_declared_shapes_on_the_meta_device(model: str, shape: tuple[int, ...]) -> None:
    """What a GPU node would compute, shape by shape, without any memory: each segment between two cut
    points takes the tensors its start declares and gives those its end declares (no device assumed)."""
    torch.manual_seed(0)
    net = EarlyExitNet.from_model(build_model(model, 10), torch.zeros(1, *shape),
                                  source=ModelSource(name=model, num_classes=10)).eval()
    cuts = [c.id for c in net.graph.cut_points]
    bounds: list[Cut] = [MODEL_INPUT, *cuts[:: max(1, len(cuts) // 6)], MODEL_OUTPUT]
    for start, end in zip(bounds[:-1], bounds[1:]):
        segment = copy.deepcopy(net.segment_between(start, end)).to("meta")
        infos = (net.input_info,) if start is MODEL_INPUT else net.graph.crossing_info(start)
        with torch.inference_mode():
            out = segment(*(torch.empty(2, *i.shape, dtype=i.dtype, device="meta") for i in infos))
        got = [tuple(t.shape) for t in (out if isinstance(out, tuple) else (out,))]
        want = [(2, 10)] if end is MODEL_OUTPUT else [(2, *i.shape) for i in net.graph.crossing_info(end)]
        assert got == want, (model, start, end)


# --------------------------------------------------------------------------- compiled stages, padded batches
def test_batch_buckets_are_powers_of_two_up_to_max_batch() -> None:
    assert batch_buckets(8) == (1, 2, 4, 8) and batch_buckets(6) == (1, 2, 4, 6) and batch_buckets(1) == (1,)


def test_a_padded_stage_answers_exactly_as_the_plain_one() -> None:
    """Every segment and head call sees a bucket's rows (or more than the largest), and the padded zero rows
    never reach an exit: answers and forwarded tensors equal the plain stage's."""
    net = digits_net()
    seen: list[int] = []

    def counting(module: torch.nn.Module) -> Callable[..., object]:
        def call(*tensors: torch.Tensor) -> object:
            seen.append(int(tensors[0].shape[0]))
            return module(*tensors)
        return call

    for start, end in ((MODEL_INPUT, MODEL_OUTPUT), (MODEL_INPUT, net.exit_cuts[1].id)):
        plain = net.stage(start, end)
        padded = plain.compiled(counting, (1, 4, 8))
        for rows in (3, 8, 13):
            x = torch.randn(rows, 1, 8, 8, generator=torch.Generator().manual_seed(rows))
            with torch.inference_mode():
                want, got = plain.run((x,)), padded.run((x,))
            for field in ("rows", "exit", "prediction", "confidence", "logits", "forward_rows"):
                assert torch.equal(getattr(want, field), getattr(got, field)), (rows, field)
            assert all(torch.equal(a, b) for a, b in zip(want.forward, got.forward))
    assert seen and all(size in (1, 4, 8) or size > 8 for size in seen), seen


def test_cuda_graphs_need_a_cuda_device() -> None:
    with pytest.raises(ClusterError, match="reduce-overhead .*CUDA graphs.* on cpu"):
        choose_device("cpu", "fp32", member="node a", compile="reduce-overhead")


@pytest.mark.slow
def test_compile_runs_on_the_cpu_and_answers_as_eager() -> None:
    """torch.compile (inductor on the CPU) of the last stage, warmed up at both bucket sizes of max_batch 2."""
    net = digits_net()
    plain = net.stage(net.exit_cuts[-1].id, MODEL_OUTPUT)
    compiled = choose_device("cpu", "fp32", member="node a", compile="default").prepared(plain, max_batch=2)
    assert compiled is not plain and choose_device("cpu", "fp32", member="node a").prepared(plain, 2) is plain
    (info,) = plain.input_tensors
    x = torch.randn(2, *info.shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want, got = plain.run((x,)), compiled.run((x,))
    assert torch.equal(want.prediction, got.prediction)
    assert torch.allclose(want.logits, got.logits, atol=1e-4)
