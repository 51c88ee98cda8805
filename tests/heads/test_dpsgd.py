"""Head source ``dpsgd``: an epsilon reported, secret noise, and its composition."""

from __future__ import annotations

import math

import pytest
import torch
from head_helpers import head_config, preset_head

from clicooper.heads import build_head, total_privacy
from clicooper.heads.base import HeadPrivacy


@pytest.fixture(scope="module")
def dp_head(digits):
    """One DP-SGD head on 400 digits, shared by the tests of this file."""
    data = digits.limit(400, 200, seed=0)
    return data, build_head(head_config("dpsgd", dp_epsilon=2.0), data, preset_head(data))


def test_dpsgd_reports_its_epsilon(dp_head):
    small_digits, fh = dp_head
    p = fh.privacy
    assert p.epsilon is not None and 0 < p.epsilon <= 2.0 + 1e-6
    assert p.delta == pytest.approx(1e-6)  # a tenth of the run's delta by default
    assert p.details["noise_multiplier"] > 0 and p.details["steps"] > 0
    assert fh.pretrain.runner == "owner" and fh.pretrain.flops > 0
    assert len(fh.data.train) == len(small_digits.train)  # every record is private


def test_dpsgd_noise_does_not_follow_the_seed(dp_head):
    """The same seed twice gives different heads: the DP noise comes from the OS CSPRNG."""
    small_digits, first = dp_head
    x = small_digits.test.x[:8]
    a = first.module(x)
    again = head_config("dpsgd", dp_epsilon=2.0)
    b = build_head(again, small_digits, preset_head(small_digits)).module(x)
    assert not torch.allclose(a, b)


def test_total_privacy_composes():
    release = total_privacy(HeadPrivacy(None, None, "public"), 7.0, 1e-5)
    assert release["total"]["epsilon"] == 7.0 and release["total"]["delta"] == 1e-5
    both = total_privacy(HeadPrivacy(1.0, 1e-6, "dp-sgd"), 6.0, 5e-6)
    assert both["head"]["replace_one"]["epsilon"] == 2.0
    assert both["total"]["epsilon"] == pytest.approx(8.0)
    assert both["total"]["delta"] == pytest.approx((1 + math.e) * 1e-6 + 5e-6)
    assert "basic composition" in both["total"]["rule"]
