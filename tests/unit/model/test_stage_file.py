"""Stage files: what a node is shipped rebuilds exactly the stage, and nothing altered or untrusted loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splitexit import EarlyExitNet, ExitPolicy, ModelSource, build_model
from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT
from splitexit.errors import IntegrityError, PackageError
from splitexit.model.stage_file import load_stage_file, sha256_hex, stage_file


@pytest.fixture(scope="module")
def net() -> EarlyExitNet:
    torch.manual_seed(0)
    net = EarlyExitNet.from_model(build_model("digits_cnn"), torch.zeros(1, 1, 8, 8),
                                  source=ModelSource(name="digits_cnn")).eval()
    net.set_policy(ExitPolicy(temperatures=(0.5,) * net.num_exits, thresholds=(0.3,) * len(net.exit_cuts)))
    return net


def test_a_shipped_stage_computes_exactly_what_the_original_does(net: EarlyExitNet) -> None:
    start, end = net.exit_cuts[0].id, MODEL_OUTPUT
    data = stage_file(net, start, end)
    loaded = load_stage_file(data, sha256=sha256_hex(data))
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        (activation,) = net.segment_between(MODEL_INPUT, start)(x)
        want = net.stage(start, end).run((activation,))
        got = loaded.stage.run((activation,))
    torch.testing.assert_close(got.logits, want.logits)
    assert got.rows.tolist() == want.rows.tolist() and got.exit.tolist() == want.exit.tolist()
    assert loaded.net.policy == net.policy


def test_a_stage_file_holds_only_its_stage_and_is_deterministic(net: EarlyExitNet) -> None:
    first, second = net.exit_cuts[0].id, net.exit_cuts[1].id
    middle = stage_file(net, first, second)
    whole = stage_file(net, MODEL_INPUT, MODEL_OUTPUT)
    assert len(middle) < len(whole) / 2, "the middle stage should not carry the other stages' weights"
    assert stage_file(net, first, second) == middle, "same stage, same bytes: the sha256 names it"


def test_altered_bytes_are_refused(net: EarlyExitNet) -> None:
    data = bytearray(stage_file(net, MODEL_INPUT, net.exit_cuts[0].id))
    sha = sha256_hex(bytes(data))
    data[-5] ^= 0xFF
    with pytest.raises(IntegrityError, match="sha256"):
        load_stage_file(bytes(data), sha256=sha)


USER_MODELS = Path(__file__).parents[2] / "assets" / "models.py"


def user_net(factory: str) -> EarlyExitNet:
    torch.manual_seed(0)
    name = f"{USER_MODELS}:{factory}"
    return EarlyExitNet.from_model(build_model(name, 10), torch.zeros(1, 1, 8, 8),
                                   source=ModelSource(name=name, num_classes=10)).eval()


def test_a_user_model_travels_as_its_graph_and_needs_no_trust() -> None:
    user = user_net("build")
    start, end = user.exit_cuts[0].id, MODEL_OUTPUT
    data = stage_file(user, start, end)
    loaded = load_stage_file(data, sha256=sha256_hex(data))  # trusts nothing
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        (activation,) = user.segment_between(MODEL_INPUT, start)(x)
        want, got = user.stage(start, end).run((activation,)), loaded.stage.run((activation,))
    assert torch.equal(got.logits, want.logits)
    assert [c.after for c in loaded.net.exit_cuts] == [c.after for c in user.exit_cuts]


def test_a_user_model_whose_graph_cannot_travel_needs_trust_and_says_why() -> None:
    user = user_net("own_op")
    data = stage_file(user, MODEL_INPUT, user.exit_cuts[0].id)
    with pytest.raises(PackageError, match="trusted_models") as refused:
        load_stage_file(data, sha256=sha256_hex(data))
    assert "halve" in str(refused.value), "the node says what in the graph needs code"
    loaded = load_stage_file(data, sha256=sha256_hex(data), trusted_models=[f"{USER_MODELS}:own_op"])
    assert loaded.net.source == user.source
