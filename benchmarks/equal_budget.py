"""Equal-budget accuracy: vanilla once, clicooper several times (fresh owner secrets).

Every run of one setting has the same dataset, model preset, epochs, trainers, seed
and batch order; only the clicooper runs' owner and watermark secrets differ (each
run draws fresh ones). By default the runs train on 80% of the training split and are
scored on the other 20% (a validation split carved from the training data, seeded by
``--seed``), so settings are chosen without seeing the test set; ``--test`` trains on
the whole training split and scores the test set (for the final table only).

One training process at a time, in this process. Rows are appended to ``--out``
(JSON lines) and a rerun skips the rows already there, so an interrupted grid
resumes where it stopped. Usage:

    python benchmarks/equal_budget.py --dataset digits --models mlp cnn --epochs 5 10 \\
        --trainers 1 2 3 --runs 3 --out eb.jsonl
    python benchmarks/equal_budget.py --dataset digits --set watermark.strength=0 --label nowm

``--set KEY=VALUE`` (repeatable) overrides a clicooper setting (dotted keys of
``RunConfig``); ``--label`` names the variant in the table and the resume key.
``--set-both KEY=VALUE`` overrides a setting of vanilla and clicooper alike (e.g. ``lr``:
a setting both modes share is compared at the same value); it is part of both modes'
resume keys. ``--pair-nowm`` measures the watermark's own cost: each clicooper run is
repeated with its owner secret (the same label permutation and activation noise) and
the watermark off, so the two differ only by the watermark; the table adds the median
of (without - with) over the runs (rows resumed from an unpaired grid have none).

``--release once`` compares clicooper's release once (at its default epsilon unless
``--set`` says otherwise) against vanilla on the same frozen head (``--mode vanilla
--release once``: the same head source, public split, chain warm start, lr and seed, its
clean activations sent once). Each row keeps the test accuracy after every epoch on the
releases (``history``, the warm start's epochs left out); ``--read-epochs 1 2`` prints
the table at those epochs too, read from the same runs, which is exactly the run of that
many epochs when nothing depends on the total (:func:`history_exact` checks it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from clicooper.config import RunConfig
from clicooper.data import load_dataset
from clicooper.data.base import Dataset
from clicooper.privacy.secrets import SECRET_FILE
from clicooper.runtime.session import Session, run

VALIDATION_FRACTION = 0.2
#: Called inside :func:`one_run` on the marked run (its session, directory and config);
#: what it returns is kept in the row as ``"after"``.
AfterRun = Callable[[Session, Path, RunConfig], Any]


def parse_value(text: str) -> Any:
    """``KEY=VALUE``'s value as JSON when it parses (numbers, booleans), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_sets(items: Iterable[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": 1, "c": "x"}``; ValueError naming a bad item."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: use KEY=VALUE, e.g. watermark.strength=0")
        out[key] = parse_value(value)
    return out


def evaluation_data(dataset: str, seed: int, test: bool, subset: int | None) -> Dataset:
    """Train/score splits: (80% of train, 20% of train) or, with ``test``, (train, test)."""
    data = load_dataset(dataset, seed=seed)
    if subset is not None:
        data = data.limit(subset, subset, seed)
    if test:
        return data
    kept, val = data.split_auxiliary(VALIDATION_FRACTION, seed)
    return Dataset(data.name, kept.train, val, data.num_classes)


def history_exact(cfg: RunConfig) -> str | None:
    """Why epoch e of a run of ``cfg`` is not the run of e epochs, or None when it is.

    Nothing of a run before the end of epoch e depends on the total epochs when the lr
    schedule is constant (warm-up counts steps from the start), watermark stages are
    epochs (``stage_steps`` closes a stage only with a stage's steps still to go) and the
    noise does not come from a target epsilon spread over every epoch's release."""
    if cfg.schedule != "constant":
        return f"the {cfg.schedule} lr schedule spans the whole run"
    if cfg.watermark.stage_steps is not None:
        return "watermark.stage_steps: the last stage's length depends on the total steps"
    p = cfg.privacy
    if cfg.mode == "clicooper" and p.release != "once" and p.target_epsilon is not None:
        return "target_epsilon spreads its budget over every epoch's release"
    return None


def one_run(
    data: Dataset,
    mode: str,
    setting: dict[str, Any],
    extra: dict[str, Any],
    pair: bool = False,
    after: AfterRun | None = None,
) -> dict:
    """Train one run in-process; its accuracy, watermark verdicts and seconds.

    ``pair``: a marked clicooper run is trained again with its owner secret and the
    watermark off (``accuracy_nowm``, ``history_nowm``): the same permutation, noise and
    batch order. ``after`` (e.g. removal attacks) runs on the marked run before its
    directory goes; its result is the row's ``"after"``.
    """
    cfg = RunConfig.load(
        None, dataset=data.name, mode=mode, **{"privacy.release": "every-epoch", **setting, **extra}
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        session = run(cfg, Path(tmp) / "marked", data=data)
        res = session.results
        wm = res.get("watermark", {})
        marked = wm.get("enabled", False)
        out = {
            "accuracy": res["accuracy"]["test"],
            "history": _history(res),
            "history_exact": history_exact(cfg) is None,
            "epsilon": res["privacy"]["epsilon"],
            "max_ber": max(wm["final_ber"].values()) if marked else None,
            "verified": (wm["verified"] and wm["attestations_failed"] == 0) if marked else None,
            "seconds": round(time.perf_counter() - start, 1),
        }
        if after is not None:
            out["after"] = after(session, Path(tmp) / "marked", cfg)
        if pair and marked:
            unmarked = cfg.watermark.model_copy(update={"enabled": False})
            secret = Path(tmp) / "marked" / "owner" / SECRET_FILE
            bare = cfg.model_copy(update={"owner_secret": secret, "watermark": unmarked})
            bare_res = run(bare, Path(tmp) / "bare", data=data).results
            out["accuracy_nowm"] = bare_res["accuracy"]["test"]
            out["history_nowm"] = _history(bare_res)
    return out


def _history(results: dict) -> list[float]:
    """Test accuracy after every epoch on the releases (a warm start's epochs left out)."""
    return [h["test_accuracy"] for h in results["history"] if h.get("phase") != "public"]


def load_rows(path: Path | None) -> list[dict]:
    if path is None or not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def grid_runs(args: argparse.Namespace) -> list[tuple[dict[str, Any], str, int]]:
    """(setting, mode, run index) for every run of the grid: vanilla 0, clicooper 0..runs-1."""
    out = []
    for model, epochs, trainers in itertools.product(args.models, args.epochs, args.trainers):
        setting = {"model": model, "epochs": epochs, "trainers": trainers, "seed": args.seed}
        if not args.no_vanilla:
            out.append((setting, "vanilla", 0))
        out.extend((setting, "clicooper", i) for i in range(args.runs))
    return out


def row_key(row: dict) -> tuple:
    s = row["setting"]
    return (
        row["split"],
        row["dataset"],
        s["model"],
        s["epochs"],
        s["trainers"],
        s["seed"],
        row["mode"],
        row["label"] if row["mode"] == "clicooper" else "",
        json.dumps(row.get("both", {}), sort_keys=True),
        row.get("release", "every-epoch"),
        row["run"],
    )


def at_epoch(rows: list[dict], epoch: int) -> list[dict]:
    """The rows as runs of ``epoch`` epochs, read from their per-epoch history: only rows
    whose history is exact (:func:`history_exact`) and that trained that long."""
    out = []
    for r in rows:
        if r.get("history_exact") and len(r.get("history", [])) >= epoch:
            setting = {**r["setting"], "epochs": epoch}
            out.append({**r, "setting": setting, "accuracy": r["history"][epoch - 1]})
            out[-1].pop("accuracy_nowm", None)
            if len(r.get("history_nowm", [])) >= epoch:  # rows from before it have none
                out[-1]["accuracy_nowm"] = r["history_nowm"][epoch - 1]
    return out


def summarise(rows: list[dict], label: str) -> list[dict]:
    """Per setting: vanilla, clicooper median and worst, their gaps to vanilla."""
    table = []
    by_setting: dict[tuple, dict[str, list[float]]] = {}
    wm_costs: dict[tuple, list[float]] = {}  # per run: accuracy without - with the watermark
    for r in rows:
        s = r["setting"]
        key = (r["split"], r["dataset"], s["model"], s["epochs"], s["trainers"])
        mode = "vanilla" if r["mode"] == "vanilla" else r["label"]
        by_setting.setdefault(key, {}).setdefault(mode, []).append(r["accuracy"])
        if mode == label and "accuracy_nowm" in r:
            wm_costs.setdefault(key, []).append(r["accuracy_nowm"] - r["accuracy"])
    for key, modes in by_setting.items():
        if label not in modes:
            continue
        runs = modes[label]
        vanilla = modes.get("vanilla", [float("nan")])[0]
        costs = wm_costs.get(key, [])
        table.append(
            {
                "split": key[0],
                "dataset": key[1],
                "model": key[2],
                "epochs": key[3],
                "trainers": key[4],
                "vanilla": vanilla,
                "median": statistics.median(runs),
                "worst": min(runs),
                "runs": runs,
                "median_gap": statistics.median(runs) - vanilla,
                "worst_gap": min(runs) - vanilla,
                "wm_cost": statistics.median(costs) if costs else None,
            }
        )
    return table


def print_table(table: list[dict], label: str, release: str = "every-epoch") -> None:
    base = "vanilla on the same frozen head" if release == "once" else "vanilla"
    print(f"\nvariant: {label}, release {release}, against {base}")
    head = f"{'split':<5} {'dataset':<14} {'model':<5} {'ep':>3} {'tr':>3} {'vanilla':>8} "
    print(head + f"{'median':>8} {'worst':>8} {'gap med':>8} {'gap worst':>9}  ok  wm cost")
    for t in table:
        ok = t["median_gap"] >= -0.02 and t["worst_gap"] >= -0.04
        cost = "" if t["wm_cost"] is None else f"{t['wm_cost']:+8.4f}"
        print(
            f"{t['split']:<5} {t['dataset']:<14} {t['model']:<5} {t['epochs']:>3} "
            f"{t['trainers']:>3} {t['vanilla']:>8.4f} {t['median']:>8.4f} {t['worst']:>8.4f} "
            f"{t['median_gap']:>+8.4f} {t['worst_gap']:>+9.4f}  {'yes' if ok else 'NO ':<3} {cost}"
        )


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--models", nargs="+", default=["mlp"])
    ap.add_argument("--epochs", type=int, nargs="+", default=[5])
    ap.add_argument("--trainers", type=int, nargs="+", default=[3])
    ap.add_argument("--runs", type=int, default=3, help="clicooper runs per setting")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--subset", type=int, default=None, help="train/test samples to keep")
    ap.add_argument("--test", action="store_true", help="train on all of train, score test")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--set-both", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--pair-nowm", action="store_true", help="each run again, watermark off")
    ap.add_argument("--label", default="default", help="the variant's name")
    ap.add_argument("--no-vanilla", action="store_true", help="only clicooper runs")
    ap.add_argument(
        "--release",
        choices=("every-epoch", "once"),
        default="every-epoch",
        help="once: clicooper release once against vanilla on the same frozen head",
    )
    ap.add_argument(
        "--read-epochs",
        type=int,
        nargs="*",
        default=[],
        help="also print the table at these epochs, read from the runs' history",
    )
    ap.add_argument("--out", type=Path, default=None, help="JSON lines; a rerun resumes")
    args = ap.parse_args(argv)
    try:
        extra = parse_sets(args.set)
        both = parse_sets(args.set_both)
    except ValueError as exc:
        ap.error(str(exc))
    split = "test" if args.test else "val"
    release = {"privacy.release": "once"} if args.release == "once" else {}
    data = evaluation_data(args.dataset, args.seed, args.test, args.subset)
    rows = load_rows(args.out)
    done = {row_key(r) for r in rows}
    for setting, mode, index in grid_runs(args):
        row = {
            "split": split,
            "dataset": args.dataset,
            "setting": setting,
            "mode": mode,
            "label": args.label,
            "set": extra if mode == "clicooper" else {},
            "both": both,
            "run": index,
            "release": args.release,
        }
        if row_key(row) in done:
            continue
        extra_run = {**both, **release, **row["set"]}
        row.update(one_run(data, mode, setting, extra_run, args.pair_nowm))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out is not None:
            with args.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
    mine = rows_for(rows, args, split, both)
    table = summarise(mine, args.label)
    print_table(table, args.label, args.release)
    for epoch in args.read_epochs:
        print(f"\nread from the runs' history after epoch {epoch}:")
        print_table(summarise(at_epoch(mine, epoch), args.label), args.label, args.release)
    return table


def rows_for(
    rows: list[dict], args: argparse.Namespace, split: str, both: dict[str, Any]
) -> list[dict]:
    """The rows of this invocation's grid (the file may hold other grids and variants)."""
    wanted = {(s["model"], s["epochs"], s["trainers"]) for s, _, _ in grid_runs(args)} or {
        (m, e, t) for m in args.models for e in args.epochs for t in args.trainers
    }
    return [
        r
        for r in rows
        if r["split"] == split
        and r["dataset"] == args.dataset
        and (r["setting"]["model"], r["setting"]["epochs"], r["setting"]["trainers"]) in wanted
        and r["setting"]["seed"] == args.seed
        and r.get("both", {}) == both
        and r.get("release", "every-epoch") == args.release
        and (r["mode"] == "vanilla" or r["label"] == args.label)
    ]


if __name__ == "__main__":
    main()
