"""``clicooper evaluate``: vanilla and CliCooper runs, every attack on each, one results dict.

The columns (:data:`~clicooper.evaluation.settings.COLUMNS`) are vanilla split learning,
CliCooper releasing every epoch and CliCooper releasing once; each is the run ``clicooper
run`` makes with that mode and release, and the one it makes with neither flag is the
evaluation's ``default_column`` (``once`` on a training set of at least
:data:`clicooper.config.RELEASE_BY_SIZE` records, else ``clicooper``). Every run uses the
same seed, data and batch order, and the same architecture, except that where ``run``
defaults to release once and no model was chosen the once column takes the owner-light
preset ``run`` gives it (:func:`.columns.with_run_defaults`); the owner's training data excludes the
auxiliary split handed to the attackers. Each attack sees only what its party received
(:mod:`.views`): a release-once T1 holds its cache of the owner's single release per
record (read back from ``parties/t1/releases``) and the clean inference path. Scoring
joins records to the truth (:mod:`.truth`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clicooper.config import RunConfig
from clicooper.evaluation.columns import (
    Say,
    TrainProgress,
    column_config,
    default_column,
    prepare_data,
    run_summary,
    stage,
    train,
    with_run_defaults,
)
from clicooper.evaluation.settings import COLUMNS, EvalSettings
from clicooper.evaluation.suite import (
    attack_run,
    watermark_removal,
)
from clicooper.evaluation.sweeps import (
    frontier,
    once_sweep,
    privacy_utility,
    shallow_cut,
    trade_off_point,
)
from clicooper.evaluation.targets import targets


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
        with stage(say, timing, f"{column}: training"):
            session = train(run_cfg, data, run_dir, progress)
        results["runs"][column] = run_summary(session)
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
