"""Head source ``public``: the declared split, a path, and the byte-for-byte overlap check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clicooper.data import DataError
from clicooper.data.base import image_digests as image_hashes
from clicooper.heads import build_head, check_disjoint
from clicooper.heads.public import carve


def test_declared_split_is_carved_and_recorded(small_digits, split_head, head_cfg):
    fh = build_head(head_cfg("public", public_split=100), small_digits, split_head)
    assert fh.public == {
        "kind": "split",
        "dataset": "digits",
        "indices": "train[0:100]",
        "n": 100,
        "pretrain_epochs": 1,
    }
    assert len(fh.data.train) == len(small_digits.train) - 100
    assert torch.equal(fh.data.train.x, small_digits.train.x[100:])
    assert fh.privacy.epsilon is None
    assert fh.pretrain.flops > 0


def test_default_split_is_a_sixth(small_digits):
    kept, public, record = carve(small_digits, None)
    assert record["n"] == len(small_digits.train) // 6 == len(public)
    assert len(kept.train) + len(public) == len(small_digits.train)


def test_split_that_leaves_no_private_data_is_refused(small_digits, split_head, head_cfg):
    cfg = head_cfg("public", public_split=len(small_digits.train))
    with pytest.raises(DataError) as err:
        build_head(cfg, small_digits, split_head)
    assert "public_split" in str(err.value) and "\n" not in str(err.value)


def _npz(path, x: torch.Tensor, y: torch.Tensor) -> None:
    arrays = {"x_train": x.numpy(), "y_train": y.numpy(), "x_test": x[:5].numpy()}
    np.savez(path, **arrays, y_test=y[:5].numpy())


def test_public_path_overlapping_training_data_is_refused(
    small_digits, split_head, tmp_path, head_cfg
):
    """Three private training images hidden among fresh ones are found byte for byte."""
    fresh = torch.rand(40, *small_digits.image_shape)
    x = torch.cat([fresh, small_digits.train.x[[3, 50, 77]]])
    y = torch.randint(0, 10, (len(x),))
    _npz(tmp_path / "public.npz", x, y)
    cfg = head_cfg("public", public_path=tmp_path / "public.npz")
    with pytest.raises(DataError) as err:
        build_head(cfg, small_digits, split_head)
    message = str(err.value)
    assert "shares 3 image(s)" in message and "\n" not in message


def test_disjoint_public_path_is_used(small_digits, split_head, tmp_path, head_cfg):
    x = torch.rand(60, *small_digits.image_shape)
    _npz(tmp_path / "public.npz", x, torch.randint(0, 10, (60,)))
    cfg = head_cfg("public", public_path=tmp_path / "public.npz")
    fh = build_head(cfg, small_digits, split_head)
    assert fh.public["kind"] == "path" and fh.public["n"] == 60
    assert fh.data is small_digits  # a separate public set leaves the training data whole


def test_missing_public_path_is_refused(small_digits, split_head, tmp_path, head_cfg):
    cfg = head_cfg("public", public_path=tmp_path / "nowhere")
    with pytest.raises(DataError) as err:
        build_head(cfg, small_digits, split_head)
    assert "does not exist" in str(err.value) and "\n" not in str(err.value)


def test_overlap_check_is_byte_for_byte(small_digits):
    private = small_digits.train.x[:20]
    near = private.clone()
    flat = near.view(len(near), -1)
    flat[:, 0] = torch.nextafter(flat[:, 0], torch.tensor(2.0))  # one ulp off, every image
    check_disjoint(near, private, "(one ulp off)")  # no image equal: accepted
    with pytest.raises(DataError):
        check_disjoint(torch.cat([near, private[7:8]]), private, "(one exact copy)")
    assert len(set(image_hashes(private))) == 20
