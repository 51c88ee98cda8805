"""report.md: the paper-style table, one column per run (vanilla, CliCooper releasing every
epoch, CliCooper releasing once), the targets, the frontier and honest notes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clicooper.evaluation.targets import TARGETS

MODES = ("vanilla", "clicooper")
#: What each column is, for the report's legend.
COLUMN_NAMES = {
    "vanilla": "vanilla split learning (no protection)",
    "clicooper": "CliCooper, every-epoch release (the owner's head trains)",
    "once": "CliCooper, release once (a frozen head, one noisy release per record)",
}


def columns(r: dict[str, Any]) -> list[str]:
    """The evaluation's columns (results written before the third column: both modes)."""
    return list(r.get("columns", MODES))


def _default_mark(r: dict[str, Any], column: str) -> str:
    """The legend's note on the column ``clicooper run`` makes by default on this data."""
    if r.get("default_column") != column:
        return ""
    return " -- what `clicooper run` trains on this data with no mode or release flag"


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "none"
    if isinstance(x, float) and x == float("inf"):
        return "inf"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _row(name: str, values: list[Any]) -> str:
    return "| " + " | ".join([name, *[_f(v) for v in values]]) + " |"


def main_table(r: dict[str, Any]) -> list[str]:
    a, runs, cols = r["attacks"], r["runs"], columns(r)
    inv = {m: a[m]["inversion"] for m in cols}
    t1 = {m: a[m]["clustering"]["T1"] for m in cols}

    def row(name: str, value: Any) -> str:
        return _row(name, [value(m) for m in cols])

    lines = ["| metric | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines.append(row("test accuracy", lambda m: runs[m]["accuracy"]["test"]))
    lines.append(row("clustering success at T1 (p < 0.01)", lambda m: t1[m]["success_rate"]))
    lines.append(row("clustering matched accuracy at T1", lambda m: t1[m]["matched_accuracy"]))
    lines.append(row("clustering ARI at T1", lambda m: t1[m]["ari"]))
    lines.append(row("inversion SSIM (headline: max of data-free, aux)", lambda m: inv[m]["ssim"]))
    for k in ("data_free", "aux_no_query", "query_decoder", "query_decoder_nonadaptive"):
        lines.append(row(f"inversion SSIM, {k}", lambda m, k=k: inv[m][k]["ssim"]))
        lines.append(row(f"inversion PSNR dB, {k}", lambda m, k=k: inv[m][k]["psnr"]))
    shallow = {m: inv[m].get("shallow_cut") for m in cols}
    present = [m for m in cols if shallow[m]]
    if present:
        cut = shallow[present[0]]["cut"]
        lines.append(
            row(
                f"inversion SSIM, data_free at the shallowest cut ({cut})",
                lambda m: shallow[m]["data_free"]["ssim"] if shallow[m] else None,
            )
        )
        lines.append(
            row(
                f"test accuracy at the {cut} cut",
                lambda m: shallow[m]["accuracy"] if shallow[m] else None,
            )
        )
    for k in ("dataset_mean", "class_mean", "uniform_noise"):
        lines.append(row(f"baseline SSIM, {k}", lambda m, k=k: inv[m]["baselines"][k]))
    lines.append(
        row("extraction accuracy (non-adaptive)", lambda m: a[m]["extraction"]["accuracy"])
    )
    lines.append(
        row(
            "extraction accuracy (query access)",
            lambda m: a[m]["extraction"]["query_access"]["accuracy"],
        )
    )
    lines.append(row("extraction chance (1/C)", lambda m: a[m]["extraction"]["chance"]))
    lines.append(
        row(
            "extraction, best naming (evaluator-only)",
            lambda m: a[m]["extraction"]["matched_accuracy"],
        )
    )
    lines.append(row("epsilon (delta 1e-5)", lambda m: r["epsilon"][m]))
    return lines


def targets_table(r: dict[str, Any]) -> list[str]:
    """Issue 10's release-once targets, value and pass/fail, in every column."""
    found, cols = r.get("targets"), columns(r)
    if not found:
        return ["(no targets in these results)"]
    lines = ["| target | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for key, what, _ in TARGETS:
        cells = []
        for m in cols:
            t = found[m][key]
            extra = ""
            if "floor" in t:
                extra = f" (floor {_f(t['floor'])})"
            elif "dataset_mean" in t:
                extra = f" (dataset mean {_f(t['dataset_mean'])})"
            elif "chance" in t:
                extra = f" (chance {_f(t['chance'])})"
            cells.append(f"{_f(t['value'])}{extra} {'pass' if t['passed'] else 'FAIL'}")
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    return lines


def once_notes(r: dict[str, Any]) -> list[str]:
    """How the release-once column was run and what its T1 attackers hold."""
    if "once" not in columns(r):
        return ["The release-once column was left out of this evaluation (`--columns`)."]
    p = r["runs"]["once"]["privacy"]
    head = p.get("head") or {}
    inv = r["attacks"]["once"]["inversion"]
    per = p.get("releases_per_record") or {}
    exact = inv.get("attacker_head") == "exact"
    head_eps = _f((head.get("privacy") or {}).get("epsilon"))
    return [
        f"- Head source `{head.get('source')}` ({head.get('pretrain_note', '')}; pretrained by "
        f"{head.get('pretrain_runner')}); head epsilon {head_eps}; "
        f"release: clip {p['clip_norm']}, noise multiplier {_f(p['noise_multiplier'])} for "
        f"epsilon {_f(p['epsilon'])} (delta {p['delta']:g}), releases per record "
        f"{per.get('min')}..{per.get('max')} over {per.get('records')} records.",
        "- What T1 attacks: its release cache, read back from `parties/t1/releases` (every "
        "input T1 recorded in training was checked equal, byte for byte, to the cached release "
        "of its record); the inversion targets are a seeded draw of the record ids it holds. "
        "At inference it is served clean activations (no `noise_at_inference`), so the "
        "query attackers' pairs are clean; the adaptive query decoder adds the release's "
        "noise (its scale is public) itself with its own generator.",
        "- Attacker's head: "
        + (
            "the exact frozen head. The trainers pretrained it on public data (or can rebuild "
            "a seeded or fixed one), so data-free inversion is white-box (Adam on the images "
            "through the fixed head, UnSplit's image steps and prior), and the extraction's "
            "shadow head is the head itself."
            if exact
            else "its architecture only (a fresh preset head ending in the unit norm): the "
            "head was fitted on data the trainers do not hold."
        ),
        "- The shallowest-cut runs and the noise sweep vary the every-epoch release; the "
        "release-once column has no shallow-cut run (its head source would be pretrained "
        "at that cut too).",
    ]


def frontier_table(r: dict[str, Any]) -> list[str]:
    """The frontier's points: the evaluation's runs (and any extra points given), each with
    its data-free SSIM (the run's column attack; release once: white-box through the head
    when the trainers hold it) beside the dataset-mean SSIM of the same targets."""
    points = (r.get("frontier") or {}).get("points") or []
    lines = [
        "| series | run | epochs | epsilon | test accuracy | owner share | data-free SSIM "
        "| dataset-mean SSIM | source |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        lines.append(
            f"| {p.get('series')} | {p.get('label')} | {_f(p.get('epochs'))} | "
            f"{_f(p.get('epsilon'))} | {_f(p.get('accuracy'))} | {_f(p.get('owner_share'))} | "
            f"{_f(p.get('data_free_ssim'))} | {_f(p.get('dataset_mean_ssim'))} | "
            f"{p.get('source')} |"
        )
    return lines


def compute_table(r: dict[str, Any]) -> list[str]:
    """Owner share of the training FLOPs, and each party's FLOPs and CPU seconds, per run."""
    runs = {m: run_.get("compute") for m, run_ in r["runs"].items() if run_.get("compute")}
    if not runs:
        return ["(no compute accounting in these runs)"]
    modes = list(runs)
    parties: list[str] = []
    for c in runs.values():
        for party in (*c["flops"], *c["cpu_seconds"]):
            if party not in parties:
                parties.append(party)
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
    for m in columns(r):
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
    """Adaptive extraction per m, every column's surrogate, then the CliCooper columns'
    accuracy before fine-tuning and the from-scratch baseline on the same m examples."""
    cols = columns(r)
    by = {m: {a["m"]: a for a in r["attacks"][m]["extraction"]["adaptive"]} for m in cols}
    defended = [m for m in cols if m != "vanilla"]
    ms = sorted({k for table in by.values() for k in table})
    lines = [
        "| m per class | "
        + " | ".join(f"{m} surrogate" for m in cols)
        + "".join(f" | {m} before fine-tune" for m in defended)
        + " | from scratch |",
        "|---|" + "---|" * (len(cols) + len(defended) + 1),
    ]
    for k in ms:
        got = [by[m].get(k, {}) for m in cols]
        before = [by[m].get(k, {}).get("accuracy_before_finetune") for m in defended]
        scratch = next((g["scratch_accuracy"] for g in got if "scratch_accuracy" in g), None)
        cells = [_f(g.get("accuracy")) for g in got] + [_f(b) for b in before] + [_f(scratch)]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
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
    if "privacy_utility" not in r:
        return ["The every-epoch column was left out (`--columns`): no noise sweep."]
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
        f"Vanilla test accuracy {_f(r['privacy_utility'].get('vanilla_accuracy'))}; baselines: "
        f"dataset-mean SSIM {_f(first['dataset_mean_ssim'])}, class-mean SSIM "
        f"{_f(first['class_mean_ssim'])}, extraction chance {_f(first['extraction_chance'])}.",
    ]
    return lines


def removal_table(r: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for m in [c for c in columns(r) if c != "vanilla"]:
        lines += [f"### {m}", "", *removal_rows(r["attacks"][m].get("watermark_removal"), m), ""]
    lines.append("Vanilla split learning has no watermark, so no party there can claim anything.")
    return lines


def removal_rows(removal: dict[str, Any] | None, column: str) -> list[str]:
    """One CliCooper column's removal attacks and every trainer's claim after each."""
    if not removal:
        return [f"The {column} run had no watermark: nothing to remove or claim."]
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
        "auxiliary images; it fine-tunes on the chain's own pseudo-class predictions.",
    ]
    return lines


def run_line(r: dict[str, Any]) -> str:
    """The settings every column shares, and the CliCooper runs' protection."""
    s, cols = r["settings"], columns(r)
    first = r["runs"][cols[0]]["model"]
    other = [
        f"{c}: preset {m['preset']} cut at {m['cut']}"
        for c in cols
        if (m := r["runs"][c]["model"])["preset"] != first["preset"] or m["cut"] != first["cut"]
    ]
    differs = f" ({'; '.join(other)})" if other else ""  # release once's owner-light preset
    line = (
        f"- Every run ({', '.join(cols)}): same seed ({r['seed']}), preset {first['preset']} cut "
        f"at {first['cut']}{differs}, {first['trainers']} trainers, {s['epochs']} epochs, "
        f"batch {s['batch_size']}."
    )
    for m in (c for c in cols if c != "vanilla"):
        cc = r["runs"][m]
        line += (
            f" {m}: noise_multiplier {_f(cc['privacy']['noise_multiplier'])}, clip "
            f"{cc['privacy']['clip_norm']}, labels {cc['labels']['mode']} x"
            f"{cc['labels']['expansion']} ({cc['labels']['pseudo_classes']} pseudo-classes), "
            f"watermark {cc['watermark']['enabled']} (ledger verified: "
            f"{cc['watermark']['verified']})."
        )
    return line


def notes(r: dict[str, Any]) -> list[str]:
    s, d = r["settings"], r["data"]
    return [
        f"- Data: {r['dataset']}; owner trains on {d['train']} images, tests on {d['test']}; the "
        f"attackers hold {d['auxiliary']} auxiliary images held out of the owner's training split "
        f"({d['aux_unlabelled']} unlabelled, a pool of {d['aux_labelled_pool']} labelled for the "
        "adaptive attacker only), checked byte-for-byte disjoint from the owner's training data.",
        run_line(r),
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
        "activations T1 received in the last epoch (noisy under CliCooper; release once: its "
        "cached releases, below). The query attacker "
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
        *[f"- `{c}`: {COLUMN_NAMES[c]}{_default_mark(r, c)}" for c in columns(r)],
        "",
    ]
    return "\n".join(
        [
            *head,
            *main_table(r),
            "",
            "## Targets (issue 10, set for Fashion-MNIST), every column",
            "",
            *targets_table(r),
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
            "## Watermark removal on the stolen CliCooper chains",
            "",
            *removal_table(r),
            "",
            "## Release once: what its T1 holds and how it is attacked",
            "",
            *once_notes(r),
            "",
            "## Frontier: accuracy against epsilon, owner share against accuracy",
            "",
            *frontier_table(r),
            "",
            "Figure: figures/frontier.png (left: test accuracy against epsilon for the "
            "every-epoch and release-once runs, vanilla as a line; right: owner share of the "
            "training FLOPs against test accuracy for every run).",
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
            "figures/activations_pca.png, figures/frontier.png.",
            "",
        ]
    )


def write_report(results: dict[str, Any], path: Path) -> None:
    path.write_text(render(results))
