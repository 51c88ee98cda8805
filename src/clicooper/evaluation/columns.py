"""The evaluation's runs: the data each column trains on, each column's config (as
``clicooper run`` would make it) and its training, with a timed stage per step."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

from clicooper.config import ONCE_MODEL, RunConfig, default_lr, default_release
from clicooper.data import Dataset, default_dataset, load_dataset
from clicooper.evaluation.settings import COLUMNS, EvalSettings
from clicooper.evaluation.views import (
    AuxData,
    assert_disjoint,
    make_aux,
)
from clicooper.runtime.session import Session, run, warm_epochs

Say = Callable[[str], None]


TrainProgress = Callable[[int, str], AbstractContextManager[Any]]


@contextmanager
def stage(say: Say, timing: dict[str, float], name: str) -> Iterator[None]:
    say(f"{name} ...")
    start = time.perf_counter()
    yield
    timing[name] = round(time.perf_counter() - start, 2)
    say(f"{name} done in {timing[name]:.1f} s")


def prepare_data(cfg: RunConfig, s: EvalSettings) -> tuple[Dataset, AuxData, Any]:
    """(owner's dataset without the auxiliary split, attackers' AuxData, the aux split)."""
    name = default_dataset() if cfg.dataset == "auto" else cfg.dataset
    data = load_dataset(name, seed=s.seed).limit(s.train_subset, s.test_subset, s.seed)
    owner_data, aux_split = data.split_auxiliary(s.aux_fraction, s.seed)
    assert_disjoint(aux_split.x, owner_data.train.x)
    return owner_data, make_aux(aux_split, data.num_classes), aux_split


def mode_config(
    cfg: RunConfig, s: EvalSettings, mode: str, head: dict[str, Any] | None = None, **privacy: Any
) -> RunConfig:
    """The shared config of every run, in ``mode`` (subsets already applied to the data);
    ``head`` and ``privacy`` override those sections. A config at its release mode's default
    lr takes the column's release mode's (:data:`clicooper.config.DEFAULT_LR`)."""
    raw = cfg.model_dump()
    raw.update(
        mode=mode,
        seed=s.seed,
        epochs=s.epochs,
        batch_size=s.batch_size,
        record=s.record,
        train_subset=None,
        test_subset=None,
    )
    if raw["lr"] == default_lr(cfg.privacy.release):  # the mode's default: the column's own
        del raw["lr"]
    raw["privacy"].update(privacy)
    raw["head"].update(head or {})
    return RunConfig.model_validate(raw)


def column_config(cfg: RunConfig, s: EvalSettings, column: str, **privacy: Any) -> RunConfig:
    """The config of one column: ``vanilla``, ``clicooper`` (released every epoch) or
    ``once`` (a frozen head from ``s.once_head_source``, or the config's, and one release
    per record with the noise for ``s.once_target_epsilon``); ``privacy`` overrides."""
    if column == "vanilla":
        return mode_config(cfg, s, "vanilla", **privacy)
    if column == "clicooper":
        return mode_config(cfg, s, "clicooper", **{"release": "every-epoch", **privacy})
    if column != "once":
        raise ValueError(f"unknown column {column!r}: use {', '.join(COLUMNS)}")
    once = {"release": "once", "target_epsilon": s.once_target_epsilon, **privacy}
    head = {"source": s.once_head_source} if s.once_head_source else None
    if s.once_model is not None:
        cfg = cfg.model_copy(update={"model": s.once_model})
    return mode_config(cfg, s, "clicooper", head, **once)


def default_column(n_train: int) -> str:
    """The column ``clicooper run`` makes with no mode or release flag on ``n_train``
    training records (:func:`clicooper.config.default_release`)."""
    return "once" if default_release(n_train) == "once" else "clicooper"


def with_run_defaults(cfg: RunConfig, s: EvalSettings, n_train: int) -> EvalSettings:
    """``s`` with the once column's preset resolved as ``clicooper run`` resolves it on
    ``n_train`` training records: where release once is run's default and no model was
    chosen for the column (``s.once_model`` None), the owner-light counterpart of the
    config's model (:data:`clicooper.config.ONCE_MODEL`); else the config's model."""
    if s.once_model is not None or default_column(n_train) != "once":
        return s
    return replace(s, once_model=ONCE_MODEL.get(cfg.model, cfg.model))


def releases_once(cfg: RunConfig) -> bool:
    """A CliCooper run with ``privacy.release = "once"``."""
    return cfg.mode == "clicooper" and cfg.privacy.release == "once"


def head_known(cfg: RunConfig) -> bool:
    """Whether the trainers hold a release-once run's frozen head exactly.

    They pretrained a public head themselves (``head.pretrain_by = "trainers"``, the
    default), can rebuild a seeded random head (the seed is shared) and know the fixed
    scattering transform; a DP-SGD head, or a public head the owner pretrained, they
    know by architecture only.
    """
    h = cfg.head
    return h.source in ("random", "scattering") or (
        h.source == "public" and h.pretrain_by == "trainers"
    )


def train(cfg: RunConfig, data: Dataset, out: Path, progress: TrainProgress | None) -> Session:
    """One run of the session in ``out`` with optional progress bars."""
    ctx = progress(cfg.epochs + warm_epochs(cfg), cfg.mode) if progress else nullcontext(None)
    with ctx as bar:
        return run(cfg, out, data=data, progress=bar, overwrite=True)


def run_summary(session: Session) -> dict[str, Any]:
    r = session.results
    keep = ("accuracy", "history", "timing", "privacy", "labels", "model", "config", "compute")
    summary = {k: r[k] for k in keep if k in r}
    wm = r.get("watermark") or {}
    summary["watermark"] = {k: wm.get(k) for k in ("enabled", "verified", "stages")}
    return summary
