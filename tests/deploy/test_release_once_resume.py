"""Release once with real processes (issue 10, point 9).

`clicooper launch --release once`: t1, on its own node process, caches the owner's releases
in its party directory. After kill -9 of t1's node the session resumes from that cache: the
owner releases no record again (its own count per record, t1's files) and epsilon is
the one release's. (That launch trains exactly as the in-process run with the same owner
secret is tests/deploy/test_release_once_launch.py.)
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch
from conftest import alive, cli, launched_checkpoint, pids, wait_for
from safetensors.torch import load_file

from clicooper.privacy import accounting

FLAGS = ["--dataset", "digits", "--model", "mlp", "--trainers", "2", "--epochs", "2"]
FLAGS += ["--train-subset", "480", "--test-subset", "200", "--batch-size", "16"]
FLAGS += ["--release", "once", "--label-mode", "keyed", "--head-source", "random"]
STEPS = 2 * 480 // 16  # 60 steps, 30 per epoch


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def _cached_ids(run_dir: Path) -> torch.Tensor:
    files = sorted((run_dir / "parties" / "t1" / "releases").glob("chunk-*.safetensors"))
    return torch.cat([load_file(str(f))["ids"] for f in files])


def test_t1_killed_mid_training_resumes_from_its_cached_releases(tmp_path, procs, cli_inprocess):
    """The public head source with a 2-epoch warm start (and the public set replayed in
    every later epoch): the first 80 of the 480 images are public, so 400 records are
    released; t1 is killed in the epochs on the releases. Neither set is sent again, and
    the warm start is not trained again."""
    out = tmp_path / "run"
    (tmp_path / "wm.toml").write_text("[watermark]\nstrength = 0.01\n")
    flags = [*FLAGS, "--noise-multiplier", "0.5", "--checkpoint-steps", "5"]
    flags += ["--head-source", "public", "--warm-epochs", "2"]  # the later flag wins
    flags += ["--send-timeout", "3", "--step-timeout", "30"]
    argv = cli("launch", *flags, "--config", str(tmp_path / "wm.toml"), "--out", str(out))
    launcher = procs.start(argv, tmp_path / "launch.log")
    warm_steps, records = 2 * 80 // 16, 400
    steps = warm_steps + 2 * (records // 16 + 80 // 16)  # 10, then 25 + 5 (replay) per epoch
    ready = [launched_checkpoint(out, p, warm_steps + 10) for p in ("do", "t1", "t2", "verifier")]
    wait_for(lambda: all(check() for check in ready), 120, "training past the warm start")
    first = pids(out)["t1"]
    os.kill(first, signal.SIGKILL)  # in the first epoch on the releases
    assert launcher.wait(timeout=150) == 0, (tmp_path / "launch.log").read_text()[-3000:]

    assert pids(out)["t1"] != first and not alive(first)
    results = json.loads((out / "results.json").read_text())
    transport = results["transport"]
    assert transport["restarts"]["t1"] == 1 and len(transport["recoveries"]) == 1
    # the recovery rolled back to a checkpoint after the warm start: no public step twice
    assert transport["recoveries"][0]["resumed_from_step"] >= warm_steps
    assert transport["steps"] == steps and transport["steps_applied"] == {"t1": steps, "t2": steps}
    t1_log = (out / "logs" / "t1.log").read_text()
    assert "t1: set up (resumed)" in t1_log
    assert "1 release chunks and 1 public chunks read back" in t1_log
    # the owner released each record once, and did not send any again after the restart
    privacy = results["privacy"]
    assert privacy["release"] == "once" and privacy["resent_chunks"] == 0
    assert privacy["releases_per_record"] == {"min": 1, "max": 1, "records": records}
    public = privacy["public_set"]  # the public set, likewise sent once, never again
    assert public["resent_chunks"] == 0
    assert public["releases_per_record"] == {"min": 1, "max": 1, "records": 80}
    counts = load_file(str(out / "owner" / "releases.safetensors"))["counts"]
    assert torch.equal(counts, torch.ones(records, dtype=torch.int32))
    assert torch.equal(_cached_ids(out).sort().values, torch.arange(records))
    one = accounting.epsilon(0.5, 1, 1e-5)
    assert privacy["epsilon"] == one and privacy["releases"] == 1
    history = _history(out)
    assert len(history) == 2 + 2  # two warm-start epochs, then two on the releases
    assert [h["epsilon"] for h in history[2:]] == [one, one]  # unchanged by the recovery
    assert results["watermark"]["verified"]
    code, err, text = cli_inprocess("verify", str(out))
    assert code == 0 and "chain holds" in err + text
