"""Helpers shared by the tests (importable thanks to pytest's pythonpath setting)."""

from clicooper.config import RunConfig


def quick_config(**overrides: object) -> RunConfig:
    """A run small enough for unit tests: digits, MLP, two epochs."""
    base = {
        "dataset": "digits",
        "model": "mlp",
        "epochs": 2,
        "batch_size": 32,
        "train_subset": 400,
        "test_subset": 200,
    }
    base.update(overrides)
    return RunConfig.load(None, **base)
