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
    shallow = {m: inv[m].get("shallow_cut") for m in MODES}
    if all(shallow.values()):
        cut = shallow["vanilla"]["cut"]
        lines.append(
            _row(
                f"inversion SSIM, data_free at the shallowest cut ({cut})",
                [shallow[m]["data_free"]["ssim"] for m in MODES],
            )
        )
        lines.append(
            _row(f"test accuracy at the {cut} cut", [shallow[m]["accuracy"] for m in MODES])
        )
    for k in ("dataset_mean", "class_mean", "uniform_noise"):
        lines.append(_row(f"baseline SSIM, {k}", [inv[m]["baselines"][k] for m in MODES]))
    lines.append(
        _row("extraction accuracy (non-adaptive)", [a[m]["extraction"]["accuracy"] for m in MODES])
    )
    lines.append(
        _row(
            "extraction accuracy (query access)",
            [a[m]["extraction"]["query_access"]["accuracy"] for m in MODES],
        )
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


def compute_table(r: dict[str, Any]) -> list[str]:
    """Owner share of the training FLOPs, and each party's FLOPs and CPU seconds, per run."""
    runs = {m: run_.get("compute") for m, run_ in r["runs"].items() if run_.get("compute")}
    if not runs:
        return ["(no compute accounting in these runs)"]
    modes = list(runs)
    parties: list[str] = []
    for c in runs.values():
        parties += [p for p in (*c["flops"], *c["cpu_seconds"]) if p not in parties]
    lines = ["| metric | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    lines.append(_row("owner share of training FLOPs", [runs[m]["owner_share"] for m in modes]))
    for party in parties:
        flops = [runs[m]["flops"].get(party) for m in modes]
        lines.append(
            "| "
            + " | ".join(
                [
                    f"training GFLOPs, {party}",
                    *("-" if f is None else f"{f / 1e9:.3f}" for f in flops),
                ]
            )
            + " |"
        )
    for party in parties:
        lines.append(
            _row(f"CPU seconds, {party}", [runs[m]["cpu_seconds"].get(party) for m in modes])
        )
    return lines


def clustering_table(r: dict[str, Any]) -> list[str]:
    lines = [
        "| party | mode | source | matched acc (act / grad) | ARI (act / grad) | "
        "success (act / grad) | naming acc (blind / block layout) | chance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in MODES:
        for party, c in r["attacks"][m]["clustering"].items():
            act, grad = c["activations"], c["gradients"]
            lines.append(
                f"| {party} | {m} | {c['source']} | {act['matched_accuracy']:.3f} / "
                f"{grad['matched_accuracy']:.3f} | {act['ari']:.3f} / {grad['ari']:.3f} | "
                f"{act['success_rate']:.2f} / {grad['success_rate']:.2f} | "
                f"{c['naming_accuracy']:.3f} / {_f(c.get('naming_structural'))} | "
                f"{c['chance']:.3f} |"
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


SWEEP_COLUMNS = {
    "test accuracy": "accuracy",
    "epsilon": "epsilon",
    "T1 clustering success act / grad": (
        "clustering_t1_activations_success_rate",
        "clustering_t1_gradients_success_rate",
    ),
    "T1 matched acc": "clustering_t1_matched_accuracy",
    "T1 naming acc": "clustering_t1_naming_accuracy",
    "SSIM data-free": "data_free_ssim",
    "SSIM aux": "aux_no_query_ssim",
    "SSIM query": "query_decoder_ssim",
    "SSIM query non-adaptive": "query_decoder_nonadaptive_ssim",
    "extraction": "extraction_accuracy",
    "extraction (query)": "extraction_query_accuracy",
}


def sweep_table(r: dict[str, Any]) -> list[str]:
    lines = [
        "| noise_multiplier | gradient noise | " + " | ".join(SWEEP_COLUMNS) + " |",
        "|---" * (len(SWEEP_COLUMNS) + 2) + "|",
    ]
    for p in r["privacy_utility"]["points"]:
        main = " (main run)" if p.get("main_run") else ""
        cells = [
            " / ".join(_f(p[k], 2) for k in key) if isinstance(key, tuple) else _f(p[key])
            for key in SWEEP_COLUMNS.values()
        ]
        head = f"| {p['noise_multiplier']:g}{main} | {p['gradient_noise_multiplier']:g} | "
        lines.append(head + " | ".join(cells) + " |")
    first = r["privacy_utility"]["points"][0]
    lines += [
        "",
        f"Vanilla test accuracy {_f(r['privacy_utility']['vanilla_accuracy'])}; baselines: "
        f"dataset-mean SSIM {_f(first['dataset_mean_ssim'])}, class-mean SSIM "
        f"{_f(first['class_mean_ssim'])}, extraction chance {_f(first['extraction_chance'])}.",
    ]
    return lines


def removal_table(r: dict[str, Any]) -> list[str]:
    removal = r["attacks"]["clicooper"].get("watermark_removal")
    if not removal:
        return ["The clicooper run had no watermark: nothing to remove or claim."]
    rows = removal["rows"]
    parties = [k for k in rows[0] if k.startswith("t") and isinstance(rows[0][k], dict)]
    lines = [
        "| attack | steps | test accuracy | "
        + " | ".join(f"{p} BER / p-value / claim holds" for p in parties)
        + " |",
        "|---" * (3 + len(parties)) + "|",
    ]
    for row in rows:
        claims = [
            f"{row[p]['ber']:.3f} / {row[p]['p_value']:.2e} / {row[p]['holds']}" for p in parties
        ]
        lines.append(
            f"| {row['attack']} | {row['steps']} | {row['accuracy']:.3f} | "
            + " | ".join(claims)
            + " |"
        )
    lines += [
        "",
        f"The thief holds the whole stolen chain and {removal['thief_images']} unlabelled "
        "auxiliary images; it fine-tunes on the chain's own pseudo-class predictions. Vanilla "
        "split learning has no watermark, so no party there can claim anything.",
    ]
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
        "- Naming accuracy: vanilla Tn names by the true labels it receives (1.0 by "
        "construction). Every other party holds groups but nothing that names them (T1..Tn-1: "
        "k-means clusters of its activations; CliCooper Tn: its pseudo-classes grouped by "
        "k-means on its classifier rows), so its naming is blind: the mean over 100 random "
        "namings, 1/C in expectation (a fixed rule like cluster j -> class j is one draw of it). "
        "CliCooper Tn also tries the block layout p -> floor(p C / M), which names every sample "
        "right if the secret permutation is missing. How well the groups follow the classes is "
        "the matched accuracy and ARI.",
        f"- Inversion targets: {s['n_invert']} of the owner's training images, from the "
        "activations T1 received in the last epoch (noisy under CliCooper). The query attacker "
        "queries the owner's real inference path with its auxiliary images (noise on for "
        "`query_decoder`, off for `query_decoder_nonadaptive`) and reads what T1 receives; these "
        "inference queries are not in the run's epsilon. Baselines are computed on the same "
        "target images with means from the auxiliary split.",
        f"- Attack budgets: UnSplit {s['unsplit_rounds']} rounds x {s['unsplit_steps']} steps "
        f"(the original paper used 1,000 x 100), auxiliary autoencoder {s['aux_epochs']} epochs "
        "(its decoder is the aux-data inverter, its encoder the extraction's shadow head), "
        f"decoders {s['decoder_epochs']} epochs, adaptive fine-tuning {s['finetune_epochs']} "
        f"epochs, from-scratch baseline {s['scratch_epochs']} epochs. All trainers collude in "
        "extraction. Query-access extraction regresses a shadow head on the query attacker's "
        "pairs (as many as for the query decoder) and names the stolen outputs like the "
        "non-adaptive attacker.",
        f"- Shallowest cut: vanilla and CliCooper also train for {s['shallow_epochs']} epoch(s) "
        "cut after the preset's first block, and UnSplit inverts T1's last-epoch activations "
        "there (same budget). The default cut is a low-dimensional bottleneck that no data-free "
        "attack tried here inverts better than the dataset mean.",
        "- Epsilon covers the noisy cut activations released to T1 during training, per record, "
        "given the head (not the head's weights). Test-time inference in the main runs sends "
        "activations without noise unless `privacy.noise_at_inference` is set.",
        f"- Privacy-utility points other than the main run train for "
        f"{s['sweep_epochs'] or s['epochs']} epochs on "
        f"{s['sweep_train_subset'] or d['train']} images, so compare them with each other, "
        "not with the main run. Each point is attacked like the main runs at T1 (clustering, "
        "all inversions, non-adaptive extraction).",
        "- Gradient noise: the last trainer clips each sample's loss gradient to "
        "`privacy.gradient_clip_norm` and adds Gaussian noise of std `gradient noise` x that "
        "norm before sending it back (off in the main run). Activation noise cannot touch the "
        "gradients, which carry the pseudo-labels; this is the one setting that moves T1's "
        "gradient clustering, and the table shows what it costs in accuracy.",
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
            "## Compute: who does the training work",
            "",
            *compute_table(r),
            "",
            "FLOPs: forward plus backward of every training step, counted with "
            "torch.utils.flop_counter.FlopCounterMode (matrix products and convolutions; "
            "element-wise work such as the noise is left out); CPU seconds: each party's own.",
            "",
            "## Clustering label inference at every trainer",
            "",
            *clustering_table(r),
            "",
            "## Adaptive extraction (m labelled examples per class)",
            "",
            *adaptive_table(r),
            "",
            "## Watermark removal on the stolen CliCooper chain",
            "",
            *removal_table(r),
            "",
            "## Privacy-utility trade-off: accuracy and every T1 attack over the noise",
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
