"""The Python API: bring your own model and dataset.

    import clicooper
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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from torch import nn

from clicooper.config import RunConfig
from clicooper.data import Dataset
from clicooper.models import SplitModel, split_sequential
from clicooper.runtime.session import ProgressFn, Session, run


def train(
    config: RunConfig,
    out_dir: str | Path,
    data: Dataset | None = None,
    model: Callable[[int], nn.Sequential] | None = None,
    cuts: Sequence[int] | None = None,
    progress: ProgressFn | None = None,
    overwrite: bool = False,
) -> Session:
    """Run ``config`` (optionally on your dataset and your ``nn.Sequential``); see module doc."""
    factory = None
    if model is not None:
        if cuts is None or len(cuts) != config.trainers:
            raise ValueError(f"give one cut index per trainer ({config.trainers}), got {cuts}")

        def factory(n_outputs: int) -> SplitModel:
            return split_sequential(model(n_outputs), cuts)

    return run(
        config,
        Path(out_dir),
        data=data,
        model_factory=factory,
        progress=progress,
        overwrite=overwrite,
    )
