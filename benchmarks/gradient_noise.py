"""Gradient protection against T1's clustering attack, and what it costs in accuracy.

One clicooper run per gradient noise level (same seed, data and activation noise),
each followed by the clustering attack of ``clicooper evaluate`` (full budget: 20
trials, 500 rows, permutation test at p < 0.01) on what T1 recorded: the activations
it received and the gradients it computed at its input. Prints one JSON line per
level, with the last trainer's per-sample gradient norms (10th, 50th, 90th
percentile) to choose ``--clip`` by. Usage:

    python benchmarks/gradient_noise.py --noise 0 0.1 0.3 1 4 [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings

import torch

from clicooper.config import RunConfig
from clicooper.data import load_dataset
from clicooper.evaluation import adapters
from clicooper.evaluation.settings import FULL
from clicooper.evaluation.suite import labels_of
from clicooper.evaluation.views import view_of
from clicooper.runtime.session import run

warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=float, nargs="+", default=[0, 0.1, 0.3, 1, 4])
    ap.add_argument("--clip", type=float, default=1.0, help="privacy.gradient_clip_norm")
    args = ap.parse_args()
    data = load_dataset(args.dataset, seed=args.seed)
    settings = FULL.with_seed(args.seed)
    for noise in args.noise:
        cfg = RunConfig.load(
            None,
            dataset=args.dataset,
            mode="clicooper",
            epochs=args.epochs,
            seed=args.seed,
            record=settings.record,
            **{
                "privacy.gradient_noise_multiplier": noise,
                "privacy.gradient_clip_norm": args.clip,
                "privacy.release": "every-epoch",
            },
        )
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            session = run(cfg, f"{tmp}/run", data=data)
        views = [view_of(t) for t in session.trainers]
        labels = labels_of(session, views, cfg)
        batch = cfg.effective_batch_size(len(data.train))
        norms = (views[-1].records["gradient"].flatten(1) * batch).norm(dim=1)  # Tn's, clean
        t1 = adapters.clustering(views[0], labels[0], data.num_classes, False, settings)
        row = {
            "gradient_noise": noise,
            "test_accuracy": round(session.results["accuracy"]["test"], 4),
            "tn_gradient_norm_p10_p50_p90": [
                round(float(q), 3) for q in torch.quantile(norms, torch.tensor([0.1, 0.5, 0.9]))
            ],
            **{
                f"t1_{source}_{key}": round(t1[source][key], 4)
                for source in ("gradients", "activations")
                for key in ("success_rate", "matched_accuracy")
            },
            "null_matched_accuracy": round(t1["gradients"]["null_matched_accuracy"], 4),
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
