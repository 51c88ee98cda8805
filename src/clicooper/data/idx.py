"""IDX files (the MNIST family's format), plain or gzipped."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from clicooper.data.errors import DataError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file: magic (0, 0, dtype, ndim), big-endian dims, then data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    dtype = np.dtype(_DTYPES[raw[2]])
    count = int(np.prod(dims))
    if len(raw) - offset != count * dtype.itemsize:
        raise DataError(f"{path} is truncated or corrupt: expected {count} values of {dims}")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(dims)


def find_idx(directory: Path, stem: str) -> Path:
    """``stem`` or ``stem.gz`` in ``directory`` (also the ``t10k``/``train`` dotted variant)."""
    for name in (
        stem,
        stem + ".gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        candidate = directory / name
        if candidate.exists():
            return candidate
    raise DataError(f"{directory} has no {stem}[.gz]: give a directory holding the four IDX files")


def load_idx_dir(directory: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train images/labels and test images/labels from an MNIST-style IDX directory."""
    if not directory.is_dir():
        raise DataError(f"{directory} is not a directory of IDX files")
    parts = [
        read_idx(find_idx(directory, stem))
        for stem in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
    ]
    return parts[0], parts[1], parts[2], parts[3]
