"""report.md: the paper-style table, vanilla and CliCooper side by side, with honest notes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODES = ("vanilla", "clicooper")


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "none"
    if isinstance(x, float) and x == float("inf"):
        return "inf"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _row(name: str, values: list[Any]) -> str:
    return "| " + " | ".join([name, *[_f(v) for v in values]]) + " |"


def main_table(r: dict[str, Any]) -> list[str]:
    a, runs = r["attacks"], r["runs"]
    inv = {m: a[m]["inversion"] for m in MODES}
    t1 = {m: a[m]["clustering"]["T1"] for m in MODES}
    lines = ["| metric | vanilla | clicooper |", "|---|---|---|"]
    lines.append(_row("test accuracy", [runs[m]["accuracy"]["test"] for m in MODES]))
    lines.append(
        _row("clustering success at T1 (p < 0.01)", [t1[m]["success_rate"] for m in MODES])
    )
    lines.append(
        _row("clustering matched accuracy at T1", [t1[m]["matched_accuracy"] for m in MODES])
    )
    lines.append(_row("clustering ARI at T1", [t1[m]["ari"] for m in MODES]))
    lines.append(
        _row("inversion SSIM (headline: max of data-free, aux)", [inv[m]["ssim"] for m in MODES])
    )
    for k in ("data_free", "aux_no_query", "query_decoder", "query_decoder_nonadaptive"):
        lines.append(_row(f"inversion SSIM, {k}", [inv[m][k]["ssim"] for m in MODES]))
        lines.append(_row(f"inversion PSNR dB, {k}", [inv[m][k]["psnr"] for m in MODES]))
    for k in ("dataset_mean", "class_mean", "uniform_noise"):
        lines.append(_row(f"baseline SSIM, {k}", [inv[m]["baselines"][k] for m in MODES]))
    lines.append(
        _row("extraction accuracy (non-adaptive)", [a[m]["extraction"]["accuracy"] for m in MODES])
    )
    lines.append(_row("extraction chance (1/C)", [a[m]["extraction"]["chance"] for m in MODES]))
    lines.append(
        _row(
            "extraction, best naming (evaluator-only)",
            [a[m]["extraction"]["matched_accuracy"] for m in MODES],
        )
    )
    lines.append(_row("epsilon (delta 1e-5)", [r["epsilon"][m] for m in MODES]))
    return lines


def clustering_table(r: dict[str, Any]) -> list[str]:
    lines = [
        "| party | mode | source | matched acc (act / grad) | ARI (act / grad) | "
        "success (act / grad) | naming acc | chance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in MODES:
        for party, c in r["attacks"][m]["clustering"].items():
            act, grad = c["activations"], c["gradients"]
            lines.append(
                f"| {party} | {m} | {c['source']} | {act['matched_accuracy']:.3f} / "
                f"{grad['matched_accuracy']:.3f} | {act['ari']:.3f} / {grad['ari']:.3f} | "
                f"{act['success_rate']:.2f} / {grad['success_rate']:.2f} | "
                f"{c['naming_accuracy']:.3f} | {c['chance']:.3f} |"
            )
    return lines


def adaptive_table(r: dict[str, Any]) -> list[str]:
    lines = [
        "| m per class | vanilla surrogate | clicooper surrogate | "
        "clicooper before fine-tune | from scratch |",
        "|---|---|---|---|---|",
    ]
    van = {a["m"]: a for a in r["attacks"]["vanilla"]["extraction"]["adaptive"]}
    for a in r["attacks"]["clicooper"]["extraction"]["adaptive"]:
        v = van.get(a["m"], {})
        lines.append(
            f"| {a['m']} | {_f(v.get('accuracy'))} | {a['accuracy']:.3f} | "
            f"{a['accuracy_before_finetune']:.3f} | {a['scratch_accuracy']:.3f} |"
        )
    return lines


def sweep_table(r: dict[str, Any]) -> list[str]:
    lines = [
        "| noise_multiplier | test accuracy | epsilon | T1 clustering success | "
        "T1 matched acc | query-decoder SSIM |",
        "|---|---|---|---|---|---|",
    ]
    for p in r["privacy_utility"]["points"]:
        main = " (main run)" if p.get("main_run") else ""
        lines.append(
            f"| {p['noise_multiplier']:g}{main} | {p['accuracy']:.3f} | {_f(p['epsilon'], 2)} | "
            f"{p['clustering_t1_success_rate']:.2f} | {p['clustering_t1_matched_accuracy']:.3f} | "
            f"{p['query_decoder_ssim']:.3f} |"
        )
    return lines


def notes(r: dict[str, Any]) -> list[str]:
    s, d = r["settings"], r["data"]
    cc = r["runs"]["clicooper"]
    return [
        f"- Data: {r['dataset']}; owner trains on {d['train']} images, tests on {d['test']}; the "
        f"attackers hold {d['auxiliary']} auxiliary images held out of the owner's training split "
        f"({d['aux_unlabelled']} unlabelled, a pool of {d['aux_labelled_pool']} labelled for the "
        "adaptive attacker only), checked byte-for-byte disjoint from the owner's training data.",
        f"- Both runs: same seed ({r['seed']}), preset {cc['model']['preset']} cut at "
        f"{cc['model']['cut']}, {cc['model']['trainers']} trainers, {s['epochs']} epochs, batch "
        f"{s['batch_size']}. CliCooper: noise_multiplier {cc['privacy']['noise_multiplier']}, "
        f"clip {cc['privacy']['clip_norm']}, labels {cc['labels']['mode']} x"
        f"{cc['labels']['expansion']} ({cc['labels']['pseudo_classes']} pseudo-classes), "
        f"watermark {cc['watermark']['enabled']} (ledger verified: {cc['watermark']['verified']}).",
        f"- Clustering: {s['cluster_trials']} trials per source (one source per recorded epoch), "
        f"{s['cluster_subset']} rows each, k-means on L2-normalised rows, permutation test with "
        f"{s['permutations']} random clusterings at p < 0.01. False-positive floor: on features "
        "with no label information about 1% of trials pass this test by chance, so a success "
        "rate of 0.05 or less is consistent with no leak. Top-level clustering keys repeat the "
        "stronger of activations and gradients.",
        "- Naming accuracy: T1..Tn-1 name k-means cluster j as class j (expected 1/C); vanilla Tn "
        "names by the true labels it receives (1.0 by construction); CliCooper Tn groups its "
        "pseudo-classes by k-means on its classifier rows and names group g as class g.",
        f"- Inversion targets: {s['n_invert']} of the owner's training images, from the "
        "activations T1 received in the last epoch (noisy under CliCooper). The query attacker "
        "queries the owner's real inference path with its auxiliary images (noise on for "
        "`query_decoder`, off for `query_decoder_nonadaptive`) and reads what T1 receives; these "
        "inference queries are not in the run's epsilon. Baselines are computed on the same "
        "target images with means from the auxiliary split.",
        f"- Attack budgets: UnSplit {s['unsplit_rounds']} rounds x {s['unsplit_steps']} steps "
        f"(the original paper used 1,000 x 100), auxiliary autoencoder {s['aux_epochs']} epochs, "
        f"decoders {s['decoder_epochs']} epochs, extraction shadow head {s['extraction_epochs']} "
        "epochs. All trainers collude in extraction.",
        "- Epsilon covers the noisy cut activations released to T1 during training, per record, "
        "given the head (not the head's weights). Test-time inference in the main runs sends "
        "activations without noise unless `privacy.noise_at_inference` is set.",
        f"- Privacy-utility points other than the main run train for "
        f"{s['sweep_epochs'] or s['epochs']} epochs on "
        f"{s['sweep_train_subset'] or d['train']} images, so compare them with each other, "
        "not with the main run.",
        "- Watermark removal attacks are not evaluated here.",
    ]


def render(r: dict[str, Any]) -> str:
    t = r["timing"]
    head = [
        f"# CliCooper evaluation on {r['dataset']}{' (quick)' if r['quick'] else ''}",
        "",
        f"Wall time: {t.get('total', 0):.0f} s (stages: "
        + ", ".join(
            f"{k} {v:.0f} s" for k, v in t.items() if k not in ("total", "total_with_outputs")
        )
        + ").",
        "",
        "## Paper-style table",
        "",
    ]
    return "\n".join(
        [
            *head,
            *main_table(r),
            "",
            "## Clustering label inference at every trainer",
            "",
            *clustering_table(r),
            "",
            "## Adaptive extraction (m labelled examples per class)",
            "",
            *adaptive_table(r),
            "",
            "## Privacy-utility trade-off (CliCooper runs over noise_multiplier)",
            "",
            *sweep_table(r),
            "",
            "## Notes",
            "",
            *notes(r),
            "",
            "Figures: figures/reconstructions.png, figures/accuracy_curves.png, "
            "figures/privacy_utility.png, figures/adaptive_extraction.png, "
            "figures/activations_pca.png.",
            "",
        ]
    )


def write_report(results: dict[str, Any], path: Path) -> None:
    path.write_text(render(results))
