"""Preset assembly: the preset model of a run config, split at its cut among its trainers.

Every process builds it from the config and the seed alone, so the data owner's
in-process parties and a served trainer (:mod:`clicooper.runtime.deploy.host`) start
from the same weights.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from clicooper.config import RunConfig
from clicooper.data import Dataset
from clicooper.models.presets import DEFAULT_CUT, build_preset
from clicooper.models.split import SplitModel, split_blocks

ModelFactory = Callable[[int], SplitModel]  # n_outputs -> head and segments
#: Seeding and building use torch's one global generator: a node sets up the trainers of
#: several sessions in threads of one process, and two builds at once would interleave
#: their draws (neither would get the weights its seed gives).
_BUILD = threading.Lock()


def preset_split(cfg: RunConfig, image_shape: tuple[int, int, int], n_outputs: int) -> SplitModel:
    """The preset model seeded with ``cfg.seed``: every process builds the same weights."""
    with _BUILD:
        torch.manual_seed(cfg.seed)
        blocks = build_preset(cfg.model, image_shape, n_outputs, cfg.trainers)
    return split_blocks(blocks, cfg.cut or DEFAULT_CUT[cfg.model], cfg.trainers)


def preset_segment(
    cfg: RunConfig, image_shape: tuple[int, int, int], n_outputs: int, index: int
) -> torch.nn.Module:
    """Trainer ``index``'s segment, initialised exactly as in the in-process session."""
    return preset_split(cfg, image_shape, n_outputs).segments[index - 1]


def preset_factory(cfg: RunConfig, data: Dataset) -> ModelFactory:
    """The model factory of a run on ``data``: the preset of ``cfg`` for its image shape."""

    def factory(n_outputs: int) -> SplitModel:
        return preset_split(cfg, data.image_shape, n_outputs)

    return factory
