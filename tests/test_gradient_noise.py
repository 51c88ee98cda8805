"""Gradient protection on the backward channel (clicooper.privacy.gradient)."""

import pytest
import torch
from cc_helpers import SpyTransport, quick_config

from clicooper.config import ConfigError
from clicooper.privacy import accounting, gradient
from clicooper.privacy.gradient import GradientNoise
from clicooper.runtime import factory
from clicooper.runtime import session as session_mod


def test_without_noise_each_per_sample_gradient_is_clipped_at_the_per_sample_scale():
    protect = GradientNoise(clip_norm=0.5, noise_multiplier=0.0)
    batch = 32
    per_sample = torch.randn(batch, 16) * torch.logspace(-2, 1, batch).unsqueeze(1)
    out = protect(per_sample / batch, loss_scale=batch)  # a batch-mean loss's gradient
    norms = (out * batch).norm(dim=1)
    assert float(norms.max()) <= 0.5 + 1e-5
    short = per_sample.norm(dim=1) < 0.5
    assert short.any() and (~short).any()
    assert torch.allclose(out[short] * batch, per_sample[short], atol=1e-6)  # left alone


def test_noise_has_std_multiplier_times_clip_on_the_per_sample_scale():
    protect = GradientNoise(clip_norm=2.0, noise_multiplier=1.5)
    out = protect(torch.zeros(4000, 64), loss_scale=100.0)
    assert abs(float(out.std()) * 100 - 3.0) < 0.05  # sigma * G, scaled back by 1/100


def test_noise_is_fresh_and_not_from_the_global_seed():
    torch.manual_seed(0)
    a = GradientNoise(1.0, 1.0)(torch.zeros(8, 8), 8)
    torch.manual_seed(0)
    b = GradientNoise(1.0, 1.0)(torch.zeros(8, 8), 8)
    assert not torch.equal(a, b)


def test_a_bad_loss_scale_is_refused():
    with pytest.raises(ValueError, match="loss_scale"):
        GradientNoise(1.0, 1.0)(torch.zeros(2, 2), 0.0)


def test_only_the_last_of_several_clicooper_trainers_protects_its_gradients():
    on = {"privacy.gradient_noise_multiplier": 1.0}
    cfg = quick_config(trainers=3, **on)
    assert [gradient.for_trainer(cfg, i) is not None for i in (1, 2, 3)] == [False, False, True]
    assert gradient.for_trainer(quick_config(trainers=1, **on), 1) is None  # owner is next
    assert gradient.for_trainer(quick_config(trainers=2, mode="vanilla", **on), 2) is None
    assert gradient.for_trainer(quick_config(trainers=2), 2) is None  # off by default
    with pytest.raises(ConfigError, match="gradient_noise_multiplier"):
        quick_config(**{"privacy.gradient_noise_multiplier": -1})


def _backward_to_t1(tmp_path, small_digits, monkeypatch, multiplier):
    spies = []
    monkeypatch.setattr(
        factory, "InProcessTransport", lambda: spies.append(SpyTransport()) or spies[-1]
    )
    cfg = quick_config(
        trainers=2,
        epochs=1,
        record=64,
        **{
            "watermark.enabled": False,
            "privacy.gradient_noise_multiplier": multiplier,
            "privacy.gradient_clip_norm": 0.05,
        },
    )
    sess = session_mod.run(cfg, tmp_path / f"m{multiplier}", data=small_digits)
    sent = {m.step: m.tensors["g"] for m in spies[0].delivered["t1"] if m.kind == "backward"}
    clean = sess.trainers[1].recorder.tensors()  # t2's own record: the gradient it computed
    return sent, clean


@pytest.mark.parametrize("multiplier", [0.0, 2.0])
def test_the_first_trainer_receives_the_protected_gradient_only(
    tmp_path, small_digits, monkeypatch, multiplier
):
    sent, clean = _backward_to_t1(tmp_path, small_digits, monkeypatch, multiplier)
    step = int(clean["step"][-1])
    rows = clean["step"] == step
    computed, received = clean["gradient"][rows], sent[step]
    batch = len(received)
    if multiplier == 0:
        assert torch.equal(received, computed)  # off: t1 gets exactly what t2 computed
        return
    # clipped to G = 0.05 per sample, then noise of std 2 * 0.05 on the per-sample scale
    clipped = GradientNoise(0.05, 0.0)(computed, batch)
    residual = (received - clipped) * batch
    assert abs(float(residual.std()) - 0.1) < 0.02
    assert float((computed * batch).norm(dim=1).max()) > 0.05  # the clip had work to do


def test_results_account_for_the_backward_channel(tmp_path, small_digits):
    on = {"privacy.gradient_noise_multiplier": 2.0, "watermark.enabled": False}
    res = session_mod.run(quick_config(epochs=2, **on), tmp_path / "on", data=small_digits).results
    g = res["privacy"]["gradient"]
    assert g["noise_multiplier"] == 2.0 and g["clip_norm"] == 1.0 and g["releases"] == 2
    assert g["applied_by"] == "t2" and "last trainer" in g["covers"]
    assert g["epsilon"] == pytest.approx(accounting.epsilon(2.0, 2, 1e-5))
    assert g["epsilon"] > accounting.epsilon(2.0, 1, 1e-5)  # two epochs, two releases
    off = session_mod.run(quick_config(epochs=1), tmp_path / "off", data=small_digits).results
    assert off["privacy"]["gradient"]["epsilon"] is None


def test_a_served_trainer_with_other_gradient_protection_is_refused():
    from clicooper.common.messages import ProtocolError
    from clicooper.runtime.deploy.settings import check_settings, party_settings

    owner = quick_config(**{"privacy.gradient_noise_multiplier": 1.0})
    trainer = quick_config()  # started without the owner's protection
    check_settings(party_settings(owner, "trainer"), party_settings(owner, "trainer"), "t2")
    with pytest.raises(ProtocolError, match="setting privacy differs.*t2"):
        check_settings(party_settings(trainer, "trainer"), party_settings(owner, "trainer"), "t2")
