"""The dataset container shared by every loader."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from clicooper.data.errors import DataError
from clicooper.data.layout import Layout, split_arrays

__all__ = [
    "DataError",
    "Dataset",
    "Split",
    "from_arrays",
    "image_digests",
    "seeded_split",
    "shared_images",
]


@dataclass(frozen=True)
class Split:
    """Images in [0, 1] as (N, C, H, W) float32 and labels as (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise DataError(
                f"images must be (N,C,H,W) and labels (N,), got {self.x.shape} {self.y.shape}"
            )

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: torch.Tensor | np.ndarray) -> Split:
        index = torch.as_tensor(index, dtype=torch.long)
        return Split(self.x[index], self.y[index])


@dataclass(frozen=True)
class Dataset:
    """A named dataset with its train and test splits."""

    name: str
    train: Split
    test: Split
    num_classes: int

    @classmethod
    def from_arrays(
        cls,
        name: str,
        x_train: np.ndarray,
        y_train: np.ndarray,
        x_test: np.ndarray,
        y_test: np.ndarray,
        scale: float = 1.0,
        layout: Layout = "auto",
    ) -> Dataset:
        """A dataset from your own arrays (pixels divided by ``scale`` must lie in [0, 1]).

        Images may be (N, D), (N, H, W), (N, C, H, W) or (N, H, W, C): see
        :mod:`clicooper.data.layout` for the axis rule that ``layout`` overrides.
        """
        train = Split(*from_arrays(name, x_train, y_train, scale, layout))
        test = Split(*from_arrays(name, x_test, y_test, scale, layout))
        classes = int(max(train.y.max(), test.y.max())) + 1
        return cls(name, train, test, classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]

    def limit(self, train: int | None, test: int | None, seed: int) -> Dataset:
        """A seeded random subset of each split (None keeps a split whole)."""
        return Dataset(
            self.name,
            _take(self.train, train, seed),
            _take(self.test, test, seed + 1),
            self.num_classes,
        )

    def split_auxiliary(self, fraction: float, seed: int) -> tuple[Dataset, Split]:
        """Hold out ``fraction`` of the training split as auxiliary data.

        The returned dataset's training split and the auxiliary split are
        disjoint: an attacker's auxiliary images never include the data
        owner's training images.
        """
        n_aux = int(round(len(self.train) * fraction))
        order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(seed))
        aux, kept = order[:n_aux], order[n_aux:]
        return (
            Dataset(self.name, self.train.subset(kept), self.test, self.num_classes),
            self.train.subset(aux),
        )


def _take(split: Split, n: int | None, seed: int) -> Split:
    if n is None or n >= len(split):
        return split
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    return split.subset(order[:n])


def from_arrays(
    name: str, x: np.ndarray, y: np.ndarray, scale: float, layout: Layout = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,C,H,W) float32 pixels ``x / scale`` in [0, 1] and int64 labels from raw arrays."""
    return split_arrays(name, x, y, layout, 0.0, scale, clip=False)


def seeded_split(
    name: str, x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int
) -> tuple[Split, Split]:
    """Deterministic stratified train/test split for datasets that ship without one."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=y.numpy())
    return Split(x[tr], y[tr]), Split(x[te], y[te])


def image_digests(x: torch.Tensor) -> list[bytes]:
    rows = x.detach().to("cpu", torch.float32).contiguous().flatten(1)
    return [hashlib.sha256(row.numpy().tobytes()).digest() for row in rows]


def shared_images(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many images of ``a`` equal an image of ``b`` byte for byte (as float32).

    Images of another shape never match: compare the same preprocessing.
    """
    if a.shape[1:] != b.shape[1:]:
        return 0
    seen = set(image_digests(b))
    return sum(d in seen for d in image_digests(a))
