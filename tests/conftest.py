"""Shared fixtures: small real data (scikit-learn digits) and quick configs."""

from __future__ import annotations

import os

import pytest
import torch

from clicooper.data import Dataset, load_dataset

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
