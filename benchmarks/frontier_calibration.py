"""Release-once calibration on Fashion-MNIST: each head source, one noisy release per
record at epsilon <= 8, and the readouts a trainer could fit on the releases.

For each head source (clicooper.heads): build the frozen head, hold out ``--val`` of the
owner's training records as a clean validation split (every choice below is made on it,
never on the test set), release each remaining record once (clip C = 1, Gaussian noise
at the multiplier giving the release's epsilon at its delta, one release), fit nearest
class mean, logistic regression, noise-aware LDA and the chain designs on the releases,
and score the choice of each family on the clean test activations. Usage:

    python benchmarks/frontier_calibration.py --sources public scattering dpsgd random \
        --private 20000 --grid explore          # explore on a subsample
    python benchmarks/frontier_calibration.py --sources public --grid best   # full size

The owner's FLOPs: the head's forward pass once per record (plus any pretraining it runs);
the trainers': the chain's training (plus public pretraining when they run it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from release_readouts import ChainSpec, accuracy, chain, lda, logistic, ncm  # noqa: E402

from clicooper.config import RunConfig  # noqa: E402
from clicooper.data import load_dataset  # noqa: E402
from clicooper.heads import build_head, total_privacy  # noqa: E402
from clicooper.heads.base import embed  # noqa: E402
from clicooper.models.presets import build_preset  # noqa: E402
from clicooper.models.split import split_blocks  # noqa: E402
from clicooper.privacy.accounting import epsilon as release_epsilon  # noqa: E402
from clicooper.privacy.accounting import noise_for_epsilon  # noqa: E402

warnings.filterwarnings("ignore")

GRIDS: dict[str, list[ChainSpec]] = {
    "explore": [
        ChainSpec(name="plain", standardize=False, holdout=0.0, epochs=15),
        ChainSpec(name="std+es"),
        ChainSpec(name="std+es+wd", wd=0.05),
        ChainSpec(name="xnoise0.5", extra_noise=0.5),
        ChainSpec(name="mix4", mixup=4),
        ChainSpec(name="mix8", mixup=8),
        ChainSpec(name="mix8+xnoise", mixup=8, extra_noise=0.5),
        ChainSpec(name="wide1024-mix8", width=1024, mixup=8),
        ChainSpec(name="deep4-mix8", depth=4, mixup=8),
        ChainSpec(name="drop0.5-mix8", dropout=0.5, mixup=8),
    ],
    "explore-posterior": [
        ChainSpec(name="post-mean", posterior="mean", epochs=20),
        ChainSpec(name="post-sample", posterior="sample", epochs=30, patience=8),
    ],
    "quick": [
        ChainSpec(name="post-mean", posterior="mean", epochs=20),
        ChainSpec(name="public-only (warm 20, no releases)", warm=20, epochs=0),
        ChainSpec(name="warm20+post-mean", warm=20, posterior="mean", lr=1e-4, epochs=20),
    ],
    "best": [
        ChainSpec(name="wide1024-mix8", width=1024, mixup=8),
        ChainSpec(name="post-mean", posterior="mean", epochs=20),
        ChainSpec(name="public-only (warm 20, no releases)", warm=20, epochs=0),
        ChainSpec(name="warm20+post-sample", warm=20, posterior="sample", lr=1e-4, epochs=20),
        ChainSpec(name="warm20+post-mean", warm=20, posterior="mean", lr=1e-4, epochs=20),
    ],
}


def release(a: torch.Tensor, multiplier: float, seed: int) -> torch.Tensor:
    """Clip each row to norm 1 and add N(0, multiplier^2) once (a measurement: seeded)."""
    clipped = a * (1.0 / a.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
    gen = torch.Generator().manual_seed(seed + 7919)
    return clipped + torch.randn(clipped.shape, generator=gen) * multiplier


def budget(source: str, args: argparse.Namespace, head_eps: float | None) -> tuple[float, float]:
    """(release epsilon, release delta) so that the run's total stays within the target."""
    if head_eps is None:
        return args.epsilon, args.delta
    dp_delta = args.delta / 10
    eps_r = args.epsilon - 2 * head_eps
    delta_r = args.delta - (1 + math.exp(head_eps)) * dp_delta
    if eps_r <= 0 or delta_r <= 0:
        raise SystemExit(f"head epsilon {head_eps} leaves no budget for the release")
    return eps_r, delta_r


def run_source(source: str, data, args) -> dict:
    over = {
        "head.source": source,
        "head.pretrain_epochs": args.pretrain_epochs,
        "head.dp_epsilon": args.dp_epsilon,
        "head.dp_epochs": args.dp_epochs,
        "head.dp_delta": args.delta / 10,
        "head.scattering_j": args.scattering_j,
    }
    cfg = RunConfig.load(dataset="fashion-mnist", model="cnn", seed=args.seed, **over)
    if args.limit_train:
        data = data.limit(args.limit_train, None, args.seed)
    blocks = build_preset("cnn", data.image_shape, data.num_classes, 2, bottleneck=args.bottleneck)
    head = split_blocks(blocks, "bottleneck", 2).head
    t0 = time.time()
    fh = build_head(cfg, data, head)
    t_head = time.time() - t0
    train = fh.data.train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    val_idx, fit_idx = order[: args.val], order[args.val :]
    if args.private:
        fit_idx = fit_idx[: args.private]
    a_fit = embed(fh.module, train.x[fit_idx])
    a_val = embed(fh.module, train.x[val_idx])
    a_test = embed(fh.module, data.test.x)
    y_fit, y_val, y_test = train.y[fit_idx], train.y[val_idx], data.test.y
    eps_r, delta_r = budget(source, args, fh.privacy.epsilon)
    m = noise_for_epsilon(eps_r, 1, delta_r)
    r = release(a_fit, m, args.seed)
    public = None
    if fh.public and fh.public["kind"] == "split":
        pub = data.train.subset(torch.arange(fh.public["n"]))
        public = (embed(fh.module, pub.x), pub.y)
    k = data.num_classes
    rows: list[dict] = []

    def score(family: str, setting: str, predict, info=None) -> None:
        rows.append(
            {
                "family": family,
                "setting": setting,
                "val": accuracy(predict(a_val), y_val),
                "test": accuracy(predict(a_test), y_test),
                **(info or {}),
            }
        )
        print(
            f"  {source:10s} {family:9s} {setting:22s} val {rows[-1]['val']:.4f} "
            f"test {rows[-1]['test']:.4f}",
            flush=True,
        )

    score("ncm", "releases", ncm(r, y_fit, k))
    for wd in (0.0, 1e-3, 1e-2):
        score("logistic", f"wd={wd}", logistic(r, y_fit, k, wd=wd))
    for floor in (1e-3, 1e-2, 1e-1):
        score("lda", f"denoised floor={floor}", lda(r, y_fit, k, m, floor=floor))
    for spec in GRIDS[args.grid]:
        if spec.warm and public is None:
            continue  # a warm start needs public data
        t = time.time()
        predict, info = chain(r, y_fit, k, m, spec, seed=args.seed, public=public)
        info["seconds"] = round(time.time() - t, 1)
        score("chain" if spec.epochs else "public-only", spec.label(), predict, info)
    score("clean-ref", "logistic, no noise", logistic(a_fit, y_fit, k, wd=1e-3))
    if public is not None:
        score("public-ref", "logistic, public only", logistic(*public, k, wd=1e-3))
    best = {}
    for fam in ("ncm", "logistic", "lda", "chain"):
        cands = [row for row in rows if row["family"] == fam]
        best[fam] = max(cands, key=lambda row: row["val"])
    n = len(fit_idx)
    chain_flops = best["chain"]["flops"]
    fwd = fh.forward_flops * n
    owner = fwd + (fh.pretrain.flops if fh.pretrain.runner == "owner" else 0)
    trainers = chain_flops + (fh.pretrain.flops if fh.pretrain.runner == "trainers" else 0)
    privacy = total_privacy(fh.privacy, release_epsilon(m, 1, delta_r), delta_r)
    return {
        "source": source,
        "head": fh.results(),
        "head_seconds": round(t_head, 1),
        "n_release": n,
        "n_val": len(val_idx),
        "noise_multiplier": m,
        "privacy": privacy,
        "rows": rows,
        "best": best,
        "flops": {
            "owner": owner,
            "trainers": trainers,
            "owner_share": owner / (owner + trainers),
            "owner_share_without_pretrain": fwd / (fwd + chain_flops),
        },
    }


def table(results: list[dict]) -> str:
    head = (
        "| head source | eps head | eps release | eps total | NCM | logistic | LDA (denoised) "
        "| chain (design) | public-only chain | clean logistic | owner share |"
    )
    lines = [head, "|" + "---|" * 11]
    for res in results:
        p, b = res["privacy"], res["best"]
        ref = next(row for row in res["rows"] if row["family"] == "clean-ref")
        pub = [row["test"] for row in res["rows"] if row["family"] == "public-only"]
        pub_s = f"{pub[0]:.4f}" if pub else "-"
        eh = p["head"]["epsilon"]
        lines.append(
            f"| {res['source']} | {'-' if eh is None else f'{eh:.2f}'} | "
            f"{p['release']['epsilon']:.2f} | {p['total']['epsilon']:.2f} | "
            f"{b['ncm']['test']:.4f} | {b['logistic']['test']:.4f} | {b['lda']['test']:.4f} | "
            f"{b['chain']['test']:.4f} ({b['chain']['setting']}) | {pub_s} | {ref['test']:.4f} | "
            f"{res['flops']['owner_share']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", nargs="+", default=["public", "scattering", "dpsgd", "random"])
    ap.add_argument("--private", type=int, default=0, help="release only this many (0: all)")
    ap.add_argument("--val", type=int, default=5000)
    ap.add_argument("--limit-train", type=int, default=0, help="subsample the training split")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--bottleneck", type=int, default=64)
    ap.add_argument("--pretrain-epochs", type=int, default=10)
    ap.add_argument("--dp-epsilon", type=float, default=1.0)
    ap.add_argument("--dp-epochs", type=int, default=5)
    ap.add_argument("--scattering-j", type=int, default=2)
    ap.add_argument("--grid", choices=sorted(GRIDS), default="explore")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist")
    results = [run_source(s, data, args) for s in args.sources]
    print(table(results))
    if args.out:
        args.out.write_text(
            json.dumps(
                {"args": vars(args) | {"out": str(args.out)}, "results": results},
                indent=1,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
