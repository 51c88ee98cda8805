"""CPU time of ``clicooper evaluate --dataset digits --quick`` against a plain training run.

The quick evaluation should take a few minutes on two idle cores (goal: under 180 CPU s of
its one-thread process). CPU seconds still depend on the host (a slower or shared core
spends more of them), so this prints, measured side by side in one run, the quick
evaluation's CPU seconds, those of one ``clicooper run --dataset digits --mode vanilla
--model cnn --epochs 15`` (the vanilla column's own training), and their ratio, which
carries from host to host better than either number.

    python benchmarks/quick_evaluation_time.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

GOAL_CPU_SECONDS = 180.0


def _cpu_seconds(argv: list[str]) -> tuple[float, float]:
    """CPU and wall seconds of one CLI call in this process."""
    from clicooper.cli import main as cli_main

    cpu, wall = time.process_time(), time.monotonic()
    with mock.patch.object(sys, "argv", ["clicooper", *argv]):
        try:
            cli_main.main()
        except SystemExit as exc:
            if exc.code:
                raise
    return time.process_time() - cpu, time.monotonic() - wall


def main() -> None:
    import torch

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="clicooper-quick-time-"))
    run = ["run", "--dataset", "digits", "--mode", "vanilla", "--model", "cnn"]
    ref_cpu, ref_wall = _cpu_seconds([*run, "--epochs", "15", "--out", str(root / "run")])
    evaluate = ["evaluate", "--dataset", "digits", "--quick", "--out", str(root / "eval")]
    quick_cpu, quick_wall = _cpu_seconds(evaluate)
    print(f"vanilla run (15 epochs): {ref_cpu:.1f} CPU s, {ref_wall:.1f} s wall")
    print(f"quick evaluation: {quick_cpu:.1f} CPU s, {quick_wall:.1f} s wall")
    verdict = "met" if quick_cpu < GOAL_CPU_SECONDS else "NOT met on this host"
    print(f"ratio quick evaluation / vanilla run: {quick_cpu / ref_cpu:.2f}")
    print(f"goal: under {GOAL_CPU_SECONDS:.0f} CPU s: {verdict}")


if __name__ == "__main__":
    main()
