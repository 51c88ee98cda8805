"""benchmarks/equal_budget.py on a tiny digits grid: one table, a validation split, resume."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from clicooper.config import ONCE_TARGET_EPSILON

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def equal_budget():
    return _load("equal_budget")


def test_validation_split_is_carved_from_train_and_disjoint(equal_budget):
    """The scored split is 20% of the training split; the test set is not used."""
    full = equal_budget.evaluation_data("digits", 0, test=True, subset=None)
    val = equal_budget.evaluation_data("digits", 0, test=False, subset=None)
    assert len(val.test) == round(0.2 * len(full.train))

    def rows(x):
        return sorted(tuple(r) for r in x.flatten(1).tolist())

    assert rows(torch.cat([val.train.x, val.test.x])) == rows(full.train.x)


def test_tiny_grid_prints_one_table_and_resumes(equal_budget, tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    argv = ["--subset", "200", "--epochs", "1", "--runs", "2", "--trainers", "1", "--out", str(out)]
    table = equal_budget.main(argv)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["mode"] for r in rows] == ["vanilla", "clicooper", "clicooper"]
    assert all(r["split"] == "val" for r in rows)
    assert all(r["verified"] and r["max_ber"] == 0.0 for r in rows[1:])  # the mark held
    (line,) = table
    accs = [r["accuracy"] for r in rows]
    assert line["vanilla"] == accs[0] and line["worst"] == min(accs[1:])
    assert line["median_gap"] == pytest.approx((accs[1] + accs[2]) / 2 - accs[0])
    assert "gap med" in capsys.readouterr().out
    assert equal_budget.main(argv) == table  # resumed: nothing trained again
    assert len(out.read_text().splitlines()) == 3


def test_release_once_grid_against_vanilla_on_the_frozen_head(equal_budget, tmp_path, capsys):
    """--release once: vanilla on the same frozen head and clicooper's release once, both at
    the same budget; --read-epochs reads epoch 1 from the 2-epoch runs, which is exactly
    the 1-epoch run (trained here again to check)."""
    out = tmp_path / "once.jsonl"
    short = ["--set-both", "chain.warm_epochs=1", "--set-both", "head.pretrain_epochs=1"]
    argv = ["--subset", "300", "--epochs", "2", "--runs", "1", "--trainers", "2", *short]
    table = equal_budget.main([*argv, "--release", "once", "--read-epochs", "1", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["mode"], r["release"]) for r in rows] == [("vanilla", "once"), ("clicooper", "once")]
    assert rows[0]["epsilon"] is None
    assert rows[1]["epsilon"] == pytest.approx(ONCE_TARGET_EPSILON, abs=0.01)
    assert all(r["history_exact"] and len(r["history"]) == 2 for r in rows)  # warm start left out
    assert table[0]["vanilla"] == rows[0]["accuracy"] == rows[0]["history"][-1]
    printed = capsys.readouterr().out
    assert "against vanilla on the same frozen head" in printed and "after epoch 1" in printed
    (one,) = equal_budget.summarise(equal_budget.at_epoch(rows, 1), "default")
    assert one["epochs"] == 1 and one["vanilla"] == rows[0]["history"][0]
    data = equal_budget.evaluation_data("digits", 0, test=False, subset=300)
    setting = {"model": "mlp", "epochs": 1, "trainers": 2, "seed": 0}
    extra = {"privacy.release": "once", "chain.warm_epochs": 1, "head.pretrain_epochs": 1}
    assert equal_budget.one_run(data, "vanilla", setting, extra)["accuracy"] == one["vanilla"]


def test_history_is_exact_only_when_nothing_depends_on_the_total_epochs(equal_budget):
    from clicooper.config import RunConfig

    def cfg(**kw):
        return RunConfig.load(None, dataset="digits", **kw)

    assert equal_budget.history_exact(cfg(**{"privacy.release": "once"})) is None
    assert equal_budget.history_exact(cfg(mode="vanilla")) is None
    assert "cosine" in equal_budget.history_exact(cfg(schedule="cosine"))
    assert "stage_steps" in equal_budget.history_exact(cfg(**{"watermark.stage_steps": 5}))
    assert "target_epsilon" in equal_budget.history_exact(cfg(**{"privacy.target_epsilon": 8}))
    row = {"setting": {"epochs": 3}, "accuracy": 0.9, "history": [0.5, 0.7, 0.9]}
    assert equal_budget.at_epoch([{**row, "history_exact": False}], 1) == []
    assert equal_budget.at_epoch([{**row, "history_exact": True}], 4) == []
    (read,) = equal_budget.at_epoch([{**row, "history_exact": True}], 2)
    assert read["accuracy"] == 0.7 and read["setting"]["epochs"] == 2


def test_bad_set_is_one_line_error(equal_budget, capsys):
    with pytest.raises(SystemExit) as exc:
        equal_budget.main(["--set", "watermark.strength"])
    assert exc.value.code == 2 and "use KEY=VALUE" in capsys.readouterr().err


@pytest.fixture(scope="module")
def time_to_accuracy():
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))  # it imports equal_budget as a sibling
    try:
        return _load("time_to_accuracy")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_interleaved_runs_take_turns_an_epoch_at_a_time(time_to_accuracy, equal_budget):
    from clicooper.config import RunConfig

    data = equal_budget.evaluation_data("digits", 0, test=False, subset=200)
    common = {"dataset": "digits", "model": "mlp", "epochs": 2, "trainers": 1}
    configs = [RunConfig.load(None, mode=m, **common) for m in ("vanilla", "clicooper")]
    turns = time_to_accuracy.Turns(2)
    vanilla, clicooper = time_to_accuracy.train_interleaved(data, configs, turns)
    assert turns.order == [(0, 1), (1, 1), (0, 2), (1, 2)]
    for epochs in (vanilla, clicooper):
        assert [e["epoch"] for e in epochs] == [1, 2]
        assert 0 < epochs[0]["seconds"] < epochs[1]["seconds"]
    assert time_to_accuracy.time_to(vanilla, 0.0) == vanilla[0]["seconds"]
    assert time_to_accuracy.time_to(vanilla, 1.01) is None


def test_pair_nowm_and_set_both(equal_budget, tmp_path):
    """--pair-nowm repeats each marked run unmarked; --set-both reaches vanilla and its key."""
    out = tmp_path / "rows.jsonl"
    argv = ["--subset", "200", "--epochs", "1", "--runs", "1", "--trainers", "1"]
    argv += ["--out", str(out), "--pair-nowm", "--set-both", "lr=0.002"]
    (line,) = equal_budget.main(argv)
    vanilla, marked = (json.loads(x) for x in out.read_text().splitlines())
    assert vanilla["both"] == marked["both"] == {"lr": 0.002} and "accuracy_nowm" not in vanilla
    assert 0 <= marked["accuracy_nowm"] <= 1 and marked["verified"]
    assert line["wm_cost"] == pytest.approx(marked["accuracy_nowm"] - marked["accuracy"])
    equal_budget.main([*argv[:-2], "--set-both", "lr=0.001"])  # another lr: vanilla again
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["mode"], r["both"]["lr"]) for r in rows[2:]] == [
        ("vanilla", 0.001),
        ("clicooper", 0.001),
    ]
