import json
import os
import stat

import pytest
import torch
from cc_helpers import quick_config
from safetensors.torch import load_file

from clicooper.runtime.session import run

REQUIRED = [
    "mode",
    "dataset",
    "seed",
    "accuracy.test",
    "accuracy.train",
    "privacy.epsilon",
    "privacy.delta",
    "privacy.noise_multiplier",
    "privacy.clip_norm",
    "labels.expansion",
    "labels.mode",
    "labels.pseudo_classes",
    "timing.train_seconds",
]


def _get(d, dotted):
    for part in dotted.split("."):
        d = d[part]
    return d


def test_vanilla_is_exactly_centralized_training(tmp_path, small_digits):
    # Split learning without defences is the same maths as one model: same seed, same result.
    central = run(quick_config(mode="centralized"), tmp_path / "c", data=small_digits)
    vanilla = run(quick_config(mode="vanilla"), tmp_path / "v", data=small_digits)
    assert central.results["accuracy"] == vanilla.results["accuracy"]
    for a, b in zip(central.model.parameters(), vanilla.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    for mode in ("c", "v"):  # no defence, so no gradient protection, in the same shape
        privacy = json.loads((tmp_path / mode / "results.json").read_text())["privacy"]
        assert privacy["gradient"] == {
            "noise_multiplier": 0.0,
            "clip_norm": None,
            "epsilon": None,
            "covers": None,
        }


def test_clicooper_run_directory(tmp_path, small_digits):
    out = tmp_path / "run"
    session = run(quick_config(trainers=3), out, data=small_digits)
    results = json.loads((out / "results.json").read_text())
    for key in REQUIRED:
        _get(results, key)
    # the default K = 2 pseudo-classes per class
    assert results["mode"] == "clicooper" and results["labels"]["pseudo_classes"] == 20
    assert results["privacy"]["epsilon"] > 0 and results["privacy"]["releases"] == 2
    assert 0.0 <= results["accuracy"]["test"] <= 1.0
    for name in ("t1", "t2", "t3"):
        assert stat.S_IMODE(os.stat(out / "segments" / f"{name}.safetensors").st_mode) == 0o600
        state = load_file(str(out / "segments" / f"{name}.safetensors"))
        live = session.trainers[int(name[1]) - 1].segment.state_dict()
        assert all(torch.equal(state[k], live[k]) for k in live)
    owner = out / "owner"
    assert stat.S_IMODE(os.stat(owner).st_mode) == 0o700
    for f in owner.iterdir():  # files 0600; checkpoints/ (always on in-process) 0700
        assert stat.S_IMODE(os.stat(f).st_mode) == (0o700 if f.is_dir() else 0o600)
    assert {"owner.secret", "head.safetensors"} <= {f.name for f in owner.iterdir()}


def test_clicooper_learns_on_digits(tmp_path, digits):
    # 10 epochs, as digits' defaults: at 6 the accuracy spread 0.79 to 0.91 over six runs
    # (the noise and watermark secrets are fresh each run); at 10, 0.953 to 0.981 over four
    cfg = quick_config(
        epochs=10,
        train_subset=None,
        test_subset=None,
        **{"privacy.noise_multiplier": 0.1, "labels.mode": "keyed"},
    )
    acc = run(cfg, tmp_path, data=digits).results["accuracy"]["test"]
    assert acc > 0.85


def test_micro_batches_give_the_same_training(tmp_path, small_digits):
    # SGD: the summed micro-batch gradients differ from the whole batch's only by float
    # rounding (7e-9 here). Adam divides by sqrt(v) and lifts that rounding, where a
    # gradient is near zero, to 9e-3 after 26 steps on some CPUs (AVX-512 here).
    kw = {"mode": "vanilla", "trainers": 3, "optimizer": "sgd"}
    whole = run(quick_config(**kw), tmp_path / "a", data=small_digits)
    piped = run(quick_config(micro_batches=4, **kw), tmp_path / "b", data=small_digits)
    for a, b in zip(whole.model.parameters(), piped.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_same_seed_reproduces_vanilla_and_another_seed_does_not(tmp_path, small_digits):
    a = run(quick_config(mode="vanilla", seed=3), tmp_path / "a", data=small_digits)
    b = run(quick_config(mode="vanilla", seed=3), tmp_path / "b", data=small_digits)
    c = run(quick_config(mode="vanilla", seed=4), tmp_path / "c", data=small_digits)
    pa, pb, pc = (next(s.model.parameters()) for s in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_clicooper_repeats_exactly_with_the_owner_secret_of_an_earlier_run(
    tmp_path, small_digits, cli_inprocess
):
    """Same seed and owner secret: same permutation and noise (no watermark: trainers'
    secrets are their own), so the same weights; a fresh secret gives other weights."""
    base = {"mode": "clicooper", "watermark.enabled": False}
    a = run(quick_config(**base), tmp_path / "a", data=small_digits)
    secret = tmp_path / "a" / "owner" / "owner.secret"
    b = run(quick_config(**base, owner_secret=secret), tmp_path / "b", data=small_digits)
    c = run(quick_config(**base), tmp_path / "c", data=small_digits)
    pa, pb, pc = (next(s.model.parameters()) for s in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert a.results["accuracy"] == b.results["accuracy"]
    assert (tmp_path / "b" / "owner" / "owner.secret").read_bytes() == secret.read_bytes()
    out = tmp_path / "d"
    code, err, _ = cli_inprocess("run", "--owner-secret", str(tmp_path / "nope"), "--out", str(out))
    assert code == 2 and "cannot read the owner secret" in err.splitlines()[-1]
    assert not out.exists()  # refused before anything was made


def test_target_epsilon_sets_the_noise(tmp_path, small_digits):
    res = run(quick_config(**{"privacy.target_epsilon": 5.0}), tmp_path, data=small_digits)
    assert res.results["privacy"]["epsilon"] <= 5.0
    assert res.results["privacy"]["epsilon"] > 4.9
    assert res.results["privacy"]["noise_multiplier"] > 1.0


@pytest.mark.parametrize("label_mode", ["keyed", "feature"])
def test_label_modes_and_decoys_run(tmp_path, small_digits, label_mode):
    cfg = quick_config(
        epochs=1, **{"labels.mode": label_mode, "labels.decoys": 5, "labels.expansion": 3}
    )
    res = run(cfg, tmp_path, data=small_digits).results
    assert res["labels"]["pseudo_classes"] == 35 and res["labels"]["mode"] == label_mode


def test_cnn_preset_and_laplace(tmp_path, small_digits):
    cfg = quick_config(model="cnn", epochs=1, **{"privacy.mechanism": "laplace"})
    res = run(cfg, tmp_path, data=small_digits).results
    assert res["privacy"]["mechanism"] == "laplace" and res["privacy"]["epsilon"] > 0


def test_existing_run_is_not_overwritten_without_consent(tmp_path, small_digits):
    run(quick_config(mode="vanilla", epochs=1), tmp_path, data=small_digits)
    before = (tmp_path / "results.json").read_text()
    with pytest.raises(ValueError, match="--overwrite"):
        run(quick_config(mode="vanilla", epochs=1), tmp_path, data=small_digits)
    assert (tmp_path / "results.json").read_text() == before  # nothing already done is lost
    run(quick_config(mode="vanilla", epochs=1, seed=5), tmp_path, data=small_digits, overwrite=True)
    assert json.loads((tmp_path / "results.json").read_text())["seed"] == 5


def test_batch_size_defaults_to_the_dataset_size(tmp_path, small_digits):
    cfg = quick_config(mode="vanilla", epochs=1, batch_size=None)
    assert cfg.effective_batch_size(400) == 32 and cfg.effective_batch_size(60_000) == 128
    res = run(cfg, tmp_path, data=small_digits).results
    assert res["config"]["batch_size"] == 32
