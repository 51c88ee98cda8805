"""Bring your own model and dataset: a user nn.Sequential split at chosen indices.

Run: python examples/custom_model.py [OUT_DIR]
"""

from __future__ import annotations

import sys

from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import clicooper


def model(n_outputs: int) -> nn.Sequential:
    """Head = modules [0, 3); trainer t1 = [3, 5); trainer t2 = [5, 7)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 48),
        nn.ReLU(),  # data owner's head, cut after ReLU
        nn.Linear(48, 32),
        nn.ReLU(),  # t1
        nn.Linear(32, 32),
        nn.Linear(32, n_outputs),  # t2 ends in the (pseudo-)classifier
    )


def main(out: str) -> None:
    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        digits.images, digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )
    data = clicooper.Dataset.from_arrays("my-digits", x_tr, y_tr, x_te, y_te, scale=16.0)
    config = clicooper.RunConfig(mode="clicooper", trainers=2, epochs=12, batch_size=32)
    config.privacy.noise_multiplier = 0.1
    # The marked tensors here hold 1,536 and 1,280 weights: 256 bits (the default) would
    # move them by over 40% of their norm every stage (0.46 to 0.61 test accuracy, a
    # WatermarkWarning says so). 64 bits fit: 0.89, as without the watermark.
    config.watermark.bits = 64
    session = clicooper.train(config, out, data=data, model=model, cuts=[3, 5])
    result = session.results
    print(
        f"test accuracy {result['accuracy']['test']:.3f}, "
        f"epsilon {result['privacy']['epsilon']:.1f}, "
        f"{result['labels']['pseudo_classes']} pseudo-classes, "
        f"{result['watermark']['stages']} watermark stages, "
        f"ledger {'verified' if result['watermark']['verified'] else 'NOT verified'}"
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/custom-model")
