import json

import pytest


def test_run_writes_results_and_exits_zero(tmp_path, cli_inprocess):
    out = tmp_path / "run"
    code, err, _ = cli_inprocess(
        "run",
        "--dataset",
        "digits",
        "--mode",
        "clicooper",
        "--trainers",
        "2",
        "--epochs",
        "1",
        "--seed",
        "1",
        "--out",
        str(out),
        "--model",
        "mlp",
        "--train-subset",
        "300",
        "--noise-multiplier",
        "0.2",
        "--label-mode",
        "keyed",
        "--gradient-noise",
        "0.5",
        "--gradient-clip",
        "2",
    )
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["seed"] == 1 and results["labels"]["mode"] == "keyed"
    assert results["privacy"]["noise_multiplier"] == 0.2
    grad = results["privacy"]["gradient"]
    assert grad["noise_multiplier"] == 0.5 and grad["clip_norm"] == 2.0 and grad["epsilon"] > 0
    assert "gradient noise, epsilon" in err and "0.5 (clip 2)" in err
    assert (out / "segments" / "t2.safetensors").exists()
    assert "test accuracy" in err
    # the summary shows who did the training work, as results.json counts it
    compute = results["compute"]
    assert set(compute["flops"]) == {"do", "t1", "t2"} and min(compute["flops"].values()) > 0
    assert set(compute["cpu_seconds"]) == {"do", "t1", "t2", "verifier"}
    assert f"{compute['owner_share']:.1%}" in err
    assert "owner share of training FLOPs" in err and "t2: FLOPs, CPU s" in err
    # what the run uses, printed before it trains: 300 samples -> the small-data batch
    assert "model mlp, 1 epochs, batch size 32, lr 0.003" in err


def test_config_file_and_flags_merge(tmp_path, cli_inprocess):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        'dataset = "digits"\nmodel = "mlp"\nepochs = 1\ntrain_subset = 200\n'
        "[labels]\nexpansion = 2\n"
    )
    out = tmp_path / "run"
    code, err, _ = cli_inprocess(
        "run", "--config", str(cfg), "--mode", "vanilla", "--out", str(out)
    )
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "vanilla" and results["config"]["labels"]["expansion"] == 2


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--epochs", "abc"], "--epochs"),
        (["--mode", "split"], "mode"),
        (["--trainers", "9"], "trainers"),
        (["--dataset", "nope"], "unknown dataset"),
        (["--noise-multiplier", "-1"], "noise_multiplier"),
        (["--label-mode", "random"], "labels.mode"),
        (["--no-such-flag"], "no-such-flag"),
        (["--config", "/nonexistent.toml"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, needle, tmp_path, cli_inprocess):
    code, err, _ = cli_inprocess("run", "--out", str(tmp_path / "x"), *args)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert needle in lines[0] and "Traceback" not in err
    assert not (tmp_path / "x").exists()  # nothing was started


def test_bad_toml_is_one_line(tmp_path, cli_inprocess):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("epochs = [unclosed\n")
    code, err, _ = cli_inprocess("run", "--config", str(cfg))
    assert code == 2 and "not valid TOML" in err
    cfg.write_text("unknown_setting = 1\n")
    code, err, _ = cli_inprocess("run", "--config", str(cfg))
    assert code == 2 and "unknown_setting" in err


def test_help_lists_commands(cli_inprocess):
    code, _, out = cli_inprocess("--help")
    assert code == 0 and "run" in out


def test_custom_model_example_runs(tmp_path, run_example):
    from clicooper.watermark.embed import WatermarkWarning

    out, caught = run_example("custom_model.py", tmp_path / "ex")
    acc = float(out.split("test accuracy ")[1].split(",")[0])
    # chance is 0.1; seven runs gave 0.731 to 0.913 (fresh owner secrets); a capacity
    # problem (256 bits on 1,280 weights) gave 0.560 to 0.607
    assert acc > 0.65
    assert "12 watermark stages, ledger verified" in out
    assert not [w for w in caught if issubclass(w.category, WatermarkWarning)]  # 64 bits fit
    assert (tmp_path / "ex" / "segments" / "t2.safetensors").exists()
