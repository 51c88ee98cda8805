"""The attack suite on one run: every attack of DESIGN §7 on what each party received,
scored against the truth, and the removal attacks on its watermark."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clicooper.attacks.metrics import mean_image_baselines, reconstruction_scores
from clicooper.attacks.watermark_removal import Lab, robustness
from clicooper.config import RunConfig
from clicooper.data import Split
from clicooper.evaluation import adapters
from clicooper.evaluation.columns import (
    Say,
    head_known,
    releases_once,
    stage,
)
from clicooper.evaluation.settings import EvalSettings
from clicooper.evaluation.truth import row_labels, row_sample_ids
from clicooper.evaluation.views import (
    AuxData,
    CachedReleases,
    PartyView,
    cached_releases,
    query_activations,
    release_targets,
    view_of,
)
from clicooper.heads.base import UnitNorm
from clicooper.models.assembly import preset_factory
from clicooper.runtime.session import Session, warm_epochs

FIGURE_SAMPLES = 8


def labels_of(session: Session, views: list[PartyView], cfg: RunConfig) -> list[np.ndarray]:
    return [row_labels(sample_ids(session, v, cfg), session.dataset.train.y) for v in views]


def attack_run(
    session: Session,
    cfg: RunConfig,
    aux: AuxData,
    aux_split: Any,
    s: EvalSettings,
    say: Say,
    timing: dict[str, float],
    label: str | None = None,
    full: bool = True,
    run_dir: Path | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every attack on one finished run (its directory ``run_dir``); (results, figure material).

    ``full`` runs clustering at every trainer and the adaptive extraction; otherwise
    (privacy-utility points) clustering at T1 only and non-adaptive extraction. A
    release-once run is attacked through :func:`t1_holdings`.
    """
    data, mode = session.dataset, cfg.mode
    label = label or mode
    clear = mode == "vanilla"
    n_classes = data.num_classes
    views = [view_of(t, warm_epochs(cfg) + 1) for t in session.trainers]
    labels = labels_of(session, views, cfg)
    head_factory, model_factory = architecture(session, cfg)
    exact = releases_once(cfg) and head_known(cfg)
    first = views[0]
    out: dict[str, Any] = {}

    with stage(say, timing, f"{label}: clustering"):
        attacked = views if full else views[:1]
        out["clustering"] = {
            v.name.upper(): adapters.clustering(v, y, n_classes, clear, s)
            for v, y in zip(attacked, labels, strict=False)
        }

    held = t1_holdings(session, cfg, first, aux, s, run_dir)
    with stage(say, timing, f"{label}: auxiliary-data alignment"):
        aligned = adapters.align(held["seen"], aux, head_factory, s)

    with stage(say, timing, f"{label}: inversion"):
        ids = held["target_ids"]
        originals = data.train.x[ids]
        recon = adapters.inversion(
            held["targets"],
            aux,
            head_factory,
            data.image_shape,
            held["noisy"],
            held["clean"],
            aligned,
            s,
            exact_head=exact,
        )
        inv: dict[str, Any] = {k: reconstruction_scores(r, originals) for k, r in recon.items()}
        inv["ssim"] = max(inv["data_free"]["ssim"], inv["aux_no_query"]["ssim"])
        inv["baselines"] = target_baselines(aux_split, data.train, ids, s)
        inv["targets"] = {"images": len(ids), "source": held["source"]}
        inv["attacker_head"] = "exact" if exact else "architecture"
        out["inversion"] = inv

    with stage(say, timing, f"{label}: extraction"):
        out["extraction"] = adapters.extraction(
            views,
            aux,
            aligned[0],
            head_factory,
            held["extraction_pairs"],
            model_factory if full else None,
            n_classes,
            clear,
            data.test.x,
            data.test.y.numpy(),
            s,
            exact_head=exact,
        )
    last = first.records["epoch"] == first.epochs[-1]
    figure = {
        "originals": originals[:FIGURE_SAMPLES],
        "recon": {k: r[:FIGURE_SAMPLES] for k, r in recon.items()},
        "t1_activations": first.records["activation"][last],
        "t1_labels": labels[0][last.numpy()],
    }
    return out, figure


def t1_holdings(
    session: Session,
    cfg: RunConfig,
    first: PartyView,
    aux: AuxData,
    s: EvalSettings,
    run_dir: Path | None,
) -> dict[str, Any]:
    """What T1's attacks work on: the activations it aligns to (``seen``), the inversion
    targets (``target_ids``: record ids, evaluator-joined; ``targets``: their activations),
    the query pairs for the adaptive (``noisy``) and non-adaptive (``clean``) decoders and
    the pairs of the query-access extraction.

    Every epoch: T1's last-epoch inputs, with query pairs from the owner's inference path
    with its noise on and off. Release once: T1's release cache read back from its files
    (checked equal to what it recorded), a seeded draw of its record ids as targets, the
    clean inference path it is really served, and noisy pairs it draws itself
    (:func:`~clicooper.evaluation.adapters.simulated_noise`).
    """
    owner, t1 = session.owner, session.trainers[0]
    clean = query_activations(owner, t1, aux.images, noisy=False)
    if not releases_once(cfg):
        rows = adapters.inversion_targets(first, s.n_invert)
        noisy = query_activations(owner, t1, aux.images, noisy=True)
        return {
            "seen": adapters.observed(first),
            "target_ids": sample_ids(session, first, cfg)[rows],
            "targets": first.records["activation"][rows],
            "noisy": noisy,
            "clean": clean,
            "extraction_pairs": noisy,
            "source": "t1 last-epoch training record",
        }
    if run_dir is None:
        raise ValueError("a release-once run is attacked from its directory: pass run_dir")
    cache = cached_releases(run_dir)
    check_recorded_releases(session, first, cache, cfg)
    ids = release_targets(cache, s.n_invert, s.seed)
    return {
        "seen": cache.x,
        "target_ids": ids,
        "targets": cache.rows(ids),
        "noisy": adapters.simulated_noise(clean, session.results["privacy"], s.seed),
        "clean": clean,
        "extraction_pairs": clean,
        "source": "t1 release cache (parties/t1/releases), a seeded draw of its record ids",
    }


def target_baselines(aux_split: Split, train: Split, ids: Any, s: EvalSettings) -> dict[str, float]:
    """SSIM of the blind reconstructions of the target records ``ids`` of ``train`` (the
    owner's training split, evaluator-only): their dataset and class means, taken on the
    attackers' ``aux_split`` (:func:`~clicooper.attacks.metrics.mean_image_baselines`)."""
    return mean_image_baselines(
        aux_split.x, aux_split.y, train.x[ids], train.y[ids].numpy(), seed=s.seed
    )


def release_data_free(
    head_factory: Callable[[], nn.Module],
    exact: bool,
    cache: CachedReleases,
    train: Split,
    image_shape: tuple[int, ...],
    aux_split: Split,
    s: EvalSettings,
) -> dict[str, Any]:
    """The once column's data-free inversion of a release-once T1's cache, alone.

    The same targets as :func:`t1_holdings` (a seeded draw of ``s.n_invert`` record ids,
    :func:`~clicooper.evaluation.views.release_targets`) and the same attack
    (:func:`~clicooper.evaluation.adapters.data_free`: white-box through the frozen head
    when the trainers hold it, ``exact`` (:func:`head_known`), else UnSplit), scored
    against the records' images in ``train`` beside their :func:`target_baselines`.
    ``unpaired_ssim``: the same reconstructions scored against another target's image (the
    next in the draw), the SSIM the attack gets knowing nothing of the record it inverts.
    Cheap (no alignment, no decoders): what a frontier point of release once reports.
    """
    ids = release_targets(cache, s.n_invert, s.seed)
    recon = adapters.data_free(head_factory, cache.rows(ids), image_shape, s, exact)
    originals = train.x[ids]
    return {
        **reconstruction_scores(recon, originals),
        "unpaired_ssim": reconstruction_scores(recon, originals.roll(1, 0))["ssim"],
        "baselines": target_baselines(aux_split, train, ids, s),
        "images": len(ids),
        "attacker_head": "exact" if exact else "architecture",
    }


def check_recorded_releases(
    session: Session, first: PartyView, cache: CachedReleases, cfg: RunConfig
) -> None:
    """Every input T1 recorded in training is the cached release of its record, byte for
    byte: a release-once T1 sees nothing of the owner's data but its cache."""
    ids = torch.as_tensor(sample_ids(session, first, cfg))
    if not torch.equal(first.records["activation"], cache.rows(ids)):
        raise RuntimeError("t1's recorded inputs differ from its cached releases")


def architecture(
    session: Session, cfg: RunConfig
) -> tuple[Callable[[], nn.Module], Callable[[], nn.Module]]:
    """Factories of the attackers' copies of the run's head and of its whole model.

    The attackers know the architecture, never the owner's trained weights: a fresh head.
    Release once: the exact frozen head when the trainers hold it (:func:`head_known`),
    else a fresh head of the preset's architecture ending in the unit norm every frozen
    head ends in. The whole model is always fresh (the from-scratch baseline).
    """
    factory = preset_factory(cfg, session.dataset)
    n_classes = session.dataset.num_classes
    n_out = session.owner.labels.pseudo_classes if session.owner.labels else n_classes
    model = lambda: factory(n_classes).full()  # noqa: E731
    if releases_once(cfg) and head_known(cfg):
        frozen = session.owner.head
        return (lambda: copy.deepcopy(frozen).eval()), model
    if releases_once(cfg):
        return (lambda: nn.Sequential(factory(n_out).head, UnitNorm())), model
    return (lambda: factory(n_out).head), model


def sample_ids(session: Session, view: PartyView, cfg: RunConfig) -> np.ndarray:
    log = session.owner.log
    return row_sample_ids(view, log.steps, log.sample_ids, cfg.micro_batches)


def watermark_removal(
    session: Session,
    cfg: RunConfig,
    run_dir: Path,
    aux: AuxData,
    s: EvalSettings,
    say: Say,
    timing: dict[str, float],
    label: str | None = None,
) -> dict[str, Any] | None:
    """Fine-tune, prune and overwrite the stolen chain; every trainer's claim after each.

    The thief's images are the attackers' unlabelled auxiliary images, so it fine-tunes on
    the stolen model's own pseudo-class predictions. None when the run has no watermark.
    """
    if not cfg.watermark.enabled or cfg.mode != "clicooper":
        return None
    with stage(say, timing, f"{label or cfg.mode}: watermark removal"):
        rows = removal_grid(Lab(session, run_dir, cfg, s.seed, thief=aux.images), s)
    return {"thief_images": len(aux.images), "rows": rows}


def removal_grid(lab: Lab, s: EvalSettings) -> list[dict[str, Any]]:
    """The evaluation's removal attacks on ``lab``'s stolen chain (fine-tuning on its own
    pseudo-class predictions, pruning, overwriting at ``s``' fractions), one row each."""
    return robustness(
        lab,
        fine_tune_fractions=s.removal_fine_tune,
        prune_fractions=s.removal_prune,
        overwrite_factors=s.removal_overwrite,
        losses=("pseudo",),
    )
