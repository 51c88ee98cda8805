"""Fixtures of the head-source tests (digits, 8x8)."""

from __future__ import annotations

import pytest
from head_helpers import head_config, preset_head
from torch import nn

from clicooper.data import Dataset


@pytest.fixture
def split_head(small_digits: Dataset) -> nn.Module:
    return preset_head(small_digits)


@pytest.fixture
def head_cfg():
    return head_config


@pytest.fixture
def fresh_head():
    return preset_head
