"""Uchida-style embedding: it takes hold under training and only there."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from clicooper.watermark.embed import StageWatermark, projection, select_weight

SECRET, LINK = os.urandom(32), os.urandom(32)


def _mark(stage: int = 1, dim: int = 1024, strength: float = 0.01) -> StageWatermark:
    return StageWatermark.derive(SECRET, LINK, 1, stage, "0.weight", dim, 256, strength)


def _train(model: nn.Module, mark: StageWatermark, steps: int = 300) -> None:
    """Adam (lr 1e-3) on a classification task plus the watermark regulariser."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 32, generator=gen), torch.randint(0, 4, (64,), generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + mark.regulariser(model)
        loss.backward()
        opt.step()


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def test_select_weight_default_named_and_invalid() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 3))  # two 12-entry weights tie
    assert select_weight(model) == "0.weight"
    assert select_weight(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 9))) == "1.weight"
    assert select_weight(model, "1.bias") == "1.bias"
    with pytest.raises(ValueError, match=r"no parameter 'fc\.weight'.*valid names: 0\.weight"):
        select_weight(model, "fc.weight")
    with pytest.raises(ValueError, match="no parameters"):
        select_weight(nn.ReLU())


def test_projection_is_deterministic_and_keyed_by_secret_and_stage() -> None:
    a = projection(SECRET, 1, 8, 50)
    assert a.shape == (8, 50) and a.dtype == torch.float32
    assert torch.equal(a, projection(SECRET, 1, 8, 50))
    assert not torch.allclose(a, projection(SECRET, 2, 8, 50))
    assert not torch.allclose(a, projection(os.urandom(32), 1, 8, 50))
    big = projection(SECRET, 1, 256, 1024)
    assert abs(float(big.mean())) < 0.02 and abs(float(big.std()) - 1) < 0.02  # N(0, 1)
    with pytest.raises(ValueError):
        projection(b"", 1, 8, 50)
    with pytest.raises(ValueError):
        projection(SECRET, 0, 8, 50)


def test_regulariser_is_differentiable_in_the_marked_weight_only() -> None:
    model, mark = _model(), _mark()
    loss = mark.regulariser(model)
    assert loss.dim() == 0 and float(loss.detach()) > 0
    loss.backward()
    assert model[0].weight.grad is not None and float(model[0].weight.grad.abs().sum()) > 0
    assert model[2].weight.grad is None


def test_embedding_reaches_ber_zero_and_fresh_weights_are_chance() -> None:
    torch.manual_seed(0)
    model, mark = _model(), _mark()
    fresh = _model()
    before = mark.ber(model)
    _train(model, mark)
    assert mark.ber(model) == 0.0
    assert 0.35 < before < 0.65
    assert 0.35 < mark.ber(fresh) < 0.65
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert torch.equal(mark.extract(state), mark.extract(model))
    assert torch.equal(mark.extract(model), mark.bits.bool())
    next_stage = StageWatermark.derive(SECRET, os.urandom(32), 1, 2, "0.weight", 1024)
    assert 0.35 < next_stage.ber(model) < 0.65  # stage t weights do not carry stage t+1's bits


def test_extract_rejects_a_resized_or_missing_tensor() -> None:
    mark = _mark()
    with pytest.raises(ValueError, match="shape changed"):
        mark.extract({"0.weight": torch.zeros(16, 32)})
    with pytest.raises(ValueError, match="no tensor"):
        mark.extract({"1.weight": torch.zeros(32, 32)})
    with pytest.raises(ValueError, match=r"matrix must be \(B, d\)"):
        StageWatermark("w", torch.zeros(4, 3), torch.zeros(5), 0.01)
