"""Test accuracy of vanilla and clicooper over noise multipliers and label modes.

Same seed, architecture, data and batch order for every run; prints one line
per run and a table at the end. Usage:

    python benchmarks/accuracy_sweep.py --dataset fashion-mnist --epochs 5 \
        --noise 0 0.5 1 2 4 --label-modes feature keyed
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

from clicooper.config import RunConfig
from clicooper.runtime.session import run

warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=float, nargs="+", default=[0, 0.5, 1, 2, 4])
    ap.add_argument("--label-modes", nargs="+", default=["feature", "keyed"])
    ap.add_argument("--expansion", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument(
        "--vanilla",
        type=float,
        default=None,
        help="vanilla accuracy measured before (same seed): skip retraining it",
    )
    args = ap.parse_args()

    rows = []

    def one(mode: str, **overrides: object) -> None:
        cfg = RunConfig.load(
            None,
            dataset=args.dataset,
            mode=mode,
            epochs=args.epochs,
            seed=args.seed,
            **{"privacy.release": "every-epoch", **overrides},
        )
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            res = run(cfg, Path(tmp)).results
        row = {
            "mode": mode,
            **{k: v for k, v in overrides.items()},
            "test": res["accuracy"]["test"],
            "train": res["accuracy"]["train"],
            "epsilon": res["privacy"]["epsilon"],
            "seconds": time.perf_counter() - start,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    if args.vanilla is None:
        one("vanilla")
    else:
        rows.append({"mode": "vanilla", "test": args.vanilla, "train": None, "epsilon": None})
    for label_mode in args.label_modes:
        for nm in args.noise:
            extra = {"labels.expansion": args.expansion} if args.expansion else {}
            one("clicooper", **{"privacy.noise_multiplier": nm, "labels.mode": label_mode}, **extra)
    base = rows[0]["test"]
    print(f"\n{'mode':<10} {'labels':<8} {'noise':>6} {'test':>7} {'delta':>7} {'epsilon':>9}")
    for r in rows:
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.1f}"
        print(
            f"{r['mode']:<10} {r.get('labels.mode', '-'):<8} "
            f"{r.get('privacy.noise_multiplier', 0):>6g} {r['test']:>7.4f} "
            f"{r['test'] - base:>+7.4f} {eps:>9}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
