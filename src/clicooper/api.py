"""The Python API: bring your own model and dataset.

    import clicooper
    import torch
from torch import nn

    def model(n_outputs):                      # n_outputs: C, or M pseudo-classes
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(),
                             nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, n_outputs))

    data = clicooper.Dataset.from_arrays("mine", x_train, y_train, x_test, y_test)
    session = clicooper.train(clicooper.RunConfig(mode="clicooper", trainers=2),
                              "runs/mine", data=data, model=model, cuts=[2, 4])

``cuts[0]`` ends the data owner's head; each later index starts the next
trainer's segment (so ``len(cuts)`` must equal the number of trainers). The
model is built with the number of outputs the mode needs, since clicooper's
last trainer classifies pseudo-classes.

Or ``model`` returns the segments themselves, ``[head, t1, ..., tn]`` (any
``nn.Module`` each, the last ending in the classifier), and ``cuts`` is left out.

``train`` leaves torch's global state as it found it: the intra-op thread count
and the default generator's RNG state are restored when it returns or raises.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from clicooper.config import RunConfig
from clicooper.data import Dataset
from clicooper.models import SplitModel, split_sequential
from clicooper.models.assembly import ModelFactory
from clicooper.runtime.driver import ProgressFn
from clicooper.runtime.session import Session, run

ModelFn = Callable[[int], nn.Sequential | Sequence[nn.Module]]


def train(
    config: RunConfig,
    out_dir: str | Path,
    data: Dataset | None = None,
    model: ModelFn | None = None,
    cuts: Sequence[int] | None = None,
    progress: ProgressFn | None = None,
    overwrite: bool = False,
) -> Session:
    """Run ``config`` (optionally on your dataset and your model); see module doc."""
    factory = None if model is None else _factory(model, cuts, config.trainers)
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    try:
        return run(
            config,
            Path(out_dir),
            data=data,
            model_factory=factory,
            progress=progress,
            overwrite=overwrite,
        )
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)


def _factory(model: ModelFn, cuts: Sequence[int] | None, trainers: int) -> ModelFactory:
    """A model factory from a user's ``nn.Sequential`` and cut indices, or its segments."""

    def factory(n_outputs: int) -> SplitModel:
        built = model(n_outputs)
        if isinstance(built, nn.Sequential) and cuts is not None:
            if len(cuts) != trainers:
                raise ValueError(f"give one cut index per trainer ({trainers}), got {list(cuts)}")
            return split_sequential(built, cuts)
        if isinstance(built, nn.Sequential) or not isinstance(built, Sequence):
            raise ValueError(
                "model must return an nn.Sequential (with cuts=[...], one per trainer) "
                f"or a list [head, t1, ..., t{trainers}] of nn.Module segments"
            )
        if cuts is not None:
            raise ValueError("cuts apply to an nn.Sequential: leave them out for a segment list")
        parts = list(built)
        if len(parts) != trainers + 1 or not all(isinstance(p, nn.Module) for p in parts):
            raise ValueError(
                f"a segment list needs {trainers + 1} nn.Module entries (head, then one per "
                f"trainer), got {len(parts)}"
            )
        return SplitModel(parts[0], parts[1:])

    return factory
