"""Weight operations for watermark removal: magnitude pruning and fine-tuning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clicooper import attacks
from clicooper.attacks.removal import fine_tune, magnitude_prune


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.6])
def test_magnitude_prune_zeroes_the_smallest_weights_of_each_tensor(fraction):
    sd = _net().state_dict()
    pruned = magnitude_prune(sd, fraction)
    for name, w in sd.items():
        p = pruned[name]
        if name.endswith("bias"):
            assert torch.equal(p, w)  # biases are not pruned by default
            continue
        k = round(fraction * w.numel())
        assert int((p == 0).sum()) == k
        kept = w.abs()[p != 0]
        assert kept.min() >= w.abs()[p == 0].max()  # the zeroed ones were the smallest
        assert torch.equal(p[p != 0], w[p != 0])
        assert int((w == 0).sum()) == 0  # the input was not modified


def test_magnitude_prune_selects_tensors_and_validates():
    sd = _net().state_dict()
    pruned = magnitude_prune(sd, 1.0, param_names=["2.weight"])
    assert torch.all(pruned["2.weight"] == 0) and torch.equal(pruned["0.weight"], sd["0.weight"])
    assert magnitude_prune(sd, 0.0)["0.weight"].ne(0).all()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        magnitude_prune(sd, 1.5)
    with pytest.raises(ValueError, match="not in the state dict"):
        magnitude_prune(sd, 0.5, param_names=["nope.weight"])


def test_fine_tune_runs_the_requested_steps_and_lowers_the_loss():
    net = _net()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 10, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    data = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]  # 4 batches, re-iterated
    calls = []

    def loss_fn(module: nn.Module, batch) -> torch.Tensor:
        calls.append(1)
        return F.cross_entropy(module(batch[0]), batch[1])

    before = F.cross_entropy(net(x), y).item()
    assert fine_tune(net, data, steps=50, lr=1e-2, loss_fn=loss_fn) is net
    assert len(calls) == 50
    assert F.cross_entropy(net(x), y).item() < before - 0.3
    fine_tune(net, iter(data), steps=50, lr=1e-2, loss_fn=loss_fn)  # one-shot iterator
    assert len(calls) == 54
    with pytest.raises(ValueError, match="non-negative"):
        fine_tune(net, data, steps=-1, lr=1e-2, loss_fn=loss_fn)


def test_registry_names_every_attack():
    assert {"clustering", "unsplit", "aux_no_query", "query_decoder", "extraction"} <= set(
        attacks.ATTACKS
    )
    assert attacks.get_attack("prune") is magnitude_prune
    assert all(callable(f) for f in attacks.ATTACKS.values())
    with pytest.raises(KeyError, match="choose one of"):
        attacks.get_attack("nope")
