"""A link's codec as the planner and the coordinator pick it: named in the cluster file, or measured.

``codec: auto`` pushes a few inputs through the net to get real activations at the cut and lets the
codec module pick the cheapest encoding for the link's bandwidth. This runs torch: callers on an event
loop hand it to an executor.
"""

from __future__ import annotations

import torch

from splitexit.config import LinkSpec
from splitexit.config.codec_names import CodecSpec, parse_codec
from splitexit.cuts import MODEL_INPUT, Cut
from splitexit.model.exits import EarlyExitNet
from splitexit.wire.codec_auto import choose_codec

__all__ = ["AUTO_CODEC_SAMPLES", "link_codec"]

#: Inputs pushed through the net to get real activations for `codec: auto`.
AUTO_CODEC_SAMPLES = 8


def link_codec(net: EarlyExitNet, cut: Cut, link: LinkSpec) -> CodecSpec:
    """The link's codec; ``auto`` is measured on activations at ``cut`` against the link's bandwidth."""
    if link.codec.strip().lower() != "auto":
        return parse_codec(link.codec)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(AUTO_CODEC_SAMPLES, *net.input_shape, generator=generator).to(net.input_dtype)
    if cut is MODEL_INPUT:
        return choose_codec([x], link.bandwidth)
    with torch.inference_mode():
        activations = net.segment_between(MODEL_INPUT, cut)(net._prepare(x))
    return choose_codec(list(activations), link.bandwidth)
