"""How the chain of a release-once run learns from the releases: designs on cached activations.

A cheap proxy of ``clicooper run --release once --model cnn-light`` (issue 10, point 4):
the ``public`` head source (cnn-light head, 10 pretraining epochs on the first 10,000
Fashion-MNIST training images), one release of each of the next 45,000 at epsilon 8
(delta 1e-5), and the last 5,000 training images held out as a clean validation split
(never the test set). The chain is the trainers' segments of the preset, trained as a run
trains it: ``chain.warm_epochs`` = 20 epochs on the public split's clean activations
(Adam, lr 1e-3, batch 128), then each design's epochs on the releases, starting from the
same warm-started state and optimizer. Labels are keyed pseudo-classes (K = 2 random
sub-labels per class), decoded as the owner decodes them. No watermark and one process,
so the numbers are a proxy: the winner is confirmed with the real ``clicooper run``.

Usage (from the repository root; OMP_NUM_THREADS=1):

    PYTHONPATH=src python benchmarks/release_chain_designs.py --out /tmp/designs.json
    PYTHONPATH=src python benchmarks/release_chain_designs.py --only base replay
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from clicooper.config import RunConfig
from clicooper.data import Dataset, load_dataset
from clicooper.heads.base import embed, freeze
from clicooper.heads.public import PublicSource
from clicooper.models.assembly import preset_split
from clicooper.models.presets import Standardize
from clicooper.privacy.accounting import noise_for_epsilon

K = 2
CLASSES = 10


@dataclass
class Design:
    """One way to train the warm-started chain on the releases."""

    lr_factor: float = 0.01  # the releases' lr is 1e-3 times this
    replay: float = 0.0  # weight of a clean public batch after each release batch (0: none)
    public_only: bool = False  # control: the public epochs alone, no release
    mix: int = 1  # each release input averaged with mix-1 releases of its pseudo-class
    batch: int = 128
    clean_scale: bool = False  # releases standardised with the clean activations' scale
    freeze_t1: bool = False  # only the last trainer learns from the releases
    extra_noise: float = 0.0  # fresh noise per epoch, in units of the release noise std
    reset: bool = False  # a fresh optimizer state for the releases (Adam's moments restart)


DESIGNS = {
    "base": Design(),
    "public-only": Design(public_only=True),
    "replay": Design(replay=1.0),
    "replay-0.1": Design(replay=1.0, lr_factor=0.1),
    "public-only-0.1": Design(public_only=True, lr_factor=0.1),
    "clean-scale": Design(clean_scale=True),
    "clean-scale-replay": Design(clean_scale=True, replay=1.0),
    "mix8-replay": Design(mix=8, replay=1.0),
    "batch1024-0.1": Design(batch=1024, lr_factor=0.1),
    "freeze-t1": Design(freeze_t1=True),
    "extra-noise-replay": Design(extra_noise=0.5, replay=1.0),
    "reset": Design(reset=True),
    "reset-replay": Design(reset=True, replay=1.0),
    "reset-replay-0.1": Design(reset=True, replay=1.0, lr_factor=0.1),
    "reset-0.1": Design(reset=True, lr_factor=0.1),
}


class ScaledStandardize(nn.Module):
    """Standardize, or for release inputs the fixed clean scale: ``(x - mean) * scale``."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale, self.releases = scale, False
        self.plain = Standardize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.releases:
            return self.plain(x)
        return (x - x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)) * self.scale


def activations(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Clean public, noisy private releases, clean validation (cached in ``args.cache``)."""
    if args.cache.is_file():
        return torch.load(args.cache, weights_only=True)
    cfg = RunConfig.load(None, dataset="fashion-mnist", model="cnn-light", seed=args.seed)
    data = load_dataset("fashion-mnist", seed=args.seed)
    n = len(data.train)
    train = data.train.subset(torch.arange(n - args.validation))
    held = data.train.subset(torch.arange(n - args.validation, n))
    data = Dataset(data.name, train, held, data.num_classes)
    split = preset_split(cfg, data.image_shape, CLASSES * K)
    head = PublicSource().build(cfg, data, split.head)
    freeze(head.module)
    shape = head.out_shape
    gen = torch.Generator().manual_seed(args.seed)
    sigma = noise_for_epsilon(args.epsilon, 1, 1e-5)

    def clean(x: torch.Tensor) -> torch.Tensor:
        z = embed(head.module, x)
        return (z / z.norm(dim=1, keepdim=True).clamp_min(1.0)).view(-1, *shape)

    private = head.data.train
    rel = clean(private.x)
    rel = rel + torch.randn(rel.shape, generator=gen) * sigma
    sub = lambda y: y * K + torch.randint(K, y.shape, generator=gen)  # noqa: E731
    out = {
        "public_x": clean(head.public_split.x), "public_y": sub(head.public_split.y),
        "release_x": rel, "release_y": sub(private.y),
        "val_x": clean(data.test.x), "val_y": data.test.y, "sigma": torch.tensor(sigma),
    }  # fmt: skip
    args.cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, args.cache)
    return out


def chain_model(args: argparse.Namespace, scale: float) -> nn.Sequential:
    """The preset's trainer segments, as one module, t1's first Standardize switchable."""
    cfg = RunConfig.load(None, dataset="fashion-mnist", model="cnn-light", seed=args.seed)
    split = preset_split(cfg, (1, 28, 28), CLASSES * K)
    t1, t2 = split.segments
    assert isinstance(t1[0][0], Standardize)
    t1[0][0] = ScaledStandardize(scale)
    return nn.Sequential(t1, t2)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x[i : i + 1000]) for i in range(0, len(x), 1000)])
    classes = logits.log_softmax(1).view(-1, CLASSES, K).logsumexp(2).argmax(1)
    return float((classes == y).float().mean())


def step(model, opt, x, y, weight=1.0) -> None:
    model.train()
    loss = weight * nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def warm(args, acts, scale) -> tuple[dict, dict, float]:
    """20 epochs on the clean public activations; (model state, optimizer state, val acc)."""
    torch.manual_seed(args.seed)
    model = chain_model(args, scale)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(args.seed)
    px, py = acts["public_x"], acts["public_y"]
    for _ in range(args.warm_epochs):
        perm = torch.randperm(len(px), generator=gen)
        for i in range(0, len(px), 128):
            idx = perm[i : i + 128]
            step(model, opt, px[idx], py[idx])
    return model.state_dict(), opt.state_dict(), accuracy(model, acts["val_x"], acts["val_y"])


def class_mix(x: torch.Tensor, y: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Each row the mean of itself and k-1 random rows of its pseudo-class (noise / sqrt k)."""
    out = x.clone()
    for c in y.unique():
        idx = (y == c).nonzero().squeeze(1)
        for _ in range(k - 1):
            out[idx] += x[idx[torch.randint(len(idx), (len(idx),), generator=gen)]]
    return out / k


def train_design(args, acts, state, design: Design, scale: float) -> list[float]:
    """Validation accuracy after each epoch on the releases (first entry: the warm start)."""
    torch.manual_seed(args.seed + 1)
    model = chain_model(args, scale)
    model.load_state_dict(state[0])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    if not design.reset:  # else Adam starts afresh: its moments scaled to the releases
        opt.load_state_dict(copy.deepcopy(state[1]))
    for group in opt.param_groups:
        group["lr"] = 1e-3 * design.lr_factor
    if design.freeze_t1:
        for p in model[0].parameters():
            p.requires_grad_(False)
    gen = torch.Generator().manual_seed(args.seed + 2)
    rx, ry, px, py = acts["release_x"], acts["release_y"], acts["public_x"], acts["public_y"]
    sigma = float(acts["sigma"])
    std = model[0][0][0]
    accs = [accuracy(model, acts["val_x"], acts["val_y"])]
    for _ in range(args.epochs):
        x = class_mix(rx, ry, design.mix, gen) if design.mix > 1 else rx
        if design.extra_noise:
            x = x + torch.randn(x.shape, generator=gen) * sigma * design.extra_noise
        perm = torch.randperm(len(x), generator=gen)
        batches = [perm[i : i + design.batch] for i in range(0, len(x), design.batch)]
        n_pub = math.ceil(len(px) / 128)
        pub = torch.randperm(len(px), generator=gen)
        for b, idx in enumerate(batches):
            if not design.public_only:
                std.releases = design.clean_scale
                step(model, opt, x[idx], ry[idx])
                std.releases = False
            if (design.replay or design.public_only) and b * n_pub // len(batches) != (
                (b + 1) * n_pub // len(batches)
            ):
                j = b * n_pub // len(batches)
                pidx = pub[j * 128 : (j + 1) * 128]
                step(model, opt, px[pidx], py[pidx], design.replay or 1.0)
        accs.append(accuracy(model, acts["val_x"], acts["val_y"]))
    return accs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=list(DESIGNS))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--warm-epochs", type=int, default=20)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--validation", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/release_chain_acts.pt"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    acts = activations(args)
    px = acts["public_x"].flatten(1)
    centred = px - px.mean(1, keepdim=True)
    scale = float(1 / centred.std(1).mean())  # Standardize's factor on clean inputs
    print(f"activations {time.time() - start:.0f}s; sigma {float(acts['sigma']):.4f}", flush=True)
    warm_file = args.cache.with_suffix(".warm.pt")
    if warm_file.is_file():
        state = torch.load(warm_file, weights_only=True)
        state = (state["model"], state["opt"], float(state["acc"]))
    else:
        state = warm(args, acts, scale)
        torch.save({"model": state[0], "opt": state[1], "acc": state[2]}, warm_file)
    print(f"warm start {time.time() - start:.0f}s: validation {state[2]:.4f}", flush=True)
    results = {}
    for name in args.only:
        t = time.time()
        accs = train_design(args, acts, state, DESIGNS[name], scale)
        results[name] = accs
        shown = " ".join(f"{a:.4f}" for a in accs)
        print(f"{name:22s} {shown}  ({time.time() - t:.0f}s)", flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
