"""Shared fixtures: small real data (scikit-learn digits) and quick configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from clicooper.data import Dataset, load_dataset

# The slowest files (measured with --durations), slowest first. With `--dist loadfile
# --no-loadscope-reorder` (scripts/test.sh) a file runs whole on one worker, in this order:
# started last, the quick evaluation's module fixture (minutes) or a file of process-killing
# runs would leave the other worker idle at the end. (xdist's default reorder puts the
# files with the most tests first, which puts these, with few tests each, last.)
SLOWEST_FIRST = (
    "evaluation/test_evaluate_quick.py",
    "deploy/test_deploy_resume.py",
    "deploy/test_release_once_resume.py",
    "attacks/test_attack_extraction.py",
    "deploy/test_deploy_launch.py",
    "deploy/test_pool.py",
    "attacks/test_attack_inversion.py",
    "test_api.py",
    "test_cli_and_example.py",
    "grpc/test_grpc_fuzz.py",
    "test_chain_integration.py",
    "deploy/test_node_faults.py",
    "test_session.py",
    "deploy/test_release_once_launch.py",
    "deploy/test_resume_inprocess.py",
    "test_compute.py",
    "watermark/test_tampered_run.py",
    "attacks/test_attack_clustering.py",
    "deploy/test_default_release.py",
    "attacks/test_watermark_removal.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The files of :data:`SLOWEST_FIRST` first, in that order; the rest as collected."""
    root = Path(__file__).parent

    def rank(item: pytest.Item) -> int:
        try:
            name = item.path.relative_to(root).as_posix()
        except ValueError:
            return len(SLOWEST_FIRST)
        return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file is kept


# Two pytest-xdist workers share the two cores: one torch thread each (oversubscribed
# threads spin); a lone run may use both.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(scope="session")
def digits() -> Dataset:
    return load_dataset("digits", seed=0)


@pytest.fixture
def small_digits(digits: Dataset) -> Dataset:
    return digits.limit(400, 200, seed=0)


@pytest.fixture
def run_example(monkeypatch, capsys):
    """Run ``examples/<name>`` as ``python examples/<name> OUT`` does, in this process (a
    fresh interpreter spends seconds importing torch); returns (stdout, warnings raised)."""
    import runpy
    import warnings

    def call(name: str, out: Path) -> tuple[str, list[warnings.WarningMessage]]:
        path = Path(__file__).resolve().parents[1] / "examples" / name
        monkeypatch.setattr("sys.argv", [str(path), str(out)])
        capsys.readouterr()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runpy.run_path(str(path), run_name="__main__")
        return capsys.readouterr().out, caught

    return call


@pytest.fixture
def cli_inprocess(monkeypatch, capsys):
    """Run the real entry point in this process; returns (exit status, stderr, stdout)."""
    from clicooper.cli import main as cli_main

    def call(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr("sys.argv", ["clicooper", *args])
        monkeypatch.setattr(cli_main.console, "width", 300)  # keep one line on narrow terminals
        capsys.readouterr()
        try:
            cli_main.main()
        except SystemExit as exc:
            captured = capsys.readouterr()
            return int(exc.code or 0), captured.err, captured.out
        captured = capsys.readouterr()
        return 0, captured.err, captured.out

    return call
