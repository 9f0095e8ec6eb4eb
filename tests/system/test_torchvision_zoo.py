"""Every torchvision classifier we advertise traces, takes auto exits, and keeps its output (STYLE rule 10).

Random weights (nothing is downloaded); ImageNet-sized input, batch 1, eval mode.
"""

from __future__ import annotations

import pytest
import torch

from splitexit.model import zoo
from splitexit.model.exits import EarlyExitNet

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "vgg16", "alexnet", "efficientnet_b0",
          "vit_b_16"]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_torchvision_model_with_auto_exits_keeps_its_output(name):
    torch.manual_seed(0)
    model = zoo.build_model(name).eval()
    x = torch.randn(1, 3, 224, 224)
    net = EarlyExitNet.from_model(model, x, exits="auto").eval()
    assert net.num_exits >= 2
    assert all(cut.can_carry_exit for cut in net.exit_cuts)
    with torch.no_grad():
        outputs = net(x)
        expected = model(x)
    assert len(outputs) == net.num_exits
    assert expected.shape == (1, 1000)
    torch.testing.assert_close(outputs[-1], expected, rtol=1e-4, atol=1e-4)
    for logits in outputs[:-1]:
        assert logits.shape == (1, 1000)
