"""Issue 10's targets and frontier on Fashion-MNIST, every run through the real parties.

Each point is one ``clicooper.runtime.session.run`` (in-process transport, the watermark
chain on, the ledger verified), exactly what ``clicooper run`` does. Printed side by side:

- **targets** at ``--release once`` (default head source ``public``, the chain warm-started
  on the public split, epsilon 8 at delta 1e-5 for the whole run): epsilon, test accuracy,
  owner share of the training FLOPs, and the nearest-class-mean and logistic readouts of
  the same releases (the chain must beat both), against the issue's targets;
- **accuracy against epsilon**, every-epoch (a few noise multipliers; epsilon composes over
  the epochs) and once (a few target epsilons);
- **owner share against accuracy**, release once at epsilon 8, for the ``cnn`` and
  ``cnn-light`` presets at two cuts each.

The figure (``--figure``, png) has both panels. The default is a subset that a 2-core
machine runs in minutes (``--train-subset``, ``--test-subset``); ``--full`` uses all of
Fashion-MNIST. ``--validation N`` scores on the last N training images instead of the test
set (carved before anything else: the way to choose settings). Usage:

    python benchmarks/frontier.py                          # subset, a few minutes
    python benchmarks/frontier.py --full --only targets    # the targets at full size
    python benchmarks/frontier.py --full --only targets --target-model cnn-light --epochs 1
    python benchmarks/frontier.py --full --validation 5000 --only select  # choose settings
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from clicooper.config import RunConfig
from clicooper.data import Dataset, load_dataset
from clicooper.runtime.session import run

warnings.filterwarnings("ignore")

TARGETS = {"epsilon": 8.0, "test": 0.85, "owner_share": 0.10}
EVERY_EPOCH_NOISE = (0.5, 1.0, 2.0)
ONCE_EPSILON = (2.0, 4.0, 8.0)
CUTS = (("cnn", "bottleneck"), ("cnn", "conv2"), ("cnn-light", "squeeze"), ("cnn-light", "stem"))


def dataset(args: argparse.Namespace) -> Dataset:
    """Fashion-MNIST, its test set or (``--validation``) the last training images as test."""
    data = load_dataset("fashion-mnist", seed=args.seed)
    if args.validation:
        n = len(data.train)
        train = data.train.subset(torch.arange(n - args.validation))
        held = data.train.subset(torch.arange(n - args.validation, n))
        data = Dataset(data.name, train, held, data.num_classes)
    if args.full:
        return data
    return data.limit(args.train_subset, args.test_subset, args.seed)


_DONE: dict[str, dict[str, Any]] = {}


def point(label: str, data: Dataset, args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    """One run with ``overrides`` (dotted config keys); its headline numbers (a setting
    already run is not run again: the targets are also a point of each panel)."""
    key = json.dumps(overrides, sort_keys=True)
    if key in _DONE:
        return {**_DONE[key], "label": label}
    settings = {"dataset": "fashion-mnist", "seed": args.seed, "epochs": args.epochs}
    settings.update(threads=args.threads, **overrides)
    if args.warm_epochs is not None:
        settings.setdefault("chain.warm_epochs", args.warm_epochs)
    cfg = RunConfig.load(None, **settings)
    start = time.time()
    with tempfile.TemporaryDirectory() as out:
        results = run(cfg, Path(out) / "run", data=data).results
    privacy, readouts = results["privacy"], results.get("readouts") or {}
    row = {
        "label": label,
        "release": privacy.get("release"),
        "model": cfg.model,
        "cut": results["model"]["cut"],
        "noise": privacy["noise_multiplier"],
        "epsilon": privacy["epsilon"],
        "test": results["accuracy"]["test"],
        "owner_share": results["compute"]["owner_share"],
        "verified": results["watermark"].get("verified"),
        "seconds": round(time.time() - start, 1),
        "history": [round(h["test_accuracy"], 4) for h in results["history"]],
        **{
            name: readouts[name]["test"]
            for name in ("ncm", "logistic", "public_only")
            if name in readouts
        },
    }
    print(json.dumps(row), file=sys.stderr, flush=True)
    _DONE[key] = row
    return row


ONCE = {"mode": "clicooper", "privacy.release": "once"}
TARGET_RUN = {**ONCE, "model": "cnn", "cut": "bottleneck", "privacy.target_epsilon": 8.0}


def targets(data: Dataset, args: argparse.Namespace) -> list[dict[str, Any]]:
    model = {} if args.target_model == "cnn" else {"model": args.target_model, "cut": None}
    return [point("targets", data, args, **{**TARGET_RUN, **model})]


def accuracy_epsilon(data: Dataset, args: argparse.Namespace) -> list[dict[str, Any]]:
    every = {
        "mode": "clicooper",
        "model": "cnn",
        "cut": "bottleneck",
        "privacy.release": "every-epoch",
    }
    rows = [
        point(f"every-epoch m={m}", data, args, **every, **{"privacy.noise_multiplier": m})
        for m in EVERY_EPOCH_NOISE
    ]
    rows += [
        point(f"once eps={e}", data, args, **{**TARGET_RUN, "privacy.target_epsilon": e})
        for e in ONCE_EPSILON
    ]
    return rows


def share_accuracy(data: Dataset, args: argparse.Namespace) -> list[dict[str, Any]]:
    return [
        point(f"{model}/{cut}", data, args, **{**TARGET_RUN, "model": model, "cut": cut})
        for model, cut in CUTS
    ]


#: The chain settings compared on a validation split (``--only select --validation N``).
SELECT = (
    {"chain.release_lr_factor": 0.1, "chain.denoise": "post-mean"},
    {"chain.release_lr_factor": 0.01, "chain.denoise": "post-mean"},
    {"chain.release_lr_factor": 0.01, "chain.denoise": "none"},
    {"chain.release_lr_factor": 0.001, "chain.denoise": "post-mean"},
)


def select(data: Dataset, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The release-once run at each chain setting of :data:`SELECT` (choose on validation)."""
    rows = []
    for setting in SELECT:
        label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in setting.items())
        rows.append(point(label, data, args, **{**TARGET_RUN, **setting}))
    return rows


def fmt(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| point | release | model/cut | noise | epsilon | test acc | NCM | logistic "
        "| public-only chain | owner share | ledger | s |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['release']} | {r['model']}/{r['cut']} | {fmt(r['noise'], '.3f')} "
            f"| {fmt(r['epsilon'], '.2f')} | {fmt(r['test'])} | {fmt(r.get('ncm'))} "
            f"| {fmt(r.get('logistic'))} | {fmt(r.get('public_only'))} "
            f"| {fmt(r['owner_share'], '.3f')} | {'ok' if r['verified'] else 'FAIL'} "
            f"| {r['seconds']} |"
        )
    return "\n".join(lines)


def verdicts(row: dict[str, Any]) -> str:
    """The targets of issue 10 point 6 that these runs measure, met or not."""
    checks = [
        ("epsilon <= 8", row["epsilon"] <= TARGETS["epsilon"]),
        ("test accuracy >= 0.85", row["test"] >= TARGETS["test"]),
        ("owner share <= 10%", row["owner_share"] <= TARGETS["owner_share"]),
        ("chain beats NCM and logistic", row["test"] > max(row["ncm"], row["logistic"])),
    ]
    return "\n".join(f"  {name}: {'met' if ok else 'NOT met'}" for name, ok in checks)


def figure(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for release, marker in (("every-epoch", "s"), ("once", "o")):
        pts = sorted(
            (r["epsilon"], r["test"])
            for r in rows
            if r["release"] == release and r["label"] != "targets" and "/" not in r["label"]
        )
        if pts:
            left.plot(*zip(*pts, strict=True), marker=marker, label=f"release {release}")
    left.axhline(TARGETS["test"], ls=":", c="grey")
    left.axvline(TARGETS["epsilon"], ls=":", c="grey")
    left.set(xscale="log", xlabel="epsilon (delta 1e-5, whole run)", ylabel="test accuracy")
    left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no crowded labels
    left.set_title("accuracy against epsilon")
    left.legend()
    for r in rows:
        if "/" in r["label"]:
            right.scatter(r["owner_share"], r["test"])
            right.annotate(r["label"], (r["owner_share"], r["test"]), fontsize=8)
    right.axvline(TARGETS["owner_share"], ls=":", c="grey")
    right.set(xscale="log", xlabel="owner share of training FLOPs", ylabel="test accuracy")
    right.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    right.set_title("release once, epsilon 8: owner share against accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-subset", type=int, default=12000)
    ap.add_argument("--test-subset", type=int, default=2000)
    ap.add_argument("--full", action="store_true", help="all of Fashion-MNIST")
    ap.add_argument("--validation", type=int, default=0, help="score on the last N train images")
    ap.add_argument("--epochs", type=int, default=3, help="epochs (on the releases, for once)")
    ap.add_argument("--warm-epochs", type=int, default=None, help="chain.warm_epochs")
    ap.add_argument("--only", choices=["targets", "epsilon", "share", "select"], nargs="+")
    ap.add_argument("--target-model", default="cnn", help="preset of the targets row")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--figure", type=Path, default=Path("frontier.png"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = dataset(args)
    parts = args.only or ["targets", "epsilon", "share"]
    rows: list[dict[str, Any]] = []
    if "targets" in parts:
        rows += targets(data, args)
    if "epsilon" in parts:
        rows += accuracy_epsilon(data, args)
    if "share" in parts:
        rows += share_accuracy(data, args)
    if "select" in parts:
        rows += select(data, args)
    where = "validation" if args.validation else "test"
    size = "full" if args.full else f"train subset {args.train_subset}, {where} {args.test_subset}"
    print(f"Fashion-MNIST ({size}), {args.epochs} epochs, seed {args.seed}; accuracy on {where}")
    print(table(rows))
    for row in rows:
        if row["label"] == "targets":
            print("issue 10 targets at --release once:")
            print(verdicts(row))
    if "epsilon" in parts or "share" in parts:
        figure(rows, args.figure)
        print(f"figure: {args.figure}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
