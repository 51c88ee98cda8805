"""Data-free inversion SSIM of finished release-once runs, from their directories alone.

For each run directory (``clicooper run --release once --out DIR``, or an evaluation's
``runs/once`` and ``runs/sweep/once-eps-*``) this rebuilds what the evaluation's once
column attacks and runs its data-free attack on it, exactly as ``clicooper evaluate``
does (:func:`clicooper.evaluation.suite.release_data_free`):

- the owner's data and the attackers' auxiliary split: the evaluation's
  (:func:`~clicooper.evaluation.columns.prepare_data` at the ``FULL`` or ``--quick``
  settings), then the run's head source's carving of its public split (the head is built
  by its source, then given the run's own frozen weights, ``owner/head.safetensors``);
- T1's release cache, read back from ``parties/t1/releases``; the targets are the
  evaluation's seeded draw of ``n_invert`` record ids;
- white-box inversion through the frozen head when the trainers hold it (the default
  ``public`` head they pretrain), UnSplit otherwise; scored by SSIM against the records'
  images beside the dataset-mean SSIM of the same targets (a blind guess) and the
  *unpaired* SSIM: the same reconstructions against another target's image, what the
  attack scores with no information about the record it inverts.

A check that the rebuild is the run's: the releases minus the rebuilt head's clean
activations of the same records must have the configured noise std (``noise std``).
Usage (the directories must come from runs on the settings' data, e.g. a full
Fashion-MNIST evaluation)::

    PYTHONPATH=src python benchmarks/data_free_epsilon.py RUN_DIR [RUN_DIR ...] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from clicooper.config import RunConfig
from clicooper.evaluation import FULL, QUICK
from clicooper.evaluation.columns import head_known, prepare_data
from clicooper.evaluation.settings import EvalSettings
from clicooper.evaluation.suite import release_data_free
from clicooper.evaluation.views import cached_releases, release_targets
from clicooper.heads.base import embed
from clicooper.models.assembly import preset_factory
from clicooper.privacy.release import frozen_head
from clicooper.runtime.rundirs import RunDir
from clicooper.watermark.chain import load_segment


def measure(run_dir: Path, settings: EvalSettings) -> dict[str, Any]:
    """The once column's data-free inversion of the release-once run in ``run_dir``."""
    rundir = RunDir(run_dir)
    cfg = RunConfig.load(rundir.config)
    if cfg.privacy.release != "once":
        raise ValueError(f"{run_dir} is not a release-once run (privacy.release)")
    s = settings.with_seed(cfg.seed)
    data, _, aux_split = prepare_data(cfg, s)
    head = frozen_head(cfg, data, preset_factory(cfg, data)(data.num_classes))
    head.module.load_state_dict(load_segment(rundir.owner / "head.safetensors"))
    owner_data = head.data or data
    cache = cached_releases(run_dir)
    found = release_data_free(
        lambda: copy.deepcopy(head.module).eval(),
        head_known(cfg),
        cache,
        owner_data.train,
        owner_data.image_shape,
        aux_split,
        s,
    )
    ids = release_targets(cache, s.n_invert, s.seed)
    noise = cache.rows(ids) - embed(head.module, owner_data.train.x[ids]).view_as(cache.rows(ids))
    results = json.loads(rundir.results.read_text()) if rundir.results.exists() else {}
    privacy = results.get("privacy") or {}
    return {
        "run": str(run_dir),
        "epsilon": privacy.get("epsilon", cfg.privacy.target_epsilon),
        "test_accuracy": (results.get("accuracy") or {}).get("test"),
        "data_free_ssim": found["ssim"],
        "unpaired_ssim": found["unpaired_ssim"],
        "dataset_mean_ssim": found["baselines"]["dataset_mean"],
        "class_mean_ssim": found["baselines"]["class_mean"],
        "attacker_head": found["attacker_head"],
        "images": found["images"],
        "noise_std": float(noise.std()),
        "noise_std_configured": privacy.get("noise_multiplier", float("nan"))
        * cfg.privacy.clip_norm,
    }


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table, ascending epsilon."""
    lines = [
        "| epsilon | test accuracy | data-free SSIM | unpaired SSIM | dataset-mean SSIM "
        "| class-mean SSIM | noise std (measured / configured) | attacker head | run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["epsilon"]):
        acc = "none" if r["test_accuracy"] is None else f"{r['test_accuracy']:.4f}"
        lines.append(
            f"| {r['epsilon']:.3g} | {acc} | {r['data_free_ssim']:.4f} | "
            f"{r['unpaired_ssim']:.4f} | {r['dataset_mean_ssim']:.4f} | "
            f"{r['class_mean_ssim']:.4f} | "
            f"{r['noise_std']:.3f} / {r['noise_std_configured']:.3f} | {r['attacker_head']} | "
            f"{r['run']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="release-once run directories")
    ap.add_argument("--quick", action="store_true", help="the quick evaluation's settings")
    ap.add_argument("--n-invert", type=int, default=None, help="targets (default: settings')")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    settings = QUICK if args.quick else FULL
    if args.n_invert is not None:
        settings = replace(settings, n_invert=args.n_invert)
    try:
        rows = [measure(run, settings) for run in args.runs]
    except (OSError, ValueError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
