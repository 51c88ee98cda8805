"""history.jsonl reaches disk as each epoch ends, with epsilon so far; progress sees it."""

import json

import pytest
from cc_helpers import quick_config

from clicooper.privacy import accounting
from clicooper.runtime.session import run


class Watcher:
    """A progress callback that reads history.jsonl at the first batch of every epoch."""

    def __init__(self, path):
        self.path, self.seen, self.shown = path, {}, []

    def __call__(self, epoch, batch, batches, loss):
        if batch == 1:
            text = self.path.read_text() if self.path.exists() else ""
            self.seen[epoch] = [json.loads(line) for line in text.splitlines()]

    def epoch_done(self, entry):
        self.shown.append(entry)


@pytest.mark.parametrize("mode", ["clicooper", "centralized"])
def test_history_is_written_as_each_epoch_ends(tmp_path, mode):
    cfg = quick_config(mode=mode, epochs=3, watermark={"enabled": False})
    watcher = Watcher(tmp_path / "history.jsonl")
    session = run(cfg, tmp_path, progress=watcher)
    assert [len(watcher.seen[e]) for e in (1, 2, 3)] == [0, 1, 2]  # on disk before the next
    lines = [json.loads(x) for x in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3]
    for line, kept in zip(lines, session.results["history"], strict=True):
        assert line["test_accuracy"] == kept["test_accuracy"]
        assert {"loss", "train_accuracy", "seconds", "epsilon"} <= set(line)
    assert lines[0]["seconds"] <= lines[1]["seconds"] <= lines[2]["seconds"]
    assert [entry["epoch"] for entry in watcher.shown] == [1, 2, 3]
    if mode == "centralized":
        assert all(line["epsilon"] is None for line in lines)
    else:
        p, noise = cfg.privacy, session.results["privacy"]["noise_multiplier"]
        assert noise == 0.1  # unset: resolved by the training set's size (400 digits)
        expected = [accounting.epsilon(noise, e, p.delta) for e in (1, 2, 3)]
        assert [line["epsilon"] for line in lines] == pytest.approx(expected)
        assert lines[-1]["epsilon"] == pytest.approx(session.results["privacy"]["epsilon"])
