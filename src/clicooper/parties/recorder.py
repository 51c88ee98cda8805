"""What a party received, kept for the attack suite (opt-in).

An attack may use only what its party really saw. Each party records the
tensors it received (and the gradients it computed at its input) per step,
up to ``limit`` samples per epoch, and saves them as safetensors.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import save_file


class Recorder:
    """Per-epoch capped record of named tensors, keyed by step and micro-batch."""

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit
        self._counts: dict[int, int] = defaultdict(int)
        self.entries: dict[str, list[torch.Tensor]] = defaultdict(list)

    def wants(self, epoch: int) -> bool:
        return self.limit > 0 and self._counts[epoch] < self.limit

    def add(self, epoch: int, step: int, micro: int, **tensors: torch.Tensor) -> None:
        """Record ``tensors`` (first dimension = samples) for one micro-batch."""
        n = len(next(iter(tensors.values())))
        for name, value in tensors.items():
            self.entries[name].append(value.detach().to("cpu", copy=True))
        self.entries["epoch"].append(torch.full((n,), epoch, dtype=torch.long))
        self.entries["step"].append(torch.full((n,), step, dtype=torch.long))
        self.entries["micro"].append(torch.full((n,), micro, dtype=torch.long))
        self._counts[epoch] += n

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: torch.cat(parts) for name, parts in self.entries.items()}

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.tensors()
        if data:
            save_file(data, str(path))
