"""``clicooper evaluate``: vanilla and CliCooper runs, every attack on both, one results dict.

Both runs use the same seed, architecture, data and batch order; the owner's
training data excludes the auxiliary split handed to the attackers. Each attack
sees only what its party received (:mod:`.views`); scoring joins records to the
truth (:mod:`.truth`).
"""

from __future__ import annotations

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
from clicooper.config import RunConfig
from clicooper.data import Dataset, default_dataset, load_dataset
from clicooper.evaluation import adapters
from clicooper.evaluation.settings import EvalSettings
from clicooper.evaluation.truth import row_labels, row_sample_ids
from clicooper.evaluation.views import (
    AuxData,
    PartyView,
    assert_disjoint,
    make_aux,
    query_activations,
    view_of,
)
from clicooper.models.assembly import preset_factory
from clicooper.models.presets import build_preset
from clicooper.runtime.session import Session, run

Say = Callable[[str], None]
TrainProgress = Callable[[int, str], AbstractContextManager[Any]]
MODES = ("vanilla", "clicooper")
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


def mode_config(cfg: RunConfig, s: EvalSettings, mode: str, **privacy: float) -> RunConfig:
    """The shared config of both runs, in ``mode`` (subsets already applied to the data)."""
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
    raw["privacy"].update(privacy)
    return RunConfig.model_validate(raw)


def train(cfg: RunConfig, data: Dataset, out: Path, progress: TrainProgress | None) -> Session:
    """One run of the session in ``out`` with optional progress bars."""
    ctx = progress(cfg.epochs, cfg.mode) if progress else nullcontext(None)
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
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every attack on one finished run; (results, figure material).

    ``full`` runs clustering at every trainer and the adaptive extraction; otherwise
    (privacy-utility points) clustering at T1 only and non-adaptive extraction.
    """
    data, mode = session.dataset, cfg.mode
    label = label or mode
    clear = mode == "vanilla"
    n_classes = data.num_classes
    views = [view_of(t) for t in session.trainers]
    labels = _labels_of(session, views, cfg)
    head_factory, model_factory = architecture(session, cfg)
    first = views[0]
    out: dict[str, Any] = {}

    with _stage(say, timing, f"{label}: clustering"):
        attacked = views if full else views[:1]
        out["clustering"] = {
            v.name.upper(): adapters.clustering(v, y, n_classes, clear, s)
            for v, y in zip(attacked, labels, strict=False)
        }

    with _stage(say, timing, f"{label}: auxiliary-data alignment"):
        aligned = adapters.align(first, aux, head_factory, s)
    # The query attacker's pairs: what T1 receives when the owner serves its chosen images.
    noisy = query_activations(session.owner, session.trainers[0], aux.images, noisy=True)
    clean = query_activations(session.owner, session.trainers[0], aux.images, noisy=False)

    with _stage(say, timing, f"{label}: inversion"):
        rows = adapters.inversion_targets(first, s.n_invert)
        ids = _sample_ids(session, first, cfg)[rows]
        originals = data.train.x[ids]
        recon = adapters.inversion(
            first, rows, aux, head_factory, data.image_shape, noisy, clean, aligned, s
        )
        inv: dict[str, Any] = {k: reconstruction_scores(r, originals) for k, r in recon.items()}
        inv["ssim"] = max(inv["data_free"]["ssim"], inv["aux_no_query"]["ssim"])
        inv["baselines"] = mean_image_baselines(
            aux_split.x, aux_split.y, originals, data.train.y[ids].numpy(), seed=s.seed
        )
        inv["targets"] = {"images": len(ids), "source": "t1 last-epoch training record"}
        out["inversion"] = inv

    with _stage(say, timing, f"{label}: extraction"):
        out["extraction"] = adapters.extraction(
            views,
            aux,
            aligned[0],
            head_factory,
            noisy,
            model_factory if full else None,
            n_classes,
            clear,
            data.test.x,
            data.test.y.numpy(),
            s,
        )
    last = first.records["epoch"] == first.epochs[-1]
    figure = {
        "originals": originals[:FIGURE_SAMPLES],
        "recon": {k: r[:FIGURE_SAMPLES] for k, r in recon.items()},
        "t1_activations": first.records["activation"][last],
        "t1_labels": labels[0][last.numpy()],
    }
    return out, figure


def architecture(
    session: Session, cfg: RunConfig
) -> tuple[Callable[[], nn.Module], Callable[[], nn.Module]]:
    """Factories of fresh (untrained) copies of the run's head and of its whole model.

    The attackers know the architecture, never the owner's weights.
    """
    factory = preset_factory(cfg, session.dataset)
    n_classes = session.dataset.num_classes
    n_out = session.owner.labels.pseudo_classes if session.owner.labels else n_classes
    return (lambda: factory(n_out).head), (lambda: factory(n_classes).full())


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
) -> dict[str, Any] | None:
    """Fine-tune, prune and overwrite the stolen chain; every trainer's claim after each.

    The thief's images are the attackers' unlabelled auxiliary images, so it fine-tunes on
    the stolen model's own pseudo-class predictions. None when the run has no watermark.
    """
    if not cfg.watermark.enabled or cfg.mode != "clicooper":
        return None
    with _stage(say, timing, f"{cfg.mode}: watermark removal"):
        lab = Lab(session, run_dir, cfg, s.seed, thief=aux.images)
        rows = robustness(
            lab,
            fine_tune_fractions=s.removal_fine_tune,
            prune_fractions=s.removal_prune,
            overwrite_factors=s.removal_overwrite,
            losses=("pseudo",),
        )
    return {"thief_images": len(aux.images), "rows": rows}


def shallow_cut(
    cfg: RunConfig,
    data: Dataset,
    s: EvalSettings,
    out: Path,
    say: Say,
    progress: TrainProgress | None,
    timing: dict[str, float],
) -> dict[str, dict[str, Any]]:
    """Data-free inversion (UnSplit) at the preset's shallowest cut, in both modes.

    The default cut ends in a low-dimensional bottleneck, which no data-free attack we
    tried inverts; the shallowest cut shows the attack working where the literature
    reports it, and what the noise does there. Short runs (``s.shallow_epochs``).
    """
    cut = build_preset(cfg.model, data.image_shape, data.num_classes, cfg.trainers)[0][0]
    short = replace(s, epochs=s.shallow_epochs)
    results = {}
    for mode in MODES:
        run_cfg = mode_config(cfg, short, mode).model_copy(update={"cut": cut})
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
        run_cfg = mode_config(cfg, sweep, "clicooper", **privacy)
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


def evaluate(
    cfg: RunConfig,
    out: Path,
    s: EvalSettings,
    say: Say = print,
    progress: TrainProgress | None = None,
    quick: bool = False,
) -> dict[str, Any]:
    """Run the whole evaluation into ``out``: results.json, report.md, figures/*.png."""
    from clicooper.evaluation.figures import write_figures
    from clicooper.evaluation.report import write_report

    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    timing: dict[str, float] = {}
    out.mkdir(parents=True, exist_ok=True)
    data, aux, aux_split = prepare_data(cfg, s)
    say(
        f"data: {data.name}, owner train {len(data.train)}, test {len(data.test)}, "
        f"attacker auxiliary {len(aux_split)} (disjoint from the owner's training data)"
    )
    results: dict[str, Any] = {
        "dataset": data.name,
        "quick": quick,
        "seed": s.seed,
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
    for mode in MODES:
        run_cfg = mode_config(cfg, s, mode)
        with _stage(say, timing, f"{mode}: training"):
            session = train(run_cfg, data, out / "runs" / mode, progress)
        results["runs"][mode] = _run_summary(session)
        results["attacks"][mode], figures[mode] = attack_run(
            session, run_cfg, aux, aux_split, s, say, timing
        )
        results["attacks"][mode]["privacy"] = {"epsilon": session.results["privacy"]["epsilon"]}
        results["attacks"][mode]["watermark_removal"] = watermark_removal(
            session, run_cfg, out / "runs" / mode, aux, s, say, timing
        )
        del session
    results["epsilon"] = {m: results["runs"][m]["privacy"]["epsilon"] for m in MODES}
    shallow = shallow_cut(cfg, data, s, out / "runs", say, progress, timing)
    for mode in MODES:
        figures[mode]["shallow"] = shallow[mode]
        results["attacks"][mode]["inversion"]["shallow_cut"] = {
            k: v for k, v in shallow[mode].items() if k not in ("reconstructions", "originals")
        }
    sweep = privacy_utility(
        cfg, data, aux, aux_split, s, out / "runs" / "sweep", say, progress, timing
    )
    main = trade_off_point(results["runs"]["clicooper"], results["attacks"]["clicooper"])
    results["privacy_utility"] = {
        "points": sorted(
            [*sweep, {"series": "activation", **main, "main_run": True}],
            key=lambda p: (p["series"], p["gradient_noise_multiplier"], p["noise_multiplier"]),
        ),
        "vanilla_accuracy": results["runs"]["vanilla"]["accuracy"]["test"],
    }
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
