"""Shared fixtures: scikit-learn digits (8x8, pixels / 16 in [0, 1]) and small torch models."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: the models are tiny, and threads contend on a shared host."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Digits:
    """Digits split into the victim's training set, attacker auxiliary images and a test set."""

    x: torch.Tensor  # (1797, 1, 8, 8) in [0, 1]
    y: np.ndarray  # (1797,) int64
    train: torch.Tensor  # indices
    aux: torch.Tensor
    test: torch.Tensor


@pytest.fixture(scope="session")
def digits() -> Digits:
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return Digits(x, d.target.astype(np.int64), perm[:900], perm[900:1300], perm[1300:])


def linear_head() -> nn.Module:
    """The head used in the tests: Flatten -> Linear(64, 32) -> ReLU."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())


def conv_head() -> nn.Module:
    """A small conv head: Conv2d(1, 8, 3, padding=1) -> ReLU, output (8, 8, 8)."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())


def train_victim(
    digits: Digits,
    head_factory: Callable[[], nn.Module],
    targets: np.ndarray,
    n_out: int,
    seed: int,
) -> tuple[nn.Module, nn.Module]:
    """Train head + tail (Flatten -> Linear(., 32) -> ReLU -> Linear(32, n_out)) on digits."""
    torch.manual_seed(seed)
    head = head_factory()
    tail = nn.Sequential(nn.Flatten(), nn.LazyLinear(32), nn.ReLU(), nn.Linear(32, n_out))
    model = nn.Sequential(head, tail)
    model(digits.x[:2])
    t = torch.as_tensor(targets)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        for idx in digits.train.split(64):
            opt.zero_grad()
            F.cross_entropy(model(digits.x[idx]), t[idx]).backward()
            opt.step()
    return head.eval(), tail.eval()


@pytest.fixture(scope="session")
def heads() -> dict[str, Callable[[], nn.Module]]:
    """Head factories by name (fixtures, so test modules need not import conftest)."""
    return {"linear": linear_head, "conv": conv_head}


@pytest.fixture(scope="session")
def victim() -> Callable[..., tuple[nn.Module, nn.Module]]:
    """The victim trainer ``train_victim(digits, head_factory, targets, n_out, seed)``."""
    return train_victim
