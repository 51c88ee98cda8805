"""Helpers shared by the tests (importable thanks to pytest's pythonpath setting)."""

from collections import defaultdict

from clicooper.config import RunConfig
from clicooper.runtime.transport.inprocess import InProcessTransport


class SpyTransport(InProcessTransport):
    """The in-process transport, keeping every message sent, by receiver."""

    def __init__(self):
        super().__init__()
        self.delivered = defaultdict(list)

    def send(self, msg):
        self.delivered[msg.receiver].append(msg)
        super().send(msg)


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
