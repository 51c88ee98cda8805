"""Release once: the frozen head, where it comes from, and what the one release covers.

With ``privacy.release = "once"`` the data owner's head is frozen for the whole run.
Each training record's cut-layer activation ``z = head(x)`` is clipped to norm C and
noised once, before training (:mod:`clicooper.parties.releases`); the first trainer
caches these releases and the chain trains every epoch on them. The release of a
record is one run of the mechanism of :mod:`clicooper.privacy.activation`: under
replace-one adjacency two clipped activations differ by at most 2C, so its epsilon
is that of a single Gaussian (or Laplace) mechanism with ratio ``m / 2``, given the
head. The head's own cost is its source's: a fixed head that touched no data costs
nothing; a head fitted on data costs what that fitting costs, reported apart.

The hook is :func:`frozen_head`: it looks the configured ``[head] source`` up in
:data:`HEAD_SOURCES`, builds the head, checks any data the head was fitted on against
the training set (:func:`check_disjoint`) and freezes it. More sources register in
:data:`HEAD_SOURCES`; each returns a :class:`FrozenHead` saying what it cost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from clicooper.config import ConfigError, RunConfig
from clicooper.data import DataError, Dataset, Split
from clicooper.data.base import shared_images
from clicooper.heads.base import freeze
from clicooper.models import SplitModel


@dataclass
class FrozenHead:
    """A head for release-once, with what obtaining it cost in privacy.

    ``privacy`` is reported as results.json ``privacy.head`` (``source``, ``epsilon``,
    ``data`` and a ``note`` at least). ``fitted_on``: images the head was fitted on
    (a public split), which :func:`frozen_head` checks disjoint from the training set.
    """

    module: nn.Module
    privacy: dict[str, Any]
    fitted_on: torch.Tensor | None = field(default=None, repr=False)
    data: Dataset | None = field(default=None, repr=False)  # the private data, when it shrank
    #: the public data the head was pretrained on (the chain's warm start), when there is one
    public: Split | None = field(default=None, repr=False)


HeadSource = Callable[[RunConfig, Dataset, SplitModel], FrozenHead]

RANDOM_NOTE = (
    "the preset's head as initialised from the run's seed, then frozen: a fixed random "
    "feature map that touches no data, so it costs no privacy (the seed is shared with the "
    "trainers, which can rebuild it)"
)


def _random_head(cfg: RunConfig, data: Dataset, split: SplitModel) -> FrozenHead:
    """The preset's freshly initialised head (a fixed random projection, cf. LightSplit)."""
    return FrozenHead(
        split.head, {"source": "random", "epsilon": None, "data": "none", "note": RANDOM_NOTE}
    )


def _library_source(name: str) -> HeadSource:
    """A source of :mod:`clicooper.heads`, its summary as the head's privacy entry and the
    private data it leaves (a public split is carved off the training split)."""

    def build(cfg: RunConfig, data: Dataset, split: SplitModel) -> FrozenHead:
        from clicooper import heads

        built = heads.get_source(name).build(cfg, data, split.head)
        return FrozenHead(built.module, built.results(), data=built.data, public=built.public_split)

    return build


#: Head sources by ``[head] source`` name: "random" is the preset's head as initialised,
#: the others are :data:`clicooper.heads.HEAD_SOURCES`.
HEAD_SOURCES: dict[str, HeadSource] = {
    "random": _random_head,
    **{name: _library_source(name) for name in ("public", "scattering", "dpsgd")},
}


def head_source(name: str) -> HeadSource:
    """The source registered as ``name``; a one-line :class:`ConfigError` otherwise."""
    try:
        return HEAD_SOURCES[name]
    except KeyError:
        raise ConfigError(
            f"unknown head source {name!r} (head.source): choose one of "
            f"{', '.join(sorted(HEAD_SOURCES))}"
        ) from None


def frozen_head(cfg: RunConfig, data: Dataset, split: SplitModel) -> FrozenHead:
    """The frozen head of a release-once run: built by its source, checked, frozen.

    ConfigError or DataError (one line) when the source cannot be had or was fitted
    on images of the training set.
    """
    head = head_source(cfg.head.source)(cfg, data, split)
    if head.fitted_on is not None:
        check_disjoint(head.fitted_on, data.train.x, f"head source {cfg.head.source!r}")
    freeze(head.module)
    return head


def check_disjoint(public: torch.Tensor, train: torch.Tensor, what: str) -> None:
    """DataError unless no image of ``public`` equals one of ``train`` byte for byte.

    Images of another shape never match; compare the same preprocessing (a run's images
    are float32, as :func:`~clicooper.data.base.shared_images` compares them).
    """
    shared = shared_images(public, train)
    if shared:
        raise DataError(
            f"{what} was fitted on {shared} image(s) of the training set (byte for byte): "
            "a public split must be disjoint from the training data; choose another split"
        )


def once_scope(noise_at_inference: bool) -> str:
    """What the epsilon of a release-once run covers, in exact words."""
    inference = (
        ", plus one more noisy release of a training record queried at inference"
        if noise_at_inference
        else "; inference sends clean activations, which it does not cover"
    )
    return (
        "replace-one adjacency, sensitivity 2C (C = clip_norm, L2 norm for gaussian, L1 for "
        "laplace): covers the released activations of every training record given the head, "
        "for the whole run; each record's clipped cut-layer activation was noised and sent to "
        f"the first trainer exactly once, before training, and reused every epoch{inference}. "
        "The head's own privacy cost is the head source's, reported separately (privacy.head)"
    )
