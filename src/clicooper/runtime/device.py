"""Which torch device each party computes on (``device`` and ``devices`` settings).

Every party resolves its own setting in its own process: ``auto`` is CUDA when torch
sees a GPU, else Apple's MPS when available, else the CPU. A named device that this
process cannot use is a one-line :class:`~clicooper.config.ConfigError`, raised before
anything is written.

The device stops at the party boundary. A party moves what it receives to its device
(``tensor.to(device)``) and every tensor it sends is encoded from a CPU copy
(:func:`clicooper.common.serde.encode_tensors`), so messages, checkpoints, the ledger,
segment hashes and ``verify`` never see a device.
"""

from __future__ import annotations

import re

import torch

from clicooper.config import ConfigError, RunConfig

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d{1,2})?)$")


def valid_device(name: str) -> str:
    """``name`` if it is a device setting; ValueError listing the choices otherwise."""
    if not isinstance(name, str) or not _PATTERN.fullmatch(name):
        raise ValueError(f"unknown device {name!r}: choose {', '.join(DEVICE_CHOICES)}")
    return name


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str) -> torch.device:
    """The torch device a setting names here; ConfigError (one line) if unavailable."""
    valid_device(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU build of torch" if torch.version.cuda is None else "no GPU visible"
            raise ConfigError(
                f"device {name} is not available here ({build}): use --device cpu or auto, "
                "or install a CUDA build of torch (see the README)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name} does not exist: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s) (cuda:0 ..)"
            )
    if device.type == "mps" and not _mps_available():
        raise ConfigError(f"device {name} is not available here: use --device cpu or auto")
    return device


def party_device(cfg: RunConfig, party: str) -> torch.device:
    """Party ``party``'s device: its entry in ``devices``, else ``device``."""
    return resolve_device(cfg.devices.get(party, cfg.device))


def party_devices(cfg: RunConfig, parties: list[str]) -> dict[str, torch.device]:
    """The devices of ``parties`` (all in this process), each checked here."""
    return {party: party_device(cfg, party) for party in parties}
