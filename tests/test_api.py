"""The Python API: a model given as its segments, errors for bad ones, torch state restored."""

import pytest
import torch
from cc_helpers import quick_config
from torch import nn

import clicooper


def _segments(n_outputs):
    head = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
    return [head, nn.Sequential(nn.Linear(32, 32), nn.ReLU()), nn.Linear(32, n_outputs)]


def test_a_list_of_segments_trains_and_each_trainer_holds_its_own(tmp_path, small_digits):
    cfg = quick_config(mode="vanilla", trainers=2, epochs=10, lr=3e-3)
    session = clicooper.train(cfg, tmp_path, data=small_digits, model=_segments)
    assert session.results["accuracy"]["test"] > 0.5  # chance 0.1
    shapes = [tuple(t.segment.state_dict()["weight" if i else "0.weight"].shape)
              for i, t in enumerate(session.trainers)]  # fmt: skip
    assert shapes == [(32, 32), (10, 32)]


def test_batchnorm_in_a_trainer_segment_leaves_inference_out_of_its_weights(tmp_path, small_digits):
    """Inference runs a trainer's segment in eval mode: the test set neither uses batch
    statistics nor moves the running ones, so the committed segment is the final one."""

    def segments(n_outputs):
        head = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
        body = nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU())
        return [head, body, nn.Linear(32, n_outputs)]

    cfg = quick_config(mode="clicooper", trainers=2, epochs=2)
    cfg.watermark.bits = 32  # the marked tensors are small
    session = clicooper.train(cfg, tmp_path, data=small_digits, model=segments)
    assert session.results["watermark"]["verified"], session.results["watermark"]
    body = session.trainers[0].segment
    before = {k: v.clone() for k, v in body.state_dict().items()}
    first = session.owner.predict(small_digits.test.x[:7])
    second = session.owner.predict(small_digits.test.x[:7])
    assert body.training  # its mode is given back for the next training step
    assert all(torch.equal(before[k], v) for k, v in body.state_dict().items())
    assert torch.equal(first, second)  # running statistics, not the batch's


@pytest.mark.parametrize(
    "model,cuts,needle",
    [
        (lambda n: _segments(n)[:2], None, "needs 3 nn.Module entries"),
        (lambda n: [*_segments(n)[:2], "not a module"], None, "needs 3 nn.Module entries"),
        (_segments, [1, 2], "cuts apply to an nn.Sequential"),
        (lambda n: nn.Sequential(*_segments(n)), None, "with cuts=[...]"),
        (lambda n: nn.Sequential(*_segments(n)), [1], "one cut index per trainer"),
    ],
)
def test_bad_models_are_refused_before_the_run_directory_is_made(
    tmp_path, small_digits, model, cuts, needle
):
    cfg = quick_config(trainers=2)
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace(".", r"\.")):
        clicooper.train(cfg, tmp_path / "run", data=small_digits, model=model, cuts=cuts)
    assert not (tmp_path / "run").exists()


def test_train_restores_torch_threads_and_rng(tmp_path, small_digits):
    torch.set_num_threads(2)
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    cfg = quick_config(mode="vanilla", epochs=1, threads=1, seed=7)
    clicooper.train(cfg, tmp_path, data=small_digits)
    assert torch.get_num_threads() == 2
    assert torch.equal(torch.rand(3), expected)
    torch.set_num_threads(1)


def test_rgb_example_runs(tmp_path, run_example):
    out, _ = run_example("rgb_segments.py", tmp_path / "ex")
    assert "image shape (3, 32, 32)" in out
    acc = float(out.split("test accuracy ")[1].split(",")[0])
    assert acc > 0.6, out  # chance 0.25; eleven runs of 8 epochs reached 1.0 here
    assert "ledger verified" in out


def test_small_data_defaults_are_the_same_for_every_mode():
    """No hidden budget: digits' default epochs and model do not depend on the mode."""
    from clicooper.config import RunConfig

    got = {
        mode: (c.epochs, c.model, c.batch_size)
        for mode in ("centralized", "vanilla", "clicooper")
        for c in [RunConfig.load(None, dataset="digits", mode=mode)]
    }
    assert len(set(got.values())) == 1, got
    assert RunConfig.load(None, dataset="digits", epochs=5).epochs == 5  # a flag wins
