"""Secret label obfuscation (DESIGN §4).

Each of the C true classes owns K pseudo-classes; with D optional decoys
(pseudo-classes no sample uses, to hide C) there are M = C*K + D. A secret
permutation ``perm`` of [M] places class c's j-th sub-class at pseudo-label
``perm[c*K + j]``. A sample's sub-class j is chosen by one of two modes:

* ``keyed``: ``j = HMAC-SHA256(k_sub, sample id) mod K``, stable across epochs;
* ``feature``: the owner clusters a secret random projection of each class's
  head features into K parts with k-means, so sub-classes are learnable.

Decoding, at the data owner only: the score of true class c is
``log sum_{p in P(c)} softmax(pseudo_logits)_p`` (the log of the probability
mass of c's pseudo-classes). The mapping never leaves the owner.
"""

from __future__ import annotations

import hmac
from typing import Literal

import numpy as np
import torch

from clicooper.privacy.secrets import OwnerSecret

LabelMode = Literal["keyed", "feature"]
PROJECTION_DIM = 16


class LabelObfuscator:
    """The owner's secret map between true labels and pseudo-labels."""

    def __init__(
        self,
        secret: OwnerSecret,
        num_classes: int,
        expansion: int,
        decoys: int = 0,
        mode: LabelMode = "feature",
    ) -> None:
        if expansion < 1 or decoys < 0:
            raise ValueError("expansion must be >= 1 and decoys >= 0")
        self.num_classes, self.expansion, self.decoys, self.mode = (
            num_classes,
            expansion,
            decoys,
            mode,
        )
        self.pseudo_classes = num_classes * expansion + decoys
        gen = torch.Generator().manual_seed(secret.derive_seed("labels/permutation"))
        self.permutation = torch.randperm(self.pseudo_classes, generator=gen)
        self._sub_key = secret.derive("labels/sub-label")
        self._projection_seed = secret.derive_seed("labels/feature-projection")
        self._cluster_seed = secret.derive_seed("labels/feature-kmeans") % (2**31)
        # pseudo-label -> true class (or -1 for decoys), for decoding
        owner = torch.full((self.pseudo_classes,), -1, dtype=torch.long)
        owner[self.permutation[: num_classes * expansion]] = torch.arange(
            num_classes
        ).repeat_interleave(expansion)
        self.class_of_pseudo = owner
        self.sub_labels: torch.Tensor | None = None

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Fix every training sample's sub-class (index = sample id)."""
        if self.mode == "keyed" or self.expansion == 1:
            self.sub_labels = self._keyed_subs(len(labels))
        else:
            self.sub_labels = self._feature_subs(features, labels)

    def _keyed_subs(self, n: int) -> torch.Tensor:
        digests = (
            hmac.new(self._sub_key, i.to_bytes(8, "big"), "sha256").digest() for i in range(n)
        )
        return torch.tensor([int.from_bytes(d[:8], "big") % self.expansion for d in digests])

    def _feature_subs(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from sklearn.cluster import KMeans

        flat = features.flatten(1).double()
        gen = torch.Generator().manual_seed(self._projection_seed)
        proj = torch.randn(flat.shape[1], PROJECTION_DIM, generator=gen, dtype=torch.float64)
        projected = (flat @ proj).numpy()
        subs = np.zeros(len(labels), dtype=np.int64)
        for c in range(self.num_classes):
            idx = np.flatnonzero(labels.numpy() == c)
            if len(idx) < self.expansion:
                continue
            km = KMeans(self.expansion, n_init=3, random_state=self._cluster_seed)
            subs[idx] = km.fit_predict(projected[idx])
        return torch.from_numpy(subs)

    def encode(self, labels: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
        """Pseudo-labels of the training samples ``sample_ids`` with true labels ``labels``."""
        if self.sub_labels is None:
            raise RuntimeError("call fit() before encode()")
        subs = self.sub_labels[sample_ids]
        return self.permutation[labels * self.expansion + subs]

    def encode_public(self, labels: torch.Tensor) -> torch.Tensor:
        """Pseudo-labels of public records (the warm start's): keyed sub-classes from a key
        of their own (HMAC of ``"public" || index``), in either mode, so the private
        records' sub-labels are not touched. The permutation is the same: trainers that
        hold the public labels can learn the mapping from these (DESIGN §4's honest limit:
        an attacker with labelled examples)."""
        digests = (
            hmac.new(self._sub_key, b"public" + i.to_bytes(8, "big"), "sha256").digest()
            for i in range(len(labels))
        )
        subs = torch.tensor([int.from_bytes(d[:8], "big") % self.expansion for d in digests])
        return self.permutation[labels * self.expansion + subs]

    def decode_logits(self, pseudo_logits: torch.Tensor) -> torch.Tensor:
        """True-class log-scores: log of the softmax mass of each class's pseudo-classes."""
        logp = torch.log_softmax(pseudo_logits, dim=1)
        index = self.permutation[: self.num_classes * self.expansion].view(
            self.num_classes, self.expansion
        )
        return torch.logsumexp(logp[:, index], dim=2)

    def decode_labels(self, pseudo_labels: torch.Tensor) -> torch.Tensor:
        """True labels of pseudo-labels (-1 for decoys)."""
        return self.class_of_pseudo[pseudo_labels]
