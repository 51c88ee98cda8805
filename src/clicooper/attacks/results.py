"""Result records shared by the attacks (JSON-ready through :meth:`to_dict`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ClusteringResult:
    """Outcome of the clustering label-inference attack over several trials.

    ``matched_accuracy`` and ``ari`` are means over trials; ``success_rate`` is the
    share of trials whose permutation-test p-value is below ``alpha``;
    ``null_matched_accuracy`` is the mean matched accuracy of the random clusterings
    (same cluster sizes) used by the permutation test, i.e. the chance level of the
    matched-accuracy statistic, which is above 1/C because the assignment is optimised.
    """

    matched_accuracy: float
    ari: float
    success_rate: float
    null_matched_accuracy: float
    alpha: float
    permutations: int
    subset_size: int
    trial_matched_accuracy: list[float] = field(default_factory=list)
    trial_ari: list[float] = field(default_factory=list)
    p_values: list[float] = field(default_factory=list)

    @property
    def trials(self) -> int:
        """Number of trials run."""
        return len(self.p_values)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for results.json."""
        return {**asdict(self), "trials": self.trials}
