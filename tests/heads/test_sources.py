"""Every head source builds a frozen head the preset's tail fits, and the registry."""

from __future__ import annotations

import pytest
import torch

from clicooper.config import ConfigError, RunConfig
from clicooper.heads import HEAD_SOURCES, HeadSourceError, build_head, get_source


@pytest.mark.parametrize("source", sorted(HEAD_SOURCES))
def test_source_builds_frozen_head(source, small_digits, split_head, head_cfg):
    want = tuple(split_head(torch.zeros(1, *small_digits.image_shape)).shape[1:])
    fh = build_head(head_cfg(source), small_digits, split_head)
    assert fh.source == source
    assert fh.out_shape == want
    assert not fh.module.training
    assert all(not p.requires_grad for p in fh.module.parameters())
    x = small_digits.test.x[:16].clone().requires_grad_(False)
    z = fh.module(x)
    assert z.shape == (16, *want)
    assert not z.requires_grad  # no gradient can flow back into the head
    assert torch.allclose(z.flatten(1).norm(dim=1), torch.ones(16), atol=1e-5)
    assert fh.forward_flops > 0
    summary = fh.results()
    assert summary["source"] == source and summary["out_shape"] == list(want)


def test_training_sources_change_the_head(small_digits, head_cfg, fresh_head):
    """public and dpsgd train; random and scattering do not touch the data."""
    x = small_digits.test.x[:32]
    outs = {}
    for source in ("public", "random"):
        outs[source] = build_head(head_cfg(source), small_digits, fresh_head(small_digits))
    public, rnd = outs["public"], outs["random"]
    assert public.pretrain.flops > 0 and public.pretrain.runner == "trainers"
    assert rnd.pretrain.flops == 0 and rnd.pretrain.runner == "none"
    assert not torch.allclose(public.module(x), rnd.module(x))


def test_random_head_is_seeded(small_digits, head_cfg, fresh_head):
    x = small_digits.test.x[:8]
    a = build_head(head_cfg("random"), small_digits, fresh_head(small_digits)).module(x)
    b = build_head(head_cfg("random"), small_digits, fresh_head(small_digits)).module(x)
    cfg = RunConfig.load(dataset="digits", seed=1, **{"head.source": "random"})
    c = build_head(cfg, small_digits, fresh_head(small_digits)).module(x)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_registry_refuses_unknown_name():
    with pytest.raises(HeadSourceError) as err:
        get_source("imagenet")
    message = str(err.value)
    assert "\n" not in message and "'imagenet'" in message
    for name in HEAD_SOURCES:
        assert name in message


def test_config_refuses_unknown_source():
    with pytest.raises(ConfigError) as err:
        RunConfig.load(dataset="digits", **{"head.source": "imagenet"})
    assert "head.source" in str(err.value) and "\n" not in str(err.value)
