"""`clicooper launch --release once` with the default head source (issue 10, point 9):
the public head, the chain's warm start on the public split and the denoised releases,
every trainer and the verifier in its own process, train exactly as the in-process run
with the same owner secret (accuracy within 0.5 points, here to the last test image).
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import cli

FLAGS = ["--dataset", "digits", "--model", "mlp", "--trainers", "2", "--epochs", "2"]
FLAGS += ["--train-subset", "480", "--test-subset", "200", "--batch-size", "32"]
FLAGS += ["--release", "once", "--label-mode", "keyed", "--warm-epochs", "2"]
FLAGS += ["--target-epsilon", "8", "--expansion", "1", "--lr", "0.01", "--no-watermark"]
FLAGS += ["--config"]  # watermark keys are fresh in every run: marks differ, and so would steps


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def test_launch_with_the_default_head_source_matches_the_inprocess_run(
    tmp_path, procs, cli_inprocess
):
    config = tmp_path / "small.toml"
    config.write_text("[head]\npretrain_epochs = 5\n")
    flags = [*FLAGS, str(config)]
    local = tmp_path / "local"
    code, err, _ = cli_inprocess("run", *flags, "--out", str(local))
    assert code == 0, err
    out = tmp_path / "launched"
    argv = cli("launch", *flags, "--owner-secret", str(local / "owner" / "owner.secret"))
    launcher = procs.start([*argv, "--out", str(out)], tmp_path / "launch.log")
    assert launcher.wait(timeout=150) == 0, (tmp_path / "launch.log").read_text()[-3000:]
    a = json.loads((local / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    assert b["transport"]["name"] == "grpc" and a["privacy"]["head"]["source"] == "public"
    history_a, history_b = _history(local), _history(out)
    assert [h.get("phase") for h in history_b] == ["public", "public", None, None]
    for x, y in zip(history_a, history_b, strict=True):
        assert abs(x["test_accuracy"] - y["test_accuracy"]) <= 0.005  # within half a point
        assert abs(x["loss"] - y["loss"]) <= 1e-6
    assert abs(a["accuracy"]["test"] - b["accuracy"]["test"]) <= 0.005
    # it learns (10 classes; a 80-image public split and 2 epochs: 0.24 measured)
    assert a["accuracy"]["test"] > 0.15 and history_a[1]["loss"] < history_a[0]["loss"]
    assert a["privacy"]["epsilon"] == b["privacy"]["epsilon"] <= 8.0
    assert b["privacy"]["releases_per_record"]["max"] == 1
    assert a["readouts"]["ncm"] == b["readouts"]["ncm"]  # the same releases
    # the trainers' processes did the warm start: t1 holds the public set, and its FLOPs
    assert (out / "parties" / "t1" / "releases" / "public").is_dir()
    assert b["compute"]["head_pretrain"]["credited_to"] == "t1"
    assert b["compute"]["flops"]["t1"] > b["compute"]["head_pretrain"]["flops"]
