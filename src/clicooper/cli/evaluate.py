"""``clicooper evaluate``: vanilla vs CliCooper (released every epoch, and released once)
under every attack, with report and figures."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from clicooper.cli.app import app, build_config, fail
from clicooper.cli.progress import console, training_progress

Opt = typer.Option


@app.command()
def evaluate(
    dataset: Annotated[
        str | None, Opt(help="digits, fashion-mnist, mnist5k, an IDX dir or .npz")
    ] = None,
    out: Annotated[Path, Opt(help="evaluation directory")] = Path("runs/evaluation"),
    quick: Annotated[bool, Opt(help="small budgets: a few minutes on digits")] = False,
    config: Annotated[Path | None, Opt(help="TOML config of both runs; flags override it")] = None,
    seed: Annotated[int | None, Opt()] = None,
    epochs: Annotated[int | None, Opt(help="epochs of both runs (15 quick, 5 full)")] = None,
    train_subset: Annotated[int | None, Opt(help="owner trains on a seeded subset")] = None,
    test_subset: Annotated[int | None, Opt()] = None,
    noise_multiplier: Annotated[
        float | None,
        Opt(help="noise std / clip norm of the clicooper column (once: --once-target-epsilon)"),
    ] = None,
    model: Annotated[
        str | None,
        Opt(
            help="preset of every column (default cnn: the inversion attacks assume an image "
            "head; the once column cnn-light where `run` defaults to release once)"
        ),
    ] = None,
    cut: Annotated[str | None, Opt(help="named cut point of the preset")] = None,
    overwrite: Annotated[bool, Opt(help="write into an --out that already holds files")] = False,
    columns: Annotated[
        str,
        Opt(help="comma-separated columns: vanilla, clicooper (every-epoch release), once"),
    ] = "vanilla,clicooper,once",
    once_head_source: Annotated[
        str | None, Opt(help="frozen head of the once column (default: the config's head.source)")
    ] = None,
    once_target_epsilon: Annotated[
        float | None,
        Opt(
            help="epsilon of the once column's single release (picks its noise; default: "
            "release once's default, config.ONCE_TARGET_EPSILON; with --quick 8)"
        ),
    ] = None,
    once_sweep: Annotated[
        str | None,
        Opt(help="comma-separated epsilons of extra release-once runs for the frontier ('' none)"),
    ] = None,
    frontier_extra: Annotated[
        Path | None,
        Opt(
            help="JSON list of extra frontier points: label, series, accuracy, epsilon, owner_share"
        ),
    ] = None,
) -> None:
    """Train vanilla and CliCooper (every-epoch and release-once) alike, run every attack on
    each, write the report with the targets and the frontier figure."""
    from clicooper.data import DataError
    from clicooper.evaluation import FULL, QUICK
    from clicooper.evaluation import evaluate as run_evaluation

    cfg = build_config(
        config,
        dataset=dataset,
        model=model or "cnn",
        cut=cut,
        **{"privacy.noise_multiplier": noise_multiplier},
    )
    settings = QUICK if quick else FULL
    overrides = {
        k: v
        for k, v in {
            "seed": seed,
            "epochs": epochs,
            "train_subset": train_subset,
            "test_subset": test_subset,
        }.items()
        if v is not None
    }
    if overrides.get("epochs", 1) < 1 or overrides.get("seed", 0) < 0:
        fail("epochs must be >= 1 and seed >= 0")
    settings = replace(
        settings,
        **overrides,
        **_once_options(columns, once_head_source, once_target_epsilon, once_sweep),
        once_model=model,  # None: as `run` gives release once on the data (with_run_defaults)
    )
    extra = _extra_points(frontier_extra) if frontier_extra else []
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        fail(f"{out} already exists and is not empty: choose another --out or pass --overwrite")
    start = time.perf_counter()
    try:
        results = run_evaluation(
            cfg,
            out,
            settings,
            say=lambda m: console.print(m, highlight=False),
            progress=training_progress,
            quick=quick,
            extra_points=extra,
        )
    except (DataError, ValueError) as exc:
        fail(str(exc).splitlines()[0])
    runs, attacks = results["runs"], results["attacks"]
    for mode in results["columns"]:
        default = " (`run`'s default here)" if mode == results["default_column"] else ""
        console.print(
            f"{mode}{default}: {runs[mode]['model']['preset']}, "
            f"test accuracy {runs[mode]['accuracy']['test']:.3f}, "
            f"epsilon {_eps(runs[mode]['privacy']['epsilon'])}, "
            f"T1 clustering success {attacks[mode]['clustering']['T1']['success_rate']:.2f}, "
            f"inversion SSIM {attacks[mode]['inversion']['ssim']:.3f}, "
            f"query-decoder SSIM {attacks[mode]['inversion']['query_decoder']['ssim']:.3f} "
            f"(class-mean floor {attacks[mode]['inversion']['baselines']['class_mean']:.3f}), "
            f"data-free SSIM {attacks[mode]['inversion']['data_free']['ssim']:.3f}, "
            f"extraction {attacks[mode]['extraction']['accuracy']:.3f}, "
            f"targets passed {_passed(results['targets'][mode])}",
            highlight=False,
        )
    console.print(f"report: {out / 'report.md'} ({time.perf_counter() - start:.0f} s)")


def _eps(value: float | None) -> str:
    return "none" if value is None else f"{value:.3g}"


def _passed(targets: dict[str, dict[str, Any]]) -> str:
    failed = [k for k, t in targets.items() if not t["passed"]]
    return f"{len(targets) - len(failed)}/{len(targets)}" + (
        f" (failed: {', '.join(failed)})" if failed else ""
    )


def _once_options(
    columns: str, head_source: str | None, target_epsilon: float | None, sweep: str | None
) -> dict[str, Any]:
    """The release-once column's settings from the flags; exit 2 on a bad one."""
    from clicooper.evaluation.settings import COLUMNS
    from clicooper.heads import HeadSourceError, get_source

    names = [c.strip() for c in columns.split(",") if c.strip()]
    unknown = [c for c in names if c not in COLUMNS]
    if not names or unknown or len(set(names)) != len(names):
        fail(f"--columns takes distinct names among {', '.join(COLUMNS)}, got {columns!r}")
    if target_epsilon is not None and not (math.isfinite(target_epsilon) and target_epsilon > 0):
        fail(f"--once-target-epsilon must be a positive number, got {target_epsilon}")
    if head_source is not None:
        try:
            get_source(head_source)
        except HeadSourceError as exc:
            fail(str(exc))
    out: dict[str, Any] = {"columns": tuple(names), "once_head_source": head_source}
    if target_epsilon is not None:
        out["once_target_epsilon"] = target_epsilon
    if sweep is not None:
        try:
            eps = tuple(float(e) for e in sweep.split(",") if e.strip())
        except ValueError:
            eps = (-1.0,)
        if not all(math.isfinite(e) and e > 0 for e in eps):
            fail(f"--once-sweep takes comma-separated positive epsilons, got {sweep!r}")
        out["once_sweep_epsilon"] = eps
    return out


def _extra_points(path: Path) -> list[dict[str, Any]]:
    """Extra frontier points from a JSON list; exit 2 when it is not one."""
    try:
        points = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        fail(f"--frontier-extra {path}: not a readable JSON file ({exc.__class__.__name__})")
    if not isinstance(points, list) or not all(_point_ok(p) for p in points):
        fail(
            f"--frontier-extra {path}: give a JSON list of objects with a string label, a "
            "series and a number accuracy in [0, 1] (epsilon, owner_share: numbers or null)"
        )
    return [
        {"epochs": None, "epsilon": None, "owner_share": None, **p, "series": str(p["series"])}
        for p in points
    ]


def _point_ok(p: Any) -> bool:
    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

    return (
        isinstance(p, dict)
        and isinstance(p.get("label"), str)
        and isinstance(p.get("series"), str)
        and number(p.get("accuracy"))
        and 0 <= p["accuracy"] <= 1
        and all(p.get(k) is None or number(p[k]) for k in ("epsilon", "owner_share", "epochs"))
    )
