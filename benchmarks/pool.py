"""Throughput of a pool: 1, 2, 4, 8 concurrent owners on 2 trainer nodes and a verifier node.

Starts a pool (``clicooper pool up``: every node its own process on 127.0.0.1), then for
each owner count k runs k owners at once (``clicooper run --pool``, each its own process,
each a different seed, same data and settings) and, unless ``--no-sequential``, the same
k sessions one after another. Prints per setting:

* aggregate samples per second, concurrent and sequential (training samples of all k
  sessions over the wall time from the first start to the last end), and their ratio.
  Each owner process loads its modules first and waits; the k of a setting are then
  released together (one at a time when sequential), so the interpreters' start-up
  (seconds each on 2 cores) is in neither figure;
* per-owner throughput (its samples over its own ``train_seconds``), max over min
  (goal at most 1.25);
* resident memory per session on each node (its peak RSS while the k sessions ran, less
  its RSS when idle, over k);
* the owners' share of CPU time (their ``train_cpu_seconds`` over theirs plus the nodes'
  CPU seconds meanwhile, from /proc).

Linux only (/proc). Numbers depend on the cores free: run it on an otherwise idle machine.

    python benchmarks/pool.py [--dataset fashion-mnist] [--owners 1,2,4,8] [--train-subset 6000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from clicooper.node.pool import Pool, pool_down, pool_up

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--owners", default="1,2,4,8", help="comma-separated owner counts")
    ap.add_argument("--trainers", type=int, default=2, help="trainers per session (= nodes)")
    ap.add_argument("--epochs", type=int, default=1)
    # 6,000: a session trains for about 12 s at 8 owners; at 2,000 (about 5 s) its fixed
    # costs (admission, set-up, the epoch's test and seal) decide the per-owner spread
    ap.add_argument("--train-subset", type=int, default=6000)
    ap.add_argument("--test-subset", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--no-sequential", action="store_true", help="skip the one-after-another runs")
    ap.add_argument("--out", type=Path, default=None, help="keep the pool and runs here")
    args = ap.parse_args()
    counts = [int(k) for k in args.owners.split(",")]
    root = args.out or Path(tempfile.mkdtemp(prefix="clicooper-pool-bench-"))
    pool = pool_up(root / "pool", args.trainers, capacity=max(counts))
    flags = [
        "--dataset", args.dataset, "--model", args.model, "--trainers", str(args.trainers),
        "--epochs", str(args.epochs), "--train-subset", str(args.train_subset),
        "--test-subset", str(args.test_subset), "--batch-size", str(args.batch_size),
    ]  # fmt: skip
    try:
        time.sleep(2.0)
        idle = {name: _rss(n.pid) for name, n in pool.nodes.items()}
        print(f"pool: {', '.join(pool.nodes)}; idle RSS MiB " + _mib(idle))
        print(
            "owners | samples/s concurrent | sequential | ratio | per-owner max/min | "
            "RSS MiB per session per node | owner CPU share"
        )
        for k in counts:
            conc = _setting(pool, root / f"c{k}", flags, k, concurrent=True)
            seq = None if args.no_sequential else _setting(pool, root / f"s{k}", flags, k, False)
            per_session = {n: (conc["peak"][n] - idle[n]) / k for n in idle}
            ratio = f"{conc['rate'] / seq['rate']:.2f}" if seq else "-"
            print(
                f"{k:6} | {conc['rate']:20.1f} | {seq['rate'] if seq else float('nan'):10.1f} | "
                f"{ratio:>5} | {conc['spread']:17.2f} | {_mib(per_session):28} | "
                f"{conc['owner_share']:.2f}"
            )
    finally:
        pool_down(Pool.load(root / "pool"))


def _setting(pool: Pool, out: Path, flags: list[str], k: int, concurrent: bool) -> dict:
    """Run k sessions (at once or in turn); their throughput, memory and CPU figures."""
    out.mkdir(parents=True)
    peak = {name: 0 for name in pool.nodes}
    cpu0 = {name: _cpu(n.pid) for name, n in pool.nodes.items()}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            for name, n in pool.nodes.items():
                peak[name] = max(peak[name], _rss(n.pid))

    sampler = threading.Thread(target=sample)
    sampler.start()
    argv = [
        [sys.executable, "-c", _OWNER, str(out / f"owner{i}.ready"), "run",
         "--pool", str(pool.root / "pool.toml"), *flags, "--seed", str(i),
         "--out", str(out / f"owner{i}")]
        for i in range(k)
    ]  # fmt: skip
    logs = [open(out / f"owner{i}.log", "wb") for i in range(k)]  # noqa: SIM115
    quiet = [{"stdout": log, "stderr": subprocess.STDOUT} for log in logs]
    wall, codes = 0.0, []
    batches = [list(range(k))] if concurrent else [[i] for i in range(k)]
    for batch in batches:  # at once: one batch of k; in turn: k batches of one
        procs = {i: subprocess.Popen(argv[i], stdin=subprocess.PIPE, **quiet[i]) for i in batch}
        _wait_ready([out / f"owner{i}.ready" for i in batch], procs)
        start = time.monotonic()
        for p in procs.values():  # released together, once every interpreter has loaded
            p.stdin.write(b"go\n")
            p.stdin.close()
        codes += [p.wait() for p in procs.values()]
        wall += time.monotonic() - start
    for log in logs:
        log.close()
    done.set()
    sampler.join()
    if any(codes):
        raise SystemExit(f"an owner failed (exit {codes}); see {out}")
    node_cpu = sum(_cpu(n.pid) - cpu0[name] for name, n in pool.nodes.items())
    results = [json.loads((out / f"owner{i}" / "results.json").read_text()) for i in range(k)]
    samples = [r["data"]["train"] * len(r["history"]) for r in results]
    rates = [s / r["timing"]["train_seconds"] for s, r in zip(samples, results, strict=True)]
    owner_cpu = sum(r["timing"]["train_cpu_seconds"] for r in results)
    for r in results:
        if r["watermark"].get("enabled") and not r["watermark"]["verified"]:
            raise SystemExit(f"a ledger did not verify: {r['watermark']['first_failure']}")
    return {
        "rate": sum(samples) / wall,
        "spread": max(rates) / min(rates),
        "peak": peak,
        "owner_share": owner_cpu / (owner_cpu + node_cpu),
    }


# An owner process: `clicooper <args>` once its imports are done and the benchmark says go.
# Eight interpreters importing torch at once on 2 cores take seconds each; started as they
# come, the first sessions would train alone while the last still load, which measures
# the start-up of Python, not the pool.
_OWNER = """
import sys
from pathlib import Path
import torch, clicooper.cli.main as cli, clicooper.node.owner, clicooper.runtime.session
Path(sys.argv[1]).write_text("ready")
sys.stdin.readline()
sys.argv = ["clicooper", *sys.argv[2:]]
cli.main()
"""


def _wait_ready(
    marks: list[Path], procs: dict[int, subprocess.Popen], timeout: float = 300
) -> None:
    deadline = time.monotonic() + timeout
    while not all(m.exists() for m in marks):
        if any(p.poll() is not None for p in procs.values()) or time.monotonic() > deadline:
            raise SystemExit(f"an owner process did not start; see {marks[0].parent}")
        time.sleep(0.05)


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def _mib(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v / 2**20:.0f}" for k, v in values.items())


if __name__ == "__main__":
    main()
