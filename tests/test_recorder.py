"""The recorder keeps each epoch's most recent samples, rows aligned across fields."""

from __future__ import annotations

import torch

from clicooper.parties.recorder import Recorder


def test_recorder_keeps_the_last_limit_samples_of_each_epoch() -> None:
    rec = Recorder(limit=10)
    for epoch in (1, 2):
        for step in range(10):
            x = torch.full((4, 3), float(100 * epoch + step))
            rec.add(epoch, step, 0, activation=x, gradient=-x)
    t = rec.tensors()
    # 12 rows per epoch: the last three 4-row batches (dropping one more would leave 8 < 10).
    assert t["step"].tolist() == [7] * 4 + [8] * 4 + [9] * 4 + [7] * 4 + [8] * 4 + [9] * 4
    assert t["epoch"].tolist() == [1] * 12 + [2] * 12
    assert torch.equal(t["activation"][:, 0], (100 * t["epoch"] + t["step"]).float())
    assert torch.equal(t["gradient"], -t["activation"])


def test_recorder_keeps_one_batch_larger_than_its_limit_and_records_nothing_at_zero() -> None:
    rec = Recorder(limit=2)
    rec.add(1, 0, 0, activation=torch.zeros(5, 2))
    assert len(rec.tensors()["activation"]) == 5
    off = Recorder(0)
    assert not off.wants(1) and off.tensors() == {}
