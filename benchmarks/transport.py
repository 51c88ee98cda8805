"""Cost of real deployment: clicooper epochs in-process vs over gRPC with mutual TLS.

Trains the same clicooper session (3 trainers, same seed, data and model)
with every party in one process, and with each trainer and the verifier in
its own process on 127.0.0.1 over gRPC with TLS (``clicooper launch``),
without and with micro-batch pipelining. Prints the training time of each,
the ratios grpc/inprocess and grpc+pipelining/inprocess, and the bytes per
training sample on the wire (every party's sent bytes, per sample and epoch).
Goal: grpc with pipelining at most 1.5 x in-process.

Two micro-batches by default: the owner's CNN head is most of a step, so deeper
pipelining mostly adds messages (3 rounds each on Fashion-MNIST, 3 trainers:
4 micro-batches gave a median 1.67, 2 gave 1.42).

Every run shares one owner secret (the ``owner_secret`` setting), hence the label
permutation and the activation noise; only the trainers' watermark secrets differ.
So the test accuracies should agree (goal: within 0.5 points of in-process), and
every run's ledger must verify.

    python benchmarks/transport.py [--dataset fashion-mnist] [--train-subset 2000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings
from pathlib import Path

from clicooper.config import RunConfig
from clicooper.data import load_dataset
from clicooper.privacy.secrets import OwnerSecret
from clicooper.runtime.deploy.launcher import launch
from clicooper.runtime.session import run

warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--trainers", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--train-subset", type=int, default=None)
    ap.add_argument("--test-subset", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=1, help="interleaved rounds of the three")
    args = ap.parse_args()

    data = load_dataset(args.dataset, seed=0).limit(args.train_subset, args.test_subset, 0)
    base = RunConfig.load(
        None,
        dataset=args.dataset,
        model=args.model,
        trainers=args.trainers,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=0,
    )
    runs = {
        "inprocess": (base, run),
        "grpc": (base.model_copy(update={"transport": "grpc"}), launch),
        f"grpc+pipelining (micro_batches={args.micro_batches})": (
            base.model_copy(update={"transport": "grpc", "micro_batches": args.micro_batches}),
            launch,
        ),
    }
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    accuracy: dict[str, list[float]] = {name: [] for name in runs}
    per_sample: dict[str, float] = {}
    samples = len(data.train) * args.epochs
    print(
        f"clicooper on {data.name}: {len(data.train)} training samples, {args.epochs} epoch(s), "
        f"{args.trainers} trainers, model {args.model}, batch {args.batch_size}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        secret = OwnerSecret.generate().save(Path(tmp) / "owner")
        for repeat in range(args.repeats):
            for i, (name, (cfg, runner)) in enumerate(runs.items()):
                cfg = cfg.model_copy(update={"owner_secret": secret})
                results = runner(cfg, Path(tmp) / f"{repeat}-{i}", data=data).results
                seconds[name].append(results["timing"]["train_seconds"])
                per_sample[name] = results["transport"]["bytes_sent"] / samples
                accuracy[name].append(acc := results["accuracy"]["test"])
                verified = results["watermark"].get("verified")
                print(
                    f"  {name:38s} {seconds[name][-1]:8.2f} s   {per_sample[name]:10.0f} "
                    f"bytes/sample   test accuracy {acc:.4f}   ledger verified {verified}",
                    flush=True,
                )
    # Ratios within each round (its three runs ran back to back under the same load), then
    # the median over rounds: robust to load that changes between rounds.
    names = list(runs)
    for name, label, goal in ((names[1], "grpc", ""), (names[2], "grpc+pipelining", "1.5")):
        ratios = [t / c for t, c in zip(seconds[name], seconds["inprocess"], strict=True)]
        shown = ", ".join(f"{r:.2f}" for r in ratios)
        aim = f"  (goal <= {goal})" if goal else ""
        print(
            f"ratio {label}/inprocess: {statistics.median(ratios):.2f}  (per round: {shown}){aim}"
        )
    for name in names[1:]:
        gaps = [
            100 * abs(a - b) for a, b in zip(accuracy[name], accuracy["inprocess"], strict=True)
        ]
        shown = ", ".join(f"{g:.2f}" for g in gaps)
        print(f"accuracy gap {name} vs inprocess: {shown} points (goal <= 0.5)")


if __name__ == "__main__":
    main()
