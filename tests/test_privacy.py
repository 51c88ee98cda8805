import os
import stat

import pytest
import torch

from clicooper.privacy import accounting
from clicooper.privacy.activation import ActivationNoise
from clicooper.privacy.secrets import OwnerSecret


@pytest.mark.parametrize("mechanism,order", [("gaussian", 2), ("laplace", 1)])
def test_clip_bounds_every_sample_norm(mechanism, order):
    noise = ActivationNoise(clip_norm=0.7, noise_multiplier=0.0, mechanism=mechanism)
    z = torch.randn(256, 64) * torch.logspace(-2, 2, 256).unsqueeze(1)
    clipped = noise.clip(z)
    norms = clipped.norm(p=order, dim=1)
    assert float(norms.max()) <= 0.7 + 1e-5
    small = z.norm(p=order, dim=1) < 0.7
    assert torch.allclose(clipped[small], z[small])  # short vectors are left alone
    assert small.any() and (~small).any()


def test_gaussian_noise_has_the_configured_scale():
    noise = ActivationNoise(clip_norm=2.0, noise_multiplier=1.5)
    out = noise(torch.zeros(4000, 64))
    assert abs(float(out.std()) - 3.0) < 0.05
    assert abs(float(out.mean())) < 0.02


def test_laplace_noise_has_the_configured_scale():
    noise = ActivationNoise(clip_norm=1.0, noise_multiplier=0.5, mechanism="laplace")
    out = noise(torch.zeros(4000, 64))
    # Laplace(b) has mean absolute deviation b and std b * sqrt(2)
    assert abs(float(out.abs().mean()) - 0.5) < 0.01
    assert abs(float(out.std()) - 0.5 * 2**0.5) < 0.02


def test_noise_is_fresh_and_not_derived_from_the_experiment_seed():
    torch.manual_seed(0)
    a = ActivationNoise(1.0, 1.0)(torch.zeros(8, 8))
    torch.manual_seed(0)
    b = ActivationNoise(1.0, 1.0)(torch.zeros(8, 8))
    assert not torch.equal(a, b)
    n = ActivationNoise(1.0, 1.0)
    assert not torch.equal(n(torch.zeros(8, 8)), n(torch.zeros(8, 8)))


def test_gradient_flows_through_the_clip():
    noise = ActivationNoise(1.0, 0.5)
    z = (torch.randn(4, 8) * 5).requires_grad_(True)
    noise(z).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_epsilon_grows_with_epochs_and_falls_with_noise():
    eps = {(m, e): accounting.epsilon(m, e, 1e-5) for m in (0.5, 1, 2, 4) for e in (1, 5, 20)}
    for m in (0.5, 1, 2, 4):
        assert eps[(m, 1)] < eps[(m, 5)] < eps[(m, 20)]
    for e in (1, 5, 20):
        assert eps[(0.5, e)] > eps[(1, e)] > eps[(2, e)] > eps[(4, e)]
    assert accounting.epsilon(0.0, 5, 1e-5) is None


def test_sensitivity_is_twice_the_clip_norm():
    # noise multiplier m against sensitivity 2C is a Gaussian mechanism with sigma = m / 2
    import dp_accounting
    from dp_accounting import rdp

    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.0), 3))
    assert accounting.epsilon(2.0, 3, 1e-5) == pytest.approx(acc.get_epsilon(1e-5))


@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
def test_target_epsilon_finds_the_smallest_sufficient_noise(mechanism):
    m = accounting.noise_for_epsilon(8.0, 5, 1e-5, mechanism)
    assert accounting.epsilon(m, 5, 1e-5, mechanism) <= 8.0
    assert accounting.epsilon(m - 0.01, 5, 1e-5, mechanism) > 8.0


def test_owner_secret_file_and_directory_modes(tmp_path):
    secret = OwnerSecret.generate()
    path = secret.save(tmp_path / "owner")
    assert stat.S_IMODE(os.stat(tmp_path / "owner").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = OwnerSecret.load(tmp_path / "owner")
    assert loaded.derive("x") == secret.derive("x")


def test_sub_secrets_are_distinct_per_label_and_per_owner():
    a, b = OwnerSecret.generate(), OwnerSecret.generate()
    assert a.derive("labels/permutation") != a.derive("labels/sub-label")
    assert a.derive("labels/permutation") != b.derive("labels/permutation")
    with pytest.raises(ValueError, match="32 bytes"):
        OwnerSecret(b"short")


def test_noise_seeded_by_the_owner_secret_repeats_only_with_that_secret():
    a, b = OwnerSecret.generate(), OwnerSecret.generate()

    def draws(secret):
        return ActivationNoise(1.0, 1.0, seed=secret.derive_seed("activation-noise"))(
            torch.zeros(8, 8)
        )

    assert torch.equal(draws(a), draws(a))
    assert not torch.equal(draws(a), draws(b))


def test_reading_an_owner_secret_file(tmp_path):
    secret = OwnerSecret.generate()
    path = secret.save(tmp_path / "owner")
    assert OwnerSecret.read(path).derive("x") == secret.derive("x")
    (tmp_path / "short").write_bytes(b"\x00" * 31)
    with pytest.raises(ValueError, match="holds 31 bytes, not a 32-byte owner secret"):
        OwnerSecret.read(tmp_path / "short")
    with pytest.raises(ValueError, match="cannot read the owner secret"):
        OwnerSecret.read(tmp_path / "missing")
