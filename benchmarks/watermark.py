"""Watermark benchmark (DESIGN §5, §7): cost, verification, claims under attack, false positives.

(a) Cost: clicooper with and without the watermark chain, same seed, runs
    interleaved (with, without; then without, with on a repeat). The two runs of a
    pair also share the owner secret (``owner_secret`` setting) and so the label
    permutation and the activation-noise stream, so the accuracy difference is the
    watermark's and not the noise's. Reports test accuracy, the difference in points
    and the ratio of ``timing.train_seconds``.
(b) The watermarked run verifies (``results["watermark"]["verified"]``); the largest
    audited BER over all stages.
(c) (:mod:`clicooper.attacks.watermark_removal`) Claims of t1 and t2 (secret from
    ``RUN_DIR/parties/<t>/watermark.secret``,
    inputs from the ledger) on a stolen copy: the whole chain (``owner/head`` plus
    ``segments/``), attacked with fresh data: the first half of the test split
    (images the data owner never trained on). Attacks: fine-tuning the whole chain
    for 10%, 20%, 50% of the run's training steps (Adam, the run's lr and batch
    size), once on the stolen model's own arg-max pseudo-classes (what a thief can
    do) and once on the true labels through the owner's decoding (a stronger thief
    that also holds the label secret); magnitude pruning of 10%..60% of every weight
    tensor of the segments; overwriting: the thief embeds its own fresh watermark
    (own secret, this library's regulariser) in the same tensors while fine-tuning on
    pseudo-classes, for one stage's steps, at the run's strength and at 10x.
    Accuracy after an attack is measured on the other half of the test split with
    the owner's label decoding (for the benchmark only; a thief cannot decode).
(d) False positives: the owners' claims against ``--fp-models`` segment chains trained
    independently (fresh seeded init, ``--fp-steps`` Adam steps on the real head's
    clipped, noised cut activations and the owner's pseudo-labels: the same task,
    no watermark), against the no-watermark twin run of (a) (same seed: same init
    and batch order), and ``--fp-models`` outsiders with fresh secrets against the
    real segments: with the ledger's commitment (rejected outright) and as if each
    had registered its own commitment (the binomial test alone decides).

A claim holds when ``P[Binomial(B, 1/2) >= matching bits] <= claim_p_value``.

Usage::

    python benchmarks/watermark.py                          # Fashion-MNIST, defaults
    python benchmarks/watermark.py --dataset digits --epochs 3 \
        --set model=mlp --set batch_size=32 --json /tmp/wm.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clicooper.attacks._common import seeded
from clicooper.attacks.watermark_removal import Lab, copy_state, robustness, train_chain
from clicooper.config import RunConfig
from clicooper.models.assembly import preset_factory
from clicooper.privacy import secrets
from clicooper.privacy.activation import ActivationNoise
from clicooper.runtime.session import Session, run
from clicooper.runtime.verification import verify_run
from clicooper.watermark import load_segment, new_watermark_secret

warnings.filterwarnings("ignore")


# -- (a) cost --------------------------------------------------------------------------------


def owner_secret_file(root: Path, seed: int) -> Path:
    """One owner secret per seed, shared by the two runs of a pair (the ``owner_secret``
    setting): the same label permutation and activation noise, with and without the mark."""
    path = root / f"owner-{seed}" / secrets.SECRET_FILE
    return path if path.exists() else secrets.OwnerSecret.generate().save(path.parent)


def config(args: argparse.Namespace, watermark: bool) -> RunConfig:
    overrides: dict[str, Any] = {"dataset": args.dataset, "seed": args.seed, "mode": "clicooper"}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    for item in args.set:
        key, _, raw = item.partition("=")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    overrides["watermark.enabled"] = watermark
    return RunConfig.load(None, **overrides)


def cost(args: argparse.Namespace, root: Path) -> tuple[list[dict[str, Any]], Session, Session]:
    """Interleaved pairs; returns the rows and the first pair's (watermarked, plain) sessions."""
    rows, kept = [], {}
    for repeat in range(args.repeats):
        order = (True, False) if repeat % 2 == 0 else (False, True)
        pair, cpus = {}, {}
        for marked in order:
            cfg = config(args, marked)
            cfg.seed = args.seed + repeat
            out = root / f"{'wm' if marked else 'plain'}-{repeat}"
            cpu = time.process_time()
            cfg.owner_secret = owner_secret_file(root, cfg.seed)
            session = run(cfg, out, overwrite=True)
            cpus[marked] = time.process_time() - cpu
            pair[marked] = session
            res = session.results
            print(
                f"  repeat {repeat} watermark={marked}: test {res['accuracy']['test']:.4f} "
                f"train_seconds {res['timing']['train_seconds']:.1f}",
                flush=True,
            )
        if repeat == 0:
            kept = pair
        on, off = pair[True].results, pair[False].results
        rows.append(
            {
                "seed": args.seed + repeat,
                "acc_watermark": on["accuracy"]["test"],
                "acc_plain": off["accuracy"]["test"],
                "acc_diff_points": 100 * (on["accuracy"]["test"] - off["accuracy"]["test"]),
                "seconds_watermark": on["timing"]["train_seconds"],
                "seconds_plain": off["timing"]["train_seconds"],
                "time_ratio": on["timing"]["train_seconds"] / off["timing"]["train_seconds"],
                "cpu_seconds_watermark": cpus[True],
                "cpu_seconds_plain": cpus[False],
                "cpu_ratio": cpus[True] / cpus[False],
                "verified": on["watermark"]["verified"],
                "stages": on["watermark"]["stages"],
            }
        )
    return rows, kept[True], kept[False]


# -- (c) the stolen chain: clicooper.attacks.watermark_removal (Lab, robustness) ---------


# -- (d) false positives ----------------------------------------------------------------------


def false_positives(
    lab: Lab, plain_dir: Path, noise_multiplier: float, n_models: int, steps: int
) -> dict[str, Any]:
    """Owner claims on independent segments, and outsider claims on the real ones."""
    cfg = lab.cfg
    n = min(len(lab.data.train), steps * cfg.batch_size)
    ids = torch.randperm(len(lab.data.train), generator=torch.Generator().manual_seed(1))[:n]
    noise = ActivationNoise(cfg.privacy.clip_norm, noise_multiplier, cfg.privacy.mechanism)
    with torch.no_grad():
        z = noise.clip(lab.stolen[0](lab.data.train.x[ids]))
    y = lab.labels.encode(lab.data.train.y[ids], ids)
    independent: dict[str, list[Any]] = {p: [] for p in lab.parties}
    for k in range(n_models):
        with seeded(100_000 + k):
            split = preset_factory(cfg, lab.data)(lab.labels.pseudo_classes)
        chain = nn.Sequential(*split.segments)
        noisy = _Noisy(chain, noise)
        train_chain(
            noisy,
            lambda m, b: nn.functional.cross_entropy(m(z[b]), y[b]),
            len(y),
            steps,
            cfg.lr,
            cfg.batch_size,
            200_000 + k,
        )
        for i, party in enumerate(lab.parties):
            independent[party].append(lab.claim(party, copy_state(chain[i])))
    twin = {
        p: lab.claim(p, load_segment(plain_dir / "segments" / f"{p}.safetensors"))
        for p in lab.parties
    }
    real = lab.segments(lab.stolen)
    outsiders: dict[str, dict[str, list[Any]]] = {p: {"ledger": [], "own": []} for p in lab.parties}
    for _ in range(n_models):
        secret = new_watermark_secret()
        for party in lab.parties:
            outsiders[party]["ledger"].append(lab.claim(party, real[party], secret))
            outsiders[party]["own"].append(lab.claim(party, real[party], secret, True))
    summary: dict[str, Any] = {"models": n_models, "train_steps": steps, "parties": {}}
    for party in lab.parties:
        summary["parties"][party] = {
            "independent": _fp(independent[party]),
            "twin_no_watermark": _fp([twin[party]]),
            "outsider_ledger_commitment": _fp(outsiders[party]["ledger"]),
            "outsider_own_commitment": _fp(outsiders[party]["own"]),
        }
    return summary


class _Noisy(nn.Module):
    """A segment chain fed the clipped cut activations plus fresh noise, as in training."""

    def __init__(self, chain: nn.Module, noise: ActivationNoise) -> None:
        super().__init__()
        self.chain, self.noise = chain, noise

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.chain(z + self.noise.noise(z.shape))


def _fp(results: list[Any]) -> dict[str, Any]:
    return {
        "claims": len(results),
        "false_positives": sum(r.holds for r in results),
        "min_p_value": min(r.p_value for r in results),
        "max_matching": max(r.matching for r in results),
    }


# -- report ----------------------------------------------------------------------------------


def table(
    cost_rows: list[dict[str, Any]],
    verify: dict[str, Any],
    robust: list[dict[str, Any]],
    fp: dict[str, Any],
    parties: list[str],
) -> str:
    lines = [
        "(a) cost: with vs without the watermark (same seed, interleaved)",
        f"{'seed':>4} {'acc wm':>8} {'acc plain':>9} {'diff pts':>8} "
        f"{'s wm':>7} {'s plain':>7} {'ratio':>6} {'cpu ratio':>9} verified",
    ]
    for r in cost_rows:
        lines.append(
            f"{r['seed']:>4} {r['acc_watermark']:>8.4f} {r['acc_plain']:>9.4f} "
            f"{r['acc_diff_points']:>+8.2f} {r['seconds_watermark']:>7.1f} "
            f"{r['seconds_plain']:>7.1f} {r['time_ratio']:>6.3f} {r['cpu_ratio']:>9.3f} "
            f"{r['verified']}"
        )
    if len(cost_rows) > 1:
        diff = sum(r["acc_diff_points"] for r in cost_rows) / len(cost_rows)
        ratio = sum(r["seconds_watermark"] for r in cost_rows) / sum(
            r["seconds_plain"] for r in cost_rows
        )
        cpu = sum(r["cpu_seconds_watermark"] for r in cost_rows) / sum(
            r["cpu_seconds_plain"] for r in cost_rows
        )
        lines.append(
            f"mean accuracy difference {diff:+.2f} points, total train-time ratio {ratio:.3f}, "
            f"total CPU-time ratio {cpu:.3f}"
        )
    lines += [
        "",
        f"(b) verification: verified={verify['verified']} stages={verify['stages']} "
        f"max audited BER={verify['max_ber']:.4f} (threshold {verify['threshold']})",
        "",
        "(c) claims on the stolen chain (head + segments), attacked with fresh data: half "
        "the test split; accuracy on the other half",
    ]
    head = f"{'attack':<38} {'steps':>5} {'acc':>6}"
    for p in parties:
        head += f" {p + ' BER':>7} {p + ' p':>9} {p + ' claim':>8}"
    lines.append(head)
    for r in robust:
        line = f"{r['attack']:<38} {r['steps']:>5} {r['accuracy']:>6.3f}"
        for p in parties:
            c = r[p]
            line += (
                f" {c['ber']:>7.3f} {c['p_value']:>9.2e} {'holds' if c['holds'] else 'FAILS':>8}"
            )
        if "thief_ber" in r:
            line += "  thief BER " + " ".join(f"{p}={b:.3f}" for p, b in r["thief_ber"].items())
        lines.append(line)
    lines += ["", f"(d) false positives (claims that hold; must be 0), {fp['models']} each"]
    for p, d in fp["parties"].items():
        for kind, s in d.items():
            lines.append(
                f"{p} {kind:<28} {s['false_positives']:>3}/{s['claims']:<3} "
                f"min p {s['min_p_value']:.2e}  max matching {s['max_matching']}"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--epochs", type=int, default=None, help="default: the run config's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="interleaved cost pairs")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run config override, dotted keys (e.g. watermark.strength=0.01)",
    )
    ap.add_argument("--fp-models", type=int, default=100)
    ap.add_argument("--fp-steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=None, help="keep the run directories here")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        root = args.out or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        print("(a) training", flush=True)
        cost_rows, marked, _ = cost(args, root)
        run_dir = root / "wm-0"
        cfg = config(args, True)
        cfg = cfg.model_copy(
            update={"batch_size": cfg.effective_batch_size(len(marked.dataset.train))}
        )
        report = verify_run(run_dir, cfg.watermark)
        bers = [
            line.ber for line in report.lines if line.kind == "trainer" and line.ber is not None
        ]
        verify = {
            "verified": marked.results["watermark"]["verified"],
            "offline_ok": report.ok,
            "stages": marked.results["watermark"]["stages"],
            "max_ber": max(bers),
            "threshold": cfg.watermark.ber_threshold,
            "first_failure": report.first_failure,
        }
        torch.set_num_threads(cfg.threads)
        print("(c) attacks", flush=True)
        lab = Lab(marked, run_dir, cfg, args.seed)
        robust = robustness(lab)
        print("(d) false positives", flush=True)
        fp = false_positives(
            lab,
            root / "plain-0",
            marked.results["privacy"]["noise_multiplier"],
            args.fp_models,
            args.fp_steps,
        )
    text = table(cost_rows, verify, robust, fp, lab.parties)
    print(text)
    print(f"benchmark wall time {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "config": cfg.model_dump(mode="json"),
                    "cost": cost_rows,
                    "verify": verify,
                    "robustness": robust,
                    "false_positives": fp,
                    "table": text,
                },
                indent=2,
                default=float,
            )
        )


if __name__ == "__main__":
    main()
