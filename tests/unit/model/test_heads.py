"""Exit heads and confidence functions (model/heads.py), driven by their registries (STYLE rule 9)."""

from __future__ import annotations

import pytest
import torch

from splitexit.errors import ConfigError, CutError
from splitexit.model import heads
from splitexit.model.heads import (
    build_head,
    confidence_function,
    list_confidences,
    list_heads,
    register_confidence,
    register_head,
)

NUM_CLASSES = 7
BATCH = 5
#: One per-sample shape per rank: flat features, a token sequence, a feature map.
SHAPES = {1: (24,), 2: (6, 16), 3: (8, 5, 5)}
#: What the built-in heads accept; a head registered later is still checked by the rank-generic tests.
ACCEPTED_RANKS = {"auto": {1, 2, 3}, "linear": {1, 2, 3}, "pool_linear": {3}, "token_pool": {2}}


@pytest.fixture
def isolated_registries(monkeypatch):
    """Let a test register names without leaving them behind for the rest of the session."""
    monkeypatch.setattr(heads, "_HEADS", dict(heads._HEADS))
    monkeypatch.setattr(heads, "_CONFIDENCES", dict(heads._CONFIDENCES))


# ------------------------------------------------------------------------------------ heads
def test_builtin_heads_are_registered():
    assert set(ACCEPTED_RANKS) <= set(list_heads())
    assert list_heads() == sorted(list_heads())


@pytest.mark.parametrize("name", list_heads())
def test_head_builds_for_the_ranks_it_accepts_and_refuses_the_rest(name):
    built = 0
    for rank, shape in SHAPES.items():
        try:
            head = build_head(name, shape, NUM_CLASSES)
        except CutError as error:
            assert str(shape) in str(error)  # the message says what the exit carries
            continue
        built += 1
        out = head(torch.randn(BATCH, *shape))
        assert out.shape == (BATCH, NUM_CLASSES), (name, rank)
        assert torch.isfinite(out).all()
        if name in ACCEPTED_RANKS:
            assert rank in ACCEPTED_RANKS[name]
    assert built >= 1, f"head {name!r} builds for no rank at all"
    if name in ACCEPTED_RANKS:
        assert built == len(ACCEPTED_RANKS[name])


@pytest.mark.parametrize("name, shape", [("pool_linear", (24,)), ("pool_linear", (6, 16)),
                                         ("token_pool", (8, 5, 5)), ("token_pool", (24,))])
def test_head_for_the_wrong_rank_raises_cut_error(name, shape):
    with pytest.raises(CutError, match=name):
        build_head(name, shape, NUM_CLASSES)


def test_auto_head_follows_the_rank():
    assert isinstance(build_head("auto", SHAPES[3], NUM_CLASSES), heads.PooledLinearHead)
    assert isinstance(build_head("auto", SHAPES[2], NUM_CLASSES), heads.TokenPoolHead)
    assert isinstance(build_head("auto", SHAPES[1], NUM_CLASSES), heads.FlatLinearHead)


def test_unknown_head_raises_config_error_listing_choices():
    with pytest.raises(ConfigError, match="pool_linear"):
        build_head("no_such_head", SHAPES[3], NUM_CLASSES)


@pytest.mark.parametrize("name", ["auto", "linear"])
def test_registering_a_builtin_head_name_again_raises(name):
    original = heads._HEADS[name]
    with pytest.raises(ConfigError, match=name):
        register_head(name, lambda shape, classes: torch.nn.Identity())
    assert heads._HEADS[name] is original  # the registry kept the first builder


def test_registered_head_is_built_by_name_and_cannot_be_registered_twice(isolated_registries):
    register_head("test_identity_head", lambda shape, classes: torch.nn.Flatten())
    assert "test_identity_head" in list_heads()
    assert isinstance(build_head("test_identity_head", (3,), 3), torch.nn.Flatten)
    with pytest.raises(ConfigError, match="test_identity_head"):
        register_head("test_identity_head", lambda shape, classes: torch.nn.Identity())


# ------------------------------------------------------------------------------------ confidence
@pytest.mark.parametrize("name", list_confidences())
def test_confidence_is_one_score_per_row_in_unit_interval(name):
    score = confidence_function(name)
    generator = torch.Generator().manual_seed(0)
    for classes in (2, 10, 1000):
        for scale in (0.1, 3.0, 1e4):  # near-uniform, ordinary, saturated
            logits = torch.randn(BATCH * 4, classes, generator=generator) * scale
            values = score(logits)
            assert values.shape == (BATCH * 4,)
            assert values.dtype.is_floating_point
            assert torch.isfinite(values).all()
            assert ((values >= 0) & (values <= 1)).all(), (classes, scale, values)


@pytest.mark.parametrize("name", list_confidences())
def test_confidence_is_higher_for_a_peaked_distribution_than_a_uniform_one(name):
    score = confidence_function(name)
    uniform = torch.zeros(BATCH, 10)
    peaked = torch.zeros(BATCH, 10)
    peaked[:, 3] = 8.0
    softer = torch.zeros(BATCH, 10)
    softer[:, 3] = 2.0
    assert (score(peaked) > score(softer)).all()
    assert (score(softer) > score(uniform)).all()
    assert torch.allclose(score(peaked[:, [3, 0, 1, 2, 4, 5, 6, 7, 8, 9]]), score(peaked))  # class order is irrelevant


@pytest.mark.parametrize("name", list_confidences())
def test_confidence_of_uniform_logits_stays_in_unit_interval(name):
    score = confidence_function(name)
    for classes in range(2, 65):
        values = score(torch.zeros(3, classes))
        assert ((values >= 0) & (values <= 1)).all(), (classes, values)


def test_unknown_confidence_raises_config_error_listing_choices():
    with pytest.raises(ConfigError, match="max_softmax"):
        confidence_function("no_such_confidence")


@pytest.mark.parametrize("name", list_confidences())
def test_registering_a_builtin_confidence_name_again_raises(name):
    original = confidence_function(name)
    with pytest.raises(ConfigError, match=name):
        register_confidence(name, lambda logits: logits.amax(dim=1))
    assert confidence_function(name) is original


def test_registered_confidence_is_found_by_name_and_cannot_be_registered_twice(isolated_registries):
    def top_logit(logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.amax(dim=1))

    register_confidence("test_top_logit", top_logit)
    assert "test_top_logit" in list_confidences()
    assert confidence_function("test_top_logit") is top_logit
    with pytest.raises(ConfigError, match="test_top_logit"):
        register_confidence("test_top_logit", top_logit)
