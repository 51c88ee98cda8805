"""Run directories: a fresh one per run, runs/latest, and no debris from a failed start."""

import json
import os

import pytest

from clicooper.runtime.rundirs import prepare_launch_dir, prepare_run_dir

FAST = ["--dataset", "digits", "--epochs", "1", "--train-subset", "200", "--test-subset", "50"]


def test_two_plain_runs_get_two_directories_and_latest_follows(
    tmp_path, monkeypatch, cli_inprocess
):
    monkeypatch.chdir(tmp_path)
    dirs = []
    for _ in range(2):
        code, err, _ = cli_inprocess("run", *FAST, "--mode", "vanilla")
        assert code == 0, err
        runs = sorted(p for p in (tmp_path / "runs").iterdir() if not p.is_symlink())
        dirs = runs
        assert f"run directory: {runs[-1].relative_to(tmp_path)}" in " ".join(err.split())
    assert len(dirs) == 2 and all("-vanilla" in d.name for d in dirs)
    latest = tmp_path / "runs" / "latest"
    assert latest.is_symlink() and latest.resolve() == dirs[-1].resolve()
    assert json.loads((latest / "results.json").read_text())["mode"] == "vanilla"


def test_a_bad_cut_leaves_nothing_that_blocks_the_corrected_command(tmp_path, cli_inprocess):
    out = tmp_path / "d"
    code, err, _ = cli_inprocess("run", *FAST, "--cut", "nope", "--out", str(out))
    assert code == 2 and "nope" in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())
    code, err, _ = cli_inprocess("run", *FAST, "--out", str(out))
    assert code == 0, err
    assert (out / "results.json").is_file()


def test_a_failed_fresh_run_leaves_no_empty_directory(tmp_path, monkeypatch, cli_inprocess):
    monkeypatch.chdir(tmp_path)
    code, err, _ = cli_inprocess("run", *FAST, "--cut", "nope")
    assert code == 2, err
    leftovers = [p for p in (tmp_path / "runs").iterdir()] if (tmp_path / "runs").exists() else []
    assert leftovers == []


def test_overwrite_keeps_the_old_run_when_the_new_one_fails_to_start(tmp_path, cli_inprocess):
    out = tmp_path / "d"
    assert cli_inprocess("run", *FAST, "--mode", "vanilla", "--out", str(out))[0] == 0
    before = (out / "results.json").read_bytes()
    code, _, _ = cli_inprocess("run", *FAST, "--cut", "nope", "--out", str(out), "--overwrite")
    assert code == 2
    assert (out / "results.json").read_bytes() == before


def test_evaluate_refuses_a_non_empty_out_without_overwrite(tmp_path, cli_inprocess):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "results.json").write_text("{}")
    code, err, _ = cli_inprocess("evaluate", "--dataset", "digits", "--out", str(out), "--quick")
    assert code == 2 and "--overwrite" in err
    assert (out / "results.json").read_text() == "{}"
    assert os.listdir(out) == ["results.json"]


def test_a_directory_holding_a_run_is_refused_and_replaced_only_when_told(tmp_path):
    run_dir = tmp_path / "r"
    (run_dir / "deploy" / "pool").mkdir(parents=True)  # a launched run's node state only
    (run_dir / "notes.txt").write_text("mine")
    prepare_run_dir(run_dir, overwrite=False)  # an in-process run does not own deploy/
    with pytest.raises(ValueError, match=r"already holds a run \(deploy\).*--overwrite"):
        prepare_launch_dir(run_dir, overwrite=False)
    (run_dir / "results.json").write_text("{}")
    with pytest.raises(ValueError, match=r"already holds a run \(results.json\)"):
        prepare_run_dir(run_dir, overwrite=False)
    prepare_launch_dir(run_dir, overwrite=True)
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]  # only the run's own
