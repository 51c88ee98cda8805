"""Where the frozen owner head of release-once comes from: one source per module.

``HEAD_SOURCES`` maps a name to a :class:`~clicooper.heads.base.HeadSource`; the
``[head] source`` setting picks one, and :func:`build_head` is the one call a run makes:

- ``public`` (:mod:`~clicooper.heads.public`): pretrained on public data disjoint from the
  training set; no privacy cost;
- ``scattering`` (:mod:`~clicooper.heads.scattering`): a fixed wavelet scattering transform;
  no data, no privacy cost;
- ``dpsgd`` (:mod:`~clicooper.heads.dpsgd`): DP-SGD on the private data; its epsilon
  composes with the release's (:mod:`~clicooper.heads.compose`);
- ``random`` (:mod:`~clicooper.heads.random_head`): seeded random weights; no privacy cost.

Every head is frozen (eval mode, no grad) and ends in a unit norm, so each release uses
the whole clip budget.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from clicooper.heads.base import FrozenHead, HeadPrivacy, HeadSource, PretrainFlops
from clicooper.heads.compose import total_privacy
from clicooper.heads.dpsgd import DpSgdSource
from clicooper.heads.public import PublicSource, check_disjoint
from clicooper.heads.random_head import RandomSource
from clicooper.heads.scattering import ScatteringSource

if TYPE_CHECKING:
    from clicooper.config import RunConfig
    from clicooper.data import Dataset

HEAD_SOURCES: dict[str, HeadSource] = {
    s.name: s for s in (PublicSource(), ScatteringSource(), DpSgdSource(), RandomSource())
}


class HeadSourceError(ValueError):
    """An unknown head source name."""


def get_source(name: str) -> HeadSource:
    """The source called ``name``; a one-line error listing the names otherwise."""
    if name not in HEAD_SOURCES:
        raise HeadSourceError(f"unknown head source {name!r}: use one of {', '.join(HEAD_SOURCES)}")
    return HEAD_SOURCES[name]


def build_head(cfg: RunConfig, data: Dataset, split_head: nn.Module) -> FrozenHead:
    """The frozen head ``cfg.head.source`` gives for ``data`` (``split_head``: the preset's
    untrained head, trained in place by the sources that train). Raises HeadSourceError
    for an unknown source and DataError when the source cannot be had (no public data, a
    missing path) or its public data shares an image with the private training split:
    every source's public data is checked here, byte for byte, whoever registered it."""
    built = get_source(cfg.head.source).build(cfg, data, split_head)
    if built.public_split is not None:
        where = (built.public or {}).get("path") or (built.public or {}).get("indices", "")
        check_disjoint(
            built.public_split.x, built.data.train.x, f"of head source {built.source!r} {where}"
        )
    return built


__all__ = [
    "HEAD_SOURCES",
    "FrozenHead",
    "HeadPrivacy",
    "HeadSource",
    "HeadSourceError",
    "PretrainFlops",
    "build_head",
    "check_disjoint",
    "get_source",
    "total_privacy",
]
