"""The dataset container shared by every loader."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


class DataError(ValueError):
    """A dataset that cannot be loaded; the message says how to fix it."""


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
    ) -> Dataset:
        """A dataset from your own arrays (pixels divided by ``scale`` must lie in [0, 1])."""
        train = Split(*from_arrays(name, x_train, y_train, scale))
        test = Split(*from_arrays(name, x_test, y_test, scale))
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
    name: str, x: np.ndarray, y: np.ndarray, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,C,H,W) float32 pixels in [0, 1] and int64 labels from raw arrays."""
    x = np.asarray(x, dtype=np.float32) / scale
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 2:
        side = int(round(np.sqrt(x.shape[1])))
        if side * side != x.shape[1]:
            raise DataError(f"{name}: flat images of {x.shape[1]} pixels are not square")
        x = x.reshape(len(x), 1, side, side)
    if x.min() < 0 or x.max() > 1:
        raise DataError(f"{name}: pixel values fall outside [0, {scale:g}]")
    labels = np.asarray(y).astype(np.int64)
    if labels.ndim != 1 or len(labels) != len(x):
        raise DataError(f"{name}: expected one integer label per image")
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(labels)


def seeded_split(
    name: str, x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int
) -> tuple[Split, Split]:
    """Deterministic stratified train/test split for datasets that ship without one."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=y.numpy())
    return Split(x[tr], y[tr]), Split(x[te], y[te])
