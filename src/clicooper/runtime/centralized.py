"""The centralized baseline: one ordinary model trained by the owner alone.

Same architecture, seed, data and batch order as the split modes, so accuracies and
times compare directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from clicooper.common.modes import inference
from clicooper.config import RunConfig
from clicooper.data import Dataset
from clicooper.models.assembly import ModelFactory
from clicooper.parties.data_owner import epoch_batches
from clicooper.runtime import compute
from clicooper.runtime.driver import ProgressFn
from clicooper.runtime.optim import OptimSettings, make_optimizer, run_steps


def run_centralized(
    cfg: RunConfig,
    data: Dataset,
    factory: ModelFactory,
    progress: ProgressFn | None,
    on_epoch: Callable[[list[dict[str, Any]]], None],
    device: torch.device,
) -> tuple[dict[str, Any], nn.Module]:
    """Train ``factory``'s whole model on ``device``; its results and the model (on the CPU).

    Reports like a split run: per-epoch history through ``on_epoch``, timing and the
    owner's compute (the owner alone trains)."""
    model = factory(data.num_classes).full().to(device)
    settings = OptimSettings.from_config(cfg, run_steps(cfg, len(data.train)))
    optimizer, scheduler = make_optimizer(model.parameters(), settings, "do")
    history, train_seconds, train_cpu_seconds = [], 0.0, 0.0
    meter = compute.ComputeMeter()  # the owner alone trains
    for epoch in range(1, cfg.epochs + 1):
        start, cpu = time.perf_counter(), time.process_time()
        batches = epoch_batches(len(data.train), epoch, cfg.batch_size, cfg.seed)
        total, correct = 0.0, 0
        for b, ids in enumerate(batches):
            with meter.active(), meter.count(("step", len(ids))):
                y = data.train.y[ids].to(device)
                logits = model(data.train.x[ids].to(device))
                loss = nn.functional.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
            total += loss.item() * len(ids)
            correct += int((logits.argmax(1) == y).sum())
            if progress:
                progress(epoch, b + 1, len(batches), loss.item())
        train_seconds += time.perf_counter() - start
        train_cpu_seconds += time.process_time() - cpu
        with inference(model), meter.active(), meter.count(("infer", len(data.test)), "infer"):
            predicted = model(data.test.x.to(device)).argmax(1).cpu()
            test_acc = float((predicted == data.test.y).float().mean())
        history.append(
            {
                "epoch": epoch,
                "loss": total / len(data.train),
                "train_accuracy": correct / len(data.train),
                "test_accuracy": test_acc,
                "seconds": train_seconds,
            }
        )
        on_epoch(history)
    results = {
        "accuracy": {"test": history[-1]["test_accuracy"], "train": history[-1]["train_accuracy"]},
        "history": history,
        "timing": {"train_seconds": train_seconds, "train_cpu_seconds": train_cpu_seconds},
        "compute": compute.summary({"do": meter.report()}),
    }
    return results, model.cpu()
