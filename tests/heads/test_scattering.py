"""Head source ``scattering``: coefficient shapes, determinism, no data used."""

from __future__ import annotations

import pytest
import torch

from clicooper.config import RunConfig
from clicooper.data import DataError
from clicooper.heads import build_head
from clicooper.heads.scattering import Scattering, scattering_channels


def test_channel_count_formula():
    assert scattering_channels(1) == 9
    assert scattering_channels(2) == 81
    assert scattering_channels(3) == 217


def test_transform_shape_and_normalisation(small_digits):
    s = Scattering(small_digits.image_shape, 2)
    out = s(small_digits.test.x[:4])
    assert out.shape == (4, 81, 2, 2)
    # group norm without affine, 27 groups of 3 channels: zero mean, variance at most 1
    groups = out.reshape(4, 27, -1)
    assert torch.allclose(groups.mean(2), torch.zeros(4, 27), atol=1e-4)
    assert float(groups.var(2, unbiased=False).max()) <= 1.0 + 1e-4


def test_head_is_deterministic_and_seeded(small_digits, head_cfg, fresh_head):
    x = small_digits.test.x[:10]
    a = build_head(head_cfg("scattering"), small_digits, fresh_head(small_digits))
    b = build_head(head_cfg("scattering"), small_digits, fresh_head(small_digits))
    cfg = RunConfig.load(dataset="digits", seed=3, **{"head.source": "scattering"})
    c = build_head(cfg, small_digits, fresh_head(small_digits))
    assert a.out_shape == (64,)
    assert torch.equal(a.module(x), b.module(x))
    assert not torch.allclose(a.module(x), c.module(x))  # the projection follows the seed
    assert a.pretrain.flops == 0 and a.privacy.epsilon is None


def test_head_ignores_training_data(small_digits, head_cfg, fresh_head):
    """A fixed transform: building it on other training data gives the same map."""
    x = small_digits.test.x[:10]
    other = small_digits.limit(50, 200, seed=5)
    a = build_head(head_cfg("scattering"), small_digits, fresh_head(small_digits))
    b = build_head(head_cfg("scattering"), other, fresh_head(other))
    assert torch.equal(a.module(x), b.module(x))


def test_too_many_scales_for_the_image_is_refused(small_digits):
    with pytest.raises(DataError) as err:
        Scattering(small_digits.image_shape, 4)
    assert "scattering_j" in str(err.value)
