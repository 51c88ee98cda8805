"""Activation inversion on digits: query decoder, UnSplit and the auxiliary-data attacker."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clicooper.attacks.inversion import (
    aux_no_query,
    query_decoder,
    total_variation,
    unsplit,
    whitebox,
)
from clicooper.attacks.metrics import mean_image_baselines, ssim_batch


@pytest.fixture(scope="module")
def linear_victim(digits, heads, victim):
    """A trained Flatten -> Linear(64, 32) -> ReLU head (test accuracy ~0.95 with its tail)."""
    head, _ = victim(digits, heads["linear"], digits.y, 10, seed=0)
    return head


@pytest.fixture(scope="module")
def conv_victim(digits, heads, victim):
    """A trained Conv2d(1, 8, 3) -> ReLU head: one training shared by the UnSplit and
    white-box tests (each only reads it)."""
    head, _ = victim(digits, heads["conv"], digits.y, 10, seed=0)
    return head


@pytest.fixture
def few_query_steps(monkeypatch):
    """The decoders' step floor (MIN_QUERY_STEPS, 600) lowered for the tests of shapes,
    errors and seeding, which do not look at how well the decoder fits."""
    monkeypatch.setattr("clicooper.attacks._common.MIN_QUERY_STEPS", 20)


@pytest.fixture(scope="module")
def baselines(digits) -> dict[str, float]:
    d = digits
    return mean_image_baselines(d.x[d.train], d.y[d.train], d.x[d.test], d.y[d.test])


@torch.no_grad()
def _acts(head, x):
    return head(x)


def test_query_decoder_inverts_clean_activations_and_fails_on_noisy_ones(
    digits, linear_victim, baselines
):
    x_aux, x_test = digits.x[digits.aux], digits.x[digits.test]
    a_aux, z = _acts(linear_victim, x_aux), _acts(linear_victim, x_test)
    clean = query_decoder(x_aux, a_aux, z, seed=0)
    assert clean.shape == x_test.shape and clean.min() >= 0 and clean.max() <= 1
    s_clean = ssim_batch(clean, x_test).mean()
    # The attacker that ignores the noise: decoder trained on clean pairs, noisy input.
    gen = torch.Generator().manual_seed(1)
    noisy = z + 5 * z.std() * torch.randn(z.shape, generator=gen)
    s_noisy = ssim_batch(query_decoder(x_aux, a_aux, noisy, seed=0), x_test).mean()
    print(f"query decoder clean {s_clean:.3f} noisy {s_noisy:.3f} baselines {baselines}")
    assert s_clean > baselines["dataset_mean"] + 0.2
    assert s_noisy < baselines["dataset_mean"] + 0.02


def test_query_decoder_is_reproducible_and_leaves_global_rng_alone(
    digits, linear_victim, few_query_steps
):
    x = digits.x[digits.aux][:100]
    a = _acts(linear_victim, x)
    state = torch.random.get_rng_state()
    r1 = query_decoder(x, a, a[:10], epochs=3, seed=7)
    assert torch.equal(state, torch.random.get_rng_state())
    r2 = query_decoder(x, a, a[:10], epochs=3, seed=7)
    r3 = query_decoder(x, a, a[:10], epochs=3, seed=8)
    assert torch.equal(r1, r2) and not torch.equal(r1, r3)


def test_query_decoder_uses_a_conv_decoder_for_spatial_activations(digits, heads, few_query_steps):
    head = heads["conv"]()
    x = digits.x[digits.aux][:64]
    a = _acts(head, x)
    assert a.dim() == 4
    r = query_decoder(x, a, a[:8], epochs=2, seed=0)
    assert r.shape == (8, 1, 8, 8)
    with pytest.raises(ValueError, match="observed"):
        query_decoder(x, a, a[:8].flatten(1), epochs=1)
    with pytest.raises(ValueError, match="pair"):
        query_decoder(x[:10], a, a[:8], epochs=1)


def test_unsplit_recovers_structure_through_a_conv_head(digits, heads, conv_victim):
    head = conv_victim
    x = digits.x[digits.test][:128]
    recon = unsplit(heads["conv"], _acts(head, x), (1, 8, 8), seed=0)
    assert recon.shape == x.shape and recon.min() >= 0 and recon.max() <= 1
    noise = np.random.default_rng(0).random(tuple(x.shape), dtype=np.float32)
    s, s_noise = ssim_batch(recon, x).mean(), ssim_batch(noise, x).mean()
    print(f"unsplit conv head {s:.3f} uniform noise {s_noise:.3f}")
    assert s > s_noise + 0.2


def test_whitebox_inverts_the_exact_head_and_noise_defeats_it(digits, heads, conv_victim):
    head = conv_victim
    x = digits.x[digits.test][:128]
    z = _acts(head, x)
    recon = whitebox(head, z, (1, 8, 8), steps=300, seed=0)
    assert recon.shape == x.shape and recon.min() >= 0 and recon.max() <= 1
    noisy = z + 5 * z.std() * torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    s_clean = ssim_batch(recon, x).mean()
    s_noisy = ssim_batch(whitebox(head, noisy, (1, 8, 8), steps=300, seed=0), x).mean()
    print(f"whitebox clean {s_clean:.3f} noisy {s_noisy:.3f}")
    assert s_clean > 0.6 and s_noisy < s_clean - 0.3


def test_unsplit_rejects_a_head_that_does_not_produce_the_activations(digits, heads):
    z = torch.zeros(4, 32)
    with pytest.raises(ValueError, match="head_factory"):
        unsplit(heads["conv"], z, (1, 8, 8), rounds=1, steps=1)


def test_aux_no_query_beats_noise_on_undefended_activations(digits, heads, linear_victim):
    x_test = digits.x[digits.test]
    z = _acts(linear_victim, x_test)
    recon = aux_no_query(heads["linear"], digits.x[digits.aux], z, seed=0)
    assert recon.shape == x_test.shape and recon.min() >= 0 and recon.max() <= 1
    noise = np.random.default_rng(0).random(tuple(x_test.shape), dtype=np.float32)
    s, s_noise = ssim_batch(recon, x_test).mean(), ssim_batch(noise, x_test).mean()
    print(f"aux no query {s:.3f} uniform noise {s_noise:.3f}")
    assert s > s_noise + 0.2


def test_total_variation_is_zero_on_flat_images_and_positive_on_edges():
    flat = torch.full((2, 1, 8, 8), 0.3)
    assert total_variation(flat) == 0
    edge = flat.clone()
    edge[..., 4:] = 1.0
    assert total_variation(edge) > 0


def test_unsplit_and_aux_no_query_are_reproducible_for_a_seed(digits, heads):
    x = digits.x[digits.aux][:32]
    z = heads["linear"]()(x).detach()
    a = unsplit(heads["linear"], z, (1, 8, 8), rounds=2, steps=2, seed=3)
    b = unsplit(heads["linear"], z, (1, 8, 8), rounds=2, steps=2, seed=3)
    c = unsplit(heads["linear"], z, (1, 8, 8), rounds=2, steps=2, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    r1 = aux_no_query(heads["linear"], x, z, epochs=1, seed=3)
    r2 = aux_no_query(heads["linear"], x, z, epochs=1, seed=3)
    assert torch.equal(r1, r2)


def test_unsplit_weighs_its_prior_against_the_activations_energy(digits, heads, conv_victim):
    """Small activations (Fashion-MNIST after conv1 has mean z^2 = 0.046) must not drown in TV.

    With the data term in absolute units, activations scaled by 0.05 were left to the
    smoothness prior (SSIM 0.007 here); relative to |z|^2 the attack still recovers
    structure (0.486, against 0.93 at full scale, where the shadow head fits more easily).
    """
    head = conv_victim
    x = digits.x[digits.test][:128]
    recon = unsplit(heads["conv"], 0.05 * _acts(head, x), (1, 8, 8), seed=0)
    s = ssim_batch(recon, x).mean()
    print(f"unsplit on 0.05 z {s:.3f}")
    assert s > 0.3
