"""Evaluation figures (matplotlib, Agg backend): one PNG per question."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402

STRENGTHS = ("data_free", "aux_no_query", "query_decoder", "query_decoder_nonadaptive")


def _image(ax: Any, img: Any) -> None:
    a = np.asarray(img)
    a = a[0] if a.shape[0] == 1 else np.moveaxis(a, 0, -1)
    ax.imshow(a, cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])


def reconstruction_grid(figures: dict[str, Any], path: Path) -> None:
    """Rows: each column's originals and its every attacker strength (a release-once T1
    attacks other records than a T1 that keeps its last epoch, so each has its originals),
    then data-free inversion at the shallowest cut (its own short runs and originals)."""
    cols = [c for c in figures if c in ("vanilla", "clicooper", "once")]
    rows = []
    for mode in cols:
        rows.append((f"{mode}\noriginal", figures[mode]["originals"]))
        rows += [(f"{mode}\n{k}", figures[mode]["recon"][k]) for k in STRENGTHS]
    shallow = [m for m in cols if "shallow" in figures[m]]
    if shallow:
        cut = figures[shallow[0]]["shallow"]["cut"]
        rows.append((f"original\n({cut} runs)", figures[shallow[0]]["shallow"]["originals"]))
        rows += [
            (f"{mode}\ndata_free at {cut}", figures[mode]["shallow"]["reconstructions"])
            for mode in shallow
        ]
    n = len(rows[0][1])
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n + 1.6, 1.1 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(n):
            _image(axes[r][c], images[c])
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle("Inversion at T1 (what T1 holds: training inputs, or its release cache)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def accuracy_curves(results: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for mode, run in results["runs"].items():
        hist = run["history"]
        ax.plot([h["epoch"] for h in hist], [h["test_accuracy"] for h in hist], "o-", label=mode)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def privacy_utility(results: dict[str, Any], path: Path) -> None:
    """Accuracy, then every T1 attack's headline, against the activation noise; a third
    panel against the gradient noise when the sweep has gradient-noise points."""
    all_pts = results["privacy_utility"]["points"]
    pts = [p for p in all_pts if p["series"] == "activation"]
    grad_pts = [p for p in all_pts if p["series"] == "gradient"]
    panels = 3 if grad_pts else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4))
    left, right = axes[0], axes[1]
    vanilla = results["privacy_utility"]["vanilla_accuracy"]
    nm = [p["noise_multiplier"] for p in pts]
    left.plot(nm, [p["accuracy"] for p in pts], "o-", label="CliCooper test accuracy")
    if vanilla is not None:
        left.axhline(vanilla, color="grey", ls="-.", label="vanilla test accuracy")
    for p in pts:
        if p["epsilon"] is not None:
            left.annotate(
                f"eps {p['epsilon']:.3g}",
                (p["noise_multiplier"], p["accuracy"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(3, 5),
            )
    left.set_ylabel("test accuracy")
    series = {
        "T1 clustering success (activations)": "clustering_t1_activations_success_rate",
        "T1 clustering success (gradients)": "clustering_t1_gradients_success_rate",
        "data-free SSIM": "data_free_ssim",
        "aux-data SSIM": "aux_no_query_ssim",
        "query-decoder SSIM": "query_decoder_ssim",
        "extraction accuracy": "extraction_accuracy",
    }
    for (label, key), marker in zip(series.items(), "sv^D<>", strict=True):
        right.plot(nm, [p[key] for p in pts], f"{marker}-", label=label, ms=4)
    for key, style, label in (
        ("dataset_mean_ssim", ":", "dataset-mean SSIM"),
        ("class_mean_ssim", "--", "class-mean SSIM"),
        ("extraction_chance", "-.", "chance"),
    ):
        right.axhline(pts[0][key], color="grey", ls=style, lw=0.8, label=label)
    right.set_ylabel("attack success")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xticks(nm, [f"{v:g}" for v in nm])  # the sweep's values, not crowded 10^k ticks
        ax.minorticks_off()
        ax.set_xlabel("noise_multiplier (activations)")
    if panels == 3:
        ax = axes[2]
        gm = [p["gradient_noise_multiplier"] for p in grad_pts]
        ax.plot(gm, [p["accuracy"] for p in grad_pts], "o-", label="CliCooper test accuracy")
        clustering = list(series.items())[:2]  # T1 clustering on activations and gradients
        for (label, key), marker in zip(clustering, "sv", strict=True):
            ax.plot(gm, [p[key] for p in grad_pts], f"{marker}-", label=label, ms=4)
        if vanilla is not None:
            ax.axhline(vanilla, color="grey", ls="-.", label="vanilla test accuracy")
        ax.set_xlabel(f"gradient noise (activation noise {grad_pts[0]['noise_multiplier']:g})")
    for ax in axes:
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def adaptive_curve(results: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    cols = results.get("columns", ["vanilla", "clicooper"])
    for mode in cols:
        ext = results["attacks"][mode]["extraction"]
        ms = [a["m"] for a in ext["adaptive"]]
        ax.plot(ms, [a["accuracy"] for a in ext["adaptive"]], "o-", label=f"{mode} surrogate")
    ext = results["attacks"][cols[-1]]["extraction"]
    ms = [a["m"] for a in ext["adaptive"]]
    ax.plot(ms, [a["scratch_accuracy"] for a in ext["adaptive"]], "k--", label="from scratch")
    ax.axhline(ext["chance"], color="grey", ls=":", label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("labelled examples per class (m)")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def activation_projection(figures: dict[str, Any], path: Path) -> None:
    """2-D PCA of what T1 received in the last epoch, coloured by true label."""
    cols = [c for c in figures if c in ("vanilla", "clicooper", "once")]
    fig, axes = plt.subplots(1, len(cols), figsize=(5 * len(cols), 4), squeeze=False)
    for ax, mode in zip(axes[0], cols, strict=True):
        z = np.asarray(figures[mode]["t1_activations"]).reshape(len(figures[mode]["t1_labels"]), -1)
        xy = PCA(n_components=2, random_state=0).fit_transform(z)
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=figures[mode]["t1_labels"], cmap="tab10", s=6)
        ax.set_title(f"{mode}: T1 input, PCA", fontsize=10)
    fig.colorbar(sc, ax=list(axes[0]), label="true label")
    fig.savefig(path, dpi=110)
    plt.close(fig)


SERIES_STYLE = {"every-epoch": ("o-", "C0"), "once": ("s-", "C1"), "vanilla": ("*", "grey")}


def frontier(results: dict[str, Any], path: Path) -> None:
    """Left: test accuracy against epsilon, every-epoch and release-once runs (each series
    by epsilon; vanilla, which has none, as a line). Right: owner share of the training
    FLOPs against test accuracy, every run. Main runs are drawn large, extra points hollow."""
    points = results["frontier"]["points"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for series, (style, colour) in SERIES_STYLE.items():
        mine = [p for p in points if p["series"] == series]
        dp = sorted((p for p in mine if p["epsilon"] is not None), key=lambda p: p["epsilon"])
        if dp:
            left.plot(
                [p["epsilon"] for p in dp],
                [p["accuracy"] for p in dp],
                style,
                color=colour,
                label=series,
                ms=5,
            )
        for p in mine:
            if series == "vanilla":
                left.axhline(p["accuracy"], color=colour, ls="-.", lw=0.8, label=p["label"])
            shared = p.get("owner_share")
            if shared is not None:
                right.scatter(
                    p["accuracy"],
                    shared,
                    color=colour,
                    marker=style[0],
                    s=70 if p.get("main_run") else 25,
                    facecolors="none" if p.get("source") == "extra" else colour,
                )
                right.annotate(
                    p["label"],
                    (p["accuracy"], shared),
                    fontsize=6,
                    textcoords="offset points",
                    xytext=(3, 3),
                )
    for p in points:
        if p["epsilon"] is not None and p["series"] not in SERIES_STYLE:
            left.scatter(p["epsilon"], p["accuracy"], marker="x", color="k")
    left.set_xscale("log")
    left.set_xlabel("epsilon (delta 1e-5, whole run)")
    left.set_ylabel("test accuracy")
    right.set_xlabel("test accuracy")
    right.set_ylabel("owner share of training FLOPs")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)
    fig.suptitle(f"Frontier on {results['dataset']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_figures(
    results: dict[str, Any], figures: dict[str, Any], out: Path, image_shape: tuple[int, ...]
) -> list[Path]:
    """All evaluation figures into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "reconstructions.png": lambda p: reconstruction_grid(figures, p),
        "accuracy_curves.png": lambda p: accuracy_curves(results, p),
        "adaptive_extraction.png": lambda p: adaptive_curve(results, p),
        "activations_pca.png": lambda p: activation_projection(figures, p),
        "frontier.png": lambda p: frontier(results, p),
    }
    if "privacy_utility" in results:  # the every-epoch column's noise sweep
        paths["privacy_utility.png"] = lambda p: privacy_utility(results, p)
    for name, draw in paths.items():
        draw(out / name)
    return [out / name for name in paths]
