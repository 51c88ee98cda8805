"""Attack metrics: matched accuracy, ARI, SSIM, PSNR and the mean-image baselines.

Images are compared in [0, 1] (data range 1) with scikit-image; cluster quality uses
scipy's assignment solver and scikit-learn's adjusted Rand index.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from sklearn.metrics import adjusted_rand_score

from clicooper.attacks._common import ArrayLike, as_images, as_labels


def matched_accuracy(pred_clusters: ArrayLike, true_labels: ArrayLike) -> float:
    """Accuracy under the best one-to-one cluster -> class assignment.

    With contingency matrix N[k, c] = #{i: pred_i = k, y_i = c}, this is
    max over injective maps pi of sum_k N[k, pi(k)] / n (Hungarian algorithm), so it
    is invariant to renaming the clusters. Extra clusters or classes stay unmatched.
    """
    y = as_labels(true_labels, len(true_labels), "true_labels")
    p = as_labels(pred_clusters, len(y), "pred_clusters")
    return best_assignment_total(contingency(p, y)) / len(y)


def contingency(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Contingency table N[k, c] = #{i: pred_i = k-th cluster id, true_i = c-th class id}."""
    _, p = np.unique(pred, return_inverse=True)
    _, y = np.unique(true, return_inverse=True)
    ny = int(y.max()) + 1
    return np.bincount(p * ny + y, minlength=(int(p.max()) + 1) * ny).reshape(-1, ny)


def best_assignment_total(table: np.ndarray) -> int:
    """max over one-to-one row -> column maps of the matched entries' sum (Hungarian)."""
    rows, cols = linear_sum_assignment(table, maximize=True)
    return int(table[rows, cols].sum())


def ari(pred_clusters: ArrayLike, true_labels: ArrayLike) -> float:
    """Adjusted Rand index between a clustering and the true labels (0 = chance, 1 = equal)."""
    y = as_labels(true_labels, len(true_labels), "true_labels")
    return float(adjusted_rand_score(y, as_labels(pred_clusters, len(y), "pred_clusters")))


def _image_pairs(recon: ArrayLike, orig: ArrayLike) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Both batches as float64 numpy (n, H, W) or (n, H, W, C), plus the channel axis."""
    r, o = as_images(recon, "recon"), as_images(orig, "orig")
    if r.shape != o.shape:
        raise ValueError(f"recon {tuple(r.shape)} and orig {tuple(o.shape)} differ; align shapes")
    if r.dim() == 4 and r.shape[1] == 1:
        r, o = r[:, 0], o[:, 0]
    if r.dim() == 4:
        return r.permute(0, 2, 3, 1).double().numpy(), o.permute(0, 2, 3, 1).double().numpy(), -1
    return r.double().numpy(), o.double().numpy(), None


def _win_size(height: int, width: int) -> int:
    """SSIM window: 7 (scikit-image's default) when the image allows, else the largest odd side."""
    side = min(height, width)
    if side < 3:
        raise ValueError(f"images of {height}x{width} px are too small for SSIM; need >= 3 px")
    return 7 if side >= 7 else side - (1 - side % 2)


def ssim_batch(recon: ArrayLike, orig: ArrayLike) -> np.ndarray:
    """Per-image SSIM (n,) of ``recon`` against ``orig``, both in [0, 1], data range 1.

    Accepts (n, H, W) or (n, C, H, W); colour images use SSIM averaged over channels.
    The uniform 7x7 window (scikit-image default) shrinks to the largest odd side
    for images smaller than 7 px.
    """
    r, o, axis = _image_pairs(recon, orig)
    win = _win_size(*r.shape[1:3])
    return np.array(
        [
            structural_similarity(a, b, data_range=1.0, win_size=win, channel_axis=axis)
            for a, b in zip(r, o, strict=True)
        ]
    )


def psnr_batch(recon: ArrayLike, orig: ArrayLike) -> np.ndarray:
    """Per-image PSNR in dB (n,): 10 log10(1 / MSE) with data range 1; inf for identical images."""
    r, o, _ = _image_pairs(recon, orig)
    return np.array(
        [
            np.inf if np.array_equal(a, b) else peak_signal_noise_ratio(b, a, data_range=1.0)
            for a, b in zip(r, o, strict=True)
        ]
    )


def mean_image_baselines(
    train_images: ArrayLike,
    train_labels: ArrayLike,
    test_images: ArrayLike,
    test_labels: ArrayLike,
    seed: int = 0,
) -> dict[str, float]:
    """SSIM of attackers that learn nothing about the individual image, mean over test images.

    - ``dataset_mean``: every test image "reconstructed" as the mean training image
      (an attacker that knows only the data distribution);
    - ``class_mean``: each test image reconstructed as the mean training image of its
      true class (an attacker that learns the label and nothing else);
    - ``uniform_noise``: i.i.d. U[0, 1] pixels (seeded), the floor of a useless output.
    """
    xtr, xte = as_images(train_images, "train_images"), as_images(test_images, "test_images")
    ytr = as_labels(train_labels, xtr.shape[0], "train_labels")
    yte = as_labels(test_labels, xte.shape[0], "test_labels")
    if xtr.shape[1:] != xte.shape[1:]:
        raise ValueError("train_images and test_images have different image shapes")
    missing = sorted(set(yte.tolist()) - set(ytr.tolist()))
    if missing:
        raise ValueError(f"test classes {missing} have no training images; cannot form means")
    class_means = {c: xtr[ytr == c].mean(0) for c in np.unique(yte).tolist()}
    noise = np.random.default_rng(seed).random(tuple(xte.shape), dtype=np.float32)
    return {
        "dataset_mean": float(ssim_batch(xtr.mean(0).expand_as(xte), xte).mean()),
        "class_mean": float(
            ssim_batch(np.stack([class_means[c].numpy() for c in yte.tolist()]), xte).mean()
        ),
        "uniform_noise": float(ssim_batch(noise, xte).mean()),
    }


def reconstruction_scores(recon: ArrayLike, orig: ArrayLike) -> dict[str, float]:
    """Mean SSIM and mean PSNR (dB; infinite images excluded from the mean) of a reconstruction."""
    psnr = psnr_batch(recon, orig)
    finite = psnr[np.isfinite(psnr)]
    return {
        "ssim": float(ssim_batch(recon, orig).mean()),
        "psnr": float(finite.mean()) if finite.size else float("inf"),
    }
