"""Head source ``public``: pretrained on public data disjoint from the training set.

Public data is not private, so pretraining it costs no privacy: the releases' epsilon
is the whole guarantee. The public data is either

- a declared split: the first ``head.public_split`` images of the training split
  (default: one sixth of it) are carved off as public and the owner trains on the rest;
  or
- another dataset, given by ``head.public_path`` (anything ``load_dataset`` reads: its
  training split is used).

Either way every public image is checked disjoint from every private training image
byte for byte (SHA-256 of each image's float32 bytes; :func:`check_disjoint`, called
for every source by :func:`clicooper.heads.build_head`); an overlap is refused. The head
(the preset's, plus a throwaway ReLU-linear classifier) is trained with Adam on the
public labels for ``head.pretrain_epochs`` epochs. Who runs it is ``head.pretrain_by``:
by default the trainers (the issue allows it: the data is public), who hand the head
back to the owner; its FLOPs count where it runs. The public mean of the head's output
is then subtracted before the unit norm (base.finish).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from clicooper.data import DataError, Dataset, Split, load_dataset
from clicooper.data.base import shared_images
from clicooper.heads.base import (
    FrozenHead,
    HeadPrivacy,
    PretrainFlops,
    embed,
    finish,
    forward_flops,
    out_shape,
    pretrain,
)

if TYPE_CHECKING:
    from clicooper.config import RunConfig


def check_disjoint(public: torch.Tensor, private: torch.Tensor, where: str) -> None:
    """Refuse (DataError) when any public image equals a private one byte for byte."""
    shared = shared_images(public, private)
    if shared:
        raise DataError(
            f"public data {where} shares {shared} image(s) byte for byte with the private "
            "training split: give public data disjoint from the training data"
        )


def carve(data: Dataset, n: int | None) -> tuple[Dataset, Split, dict[str, Any]]:
    """The first ``n`` training images as public, the rest as the owner's training data."""
    total = len(data.train)
    n = total // 6 if n is None else n
    if not 1 <= n < total:
        raise DataError(
            f"head.public_split {n} must leave private training data: use 1 to {total - 1} "
            f"for {data.name} ({total} training images), or head.public_path"
        )
    public = data.train.subset(torch.arange(n))
    private = data.train.subset(torch.arange(n, total))
    kept = Dataset(data.name, private, data.test, data.num_classes)
    record = {"kind": "split", "dataset": data.name, "indices": f"train[0:{n}]", "n": n}
    return kept, public, record


def from_path(data: Dataset, path: Path, seed: int) -> tuple[Split, dict[str, Any]]:
    """The training split of the dataset at ``path``, checked against ``data``."""
    if not Path(path).exists():
        raise DataError(f"head.public_path {path} does not exist: give a dataset path")
    other = load_dataset(str(path), seed=seed)
    if other.image_shape != data.image_shape:
        raise DataError(
            f"public data at {path} has images {other.image_shape}, the training data "
            f"{data.image_shape}: give public images of the same shape"
        )
    if int(other.train.y.max()) >= data.num_classes:
        raise DataError(f"public data at {path} has labels beyond {data.num_classes - 1}")
    return other.train, {"kind": "path", "path": str(path), "n": len(other.train)}


class PublicSource:
    """Pretrain the preset head on public data (no privacy cost)."""

    name = "public"

    def build(self, cfg: RunConfig, data: Dataset, split_head: nn.Module) -> FrozenHead:
        hc = cfg.head
        if hc.public_path is not None:
            public, record = from_path(data, hc.public_path, cfg.seed)
            kept = data
        else:
            kept, public, record = carve(data, hc.public_split)
        seed = cfg.seed
        batch = cfg.effective_batch_size(len(public))
        flops = pretrain(
            split_head, public, data.num_classes, hc.pretrain_epochs, hc.pretrain_lr, batch, seed
        )
        center = embed(split_head, public.x).mean(0).view(out_shape(split_head, data.image_shape))
        module = finish(split_head, center)
        record["pretrain_epochs"] = hc.pretrain_epochs
        return FrozenHead(
            source=self.name,
            module=module,
            data=kept,
            out_shape=out_shape(module, data.image_shape),
            privacy=HeadPrivacy(None, None, "no private record reaches the head (public data)"),
            pretrain=PretrainFlops(
                flops, hc.pretrain_by, f"{hc.pretrain_epochs} epochs on {record['n']} public images"
            ),
            forward_flops=forward_flops(module, data.image_shape),
            public=record,
            public_split=public,
        )
