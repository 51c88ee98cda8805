"""What each attacking party holds: its received records, its own segment, auxiliary data.

An attack in the evaluation may use only a :class:`PartyView` (the tensors the
party's recorder captured from the messages it received, the gradients it
computed at its input, and a copy of its own segment) and an :class:`AuxData`
(unlabelled images disjoint from the owner's training data, plus a few labelled
ones for the adaptive attacker). Nothing here holds the owner, its head, its
secrets or the test set; those enter only through :mod:`.truth`, for scoring.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clicooper.common.messages import Kind, Message
from clicooper.data.base import Split
from clicooper.parties.releases import RELEASES_DIR, ReleaseCache

RECEIVED_KEYS = ("activation", "gradient", "pseudo_labels", "epoch", "step", "micro")


@dataclass(frozen=True)
class PartyView:
    """A trainer's own knowledge: records of what it received/computed and its segment.

    ``records`` maps ``activation`` (its input, as delivered), ``gradient`` (dL/d input
    it computed), ``pseudo_labels`` (last trainer only) and ``epoch``/``step``/``micro``
    (row bookkeeping it sees in message metadata) to tensors with one row per sample.
    """

    name: str
    index: int
    is_last: bool
    records: dict[str, torch.Tensor]
    segment: nn.Module

    def rows(self, key: str, epoch: int | None = None) -> torch.Tensor:
        """Recorded ``key`` rows, optionally of one epoch only."""
        if key not in self.records:
            raise KeyError(f"{self.name} recorded no {key!r}; it has {sorted(self.records)}")
        values = self.records[key]
        return values if epoch is None else values[self.records["epoch"] == epoch]

    @property
    def epochs(self) -> list[int]:
        """Epochs present in the record, ascending."""
        return sorted(int(e) for e in torch.unique(self.records["epoch"]))


def view_of(trainer: Any, first_epoch: int = 1) -> PartyView:
    """Snapshot of a finished trainer: its recorder's tensors from ``first_epoch`` on and a
    deep copy of its segment. Release once with a warm start: its first epochs carry the
    public split, which the attacks on the owner's records leave out."""
    records = trainer.recorder.tensors()
    if first_epoch > 1 and "epoch" in records:
        keep = records["epoch"] >= first_epoch
        records = {k: v[keep] for k, v in records.items()}
    if "activation" not in records:
        raise ValueError(f"{trainer.name} recorded nothing: run with record > 0")
    unexpected = set(records) - set(RECEIVED_KEYS)
    if unexpected:
        raise ValueError(f"{trainer.name} recorded unexpected fields {sorted(unexpected)}")
    return PartyView(
        trainer.name,
        trainer.index,
        trainer.is_last,
        {k: v.detach().clone() for k, v in records.items()},
        copy.deepcopy(trainer.segment).eval(),
    )


@dataclass(frozen=True)
class CachedReleases:
    """What a release-once t1 holds of the owner's data: one noisy release per record.

    ``ids`` are the record ids t1 was sent (it sees them in every training step), ``x`` the
    releases, one row per id, read back from t1's cache files (``parties/t1/releases``).
    """

    ids: torch.Tensor
    x: torch.Tensor

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The releases of record ``ids``; ValueError for a record t1 does not hold."""
        where = torch.full((int(self.ids.max()) + 1,), -1, dtype=torch.long)
        where[self.ids] = torch.arange(len(self.ids))
        if int(ids.max()) >= len(where) or bool((where[ids] < 0).any()):
            raise ValueError("t1 holds no release of some of these records")
        return self.x[where[ids]]


def cached_releases(run_dir: Path) -> CachedReleases:
    """t1's release cache of a finished release-once run, read from its files on disk.

    Read with t1's own loader (:class:`~clicooper.parties.releases.ReleaseCache`), which
    checks every chunk; ValueError when the run left no releases there.
    """
    cache = ReleaseCache(Path(run_dir) / "parties" / "t1" / RELEASES_DIR)
    if not cache.load() or cache.x is None or cache.held is None:
        raise ValueError(f"{run_dir} holds no t1 release cache: was it a release-once run?")
    ids = torch.nonzero(cache.held).flatten()
    return CachedReleases(ids, cache.x[ids].clone())


def release_targets(cache: CachedReleases, n: int, seed: int) -> torch.Tensor:
    """``n`` record ids t1 holds, a seeded draw: the releases the inversions attack."""
    if len(cache.ids) < n:
        raise ValueError(f"t1 holds {len(cache.ids)} releases; lower n_invert to at most that")
    order = torch.randperm(len(cache.ids), generator=torch.Generator().manual_seed(seed))
    return cache.ids[order[:n]].sort().values


@dataclass(frozen=True)
class AuxData:
    """The attackers' auxiliary data: unlabelled images and m labelled ones per class.

    ``images`` are unlabelled. ``labelled(m)`` gives the first m examples of each class
    from a separate labelled pool (the adaptive attacker only). Both are drawn from
    the held-out auxiliary split, disjoint from the owner's training data.
    """

    images: torch.Tensor
    pool_images: torch.Tensor
    pool_labels: np.ndarray
    n_classes: int

    def labelled(self, m: int) -> tuple[torch.Tensor, np.ndarray]:
        """m labelled examples per class (fewer if the pool runs out)."""
        idx = np.concatenate(
            [np.flatnonzero(self.pool_labels == c)[:m] for c in range(self.n_classes)]
        )
        return self.pool_images[idx], self.pool_labels[idx]

    def max_m(self) -> int:
        """Largest m for which every class has m labelled examples."""
        return int(np.bincount(self.pool_labels, minlength=self.n_classes).min())


def make_aux(aux: Split, n_classes: int, labelled_fraction: float = 0.5) -> AuxData:
    """Split the auxiliary split into unlabelled images and a labelled pool (seeded order)."""
    n_pool = int(round(len(aux) * labelled_fraction))
    return AuxData(aux.x[n_pool:], aux.x[:n_pool], aux.y[:n_pool].numpy(), n_classes)


def assert_disjoint(aux_images: torch.Tensor, owner_images: torch.Tensor) -> None:
    """Raise if any auxiliary image equals one of the owner's training images byte for byte."""
    seen = {row.tobytes() for row in owner_images.flatten(1).numpy()}
    shared = sum(row.tobytes() in seen for row in aux_images.flatten(1).numpy())
    if shared:
        raise ValueError(f"{shared} auxiliary images are owner training images; resplit the data")


@contextmanager
def observe_inference(trainer: Any) -> Iterator[list[torch.Tensor]]:
    """Collect the activations ``trainer`` receives in INFER messages while the block runs.

    Wraps the trainer instance's ``handle`` (the party still handles every message);
    this is exactly what a querying attacker colluding with T1 sees.
    """
    seen: list[torch.Tensor] = []
    original: Callable[[Message], None] = trainer.handle

    def handle(msg: Message) -> None:
        if msg.kind == Kind.INFER:
            seen.append(msg.tensor("x").detach().clone())
        original(msg)

    trainer.handle = handle
    try:
        yield seen
    finally:
        del trainer.handle  # back to the class method


def query_activations(owner: Any, first: Any, images: torch.Tensor, noisy: bool) -> torch.Tensor:
    """What T1 receives when the owner serves inference on ``images`` (noise on or off).

    The owner's real inference path (head, optional noise, the chain); the images are
    the querying attacker's chosen ones. Restores the owner's inference setting.
    """
    before = owner.noise_at_inference
    owner.noise_at_inference = noisy and owner.noise is not None
    try:
        with observe_inference(first) as seen:
            owner.predict(images)
    finally:
        owner.noise_at_inference = before
    return torch.cat(seen)
