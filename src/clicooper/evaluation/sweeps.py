"""The evaluation's extra runs: the shallowest cut, the every-epoch noise sweep, the
release-once epsilon sweep, and the frontier drawn from every run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from clicooper.attacks.metrics import reconstruction_scores
from clicooper.config import RunConfig
from clicooper.data import Dataset, Split
from clicooper.evaluation import adapters
from clicooper.evaluation.columns import (
    Say,
    TrainProgress,
    column_config,
    head_known,
    run_summary,
    stage,
    train,
)
from clicooper.evaluation.settings import EvalSettings
from clicooper.evaluation.suite import (
    FIGURE_SAMPLES,
    architecture,
    attack_run,
    release_data_free,
    sample_ids,
)
from clicooper.evaluation.views import (
    AuxData,
    cached_releases,
    view_of,
)
from clicooper.models.presets import build_preset

MODES = ("vanilla", "clicooper")  # the columns with a trained head (shallow cut, sweep)


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
        with stage(say, timing, f"{mode}: shallow cut {cut}"):
            session = train(run_cfg, data, out / f"shallow-{mode}", progress)
            first = view_of(session.trainers[0])
            rows = adapters.inversion_targets(first, s.n_invert)
            originals = data.train.x[sample_ids(session, first, run_cfg)[rows]]
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
        with stage(say, timing, f"{label}: training"):
            session = train(run_cfg, sweep_data, out / name, progress)
        attacks, _ = attack_run(
            session, run_cfg, aux, aux_split, sweep, say, timing, label=label, full=False
        )
        points.append({"series": series, **trade_off_point(run_summary(session), attacks)})
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
        with stage(say, timing, f"once at epsilon {eps:g}: training"):
            session = train(run_cfg, data, run_dir, progress)
        with stage(say, timing, f"once at epsilon {eps:g}: data-free inversion"):
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
        points.append(frontier_point("once", label, run_summary(session), inversion=found))
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
