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

The hook is :func:`frozen_head`: the configured ``[head] source`` is built by its
:data:`clicooper.heads.HEAD_SOURCES` entry (the one registry, whose
:func:`~clicooper.heads.build_head` also checks any public data the head was fitted on
disjoint from the training set), and frozen. Each source states what it cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from clicooper.config import RunConfig
from clicooper.data import Dataset, Split
from clicooper.heads import build_head
from clicooper.heads.base import freeze
from clicooper.models import SplitModel


@dataclass
class FrozenHead:
    """A head for release-once, with what obtaining it cost in privacy.

    ``privacy`` is reported as results.json ``privacy.head``: the source's
    :meth:`clicooper.heads.FrozenHead.results` (its privacy cost and pretraining FLOPs).
    """

    module: nn.Module
    privacy: dict[str, Any]
    data: Dataset | None = field(default=None, repr=False)  # the private data, when it shrank
    #: the public data the head was pretrained on (the chain's warm start), when there is one
    public: Split | None = field(default=None, repr=False)


def frozen_head(cfg: RunConfig, data: Dataset, split: SplitModel) -> FrozenHead:
    """The frozen head of a release-once run: built by its source, checked, frozen.

    :class:`~clicooper.heads.HeadSourceError` (an unknown source) or DataError (the source
    cannot be had, or was fitted on images of the training set), one line each.
    """
    built = build_head(cfg, data, split.head)
    freeze(built.module)
    return FrozenHead(built.module, built.results(), data=built.data, public=built.public_split)


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
