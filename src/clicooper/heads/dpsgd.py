"""Head source ``dpsgd``: trained on the owner's private data with DP-SGD (Opacus).

The preset head plus a throwaway classifier is trained for ``head.dp_epochs`` epochs with
Opacus: Poisson-sampled batches (rate q = batch / N), each per-sample gradient clipped to
``head.dp_clip_norm``, Gaussian noise of std ``z * clip`` on their sum, ``z`` chosen by
Opacus so that its RDP accountant gives ``head.dp_epsilon`` at ``head.dp_delta``
(default: a tenth of the run's delta). The owner runs it (the data is private) and its
FLOPs are counted as the owner's.

The cost composes with the release. Opacus's bound is for add/remove-one adjacency; the
releases are accounted for replace-one (sensitivity 2C). A replace is a remove and an add,
so by group privacy the head is (2 eps_h, (1 + e^eps_h) delta_h)-DP under replace-one
(Dwork & Roth, Thm. 2.2 for groups of 2), and basic composition with the release's
(eps_r, delta_r) gives the total reported by :func:`clicooper.heads.compose.total_privacy`.
That is conservative (RDP composition of the two would be tighter) and simple to state.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from clicooper.data import Dataset
from clicooper.heads.base import (
    FrozenHead,
    HeadPrivacy,
    PretrainFlops,
    classifier_for,
    finish,
    forward_flops,
    out_shape,
)

if TYPE_CHECKING:
    from clicooper.config import RunConfig


def train_dp(
    head: nn.Module,
    data: Dataset,
    epochs: int,
    epsilon: float,
    delta: float,
    clip: float,
    lr: float,
    batch_size: int,
    seed: int,
) -> tuple[float, dict[str, float], int]:
    """DP-SGD of ``head`` + a throwaway classifier on ``data.train``; returns (epsilon
    reached, accounting details, FLOPs spent)."""
    from opacus import PrivacyEngine

    torch.manual_seed(seed)
    model = nn.Sequential(head, classifier_for(head, data.image_shape, data.num_classes))
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loader = DataLoader(
        TensorDataset(data.train.x, data.train.y),
        batch_size=batch_size,
        generator=torch.Generator().manual_seed(seed),
    )
    # The DP noise must not follow from the experiment seed: its generator is seeded from
    # the OS CSPRNG (Opacus's secure_mode needs torchcsprng, which is not installed).
    noise_gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "big") >> 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns that secure_mode is off
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
        private, opt, loader = engine.make_private_with_epsilon(
            module=model,
            optimizer=opt,
            data_loader=loader,
            target_epsilon=epsilon,
            target_delta=delta,
            epochs=epochs,
            max_grad_norm=clip,
            noise_generator=noise_gen,
        )
        with FlopCounterMode(display=False) as counter:
            for _ in range(epochs):
                for x, y in loader:
                    if len(y) == 0:
                        continue
                    loss = nn.functional.cross_entropy(private(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        reached = float(engine.get_epsilon(delta))
    private.remove_hooks()
    details = {
        "noise_multiplier": float(opt.noise_multiplier),
        "sample_rate": float(loader.sample_rate),
        "steps": int(engine.accountant.history[-1][2]) if engine.accountant.history else 0,
        "clip_norm": clip,
    }
    return reached, details, int(counter.get_total_flops())


class DpSgdSource:
    """Train the head on the private records with DP-SGD; its epsilon composes."""

    name = "dpsgd"

    def build(self, cfg: RunConfig, data: Dataset, split_head: nn.Module) -> FrozenHead:
        hc = cfg.head
        delta = hc.dp_delta if hc.dp_delta is not None else cfg.privacy.delta / 10
        batch = cfg.effective_batch_size(len(data.train))
        eps, details, flops = train_dp(
            split_head,
            data,
            hc.dp_epochs,
            hc.dp_epsilon,
            delta,
            hc.dp_clip_norm,
            hc.pretrain_lr,
            batch,
            cfg.seed,
        )
        module = finish(split_head)
        privacy = HeadPrivacy(
            eps,
            delta,
            "every private training record, add/remove-one (Opacus RDP, Poisson sampling); "
            "the head's weights only",
            {**details, "adjacency": "add/remove-one"},
        )
        return FrozenHead(
            source=self.name,
            module=module,
            data=data,
            out_shape=out_shape(module, data.image_shape),
            privacy=privacy,
            pretrain=PretrainFlops(flops, "owner", f"DP-SGD, {hc.dp_epochs} epochs"),
            forward_flops=forward_flops(module, data.image_shape),
            public=None,
        )
