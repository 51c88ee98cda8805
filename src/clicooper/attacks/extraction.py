"""Model extraction by colluding trainers, and its adaptive variant.

What the colluders know: their segments (composed into ``stolen_segments``, ending in
Tn's classifier over M pseudo-classes), the activations T1 observed at the cut,
unlabelled auxiliary images from the same distribution, the head's architecture and
the number of classes C. They do not have the owner's head, labels, or the secret
pseudo-class -> class mapping. The stolen segments are deep-copied; the caller's
modules are never modified.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clicooper.attacks._common import (
    ArrayLike,
    as_images,
    as_labels,
    batches,
    fit_mse,
    query_pairs,
    seeded,
    train,
)
from clicooper.attacks.clustering import (
    blind_naming_accuracy,
    group_pseudo_classes,
    naming_accuracy_pseudo,
)
from clicooper.attacks.inversion import aligned_autoencoder
from clicooper.attacks.metrics import matched_accuracy


def last_linear(module: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` of a module (Tn's classifier over pseudo-classes)."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("stolen_segments has no nn.Linear classifier; cannot group its outputs")
    return linears[-1]


def train_shadow_head(
    shadow_head_factory: Callable[[], nn.Module],
    aux_images: ArrayLike,
    observed: ArrayLike,
    epochs: int = 60,
    seed: int = 0,
) -> nn.Module:
    """A shadow head h' whose outputs on images imitate the owner's head, without pairs.

    The encoder of :func:`clicooper.attacks.inversion.aligned_autoencoder`: trained on
    the auxiliary images so that its output distribution matches the observed
    activations (MMD) and decoding an observed activation and re-encoding it gives it
    back (cycle). Measured on digits (vanilla, Linear(64, 32)-ReLU head, true labels
    known): the surrogate's test accuracy was 0.47-0.55 for three victims but only
    0.10-0.19 for victims from other initialisations, so report it over several runs.
    """
    enc, _ = aligned_autoencoder(shadow_head_factory, aux_images, observed, epochs, seed)
    return enc


def query_shadow_head(
    shadow_head_factory: Callable[[], nn.Module],
    pairs_images: ArrayLike,
    pairs_activations: ArrayLike,
    epochs: int = 30,
    seed: int = 0,
    lr: float = 1e-3,
    batch_size: int = 64,
) -> nn.Module:
    """A shadow head fitted to queried pairs: min |h'(x_q) - z_q|^2 / N.

    The query-access attacker (a client of the owner's inference service colluding with
    T1, as for the query decoder) holds pairs of chosen images and the activations T1
    received for them, so it can regress the head directly instead of aligning
    distributions. Returns h' in eval mode.
    """
    x, z = query_pairs(pairs_images, pairs_activations)
    with seeded(seed):
        return fit_mse(shadow_head_factory(), x, z, epochs, seed, lr, batch_size)


def _surrogate(
    stolen_segments: nn.Module,
    shadow_head_factory: Callable[[], nn.Module] | None,
    aux_images: ArrayLike,
    observed: ArrayLike,
    epochs: int,
    seed: int,
    shadow_head: nn.Module | None = None,
) -> nn.Sequential:
    """Shadow head + a frozen copy of the stolen segments, in eval mode.

    A ``shadow_head`` already trained by :func:`train_shadow_head` on the same inputs is
    deep-copied instead of trained again (it is deterministic for a given seed).
    """
    tail = copy.deepcopy(stolen_segments).eval().requires_grad_(False)
    if shadow_head is None:
        if shadow_head_factory is None:
            raise ValueError("pass shadow_head_factory or an already trained shadow_head")
        head = train_shadow_head(shadow_head_factory, aux_images, observed, epochs, seed)
    else:
        head = copy.deepcopy(shadow_head).eval()
    return nn.Sequential(head, tail).eval()


@torch.no_grad()
def _pseudo_probs(model: nn.Module, images: Tensor, batch_size: int = 512) -> Tensor:
    """Softmax over the model's pseudo-class logits, batched, eval mode."""
    model.eval()
    return torch.cat([model(b).softmax(1) for b in images.split(batch_size)])


def _test_set(images: ArrayLike, labels: ArrayLike) -> tuple[Tensor, np.ndarray]:
    x = as_images(images, "test_images")
    return x, as_labels(labels, x.shape[0], "test_labels")


def extract_surrogate(
    stolen_segments: nn.Module,
    shadow_head_factory: Callable[[], nn.Module] | None,
    aux_images: ArrayLike,
    observed: ArrayLike,
    test_images: ArrayLike,
    test_labels: ArrayLike,
    n_classes: int,
    pseudo_to_class: ArrayLike | None = None,
    epochs: int = 60,
    seed: int = 0,
    shadow_head: nn.Module | None = None,
    namings: int = 100,
) -> dict[str, float]:
    """Non-adaptive extraction: shadow head + stolen segments, named without labels.

    The surrogate is :func:`train_shadow_head` composed with the frozen stolen segments.
    Its M outputs must be named as true classes. ``pseudo_to_class`` is the naming the
    colluders actually know: in vanilla split learning Tn received the true labels, so
    the caller passes ``np.arange(C)``. Under CliCooper it is ``None``: the colluders
    group the M pseudo-classes into C groups by k-means on the rows of Tn's last
    weight matrix (:func:`group_pseudo_classes`) and, holding no labels, must name
    them blindly: ``accuracy`` is the mean over ``namings`` random namings
    (:func:`blind_naming_accuracy`; one fixed naming is a draw around 1/C, e.g. 0.034).

    Returns ``accuracy`` (named predictions vs true test labels), ``chance`` = 1/C,
    ``matched_accuracy`` (evaluator-only: accuracy under the best one-to-one naming of
    the groups, i.e. how well the surrogate separates classes if the naming leaked)
    and ``n_pseudo`` = M.
    """
    x, y = _test_set(test_images, test_labels)
    surrogate = _surrogate(
        stolen_segments, shadow_head_factory, aux_images, observed, epochs, seed, shadow_head
    )
    pred = _pseudo_probs(surrogate, x).argmax(1).numpy()
    n_pseudo = last_linear(stolen_segments).out_features
    if pseudo_to_class is None:
        grouping = group_pseudo_classes(
            last_linear(stolen_segments).weight.detach(), n_classes, seed
        )
        accuracy = blind_naming_accuracy(grouping[pred], y, n_classes, namings, seed)
    else:
        grouping = as_labels(pseudo_to_class, n_pseudo, "pseudo_to_class")
        accuracy = naming_accuracy_pseudo(pred, y, grouping)
    return {
        "accuracy": accuracy,
        "chance": 1.0 / n_classes,
        "matched_accuracy": matched_accuracy(grouping[pred], y),
        "n_pseudo": float(n_pseudo),
    }


def learn_mapping(
    model: nn.Module, images: Tensor, labels: np.ndarray, n_classes: int
) -> np.ndarray:
    """Pseudo-class -> class map from labelled examples by soft majority vote.

    S[p, c] = mean over labelled examples of class c of softmax_p(model(x));
    pseudo-class p is named argmax_c S[p, c] (soft votes also name pseudo-classes
    that no labelled example hits as its top prediction).
    """
    probs = _pseudo_probs(model, images)
    votes = torch.stack([probs[torch.as_tensor(labels == c)].mean(0) for c in range(n_classes)])
    return votes.argmax(0).numpy()


def _class_log_probs(logits: Tensor, mapping: Tensor, n_classes: int) -> Tensor:
    """log P(class c) = log sum_{p: mapping[p] = c} softmax_p (the owner's inference rule)."""
    probs = logits.softmax(1)
    summed = torch.zeros(logits.shape[0], n_classes).index_add_(1, mapping, probs)
    return summed.clamp_min(1e-12).log()


def _labelled(images: ArrayLike, labels: ArrayLike, n_classes: int) -> tuple[Tensor, np.ndarray]:
    x = as_images(images, "labelled_images")
    y = as_labels(labels, x.shape[0], "labelled_labels")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"labelled_labels must be class ids in [0, {n_classes})")
    missing = sorted(set(range(n_classes)) - set(y.tolist()))
    if missing:
        raise ValueError(f"labelled_labels has no example of classes {missing}; need every class")
    return x, y


def adaptive_extraction(
    stolen_segments: nn.Module,
    shadow_head_factory: Callable[[], nn.Module] | None,
    aux_images: ArrayLike,
    observed: ArrayLike,
    labelled_images: ArrayLike,
    labelled_labels: ArrayLike,
    test_images: ArrayLike,
    test_labels: ArrayLike,
    n_classes: int,
    epochs: int = 60,
    finetune_epochs: int = 50,
    seed: int = 0,
    lr: float = 1e-3,
    shadow_head: nn.Module | None = None,
) -> dict[str, float]:
    """Adaptive extraction: the colluders also hold m labelled examples per class.

    Builds the non-adaptive surrogate, learns the pseudo -> class naming from the
    labelled examples (:func:`learn_mapping`), then fine-tunes shadow head and stolen
    segments together on them with the loss -log P(y), P(c) the summed softmax mass of
    c's pseudo-classes. Returns ``accuracy`` (after fine-tuning),
    ``accuracy_before_finetune`` (mapping only), ``chance`` and ``m`` (the smallest
    number of labelled examples of any class).
    """
    x, y = _test_set(test_images, test_labels)
    xl, yl = _labelled(labelled_images, labelled_labels, n_classes)
    surrogate = _surrogate(
        stolen_segments, shadow_head_factory, aux_images, observed, epochs, seed, shadow_head
    )
    mapping = learn_mapping(surrogate, xl, yl, n_classes)
    before = float(np.mean(mapping[_pseudo_probs(surrogate, x).argmax(1).numpy()] == y))
    map_t, yl_t = torch.as_tensor(mapping), torch.as_tensor(yl)
    with seeded(seed):
        surrogate.train().requires_grad_(True)
        gen = torch.Generator().manual_seed(seed)

        def loss(idx: Tensor) -> Tensor:
            return F.nll_loss(_class_log_probs(surrogate(xl[idx]), map_t, n_classes), yl_t[idx])

        train(surrogate.parameters(), loss, batches(xl.shape[0], 32, finetune_epochs, gen), lr)
    after = mapping[_pseudo_probs(surrogate, x).argmax(1).numpy()]
    return {
        "accuracy": float(np.mean(after == y)),
        "accuracy_before_finetune": before,
        "chance": 1.0 / n_classes,
        "m": float(np.bincount(yl, minlength=n_classes).min()),
    }


def scratch_baseline(
    model_factory: Callable[[], nn.Module],
    labelled_images: ArrayLike,
    labelled_labels: ArrayLike,
    test_images: ArrayLike,
    test_labels: ArrayLike,
    n_classes: int,
    epochs: int = 100,
    seed: int = 0,
    lr: float = 1e-3,
) -> dict[str, float]:
    """A fresh model trained only on the attacker's labelled examples (cross-entropy, Adam).

    What the m labelled examples are worth without anything stolen: adaptive extraction
    is a real gain only where it beats this. Returns ``accuracy`` and ``chance``.
    """
    x, y = _test_set(test_images, test_labels)
    xl, yl = _labelled(labelled_images, labelled_labels, n_classes)
    yl_t = torch.as_tensor(yl)
    with seeded(seed):
        model = model_factory().train()
        gen = torch.Generator().manual_seed(seed)
        train(
            model.parameters(),
            lambda idx: F.cross_entropy(model(xl[idx]), yl_t[idx]),
            batches(xl.shape[0], 32, epochs, gen),
            lr,
        )
    pred = _pseudo_probs(model, x).argmax(1).numpy()
    return {"accuracy": float(np.mean(pred == y)), "chance": 1.0 / n_classes}
