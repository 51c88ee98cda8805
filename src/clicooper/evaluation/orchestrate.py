"""``clicooper evaluate``: vanilla and CliCooper runs, every attack on each, one results dict.

The columns (:data:`~clicooper.evaluation.settings.COLUMNS`) are vanilla split learning,
CliCooper releasing every epoch and CliCooper releasing once; each is the run ``clicooper
run`` makes with that mode and release, and the one it makes with neither flag is the
evaluation's ``default_column`` (``once`` on a training set of at least
:data:`clicooper.config.RELEASE_BY_SIZE` records, else ``clicooper``). Every run uses the
same seed, data and batch order, and the same architecture, except that where ``run``
defaults to release once and no model was chosen the once column takes the owner-light
preset ``run`` gives it (:func:`with_run_defaults`); the owner's training data excludes the
auxiliary split handed to the attackers. Each attack sees only what its party received
(:mod:`.views`): a release-once T1 holds its cache of the owner's single release per
record (read back from ``parties/t1/releases``) and the clean inference path. Scoring
joins records to the truth (:mod:`.truth`).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clicooper.attacks.metrics import mean_image_baselines, reconstruction_scores
from clicooper.attacks.watermark_removal import Lab, robustness
from clicooper.config import ONCE_MODEL, RunConfig, default_lr, default_release
from clicooper.data import Dataset, Split, default_dataset, load_dataset
from clicooper.evaluation import adapters
from clicooper.evaluation.settings import COLUMNS, EvalSettings
from clicooper.evaluation.targets import targets
from clicooper.evaluation.truth import row_labels, row_sample_ids
from clicooper.evaluation.views import (
    AuxData,
    CachedReleases,
    PartyView,
    assert_disjoint,
    cached_releases,
    make_aux,
    query_activations,
    release_targets,
    view_of,
)
from clicooper.heads.base import UnitNorm
from clicooper.models.assembly import preset_factory
from clicooper.models.presets import build_preset
from clicooper.runtime.session import Session, run, warm_epochs

Say = Callable[[str], None]
TrainProgress = Callable[[int, str], AbstractContextManager[Any]]
MODES = ("vanilla", "clicooper")  # the columns with a trained head (shallow cut, sweep)
FIGURE_SAMPLES = 8


@contextmanager
def _stage(say: Say, timing: dict[str, float], name: str) -> Iterator[None]:
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


def _labels_of(session: Session, views: list[PartyView], cfg: RunConfig) -> list[np.ndarray]:
    return [row_labels(_sample_ids(session, v, cfg), session.dataset.train.y) for v in views]


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
    labels = _labels_of(session, views, cfg)
    head_factory, model_factory = architecture(session, cfg)
    exact = releases_once(cfg) and head_known(cfg)
    first = views[0]
    out: dict[str, Any] = {}

    with _stage(say, timing, f"{label}: clustering"):
        attacked = views if full else views[:1]
        out["clustering"] = {
            v.name.upper(): adapters.clustering(v, y, n_classes, clear, s)
            for v, y in zip(attacked, labels, strict=False)
        }

    held = t1_holdings(session, cfg, first, aux, s, run_dir)
    with _stage(say, timing, f"{label}: auxiliary-data alignment"):
        aligned = adapters.align(held["seen"], aux, head_factory, s)

    with _stage(say, timing, f"{label}: inversion"):
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

    with _stage(say, timing, f"{label}: extraction"):
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
            "target_ids": _sample_ids(session, first, cfg)[rows],
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
    ids = torch.as_tensor(_sample_ids(session, first, cfg))
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


def _sample_ids(session: Session, view: PartyView, cfg: RunConfig) -> np.ndarray:
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
    with _stage(say, timing, f"{label or cfg.mode}: watermark removal"):
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


def shallow_cut(
    cfg: RunConfig,
    data: Dataset,
    s: EvalSettings,
    out: Path,
    say: Say,
    progress: TrainProgress | None,
    timing: dict[str, float],
) -> dict[str, dict[str, Any]]:
    """Data-free inversion (UnSplit) at the preset's shallowest cut, vanilla and every-epoch
    CliCooper (the columns of ``s.columns`` among them; release once is left out: its head
    source would need pretraining at that cut too).

    The default cut ends in a low-dimensional bottleneck, which no data-free attack we
    tried inverts; the shallowest cut shows the attack working where the literature
    reports it, and what the noise does there. Short runs (``s.shallow_epochs``).
    """
    cut = build_preset(cfg.model, data.image_shape, data.num_classes, cfg.trainers)[0][0]
    short = replace(s, epochs=s.shallow_epochs)
    results = {}
    for mode in (m for m in MODES if m in s.columns):
        run_cfg = column_config(cfg, short, mode).model_copy(update={"cut": cut})
        with _stage(say, timing, f"{mode}: shallow cut {cut}"):
            session = train(run_cfg, data, out / f"shallow-{mode}", progress)
            first = view_of(session.trainers[0])
            rows = adapters.inversion_targets(first, s.n_invert)
            originals = data.train.x[_sample_ids(session, first, run_cfg)[rows]]
            z = first.records["activation"][rows]
            head_factory, _ = architecture(session, run_cfg)
            recon = adapters.data_free(head_factory, z, data.image_shape, s)
        results[mode] = {
            "cut": cut,
            "dimension": int(np.prod(z.shape[1:])),
            "epochs": short.epochs,
            "accuracy": session.results["accuracy"]["test"],
            "data_free": reconstruction_scores(recon, originals),
            "reconstructions": recon[:FIGURE_SAMPLES],
            "originals": originals[:FIGURE_SAMPLES],
        }
    return results


def _run_summary(session: Session) -> dict[str, Any]:
    r = session.results
    keep = ("accuracy", "history", "timing", "privacy", "labels", "model", "config", "compute")
    summary = {k: r[k] for k in keep if k in r}
    wm = r.get("watermark") or {}
    summary["watermark"] = {k: wm.get(k) for k in ("enabled", "verified", "stages")}
    return summary


def privacy_utility(
    cfg: RunConfig,
    data: Dataset,
    aux: AuxData,
    aux_split: Any,
    s: EvalSettings,
    out: Path,
    say: Say,
    progress: TrainProgress | None,
    timing: dict[str, float],
) -> list[dict[str, Any]]:
    """Short CliCooper runs over noise_multiplier, then over the gradient noise at the
    default activation noise; each under the T1 attacks (no adaptive extraction)."""
    points = []
    sweep = s if s.sweep_epochs is None else replace(s, epochs=s.sweep_epochs)
    sweep_data = data.limit(s.sweep_train_subset, None, s.seed)
    grid = [
        ("activation", {"noise_multiplier": nm}, f"noise {nm:g}", f"nm-{nm:g}")
        for nm in s.sweep_noise
    ]
    grid += [
        ("gradient", {"gradient_noise_multiplier": gm}, f"gradient noise {gm:g}", f"gm-{gm:g}")
        for gm in s.sweep_gradient_noise
    ]
    for series, privacy, label, name in grid:
        run_cfg = column_config(cfg, sweep, "clicooper", **privacy)
        with _stage(say, timing, f"{label}: training"):
            session = train(run_cfg, sweep_data, out / name, progress)
        attacks, _ = attack_run(
            session, run_cfg, aux, aux_split, sweep, say, timing, label=label, full=False
        )
        points.append({"series": series, **trade_off_point(_run_summary(session), attacks)})
    return points


def trade_off_point(run_: dict[str, Any], attacks: dict[str, Any]) -> dict[str, Any]:
    """One privacy-utility point: accuracy, epsilon and every T1 attack's headline."""
    t1, inv = attacks["clustering"]["T1"], attacks["inversion"]
    return {
        "noise_multiplier": run_["privacy"]["noise_multiplier"],
        "gradient_noise_multiplier": run_["privacy"]["gradient"]["noise_multiplier"],
        "accuracy": run_["accuracy"]["test"],
        "epsilon": run_["privacy"]["epsilon"],
        "owner_share": (run_.get("compute") or {}).get("owner_share"),
        "epochs": run_["config"]["epochs"],
        "clustering_t1_success_rate": t1["success_rate"],
        "clustering_t1_matched_accuracy": t1["matched_accuracy"],
        "clustering_t1_activations_success_rate": t1["activations"]["success_rate"],
        "clustering_t1_gradients_success_rate": t1["gradients"]["success_rate"],
        "clustering_t1_naming_accuracy": t1["naming_accuracy"],
        **{
            f"{k}_ssim": inv[k]["ssim"]
            for k in ("data_free", "aux_no_query", "query_decoder", "query_decoder_nonadaptive")
        },
        "dataset_mean_ssim": inv["baselines"]["dataset_mean"],
        "class_mean_ssim": inv["baselines"]["class_mean"],
        "extraction_accuracy": attacks["extraction"]["accuracy"],
        "extraction_query_accuracy": attacks["extraction"]["query_access"]["accuracy"],
        "extraction_chance": attacks["extraction"]["chance"],
    }


def once_sweep(
    cfg: RunConfig,
    data: Dataset,
    s: EvalSettings,
    out: Path,
    say: Say,
    progress: TrainProgress | None,
    timing: dict[str, float],
    aux_split: Split,
) -> list[dict[str, Any]]:
    """Release-once runs at ``s.once_sweep_epsilon`` (the main runs' epochs and data), for
    the frontier: trained and scored, and their release caches inverted data-free
    (:func:`release_data_free`, the once column's attack); no other attack, so they record
    nothing."""
    points = []
    for eps in s.once_sweep_epsilon:
        run_cfg = column_config(cfg, s, "once", target_epsilon=eps).model_copy(update={"record": 0})
        run_dir = out / f"once-eps-{eps:g}"
        with _stage(say, timing, f"once at epsilon {eps:g}: training"):
            session = train(run_cfg, data, run_dir, progress)
        with _stage(say, timing, f"once at epsilon {eps:g}: data-free inversion"):
            head_factory, _ = architecture(session, run_cfg)
            found = release_data_free(
                head_factory,
                head_known(run_cfg),
                cached_releases(run_dir),
                session.dataset.train,
                session.dataset.image_shape,
                aux_split,
                s,
            )
        label = f"once, epsilon {eps:g}"
        points.append(frontier_point("once", label, _run_summary(session), inversion=found))
    return points


def frontier_point(
    series: str,
    label: str,
    run_: dict[str, Any],
    main: bool = False,
    inversion: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One point of the frontier: a run's test accuracy, epsilon, owner share and epochs,
    and, where the run was inverted (``inversion``: its data-free scores ``ssim`` and the
    targets' ``baselines``), its data-free SSIM beside the dataset-mean baseline's."""
    inversion = inversion or {}
    return {
        "series": series,
        "label": label,
        "accuracy": run_["accuracy"]["test"],
        "epsilon": run_["privacy"]["epsilon"],
        "owner_share": (run_.get("compute") or {}).get("owner_share"),
        "epochs": run_["config"]["epochs"],
        "data_free_ssim": inversion.get("ssim"),
        "dataset_mean_ssim": (inversion.get("baselines") or {}).get("dataset_mean"),
        "main_run": main,
        "source": "evaluation",
    }


def frontier(
    results: dict[str, Any], once_points: list[dict[str, Any]], extra: list[dict[str, Any]]
) -> dict[str, Any]:
    """Test accuracy against epsilon (every-epoch and once) and owner share against accuracy.

    The points are the evaluation's own runs: the main run of each column, the noise
    sweep's activation points (every-epoch), the release-once runs of ``once_points``,
    then ``extra`` (given by the user, ``source`` "extra"). Vanilla has no epsilon.
    """
    series = {"vanilla": "vanilla", "clicooper": "every-epoch", "once": "once"}
    points = [
        frontier_point(
            series[c],
            f"{c} (main run)",
            results["runs"][c],
            main=True,
            inversion=_data_free_of(results["attacks"][c]["inversion"]),
        )
        for c in results["columns"]
    ]
    kept = ("accuracy", "epsilon", "owner_share", "epochs", "data_free_ssim", "dataset_mean_ssim")
    for p in (results.get("privacy_utility") or {}).get("points", []):
        if p["series"] == "activation" and not p.get("main_run"):
            point = {k: p.get(k) for k in kept}
            label = f"every-epoch, noise {p['noise_multiplier']:g}"
            points.append({"series": "every-epoch", "label": label, **point})
            points[-1].update(main_run=False, source="evaluation")
    points += once_points
    points += [{"main_run": False, "source": "extra", **p} for p in extra]
    return {"points": points}


def _data_free_of(inversion: dict[str, Any]) -> dict[str, Any]:
    """A column's data-free scores and target baselines (:func:`frontier_point`'s keys)."""
    return {**inversion["data_free"], "baselines": inversion["baselines"]}


def evaluate(
    cfg: RunConfig,
    out: Path,
    s: EvalSettings,
    say: Say = print,
    progress: TrainProgress | None = None,
    quick: bool = False,
    extra_points: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run the whole evaluation into ``out``: results.json, report.md, figures/*.png.

    ``s.columns`` names the runs (:data:`~clicooper.evaluation.settings.COLUMNS`);
    ``extra_points`` are added to the frontier figure (keys as :func:`frontier_point`'s).
    """
    from clicooper.evaluation.figures import write_figures
    from clicooper.evaluation.report import write_report

    columns = [c for c in COLUMNS if c in s.columns]
    if not columns or len(columns) != len(s.columns):
        raise ValueError(f"columns must be distinct names among {', '.join(COLUMNS)}")
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    timing: dict[str, float] = {}
    out.mkdir(parents=True, exist_ok=True)
    data, aux, aux_split = prepare_data(cfg, s)
    s = with_run_defaults(cfg, s, len(data.train))
    say(
        f"data: {data.name}, owner train {len(data.train)}, test {len(data.test)}, "
        f"attacker auxiliary {len(aux_split)} (disjoint from the owner's training data); "
        f"`clicooper run`'s default there: the {default_column(len(data.train))} column"
    )
    results: dict[str, Any] = {
        "dataset": data.name,
        "quick": quick,
        "seed": s.seed,
        "columns": columns,
        "default_column": default_column(len(data.train)),
        "settings": _settings_dict(s),
        "data": {
            "train": len(data.train),
            "test": len(data.test),
            "auxiliary": len(aux_split),
            "aux_unlabelled": len(aux.images),
            "aux_labelled_pool": len(aux.pool_labels),
            "classes": data.num_classes,
        },
        "runs": {},
        "attacks": {},
        "timing": timing,
    }
    figures: dict[str, Any] = {}
    for column in columns:
        run_cfg, run_dir = column_config(cfg, s, column), out / "runs" / column
        with _stage(say, timing, f"{column}: training"):
            session = train(run_cfg, data, run_dir, progress)
        results["runs"][column] = _run_summary(session)
        results["attacks"][column], figures[column] = attack_run(
            session, run_cfg, aux, aux_split, s, say, timing, label=column, run_dir=run_dir
        )
        results["attacks"][column]["privacy"] = {"epsilon": session.results["privacy"]["epsilon"]}
        results["attacks"][column]["watermark_removal"] = watermark_removal(
            session, run_cfg, run_dir, aux, s, say, timing, label=column
        )
        del session
    results["epsilon"] = {m: results["runs"][m]["privacy"]["epsilon"] for m in columns}
    shallow = shallow_cut(cfg, data, s, out / "runs", say, progress, timing)
    for mode, found in shallow.items():
        figures[mode]["shallow"] = found
        results["attacks"][mode]["inversion"]["shallow_cut"] = {
            k: v for k, v in found.items() if k not in ("reconstructions", "originals")
        }
    if "clicooper" in columns:  # the noise sweep varies the every-epoch release
        sweep = privacy_utility(
            cfg, data, aux, aux_split, s, out / "runs" / "sweep", say, progress, timing
        )
        main = trade_off_point(results["runs"]["clicooper"], results["attacks"]["clicooper"])
        vanilla = results["runs"].get("vanilla")
        results["privacy_utility"] = {
            "points": sorted(
                [*sweep, {"series": "activation", **main, "main_run": True}],
                key=lambda p: (p["series"], p["gradient_noise_multiplier"], p["noise_multiplier"]),
            ),
            "vanilla_accuracy": vanilla["accuracy"]["test"] if vanilla else None,
        }
    once_points = (
        once_sweep(cfg, data, s, out / "runs" / "sweep", say, progress, timing, aux_split)
        if "once" in columns
        else []
    )
    results["frontier"] = frontier(results, once_points, extra_points or [])
    results["targets"] = targets(results)
    timing["total"] = round(time.perf_counter() - start, 2)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
    write_figures(results, figures, out / "figures", data.image_shape)
    write_report(results, out / "report.md")
    timing["total_with_outputs"] = round(time.perf_counter() - start, 2)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
    return results


def _settings_dict(s: EvalSettings) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in s.__dict__.items()}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__}")
