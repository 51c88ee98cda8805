"""Uchida-style embedding: it takes hold under training and only there."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

from clicooper.watermark.embed import InputMoments, StageWatermark, projection, select_weight

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


def _scores(mark: StageWatermark, model: nn.Module) -> torch.Tensor:
    """``s_j u_j``: each bit's normalised logit on the side of its target."""
    w = model[0].weight.detach().reshape(-1)
    return (mark.matrix @ w) / w.norm() * (mark.bits.float() * 2 - 1)


def test_regulariser_is_capped_bce_on_normalised_logits() -> None:
    torch.manual_seed(3)
    model, mark = _model(), _mark(strength=0.02)
    _train(model, mark, steps=20)  # part way: some bits past the margin, some not
    deep = _scores(mark, model) >= mark.margin
    assert 0 < int(deep.sum()) < mark.n_bits
    w = model[0].weight
    u = (mark.matrix @ w.reshape(-1)) / w.detach().norm()
    bits = mark.bits.float()
    capped = torch.where(bits > 0, u.clamp(max=mark.margin), u.clamp(min=-mark.margin))
    expected = 0.02 * nn.functional.binary_cross_entropy_with_logits(capped, bits, reduction="sum")
    value = mark.regulariser(model)
    assert torch.allclose(value, expected)
    grad = torch.autograd.grad(value, w)[0].reshape(-1)
    # only bits short of the margin pull: the gradient lies in the span of their rows
    active = mark.matrix[~deep]
    coeffs = torch.linalg.lstsq(active.T, grad.unsqueeze(1)).solution
    assert torch.allclose(active.T @ coeffs.squeeze(1), grad, atol=1e-6)


def _embed_only(model: nn.Module, mark: StageWatermark, steps: int = 300) -> None:
    """Adam (lr 1e-3) on the regulariser alone: no task pulls the bits back."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        mark.regulariser(model).backward()
        opt.step()


def test_margin_deep_mark_rests_and_pushes_again_when_a_bit_slips() -> None:
    torch.manual_seed(4)
    model, mark = _model(), _mark()
    _embed_only(model, mark)
    assert bool((_scores(mark, model) >= mark.margin / 2).all())
    floor = 0.01 * 256 * float(nn.functional.softplus(torch.tensor(-mark.margin)))
    for _ in range(2 * mark.recheck):  # resting: a value at least the floor, no pull
        value = mark.regulariser(model)
        assert float(value.detach()) >= floor - 1e-6
        value.backward()
        assert float(model[0].weight.grad.abs().max()) == 0.0
        model.zero_grad()
    with torch.no_grad():  # move w straight against bit 0 until it is barely on its side
        w, a = model[0].weight.view(-1), mark.matrix[0]
        side = float(mark.bits[0]) * 2 - 1
        w -= (side * float(a @ w) - 0.1 * float(w.norm())) * side * a / float(a @ a)
    assert 0 < float(_scores(mark, model)[0]) < mark.margin / 2
    pulls = []
    for _ in range(mark.recheck):  # within one recheck period the mark pulls again
        model.zero_grad()
        mark.regulariser(model).backward()
        pulls.append(float(model[0].weight.grad.abs().max()))
    assert pulls[-1] > 0
    _embed_only(model, mark)
    assert mark.ber(model) == 0.0 and float(_scores(mark, model)[0]) >= mark.margin / 2


def test_cap_stops_where_plain_bce_keeps_pushing() -> None:
    """Both reach BER 0; the capped loss stops once every bit is margin deep."""
    moved = {}
    for margin in (0.5, float("inf")):
        torch.manual_seed(5)
        model = _model()
        start = model[0].weight.detach().clone()
        mark = StageWatermark.derive(SECRET, LINK, 1, 1, "0.weight", 1024, 256, 0.01, margin)
        # 500 steps: at 300 one bit of 256 still sat at the boundary in one CI worker (the
        # float order of a reduction depends on the process's thread settings)
        _embed_only(model, mark, steps=500)
        assert mark.ber(model) == 0.0
        moved[margin] = float((model[0].weight.detach() - start).norm() / start.norm())
    assert moved[0.5] < 0.5 * moved[float("inf")]
    assert moved[0.5] < 1.0  # about sqrt(B E[(0.5 - Z)_+^2] / d) = 0.51 at least


def test_normalised_logits_are_standard_normal_for_unmarked_weights() -> None:
    torch.manual_seed(6)
    mark = _mark()
    u = torch.cat([_scores(mark, _model()) for _ in range(20)])  # 5120 draws
    assert abs(float(u.mean())) < 0.05 and abs(float(u.std()) - 1) < 0.05


def test_margin_deep_bits_survive_a_small_random_change() -> None:
    torch.manual_seed(7)
    model, mark = _model(), _mark()
    _train(model, mark)
    w = model[0].weight.detach()
    noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(8))
    moved = {"0.weight": w + noise * (0.1 * w.norm() / noise.norm())}  # |A_j . dw| ~ 0.1 ||w||
    assert mark.ber(moved) == 0.0  # a flip needs |N(0, 1)| > margin / 0.1 = 5


def test_margin_and_strength_defaults() -> None:
    from clicooper.config import WatermarkConfig
    from clicooper.watermark.embed import DEFAULT_MARGIN, DEFAULT_STRENGTH

    assert WatermarkConfig().strength == DEFAULT_STRENGTH  # the run default is the library's
    mark = StageWatermark.derive(SECRET, LINK, 1, 1, "0.weight", 1024)
    assert (mark.strength, mark.margin) == (DEFAULT_STRENGTH, DEFAULT_MARGIN)
    with pytest.raises(ValueError, match="margin >= 0"):
        StageWatermark("w", torch.zeros(4, 3), torch.zeros(4), 0.01, margin=-1.0)
    with pytest.raises(ValueError, match="recheck >= 1"):
        StageWatermark("w", torch.zeros(4, 3), torch.zeros(4), 0.01, recheck=0)


def test_default_strength_places_a_stage_within_thirty_adam_steps() -> None:
    """A digits-sized trainer layer (64 x 128) on a task: fresh bits in place in 30 steps."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 40))
    mark = StageWatermark.derive(SECRET, LINK, 1, 1, "0.weight", 64 * 128)
    assert mark.ber(model) > 0.3
    gen = torch.Generator().manual_seed(9)
    x, y = torch.randn(256, 64, generator=gen), torch.randint(0, 40, (256,), generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(30):
        opt.zero_grad()
        (nn.functional.cross_entropy(model(x), y) + mark.regulariser(model)).backward()
        opt.step()
    assert mark.ber(model) <= 0.05


def test_seal_places_every_bit_with_a_small_change_and_no_more() -> None:
    model = nn.Sequential(nn.Linear(64, 80))  # d = 5120, as the presets' smallest mark
    mark = StageWatermark.derive(SECRET, LINK, 1, 1, "0.weight", 5120, 256, 0.01)
    before = model[0].weight.detach().clone()
    assert mark.ber(model) > 0.3  # fresh weights: about half the bits wrong
    shallow = mark.seal(model)
    assert shallow > 100
    after = model[0].weight.detach()
    depth = mark._signs * (mark.matrix @ after.reshape(-1)) / after.norm()
    assert mark.ber(model) == 0 and float(depth.min()) >= mark.margin / 2 - 1e-4
    # least-norm: about sqrt(B E[(kappa - Z)_+^2] / d) = 0.23 of ||w|| (module docstring)
    assert float((after - before).norm() / before.norm()) < 0.3
    again = after.clone()
    assert mark.seal(model) == 0 and torch.equal(model[0].weight.detach(), again)


def test_capacity_note_only_for_small_tensors() -> None:
    from clicooper.watermark.embed import capacity_note

    assert capacity_note("t1", 5120, 256) is None  # the presets' smallest mark
    note = capacity_note("t2", 1280, 256)
    assert note is not None and "t2" in note and "1280 weights" in note and "bits to 80" in note
    assert "46%" in note  # sqrt(256 * 1.04 / 1280)
    assert capacity_note("t2", 1280, 64) is None


def test_stage_note_only_for_stages_under_25_steps() -> None:
    from clicooper.watermark.embed import stage_note

    assert stage_note(25) is None and stage_note(469) is None
    note = stage_note(13)
    assert note is not None and "13 steps" in note and "stage_steps to 25" in note


def _low_rank_inputs(n: int, seed: int) -> torch.Tensor:
    """ReLU features of a 16-d latent in 128-d: most input directions carry no variance."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(16, 128, generator=torch.Generator().manual_seed(99))
    return torch.relu(torch.randn(n, 16, generator=gen) @ mix + 0.5)


def _watched_layer() -> tuple[nn.Sequential, InputMoments]:
    torch.manual_seed(3)
    model = nn.Sequential(nn.ReLU(), nn.Linear(128, 20))  # the CNN preset's last segment
    moments = InputMoments(model, "1.weight")
    for x in _low_rank_inputs(2048, 0).split(256):
        model(x).sum().backward()  # training forwards: counted
    return model, moments


def test_inputs_seal_places_every_bit_and_moves_the_outputs_less_than_the_weights_seal() -> None:
    """The input-metric seal (least change of W h + c on the data) against the least change
    of W: both put every bit kappa / 2 deep; on fresh inputs of the same distribution the
    input-metric one changes the outputs several times less and keeps their mean."""
    model, moments = _watched_layer()
    assert moments.count == 2048
    mark = StageWatermark.derive(SECRET, LINK, 2, 1, "1.weight", 2560, 128, 0.01)
    fresh = _low_rank_inputs(1024, 1)
    with torch.no_grad():
        before = model(fresh)
    changes = {}
    for name, inputs in (("weights", None), ("inputs", moments)):
        sealed = copy.deepcopy(model)
        assert mark.seal(sealed, inputs=None if inputs is None else _rebound(inputs, sealed)) > 30
        weight = sealed[1].weight.detach()
        depth = mark._signs * (mark.matrix @ weight.reshape(-1)) / weight.norm()
        assert mark.ber(sealed) == 0 and float(depth.min()) >= mark.margin / 2 - 1e-4
        with torch.no_grad():
            delta = sealed(fresh) - before
        changes[name] = (float(delta.pow(2).sum(1).mean()), float(delta.mean(0).norm()))
    assert changes["inputs"][0] < changes["weights"][0] / 4
    assert changes["inputs"][1] < changes["weights"][1] / 4


def _rebound(moments: InputMoments, model: nn.Module) -> InputMoments:
    """``moments`` moved onto ``model`` (a copy of the module it watched)."""
    copy_ = InputMoments(model, "1.weight")
    copy_.load_state(moments.state())
    return copy_


def test_input_moments_count_training_forwards_only_and_round_trip_exactly() -> None:
    model, moments = _watched_layer()
    count, state = moments.count, moments.state()
    with torch.no_grad():
        model(_low_rank_inputs(64, 2))  # inference: not counted
    model.eval()
    model(_low_rank_inputs(64, 2))  # evaluation mode: not counted
    assert moments.count == count
    again = InputMoments(copy.deepcopy(model), "1.weight")
    again.load_state(json.loads(json.dumps(state)))  # a checkpoint's JSON
    assert again.count == count and torch.equal(again.outer, moments.outer)
    assert torch.equal(again.total, moments.total)
    moments.reset()
    assert moments.count == 0 and moments.whitener() is None  # no samples: the weights seal


def test_input_moments_of_a_tensor_that_is_no_linear_weight_leave_the_weights_seal() -> None:
    model = nn.Sequential(nn.Conv2d(1, 8, 3))
    moments = InputMoments(model, "0.weight")
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    assert moments.layer is None and moments.count == 0 and moments.whitener() is None
    mark = StageWatermark.derive(SECRET, LINK, 1, 1, "0.weight", 72, 16, 0.01)
    plain = copy.deepcopy(model)
    mark.seal(plain)
    mark.seal(model, inputs=moments)
    assert torch.equal(plain[0].weight, model[0].weight)
