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
    """Rows: originals, each attacker strength on vanilla and on CliCooper, then data-free
    inversion at the shallowest cut (its own short runs, so its own originals)."""
    rows = [("original", figures["vanilla"]["originals"])]
    for mode in ("vanilla", "clicooper"):
        rows += [(f"{mode}\n{k}", figures[mode]["recon"][k]) for k in STRENGTHS]
    if "shallow" in figures["vanilla"]:
        cut = figures["vanilla"]["shallow"]["cut"]
        rows.append((f"original\n({cut} runs)", figures["vanilla"]["shallow"]["originals"]))
        rows += [
            (f"{mode}\ndata_free at {cut}", figures[mode]["shallow"]["reconstructions"])
            for mode in ("vanilla", "clicooper")
        ]
    n = len(rows[0][1])
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n + 1.6, 1.1 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(n):
            _image(axes[r][c], images[c])
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle("Inversion at T1 (training-time activations)")
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
    for mode in ("vanilla", "clicooper"):
        ext = results["attacks"][mode]["extraction"]
        ms = [a["m"] for a in ext["adaptive"]]
        ax.plot(ms, [a["accuracy"] for a in ext["adaptive"]], "o-", label=f"{mode} surrogate")
    ms = [a["m"] for a in results["attacks"]["clicooper"]["extraction"]["adaptive"]]
    scratch = [
        a["scratch_accuracy"] for a in results["attacks"]["clicooper"]["extraction"]["adaptive"]
    ]
    ax.plot(ms, scratch, "k--", label="from scratch on the m examples")
    ax.axhline(
        results["attacks"]["clicooper"]["extraction"]["chance"],
        color="grey",
        ls=":",
        label="chance",
    )
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
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, mode in zip(axes, ("vanilla", "clicooper"), strict=True):
        z = np.asarray(figures[mode]["t1_activations"]).reshape(len(figures[mode]["t1_labels"]), -1)
        xy = PCA(n_components=2, random_state=0).fit_transform(z)
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=figures[mode]["t1_labels"], cmap="tab10", s=6)
        ax.set_title(f"{mode}: T1 input, PCA", fontsize=10)
    fig.colorbar(sc, ax=axes, label="true label")
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
        "privacy_utility.png": lambda p: privacy_utility(results, p),
        "adaptive_extraction.png": lambda p: adaptive_curve(results, p),
        "activations_pca.png": lambda p: activation_projection(figures, p),
    }
    for name, draw in paths.items():
        draw(out / name)
    return [out / name for name in paths]
