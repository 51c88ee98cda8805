"""Cost of real deployment: clicooper epochs in-process vs over gRPC with mutual TLS.

Trains the same clicooper session (3 trainers, same seed, data and model)
with every party in one process, and with each trainer and the verifier in
its own process on 127.0.0.1 over gRPC with TLS (``clicooper launch``),
without and with micro-batch pipelining. Prints the training time of each,
the ratios grpc/inprocess and grpc+pipelining/inprocess, and the bytes per
training sample on the wire (every party's sent bytes, per sample and epoch).
Goals (issue 13): grpc at most 1.3 x in-process; pipelining never slower than none.

Over gRPC the owner measures whether pipelining pays (clicooper.parties.pipelining):
with the ``cnn`` preset its head is most of a step and the chain's work is small, so
there is little to overlap and the extra messages would cost more than they save.
The *owner-light* setting (``--light-model``, default ``cnn-light``: the owner keeps a
cheap stem, t1 runs the heavy body; ``--light-release once``: release once, the
frozen head's single release, so the owner computes no head pass in training) is where
the chain has work to overlap; it is run in-process and over gRPC with pipelining.
Goal: grpc+pipelining/in-process at most 1.2 there.

Per run it also prints the owner's share of the training time on its own CPU (the
rest the owner waits: for the chain, the wire and the machine's other processes).

Every run shares one owner secret (the ``owner_secret`` setting), hence the label
permutation and the activation noise; only the trainers' watermark secrets differ.
So the test accuracies should agree (goal: within 0.5 points of in-process), and
every run's ledger must verify.

    python benchmarks/transport.py [--dataset fashion-mnist] [--train-subset 2000]
        [--light-model cnn-light] [--light-release every-epoch|once] [--no-light]
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
    ap.add_argument("--repeats", type=int, default=1, help="interleaved rounds of the runs")
    ap.add_argument("--light-model", default="cnn-light", help="preset of the owner-light runs")
    ap.add_argument(
        "--light-release",
        default="every-epoch",
        choices=("every-epoch", "once"),
        help="privacy.release of the owner-light runs (once: no head pass in training)",
    )
    ap.add_argument("--lr", type=float, default=None, help="learning rate (--lr 1e-3 with once)")
    ap.add_argument("--no-light", action="store_true", help="skip the owner-light runs")
    args = ap.parse_args()

    data = load_dataset(args.dataset, seed=0).limit(args.train_subset, args.test_subset, 0)
    settings = dict(
        dataset=args.dataset,
        trainers=args.trainers,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=0,
    )
    base = RunConfig.load(None, model=args.model, **settings)
    piped = {"transport": "grpc", "micro_batches": args.micro_batches}
    runs = {
        "inprocess": (base, run),
        "grpc": (base.model_copy(update={"transport": "grpc"}), launch),
        f"grpc+pipelining (micro_batches={args.micro_batches})": (
            base.model_copy(update=piped),
            launch,
        ),
    }
    light_name = f"{args.light_model}, release {args.light_release}"
    if not args.no_light:
        light = RunConfig.load(
            None, model=args.light_model, **{"privacy.release": args.light_release}, **settings
        )
        runs[f"inprocess ({light_name})"] = (light, run)
        runs[f"grpc+pipelining ({light_name})"] = (light.model_copy(update=piped), launch)
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
                timing = results["timing"]
                seconds[name].append(timing["train_seconds"])
                per_sample[name] = results["transport"]["bytes_sent"] / samples
                accuracy[name].append(acc := results["accuracy"]["test"])
                verified = results["watermark"].get("verified")
                own = timing["train_cpu_seconds"] / timing["train_seconds"]
                used = results["transport"].get("micro_batches", {})  # steps per count
                print(
                    f"  {name:52s} {seconds[name][-1]:7.2f} s  owner cpu {100 * own:3.0f}%  "
                    f"{per_sample[name]:7.0f} bytes/sample  test accuracy {acc:.4f}  "
                    f"ledger verified {verified}  steps per micro-batch count {used}",
                    flush=True,
                )
    # Ratios within each round (its three runs ran back to back under the same load), then
    # the median over rounds: robust to load that changes between rounds.
    names = list(runs)
    ratios = [
        (names[1], names[0], "grpc/inprocess", "1.3"),
        (names[2], names[1], "grpc+pipelining/grpc", "1.0"),
        (names[2], names[0], "grpc+pipelining/inprocess", ""),
    ]
    if not args.no_light:
        ratios.append((names[4], names[3], f"grpc+pipelining/inprocess ({light_name})", "1.2"))
    for name, against, label, goal in ratios:
        shown = [t / c for t, c in zip(seconds[name], seconds[against], strict=True)]
        rounds = ", ".join(f"{r:.2f}" for r in shown)
        aim = f"  (goal <= {goal})" if goal else ""
        print(f"ratio {label}: {statistics.median(shown):.2f}  (per round: {rounds}){aim}")
    pairs = [(name, names[0]) for name in names[1:3]]
    if not args.no_light:
        pairs.append((names[4], names[3]))
    for name, against in pairs:
        gaps = [100 * abs(a - b) for a, b in zip(accuracy[name], accuracy[against], strict=True)]
        shown = ", ".join(f"{g:.2f}" for g in gaps)
        print(f"accuracy gap {name} vs {against}: {shown} points (goal <= 0.5)")


if __name__ == "__main__":
    main()
