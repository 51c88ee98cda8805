"""The watermark's own cost (issue 11 point 2): clicooper with and without it, in pairs.

Each pair is one clicooper run and the same run again with its owner secret (label
permutation, activation noise), seed and batch order, and the watermark off
(``equal_budget.one_run(..., pair=True)``, as ``equal_budget.py --pair-nowm``); only the
watermark differs (the trainers' watermark secrets are fresh by design). Printed per
pair: accuracy with and without, cost = without - with in points, whether the marked
run's ledger verified and its largest final BER; then the mean, median and max cost per
setting. ``--read-epochs`` also reads the table at earlier epochs from the runs' per-epoch
history (both runs' histories are kept; exact when ``equal_budget.history_exact``).

``--attacks N`` runs the evaluation's watermark-removal attacks on the first N marked runs
(``clicooper.evaluation.suite.removal_grid``, at ``EvalSettings``' fractions:
fine-tune 10/20/50% of the run's steps on the stolen chain's own pseudo-labels, prune
20/40/60% of each weight, overwrite at 1x and 10x), the thief holding a seeded half of
the scored split, and prints every trainer's worst BER and largest p-value over them.

By default the runs train on 80% of the training split and score the other 20% (the
validation split of ``equal_budget.evaluation_data``); ``--test`` trains on all of it and
scores the test set (final figures only). Rows go to ``--out`` (JSON lines) and a rerun
skips pairs already there. Usage:

    python benchmarks/watermark_cost.py --dataset fashion-mnist --model cnn --epochs 5 \\
        --read-epochs 2 --pairs 3 --out wc.jsonl
    python benchmarks/watermark_cost.py --dataset fashion-mnist --release once --epochs 5
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch
from equal_budget import at_epoch, evaluation_data, load_rows, one_run, parse_sets

from clicooper.config import RunConfig
from clicooper.evaluation.settings import EvalSettings
from clicooper.runtime.session import Session

#: Issue 11 point 2: the watermark's cost at equal epochs, in points.
MAX_COST_POINTS = 0.5


def removal_attacks(session: Session, run_dir: Path, cfg: RunConfig) -> dict[str, Any]:
    """Every trainer's worst BER, largest p-value and whether all its claims held, over the
    evaluation's removal attacks on this run (the thief: a seeded half of the scored split)."""
    from clicooper.attacks.watermark_removal import Lab
    from clicooper.evaluation.suite import removal_grid

    lab = Lab(session, run_dir, cfg, cfg.seed)
    rows = removal_grid(lab, EvalSettings())
    out: dict[str, Any] = {}
    for party in lab.parties:
        claims = [r[party] for r in rows]
        out[party] = {
            "worst_ber": max(c["ber"] for c in claims),
            "max_p": max(c["p_value"] for c in claims),
            "all_hold": all(c["holds"] for c in claims),
        }
    out["attacks"] = len(rows)
    return out


def pair_rows(rows: list[dict], epoch: int | None) -> list[dict]:
    """The rows at ``epoch`` (None: as trained), pairs only."""
    if epoch is not None:  # the attacks ran on the finished runs
        rows = [{k: v for k, v in r.items() if k != "after"} for r in at_epoch(rows, epoch)]
    return [r for r in rows if "accuracy_nowm" in r]


def summary(rows: list[dict]) -> dict[str, float]:
    """Mean, median and max of the per-pair cost (without - with), in points."""
    costs = [100 * (r["accuracy_nowm"] - r["accuracy"]) for r in rows]
    return {"mean": statistics.mean(costs), "median": statistics.median(costs), "max": max(costs)}


def print_pairs(rows: list[dict], title: str) -> dict[str, float] | None:
    print(f"\n{title}")
    print(f"{'pair':>4} {'with':>7} {'without':>8} {'cost pt':>8}  verified  max BER  attacks")
    for r in rows:
        cost = 100 * (r["accuracy_nowm"] - r["accuracy"])
        after = r.get("after")
        attacks = (
            ""
            if after is None
            else ", ".join(
                f"{p} worst BER {a['worst_ber']:.3f} p<={a['max_p']:.1e} "
                f"{'holds' if a['all_hold'] else 'FAILS'}"
                for p, a in after.items()
                if p != "attacks"
            )
        )
        print(
            f"{r['run']:>4} {r['accuracy']:>7.4f} {r['accuracy_nowm']:>8.4f} {cost:>+8.2f}  "
            f"{str(r['verified']):<8}  {r['max_ber']:>7.3f}  {attacks}"
        )
    if not rows:
        return None
    s = summary(rows)
    ok = s["max"] <= MAX_COST_POINTS
    print(
        f"cost mean {s['mean']:+.2f}, median {s['median']:+.2f}, max {s['max']:+.2f} points "
        f"(every pair <= {MAX_COST_POINTS}: {'yes' if ok else 'NO'}); "
        f"ledgers verified {sum(bool(r['verified']) for r in rows)}/{len(rows)}"
    )
    return s


def main(argv: list[str] | None = None) -> dict[str, dict[str, float] | None]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--model", default=None, help="preset (default: cnn; cnn-light with once)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--trainers", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--subset", type=int, default=None, help="train/test samples to keep")
    ap.add_argument("--test", action="store_true", help="train on all of train, score test")
    ap.add_argument("--release", choices=("every-epoch", "once"), default="every-epoch")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--label", default="default", help="the variant's name (resume key)")
    ap.add_argument(
        "--attacks", type=int, default=0, metavar="N", help="removal attacks on the first N pairs"
    )
    ap.add_argument("--read-epochs", type=int, nargs="*", default=[])
    ap.add_argument("--out", type=Path, default=None, help="JSON lines; a rerun resumes")
    args = ap.parse_args(argv)
    try:
        extra = parse_sets(args.set)
    except ValueError as exc:
        ap.error(str(exc))
    torch.set_num_threads(1)
    model = args.model or ("cnn-light" if args.release == "once" else "cnn")
    setting = {"model": model, "epochs": args.epochs, "trainers": args.trainers, "seed": args.seed}
    split = "test" if args.test else "val"
    head = {"split": split, "dataset": args.dataset, "setting": setting, "subset": args.subset}
    head |= {"release": args.release, "label": args.label, "set": extra}
    rows = [r for r in load_rows(args.out) if all(r.get(k) == v for k, v in head.items())]
    done = {r["run"] for r in rows}
    data = evaluation_data(args.dataset, args.seed, args.test, args.subset)
    run_extra = {"privacy.release": args.release, **extra}
    for index in range(args.pairs):
        if index in done:
            continue
        after = removal_attacks if index < args.attacks else None
        row = {**head, "mode": "clicooper", "run": index}
        row.update(one_run(data, "clicooper", setting, run_extra, pair=True, after=after))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out is not None:
            with args.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
    rows = [r for r in rows if r["run"] < args.pairs]
    where = f"{args.dataset} {split}, {model}, {args.trainers} trainers, release {args.release}"
    out = {f"{args.epochs}": print_pairs(pair_rows(rows, None), f"{where}, {args.epochs} epochs")}
    for epoch in args.read_epochs:
        title = f"{where}, {epoch} epochs (read from the runs' history)"
        out[f"{epoch}"] = print_pairs(pair_rows(rows, epoch), title)
    return out


if __name__ == "__main__":
    main()
