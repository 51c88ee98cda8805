"""Metrics: SSIM / PSNR on real digits, matched accuracy, ARI, mean-image baselines."""

from __future__ import annotations

import numpy as np
import pytest

from clicooper.attacks.metrics import (
    ari,
    matched_accuracy,
    mean_image_baselines,
    psnr_batch,
    reconstruction_scores,
    ssim_batch,
)


def test_ssim_of_image_with_itself_is_one(digits):
    x = digits.x[:16]
    assert np.allclose(ssim_batch(x, x), 1.0)
    assert np.allclose(ssim_batch(x[:, 0], x[:, 0]), 1.0)  # (N, H, W)
    rgb = x.repeat(1, 3, 1, 1)
    assert np.allclose(ssim_batch(rgb, rgb), 1.0)  # (N, C, H, W), channel-averaged


def test_ssim_with_uniform_noise_is_small(digits):
    x = digits.x[:64]
    noise = np.random.default_rng(0).random(tuple(x.shape), dtype=np.float32)
    s = ssim_batch(noise, x)
    assert s.shape == (64,)
    assert abs(s.mean()) < 0.05


def test_ssim_handles_images_smaller_than_the_default_window():
    img = np.random.default_rng(1).random((4, 5, 5))
    assert np.allclose(ssim_batch(img, img), 1.0)
    assert ssim_batch(img, img[::-1]).mean() < 1.0
    with pytest.raises(ValueError, match="too small"):
        ssim_batch(img[:, :2, :2], img[:, :2, :2])


def test_psnr_infinite_for_identical_large_for_close_low_for_noise(digits):
    x = digits.x[:8].numpy()
    assert np.all(np.isinf(psnr_batch(x, x)))
    close = np.clip(x + 1e-3, 0, 1)
    assert np.all(psnr_batch(close, x) > 50)
    noise = np.random.default_rng(2).random(x.shape)
    assert np.all(psnr_batch(noise, x) < 10)
    scores = reconstruction_scores(close, x)
    assert scores["ssim"] > 0.99 and scores["psnr"] > 50


def test_image_metrics_reject_bad_input(digits):
    x = digits.x[:4]
    with pytest.raises(ValueError, match="differ"):
        ssim_batch(x, digits.x[:5])
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        ssim_batch(x * 16, x)
    with pytest.raises(ValueError, match="NaN"):
        psnr_batch(x * float("nan"), x)


def test_matched_accuracy_value_and_invariance_to_relabelling():
    y = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    pred = np.array([5, 5, 7, 7, 7, 7, 9, 9, 9, 5])
    # Best map: 5 -> 0 (2 hits), 7 -> 1 (3), 9 -> 2 (3): 8 of 10.
    assert matched_accuracy(pred, y) == pytest.approx(0.8)
    rng = np.random.default_rng(3)
    for _ in range(5):
        rename = dict(zip([5, 7, 9], rng.permutation([0, 1, 2]).tolist(), strict=True))
        assert matched_accuracy(np.vectorize(rename.get)(pred), y) == pytest.approx(0.8)
    assert matched_accuracy(y[::-1].copy(), y) < 1.0
    assert matched_accuracy(np.arange(10), y) == pytest.approx(0.3)  # extra clusters unmatched


def test_ari_is_one_for_a_renamed_partition_and_near_zero_for_random():
    y = np.repeat(np.arange(4), 50)
    assert ari((y + 1) % 4, y) == pytest.approx(1.0)
    assert abs(ari(np.random.default_rng(4).integers(0, 4, 200), y)) < 0.05


def test_labels_must_match_and_be_integers():
    with pytest.raises(ValueError, match="expected"):
        matched_accuracy(np.zeros(3, int), np.zeros(4, int))
    with pytest.raises(ValueError, match="integer"):
        ari(np.zeros(4), np.zeros(4, int))


def test_mean_image_baselines_order_on_digits(digits):
    b = mean_image_baselines(
        digits.x[digits.train], digits.y[digits.train], digits.x[digits.test], digits.y[digits.test]
    )
    print("digits baselines", b)
    assert b["class_mean"] > b["dataset_mean"] > b["uniform_noise"] + 0.3
    assert abs(b["uniform_noise"]) < 0.05


def test_mean_image_baselines_need_every_test_class_in_training(digits):
    tr = digits.train[digits.y[digits.train] != 3]
    with pytest.raises(ValueError, match=r"\[3\]"):
        mean_image_baselines(digits.x[tr], digits.y[tr], digits.x[:50], digits.y[:50])
