"""benchmarks/watermark_cost.py on tiny digits runs, and the watermark defaults it measured.

The defaults (B 128, the ``seal`` schedule, the seal's ``inputs`` metric, ridge 0.01)
were chosen on a validation split of full Fashion-MNIST (benchmarks/defaults_calibration.md,
README "Defaults at vanilla's budget"); the pins below make a change to any of them show.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from clicooper.config import RunConfig, WatermarkConfig
from clicooper.watermark.embed import DEFAULT_RIDGE, MIN_WEIGHTS_PER_BIT, capacity_note

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def watermark_cost():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # it imports equal_budget as a sibling
    try:
        spec = importlib.util.spec_from_file_location(
            "watermark_cost", ROOT / "benchmarks" / "watermark_cost.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_watermark_defaults_are_pinned() -> None:
    wm = WatermarkConfig()
    assert (wm.bits, wm.schedule, wm.seal_metric) == (128, "seal", "inputs")
    assert wm.seal_ridge == DEFAULT_RIDGE == 0.01
    assert wm.claim_p_value <= 1e-6


def test_the_smallest_marked_tensor_of_the_presets_fits_the_default_bits() -> None:
    """The last trainer's classifier (128 features x C*K pseudo-classes, K 2 by default) on
    10 classes: 2,560 weights, 20 a bit at B 128, no capacity warning; 256 bits got one."""
    cfg = RunConfig.load(None, dataset="digits")
    dim = 128 * 10 * cfg.labels.expansion
    assert dim == 2560 and dim >= MIN_WEIGHTS_PER_BIT * cfg.watermark.bits
    assert capacity_note("t2", dim, cfg.watermark.bits) is None
    assert capacity_note("t2", dim, 256) is not None


def test_pairs_verify_and_claims_survive_the_removal_attacks(watermark_cost, tmp_path, capsys):
    """Two pairs at the defaults (CNN, 2 trainers, the last one marking 2,560 weights with
    128 bits): every marked ledger verifies with BER 0, the unmarked twin is scored, and
    every claim holds (p <= 1e-6) after the evaluation's fine-tuning, pruning and
    overwriting on the first pair; a rerun resumes without training."""
    out = tmp_path / "wc.jsonl"
    argv = ["--subset", "300", "--epochs", "2", "--read-epochs", "1", "--pairs", "2"]
    argv += ["--attacks", "1", "--out", str(out)]
    summary = watermark_cost.main(argv)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["run"] for r in rows] == [0, 1]
    for r in rows:
        assert r["verified"] and r["max_ber"] == 0.0
        assert len(r["history"]) == len(r["history_nowm"]) == 2
        assert r["history_nowm"][-1] == r["accuracy_nowm"]
    after = rows[0]["after"]
    assert after["attacks"] == 1 + 3 + 3 + 2  # as is, fine-tune x3, prune x3, overwrite x2
    for party in ("t1", "t2"):
        assert after[party]["all_hold"] and after[party]["max_p"] <= 1e-6
    assert "after" not in rows[1]
    costs = [100 * (r["accuracy_nowm"] - r["accuracy"]) for r in rows]
    assert summary["2"]["max"] == pytest.approx(max(costs))
    assert summary["2"]["mean"] == pytest.approx(sum(costs) / 2)
    first = [100 * (r["history_nowm"][0] - r["history"][0]) for r in rows]
    assert summary["1"]["max"] == pytest.approx(max(first))
    printed = capsys.readouterr().out
    assert "ledgers verified 2/2" in printed and "read from the runs' history" in printed
    assert watermark_cost.main(argv) == summary  # resumed: nothing trained again
    assert len(out.read_text().splitlines()) == 2
