"""User arrays of any common layout: the axis rule, the pixel scale, and one-line refusals."""

import json

import numpy as np
import pytest
import torch

from clicooper.data import DataError, load_dataset

RNG = np.random.default_rng(0)


def _labels(n: int, classes: int = 3) -> np.ndarray:
    return np.arange(n) % classes


def _npz(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _split_arrays(images_train, images_test):
    return {
        "x_train": images_train,
        "y_train": _labels(len(images_train)),
        "x_test": images_test,
        "y_test": _labels(len(images_test)),
    }


@pytest.mark.parametrize(
    "shape,expected",
    [
        ((30, 8, 8), (1, 8, 8)),
        ((30, 3, 8, 8), (3, 8, 8)),
        ((30, 8, 8, 3), (3, 8, 8)),
        ((30, 1, 5, 7), (1, 5, 7)),
        ((30, 5, 7, 1), (1, 5, 7)),
        ((30, 64), (1, 8, 8)),
    ],
)
def test_axis_rule_puts_channels_first(tmp_path, shape, expected):
    x = RNG.integers(0, 256, shape).astype(np.uint8)
    data = load_dataset(str(_npz(tmp_path, **_split_arrays(x, x[:10]))))
    assert data.train.x.shape[1:] == expected and data.image_shape == expected


def test_channels_last_pixels_land_in_the_right_place(tmp_path):
    x = RNG.integers(0, 256, (12, 5, 6, 3)).astype(np.uint8)
    data = load_dataset(str(_npz(tmp_path, **_split_arrays(x, x))))
    expected = torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    assert torch.equal(data.train.x, expected)


def test_ambiguous_layout_needs_a_flag_and_the_flag_decides(tmp_path):
    x = RNG.integers(0, 256, (12, 3, 6, 3)).astype(np.uint8)
    path = str(_npz(tmp_path, **_split_arrays(x, x)))
    with pytest.raises(DataError, match="--channels-first or --channels-last"):
        load_dataset(path)
    assert load_dataset(path, layout="channels-last").image_shape == (3, 3, 6)
    assert load_dataset(path, layout="channels-first").image_shape == (3, 6, 3)


def test_only_uint8_images_are_scaled(tmp_path):
    x = RNG.random((20, 6, 6)).astype(np.float32)  # already in [0, 1]
    y = _labels(20).astype(np.uint8)  # uint8 labels must not switch the pixel scale
    data = load_dataset(str(_npz(tmp_path, x_train=x, y_train=y, x_test=x, y_test=y)))
    assert torch.allclose(data.train.x[:, 0], torch.from_numpy(x))
    assert data.num_classes == 3


def test_float_images_outside_unit_range_are_refused_unless_minmax(tmp_path):
    x = (RNG.random((20, 6, 6)) * 40 - 10).astype(np.float32)
    path = str(_npz(tmp_path, **_split_arrays(x, x * 2)))
    with pytest.raises(DataError, match="--minmax-scale"):
        load_dataset(path)
    data = load_dataset(path, minmax=True)
    assert float(data.train.x.min()) == 0.0 and float(data.train.x.max()) == 1.0
    assert float(data.test.x.min()) >= 0.0 and float(data.test.x.max()) <= 1.0
    lo, hi = float(x.min()), float(x.max())
    assert torch.allclose(data.train.x[:, 0], torch.from_numpy((x - lo) / (hi - lo)))


def test_npy_directory(tmp_path):
    x = RNG.integers(0, 256, (40, 8, 8, 3)).astype(np.uint8)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", _labels(40))
    data = load_dataset(str(tmp_path))
    assert data.image_shape == (3, 8, 8) and len(data.train) + len(data.test) == 40


def _bad_npz(tmp_path, case: str):
    ok = RNG.integers(0, 256, (20, 6, 6)).astype(np.uint8)
    y = _labels(20)
    path = tmp_path / "bad.npz"
    if case == "zero-byte":
        path.write_bytes(b"")
        return path
    if case == "not-an-archive":
        path.write_text("x_train,y_train\n1,2\n")
        return path
    arrays = {
        "wrong-keys": {"X_train": ok, "Y_train": y},
        "missing-key": {"x_train": ok, "y_train": y, "x_test": ok},
        "mismatched-lengths": {"x_train": ok, "y_train": y[:15], "x_test": ok, "y_test": y},
        "negative-label": {"x_train": ok, "y_train": y - 1, "x_test": ok, "y_test": y},
        "test-label-out-of-range": {"x_train": ok, "y_train": y, "x_test": ok, "y_test": y + 5},
        "non-integer-labels": {"x_train": ok, "y_train": y + 0.5, "x_test": ok, "y_test": y},
        "string-labels": {"x_train": ok, "y_train": y.astype(str), "x_test": ok, "y_test": y},
        "nan-pixels": {
            "x_train": np.full((20, 6, 6), np.nan, dtype=np.float32),
            "y_train": y,
            "x_test": ok,
            "y_test": y,
        },
        "empty-split": {"x_train": ok, "y_train": y, "x_test": ok[:0], "y_test": y[:0]},
        "1-d-images": {"x_train": ok.reshape(-1), "y_train": y, "x_test": ok, "y_test": y},
        "5-d-images": {"x_train": ok[:, None, None], "y_train": y, "x_test": ok, "y_test": y},
        "flat-not-square": {"x": ok.reshape(20, -1)[:, :30], "y": y},
    }[case]
    np.savez(path, **arrays)
    return path


BAD_CASES = {
    "zero-byte": "cannot read",
    "not-an-archive": "cannot read",
    "wrong-keys": "needs arrays x_train",
    "missing-key": "needs arrays x_train",
    "mismatched-lengths": "one label per image",
    "negative-label": "labels must lie in",
    "test-label-out-of-range": "out of range",
    "non-integer-labels": "labels must be integers",
    "string-labels": "labels must be integers",
    "nan-pixels": "NaN",
    "empty-split": "no images",
    "1-d-images": "are not (N,H,W)",
    "5-d-images": "are not (N,H,W)",
    "flat-not-square": "not square",
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_malformed_file_is_one_line_and_exit_2(tmp_path, cli_inprocess, case):
    path = _bad_npz(tmp_path, case)
    out = tmp_path / "run"
    code, err, _ = cli_inprocess("run", "--dataset", str(path), "--out", str(out), "--epochs", "1")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert BAD_CASES[case] in lines[0], lines[0]
    assert not out.exists()  # nothing started, so nothing blocks the corrected command


def test_rgb_32x32_channels_last_trains_with_the_cnn_preset(tmp_path, cli_inprocess):
    """Synthetic RGB: class = the colour channel that is bright (learnable in one epoch)."""
    n = 96
    y = _labels(n)
    x = RNG.integers(0, 60, (n, 32, 32, 3)).astype(np.uint8)
    x[np.arange(n), :, :, y] += 180
    path = _npz(tmp_path, x_train=x[:72], y_train=y[:72], x_test=x[72:], y_test=y[72:])
    out = tmp_path / "rgb"
    code, err, _ = cli_inprocess(
        "run", "--dataset", str(path), "--model", "cnn", "--mode", "vanilla",
        "--epochs", "3", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["data"] == {"train": 72, "test": 24, "classes": 3}, results["data"]
    assert results["accuracy"]["test"] > 0.6, results["accuracy"]
