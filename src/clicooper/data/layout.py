"""Turning user arrays into (N, C, H, W) float32 images in [0, 1] and int64 labels.

Axis rule for image arrays (``layout="auto"``):

- ``(N, D)``: flat square images, ``D = S * S``, one channel;
- ``(N, H, W)``: one channel;
- ``(N, A, B, L)``: channels-first when ``A`` is 1, 3 or 4 and ``L`` is not; channels-last
  when ``L`` is 1, 3 or 4 and ``A`` is not; otherwise ambiguous (e.g. ``(N, 3, 3, 3)``)
  or neither, and the user must say ``channels-first`` or ``channels-last``.

Pixel scale: a ``uint8`` image array is divided by 255 (the only integer type that
has a conventional range). Any other array must already lie in [0, 1]; with
``minmax`` it is mapped by ``(x - lo) / (hi - lo)`` with ``lo, hi`` the training
images' minimum and maximum, and test pixels are clipped to [0, 1] (a test image
may fall outside the training range). Labels must be integers (an integer dtype, or
floats with integral values), non-negative, and every test label must be a class
that the training labels define (``< max(train labels) + 1``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from clicooper.data.errors import DataError

Layout = Literal["auto", "channels-first", "channels-last"]
CHANNEL_SIZES = (1, 3, 4)
MAX_CLASSES = 100_000


def to_nchw(x: np.ndarray, layout: Layout, name: str) -> np.ndarray:
    """``x`` as (N, C, H, W) by the module's axis rule (a view where possible)."""
    if x.ndim == 2:
        side = int(round(np.sqrt(x.shape[1])))
        if side * side != x.shape[1] or layout != "auto":
            raise DataError(f"{name}: flat images of {x.shape[1]} pixels are not square")
        return x.reshape(len(x), 1, side, side)
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise DataError(
            f"{name}: images of shape {x.shape} are not (N,H,W), (N,C,H,W) or (N,H,W,C)"
        )
    if layout == "auto":
        layout = _guess_layout(x.shape, name)
    return x if layout == "channels-first" else x.transpose(0, 3, 1, 2)


def _guess_layout(shape: tuple[int, ...], name: str) -> Layout:
    first, last = shape[1] in CHANNEL_SIZES, shape[3] in CHANNEL_SIZES
    if first != last:
        return "channels-first" if first else "channels-last"
    raise DataError(
        f"{name}: cannot tell the channel axis of images shaped {shape}: "
        "pass --channels-first or --channels-last"
    )


def check_images(x: np.ndarray, name: str) -> None:
    """Refuse empty, non-numeric or non-finite image arrays."""
    if len(x) == 0:
        raise DataError(f"{name}: the split holds no images")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"{name}: images must be numbers, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise DataError(f"{name}: images hold NaN or infinite pixels")


def pixel_range(x: np.ndarray, minmax: bool) -> tuple[float, float]:
    """``(lo, hi)`` that maps ``x`` onto [0, 1]: (0, 255) for uint8, else (0, 1) or min-max."""
    if x.dtype == np.uint8:
        return 0.0, 255.0
    if minmax:
        lo, hi = float(x.min()), float(x.max())
        return (lo, hi) if hi > lo else (lo, lo + 1.0)
    return 0.0, 1.0


def scale_pixels(x: np.ndarray, lo: float, hi: float, clip: bool, name: str) -> np.ndarray:
    """``(x - lo) / (hi - lo)`` as float32; refuse values outside [0, 1] unless ``clip``."""
    out = (np.asarray(x, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo)
    if clip:
        return np.clip(out, 0.0, 1.0)
    if out.min() < 0 or out.max() > 1:
        raise DataError(
            f"{name}: pixel values lie in [{float(x.min()):g}, {float(x.max()):g}], outside "
            f"[{lo:g}, {hi:g}]: rescale them to [0, 1], store uint8, or pass --minmax-scale"
        )
    return out


def to_labels(y: np.ndarray, n_images: int, name: str) -> np.ndarray:
    """Integer labels, one per image and non-negative."""
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n_images:
        raise DataError(f"{name}: expected one label per image ({n_images}), got shape {y.shape}")
    if np.issubdtype(y.dtype, np.floating):
        if not np.isfinite(y).all() or not np.array_equal(y, np.round(y)):
            raise DataError(f"{name}: labels must be integers, got non-integral values")
    elif not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{name}: labels must be integers, got dtype {y.dtype}")
    labels = y.astype(np.int64)
    if labels.min() < 0 or labels.max() >= MAX_CLASSES:
        raise DataError(f"{name}: labels must lie in [0, {MAX_CLASSES}), got {labels.min()}..")
    return labels


def split_arrays(
    name: str, x: np.ndarray, y: np.ndarray, layout: Layout, lo: float, hi: float, clip: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One split's images (N, C, H, W) in [0, 1] and labels, checked."""
    x = np.asarray(x)
    check_images(x, name)
    images = scale_pixels(to_nchw(x, layout, name), lo, hi, clip, name)
    labels = to_labels(y, len(images), name)
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)


def check_test_labels(train_y: torch.Tensor, test_y: torch.Tensor, name: str) -> int:
    """The number of classes the training labels define; refuse test labels beyond it."""
    classes = int(train_y.max()) + 1
    if int(test_y.max()) >= classes:
        raise DataError(
            f"{name}: test label {int(test_y.max())} is out of range: the training labels "
            f"define classes 0..{classes - 1}"
        )
    return classes
