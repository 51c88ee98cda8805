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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clicooper.attacks.metrics import mean_image_baselines, reconstruction_scores
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
from clicooper.runtime.session import Session, preset_factory, run

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
    log = session.owner.log
    return [
        row_labels(
            row_sample_ids(v, log.steps, log.sample_ids, cfg.micro_batches), session.dataset.train.y
        )
        for v in views
    ]


def attack_run(
    session: Session,
    cfg: RunConfig,
    aux: AuxData,
    aux_split: Any,
    s: EvalSettings,
    say: Say,
    timing: dict[str, float],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every attack on one finished run; (results, figure material)."""
    data, mode = session.dataset, cfg.mode
    clear = mode == "vanilla"
    n_classes = data.num_classes
    views = [view_of(t) for t in session.trainers]
    labels = _labels_of(session, views, cfg)
    factory = preset_factory(cfg, data)
    n_out = session.owner.labels.pseudo_classes if session.owner.labels else n_classes
    head_factory = lambda: factory(n_out).head  # noqa: E731  architecture only, fresh weights
    model_factory = lambda: factory(n_classes).full()  # noqa: E731
    out: dict[str, Any] = {}

    with _stage(say, timing, f"{mode}: clustering"):
        out["clustering"] = {
            v.name.upper(): adapters.clustering(v, y, n_classes, clear, s)
            for v, y in zip(views, labels, strict=True)
        }

    with _stage(say, timing, f"{mode}: inversion"):
        first = views[0]
        noisy = query_activations(session.owner, session.trainers[0], aux.images, noisy=True)
        clean = query_activations(session.owner, session.trainers[0], aux.images, noisy=False)
        rows = adapters.inversion_targets(first, s.n_invert)
        ids = row_sample_ids(
            first, session.owner.log.steps, session.owner.log.sample_ids, cfg.micro_batches
        )[rows]
        originals = data.train.x[ids]
        recon = adapters.inversion(
            first, rows, aux, head_factory, data.image_shape, noisy, clean, s
        )
        inv: dict[str, Any] = {k: reconstruction_scores(r, originals) for k, r in recon.items()}
        inv["ssim"] = max(inv["data_free"]["ssim"], inv["aux_no_query"]["ssim"])
        inv["baselines"] = mean_image_baselines(
            aux_split.x, aux_split.y, originals, data.train.y[ids].numpy(), seed=s.seed
        )
        inv["targets"] = {"images": len(ids), "source": "t1 last-epoch training record"}
        out["inversion"] = inv

    with _stage(say, timing, f"{mode}: extraction"):
        out["extraction"] = adapters.extraction(
            views,
            aux,
            head_factory,
            model_factory,
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


def _run_summary(session: Session) -> dict[str, Any]:
    r = session.results
    keep = ("accuracy", "history", "timing", "privacy", "labels", "model", "config")
    summary = {k: r[k] for k in keep if k in r}
    wm = r.get("watermark") or {}
    summary["watermark"] = {k: wm.get(k) for k in ("enabled", "verified", "stages")}
    return summary


def privacy_utility(
    cfg: RunConfig,
    data: Dataset,
    aux: AuxData,
    s: EvalSettings,
    out: Path,
    say: Say,
    progress: TrainProgress | None,
) -> list[dict[str, Any]]:
    """Short CliCooper runs over noise_multiplier: accuracy, epsilon, T1 clustering, query SSIM."""
    points = []
    sweep = (
        s if s.sweep_epochs is None else EvalSettings(**{**s.__dict__, "epochs": s.sweep_epochs})
    )
    sweep_data = data.limit(s.sweep_train_subset, None, s.seed)
    for nm in s.sweep_noise:
        say(f"privacy-utility: noise_multiplier {nm:g}")
        run_cfg = mode_config(cfg, sweep, "clicooper", noise_multiplier=nm)
        session = train(run_cfg, sweep_data, out / f"nm-{nm:g}", progress)
        points.append(_sweep_point(session, run_cfg, aux, sweep))
    return points


def _sweep_point(session: Session, cfg: RunConfig, aux: AuxData, s: EvalSettings) -> dict[str, Any]:
    views = [view_of(session.trainers[0])]
    labels = _labels_of(session, views, cfg)[0]
    n_classes = session.dataset.num_classes
    cluster = adapters.clustering(views[0], labels, n_classes, False, s)
    noisy = query_activations(session.owner, session.trainers[0], aux.images, noisy=True)
    rows = adapters.inversion_targets(views[0], s.n_invert)
    ids = row_sample_ids(
        views[0], session.owner.log.steps, session.owner.log.sample_ids, cfg.micro_batches
    )[rows]
    from clicooper.attacks import query_decoder

    recon = query_decoder(
        aux.images,
        noisy,
        views[0].records["activation"][rows],
        epochs=s.decoder_epochs,
        seed=s.seed,
    )
    return {
        "noise_multiplier": cfg.privacy.noise_multiplier,
        "accuracy": session.results["accuracy"]["test"],
        "epsilon": session.results["privacy"]["epsilon"],
        "clustering_t1_success_rate": cluster["success_rate"],
        "clustering_t1_matched_accuracy": cluster["matched_accuracy"],
        "query_decoder_ssim": reconstruction_scores(recon, session.dataset.train.x[ids])["ssim"],
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
        del session
    results["epsilon"] = {m: results["runs"][m]["privacy"]["epsilon"] for m in MODES}
    with _stage(say, timing, "privacy-utility sweep"):
        sweep = privacy_utility(cfg, data, aux, s, out / "runs" / "sweep", say, progress)
    results["privacy_utility"] = {
        "points": sorted([*sweep, main_point(results)], key=lambda p: p["noise_multiplier"]),
        "vanilla_accuracy": results["runs"]["vanilla"]["accuracy"]["test"],
    }
    timing["total"] = round(time.perf_counter() - start, 2)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
    write_figures(results, figures, out / "figures", data.image_shape)
    write_report(results, out / "report.md")
    timing["total_with_outputs"] = round(time.perf_counter() - start, 2)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
    return results


def main_point(results: dict[str, Any]) -> dict[str, Any]:
    """The main CliCooper run as a privacy-utility point (same keys as the sweep's)."""
    run_, attacks = results["runs"]["clicooper"], results["attacks"]["clicooper"]
    t1 = attacks["clustering"]["T1"]
    return {
        "noise_multiplier": run_["privacy"]["noise_multiplier"],
        "accuracy": run_["accuracy"]["test"],
        "epsilon": run_["privacy"]["epsilon"],
        "clustering_t1_success_rate": t1["success_rate"],
        "clustering_t1_matched_accuracy": t1["matched_accuracy"],
        "query_decoder_ssim": attacks["inversion"]["query_decoder"]["ssim"],
        "main_run": True,
    }


def _settings_dict(s: EvalSettings) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in s.__dict__.items()}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__}")
