"""Time to accuracy: vanilla and clicooper trained interleaved, epoch by epoch.

Both runs train in this process, taking turns: vanilla's epoch 1, clicooper's epoch 1,
vanilla's epoch 2, ... (each waits at its epoch end for the other's), so both see the
same machine load. After every epoch each is scored on a validation split carved
from the training data (20%, seeded; the test set is not used). The time of a run is
its driver's cumulative training seconds (steps and stage closes, not the scoring).
Prints, for each, the time to reach 95% of vanilla's final validation accuracy, and
the ratio clicooper / vanilla. Usage:

    python benchmarks/time_to_accuracy.py --dataset fashion-mnist --epochs 5 --subset 15000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

from equal_budget import evaluation_data, parse_sets

from clicooper.config import RunConfig
from clicooper.data.base import Dataset
from clicooper.runtime.session import run

TARGET_FRACTION = 0.95
#: Every run releases every epoch (release once, the large-data default, is frontier.py's)
EVERY = {"privacy.release": "every-epoch"}


class Turns:
    """Lets runs take turns an epoch at a time: ``wait(i)`` blocks until it is run i's."""

    def __init__(self, n: int) -> None:
        self.n, self.turn, self.finished = n, 0, set()
        self.cond = threading.Condition()
        self.order: list[tuple[int, int]] = []  # (run, epoch) as the epochs ended

    def wait(self, index: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == index)

    def done(self, index: int, finished: bool = False) -> None:
        """Run ``index`` ended an epoch (or the run): hand the turn to the next live run."""
        with self.cond:
            if finished:
                self.finished.add(index)
            for k in range(1, self.n + 1):
                nxt = (index + k) % self.n
                if nxt not in self.finished:
                    self.turn = nxt
                    break
            self.cond.notify_all()


class EpochGate:
    """A run's progress callback: records each epoch and passes the turn on."""

    def __init__(self, turns: Turns, index: int) -> None:
        self.turns, self.index = turns, index
        self.epochs: list[dict[str, Any]] = []

    def __call__(self, epoch: int, batch: int, batches: int, loss: float) -> None:
        """Per step: nothing (the driver calls this every step)."""

    def epoch_done(self, entry: dict[str, Any]) -> None:
        self.epochs.append(
            {"epoch": entry["epoch"], "val": entry["test_accuracy"], "seconds": entry["seconds"]}
        )
        self.turns.order.append((self.index, entry["epoch"]))
        self.turns.done(self.index)
        self.turns.wait(self.index)


def train_interleaved(
    data: Dataset, configs: list[RunConfig], turns: Turns | None = None
) -> list[list[dict[str, Any]]]:
    """Train ``configs`` taking turns an epoch at a time; each run's per-epoch records."""
    turns = turns or Turns(len(configs))
    gates = [EpochGate(turns, i) for i in range(len(configs))]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        turns.wait(i)  # a run starts (and draws its initial weights) only in its turn
        try:
            with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run(configs[i], Path(tmp), data=data, progress=gates[i])
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            turns.done(i, finished=True)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(configs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [g.epochs for g in gates]


def time_to(epochs: list[dict[str, Any]], target: float) -> float | None:
    """Training seconds at the first epoch whose validation accuracy reaches ``target``."""
    return next((e["seconds"] for e in epochs if e["val"] >= target), None)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--trainers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--subset", type=int, default=None, help="train/test samples to keep")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    try:
        extra = parse_sets(args.set)
    except ValueError as exc:
        ap.error(str(exc))
    data = evaluation_data(args.dataset, args.seed, test=False, subset=args.subset)
    common = {"model": args.model, "epochs": args.epochs, "trainers": args.trainers}
    configs = [
        RunConfig.load(None, dataset=data.name, mode="vanilla", seed=args.seed, **common, **EVERY),
        RunConfig.load(
            None,
            dataset=data.name,
            mode="clicooper",
            seed=args.seed,
            **common,
            **{**EVERY, **extra},
        ),
    ]
    vanilla, clicooper = train_interleaved(data, configs)
    target = TARGET_FRACTION * vanilla[-1]["val"]
    t_v, t_c = time_to(vanilla, target), time_to(clicooper, target)
    result = {
        "dataset": args.dataset, "subset": args.subset, **common, "target": target,
        "vanilla": vanilla, "clicooper": clicooper, "vanilla_seconds": t_v,
        "clicooper_seconds": t_c, "ratio": None if t_v is None or t_c is None else t_c / t_v,
    }  # fmt: skip
    print(json.dumps(result))
    print(f"\ntarget: {TARGET_FRACTION:.0%} of vanilla's final validation accuracy = {target:.4f}")
    print(f"{'epoch':>5} {'vanilla val':>11} {'s':>7} {'clicooper val':>13} {'s':>7}")
    for v, c in zip(vanilla, clicooper, strict=True):
        print(f"{v['epoch']:>5} {v['val']:>11.4f} {v['seconds']:>7.1f} {c['val']:>13.4f} "
              f"{c['seconds']:>7.1f}")  # fmt: skip
    shown = "not reached" if result["ratio"] is None else f"{result['ratio']:.2f}"
    print(f"time to target: vanilla {t_v} s, clicooper {t_c} s, ratio clicooper/vanilla {shown}")
    return result


if __name__ == "__main__":
    main()
