"""Every party's optimizer and learning-rate schedule, from the run's settings.

Each party (the data owner's head, each trainer's segment, the centralized model)
calls :func:`make_optimizer` and steps its scheduler once after each optimizer step,
so all parties follow the same schedule over the run's ``total_steps``. The schedule
is a closed form of the step count ``k`` (:func:`lr_factor`): a checkpoint that holds
the optimizer's ``param_groups`` and the scheduler's ``last_epoch`` restores it
exactly (:mod:`clicooper.runtime.checkpoint`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.optim.lr_scheduler import LambdaLR

if TYPE_CHECKING:
    from clicooper.config import RunConfig

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "step")


@dataclass(frozen=True)
class OptimSettings:
    """What :func:`make_optimizer` needs: the optimizer settings and the run's length.

    ``lr_per_party`` overrides ``lr`` for the parties it names (``do``, ``t1`` ..);
    ``weight_decay`` None is the optimizer's own default (AdamW 0.01, else 0).
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    lr_per_party: dict[str, float] = field(default_factory=dict)
    momentum: float = 0.9
    weight_decay: float | None = None
    schedule: str = "constant"
    warmup_steps: int = 0
    decay_steps: int | None = None
    decay_gamma: float = 0.1
    total_steps: int = 1
    # release once with a warm start: after ``phase_steps`` steps (the public epochs) every
    # factor is multiplied by ``phase_factor`` (chain.release_lr_factor)
    phase_steps: int = 0
    phase_factor: float = 1.0
    # and the optimizer's state (Adam's moments) is dropped at that switch
    # (chain.fresh_optimizer): see :func:`phase_reset_step`
    phase_reset: bool = False

    @classmethod
    def from_config(cls, cfg: RunConfig, total_steps: int, phase_steps: int = 0) -> OptimSettings:
        """The settings of ``cfg`` for a run of ``total_steps`` optimizer steps, the first
        ``phase_steps`` of them a warm start on public data (release once)."""
        return cls(
            phase_steps=max(0, int(phase_steps)),
            phase_factor=cfg.chain.release_lr_factor if phase_steps else 1.0,
            phase_reset=cfg.chain.fresh_optimizer and phase_steps > 0,
            optimizer=cfg.optimizer,
            lr=cfg.lr,
            lr_per_party=dict(cfg.lr_per_party),
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            schedule=cfg.schedule,
            warmup_steps=cfg.warmup_steps,
            decay_steps=cfg.decay_steps,
            decay_gamma=cfg.decay_gamma,
            total_steps=max(1, int(total_steps)),
        )

    def party_lr(self, party: str) -> float:
        """The base learning rate of ``party``."""
        return float(self.lr_per_party.get(party, self.lr))


def run_steps(cfg: RunConfig, n_train: int) -> int:
    """Optimizer steps of the whole run: epochs x batches per epoch."""
    return cfg.epochs * math.ceil(n_train / cfg.effective_batch_size(n_train))


def phase_reset_step(settings: OptimSettings | float) -> int:
    """The step after which a party drops its optimizer's state (0: never): the last step
    of a release-once warm start, with ``phase_reset``.

    Why: Adam divides each step by the root of its running mean of squared gradients,
    which after the warm start is that of the clean public activations' gradients; the
    noisy releases' gradients are far larger, and until the mean (time constant 1/(1 -
    beta2) = 1,000 steps) catches up, every step is that many times the lr. A fresh state
    starts the releases' steps at the lr (bias-corrected moments of their own gradients).
    """
    if isinstance(settings, OptimSettings) and settings.phase_reset:
        return settings.phase_steps
    return 0


def make_optimizer(
    params: Iterable[torch.nn.Parameter], settings: OptimSettings | float, party: str
) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """``(optimizer, scheduler)`` of ``party``; a bare float is Adam at that constant lr.

    ValueError naming the choices for an unknown optimizer or schedule (the config
    refuses them first; this guards direct API use).
    """
    if not isinstance(settings, OptimSettings):
        settings = OptimSettings(lr=float(settings))
    lr = settings.party_lr(party)
    decay = {} if settings.weight_decay is None else {"weight_decay": settings.weight_decay}
    if settings.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, **decay)
    elif settings.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=lr, **decay)
    elif settings.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr, momentum=settings.momentum, **decay)
    else:
        raise ValueError(
            f"unknown optimizer {settings.optimizer!r}: choose {', '.join(OPTIMIZERS)}"
        )
    return optimizer, LambdaLR(optimizer, lr_factor(settings))


def lr_factor(settings: OptimSettings) -> Callable[[int], float]:
    """The multiplier of the base lr after ``k`` optimizer steps (the lr of step ``k + 1``).

    Warm-up: ``(k + 1) / W`` for ``k < W``. Then, with ``p = (k - W) / (T - W)``:
    ``constant`` 1; ``cosine`` ``(1 + cos(pi p)) / 2`` (from 1 to 0 at the run's end);
    ``step`` ``gamma ** floor((k - W) / S)`` with ``S = decay_steps`` (default a third
    of the steps after warm-up, so the lr drops twice). From step ``phase_steps`` on
    (when set: the end of a release-once warm start) the factor is times ``phase_factor``.
    """
    schedule, warmup, total = settings.schedule, settings.warmup_steps, settings.total_steps
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: choose {', '.join(SCHEDULES)}")
    span = max(1, total - warmup)
    every = settings.decay_steps or max(1, math.ceil(span / 3))

    def factor(k: int) -> float:
        base = _factor(k)
        return base * settings.phase_factor if k >= settings.phase_steps > 0 else base

    def _factor(k: int) -> float:  # closures, not objects: LambdaLR saves no state for them
        if k < warmup:
            return (k + 1) / warmup
        done = k - warmup
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(done, span) / span))
        if schedule == "step":
            return settings.decay_gamma ** (done // every)
        return 1.0

    return factor


def scheduler_state(scheduler: LambdaLR) -> dict[str, Any]:
    """The scheduler's position as JSON (its lambdas are closures: nothing to save)."""
    state = scheduler.state_dict()
    state.pop("lr_lambdas", None)
    return state


def load_scheduler(scheduler: LambdaLR, state: dict[str, Any]) -> None:
    """Inverse of :func:`scheduler_state`."""
    scheduler.load_state_dict({**state, "lr_lambdas": [None] * len(scheduler.lr_lambdas)})
