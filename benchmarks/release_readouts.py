"""Readouts trained on release-once activations: nearest class mean, linear, chain.

Every readout sees only the noisy releases ``r_i = clip(h(x_i)) + N(0, s^2 I)`` and their
(label-obfuscation-free) labels, and is scored on clean test activations (inference takes
the clean path). Shared by benchmarks/frontier_calibration.py and benchmarks/frontier.py.

- ``ncm``, ``logistic``: :mod:`clicooper.privacy.readouts` (the run's own readouts).
- ``lda``: Gaussian LDA whose within-class covariance has the *known* noise covariance
  s^2 I subtracted (eigenvalues floored): a noise-aware linear readout (post-processing).
- ``chain``: an MLP of the kind the trainers hold, with the aids against memorising noise:
  fresh extra noise each epoch, mixup within class, weight decay, dropout, input
  rescaling to unit variance, early stopping on a held-out part of the releases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from clicooper.privacy.readouts import accuracy, logistic, ncm  # noqa: F401 (re-exported)


def lda(r: torch.Tensor, y: torch.Tensor, n_classes: int, noise_std: float, floor: float = 1e-3):
    means = torch.stack([r[y == c].mean(0) for c in range(n_classes)])
    centred = r - means[y]
    cov = centred.T @ centred / (len(r) - n_classes)
    cov = cov - noise_std**2 * torch.eye(r.shape[1])
    vals, vecs = torch.linalg.eigh(cov)
    vals = vals.clamp_min(floor * vals.max().clamp_min(1e-12))
    inv = vecs @ torch.diag(1 / vals) @ vecs.T
    prior = torch.bincount(y, minlength=n_classes).float() / len(y)
    w = means @ inv
    b = -0.5 * (w * means).sum(1) + prior.log()
    return lambda a: (a @ w.T + b).argmax(1)


@dataclass
class ChainSpec:
    """One chain design; ``extra_noise`` in units of the release noise std."""

    width: int = 256
    depth: int = 2
    epochs: int = 30
    lr: float = 1e-3
    wd: float = 0.0
    dropout: float = 0.0
    extra_noise: float = 0.0
    mixup: int = 0  # 0: off; k >= 2: each input is a random convex mix of k same-class releases
    posterior: str = ""  # "": releases as they are; "mean" / "sample": class-posterior denoising
    warm: int = 0  # epochs of pretraining on clean public activations first (0: none)
    warm_lr: float = 1e-3
    standardize: bool = True
    holdout: float = 0.1
    patience: int = 5
    batch: int = 256
    name: str = field(default="")

    def label(self) -> str:
        return self.name or (
            f"w{self.width}d{self.depth} wd{self.wd} do{self.dropout} xn{self.extra_noise} "
            f"mix{self.mixup} std{int(self.standardize)}"
        )


def _mlp(d: int, n: int, spec: ChainSpec) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(spec.depth):
        layers += [nn.Linear(d, spec.width), nn.ReLU(), nn.Dropout(spec.dropout)]
        d = spec.width
    return nn.Sequential(*layers, nn.Linear(d, n))


def _fit(model, x, y, epochs, lr, spec: ChainSpec, gen) -> int:
    """Plain supervised epochs (the public warm start); returns the FLOPs spent."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=spec.wd)
    model.train()
    with FlopCounterMode(display=False) as counter:
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), spec.batch):
                idx = perm[i : i + spec.batch]
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return int(counter.get_total_flops())


def _class_mix(x: torch.Tensor, y: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Each row replaced by a Dirichlet(1)-weighted mix of itself and k-1 same-class rows."""
    out = torch.zeros_like(x)
    w = torch.distributions.Dirichlet(torch.ones(k)).sample((len(x),))
    for c in y.unique():
        idx = (y == c).nonzero().squeeze(1)
        rows = [idx] + [
            idx[torch.randint(len(idx), (len(idx),), generator=gen)] for _ in range(k - 1)
        ]
        out[idx] = sum(w[idx, j : j + 1] * x[rows[j]] for j in range(k))
    return out


def chain(
    r: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    noise_std: float,
    spec: ChainSpec,
    seed: int = 0,
    public: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """Train the chain; returns (predict, info) with the epochs run and training FLOPs.

    ``public``: clean (activation, label) pairs of public data, for ``spec.warm`` epochs of
    pretraining before the releases (the trainers may hold public data)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    order = torch.randperm(len(r), generator=gen)
    n_hold = int(len(r) * spec.holdout)
    hold, fit = order[:n_hold], order[n_hold:]
    mu, sd = (r.mean(0), r.std(0).clamp_min(1e-6)) if spec.standardize else (0.0, 1.0)
    model = _mlp(r.shape[1], n_classes, spec)
    post = class_posterior(r[fit], y[fit], n_classes, noise_std) if spec.posterior else None
    if post is not None and spec.standardize:  # rescale by the clean-activation spread
        clean_like = posterior_samples(r[fit], y[fit], post, gen)
        mu, sd = clean_like.mean(0), clean_like.std(0).clamp_min(1e-6)
    flops = 0
    if spec.warm and public is not None:
        if spec.standardize and post is None:
            mu, sd = public[0].mean(0), public[0].std(0).clamp_min(1e-6)
        flops += _fit(model, (public[0] - mu) / sd, public[1], spec.warm, spec.warm_lr, spec, gen)
    hold_x = r[hold]  # early stopping on held-out raw releases: what the trainers have
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.wd)
    best, best_state, bad, epochs = math.inf, None, 0, 0
    if n_hold and spec.warm:
        with torch.no_grad():
            model.eval()
            best = float(nn.functional.cross_entropy(model((hold_x - mu) / sd), y[hold]))
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(spec.epochs):
        model.train()
        x, yy = r[fit], y[fit]
        if post is not None:
            x = posterior_samples(x, yy, post, gen, sample=spec.posterior == "sample")
        if spec.mixup >= 2:
            x = _class_mix(x, yy, spec.mixup, gen)
        if spec.extra_noise > 0:
            x = x + torch.randn(x.shape, generator=gen) * noise_std * spec.extra_noise
        x = (x - mu) / sd
        perm = torch.randperm(len(x), generator=gen)
        with FlopCounterMode(display=False) as counter:
            for i in range(0, len(x), spec.batch):
                idx = perm[i : i + spec.batch]
                loss = nn.functional.cross_entropy(model(x[idx]), yy[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        flops += counter.get_total_flops()
        epochs += 1
        if n_hold:
            model.eval()
            with torch.no_grad():
                val = float(nn.functional.cross_entropy(model((hold_x - mu) / sd), y[hold]))
            if val < best - 1e-4:
                best, bad = val, 0
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
                if bad >= spec.patience:
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()

    def predict(a: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model((a - mu) / sd).argmax(1)

    return predict, {"epochs": epochs, "flops": int(flops), "holdout_loss": best}


def class_posterior(r: torch.Tensor, y: torch.Tensor, n_classes: int, noise_std: float, floor=1e-3):
    """Per class c: the releases' mean mu_c and the posterior of the clean activation.

    Model: a ~ N(mu_c, S_c) within class c, r = a + N(0, s^2 I). S_c is estimated as the
    releases' class covariance minus s^2 I (eigenvalues floored at ``floor`` times the
    largest). Then a | r ~ N(mu_c + G_c (r - mu_c), S_c - G_c S_c), G_c = S_c (S_c + s^2 I)^-1.
    Returns per class (mu, gain G, Cholesky factor of the posterior covariance).
    """
    d = r.shape[1]
    eye = torch.eye(d)
    out = []
    for c in range(n_classes):
        rc = r[y == c]
        mu = rc.mean(0)
        cov = (rc - mu).T @ (rc - mu) / max(1, len(rc) - 1) - noise_std**2 * eye
        vals, vecs = torch.linalg.eigh(cov)
        vals = vals.clamp_min(floor * vals.max().clamp_min(1e-12))
        s = vecs @ torch.diag(vals) @ vecs.T
        gain = s @ torch.linalg.inv(s + noise_std**2 * eye)
        post = s - gain @ s
        post = (post + post.T) / 2 + 1e-9 * eye
        out.append((mu, gain, torch.linalg.cholesky(post)))
    return out


def posterior_samples(r, y, posterior, gen: torch.Generator, sample: bool = True) -> torch.Tensor:
    """Each release replaced by a draw from (or the mean of) its class posterior."""
    x = torch.empty_like(r)
    for c, (mu, gain, chol) in enumerate(posterior):
        idx = (y == c).nonzero().squeeze(1)
        m = mu + (r[idx] - mu) @ gain.T
        if sample:
            m = m + torch.randn(m.shape, generator=gen) @ chol.T
        x[idx] = m
    return x
