"""``clicooper evaluate``: vanilla vs CliCooper under every attack, with report and figures."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from clicooper.cli.app import app, build_config, fail
from clicooper.cli.progress import console, training_progress
from clicooper.data import DataError

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
    noise_multiplier: Annotated[float | None, Opt(help="CliCooper noise std / clip norm")] = None,
    model: Annotated[
        str, Opt(help="mlp or cnn (default cnn: the inversion attacks assume an image head)")
    ] = "cnn",
    cut: Annotated[str | None, Opt(help="named cut point of the preset")] = None,
    overwrite: Annotated[bool, Opt(help="write into an --out that already holds files")] = False,
) -> None:
    """Train vanilla and CliCooper alike, run every attack on both, write the report."""
    from clicooper.evaluation import FULL, QUICK
    from clicooper.evaluation import evaluate as run_evaluation

    cfg = build_config(
        config,
        dataset=dataset,
        model=model,
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
    settings = replace(settings, **overrides)
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
        )
    except (DataError, ValueError) as exc:
        fail(str(exc).splitlines()[0])
    runs, attacks = results["runs"], results["attacks"]
    for mode in ("vanilla", "clicooper"):
        console.print(
            f"{mode}: test accuracy {runs[mode]['accuracy']['test']:.3f}, "
            f"T1 clustering success {attacks[mode]['clustering']['T1']['success_rate']:.2f}, "
            f"inversion SSIM {attacks[mode]['inversion']['ssim']:.3f}, "
            f"extraction {attacks[mode]['extraction']['accuracy']:.3f}",
            highlight=False,
        )
    console.print(f"report: {out / 'report.md'} ({time.perf_counter() - start:.0f} s)")
