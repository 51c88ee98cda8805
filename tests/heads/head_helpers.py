"""Helpers of the head-source tests: a short digits config and the preset head."""

from __future__ import annotations

from typing import Any

from torch import nn

from clicooper.config import RunConfig
from clicooper.data import Dataset
from clicooper.models.presets import build_preset
from clicooper.models.split import split_blocks


def head_config(source: str, **head: Any) -> RunConfig:
    """A digits CNN config with ``head.source`` and short pretraining (1 epoch)."""
    over = {"head.pretrain_epochs": 1, "head.dp_epochs": 1}
    over.update({f"head.{k}": v for k, v in head.items()})
    return RunConfig.load(dataset="digits", model="cnn", **{"head.source": source, **over})


def preset_head(data: Dataset) -> nn.Module:
    """The CNN preset's (untrained) head at its default cut."""
    blocks = build_preset("cnn", data.image_shape, data.num_classes, 2)
    return split_blocks(blocks, "bottleneck", 2).head
