"""What a trainer and the verifier must share with the data owner, and the check of it."""

from __future__ import annotations

from typing import Any

from clicooper.common.messages import ProtocolError
from clicooper.config import RunConfig

#: Settings a trainer and a verifier must share with the data owner.
SHARED = {
    # privacy: the last trainer applies the gradient protection the owner asked for;
    # micro_batches: a trainer bounds the work it holds by it (max_pending)
    "trainer": (
        "mode",
        "model",
        "cut",
        "trainers",
        "seed",
        "lr",
        "optimizer",
        "lr_per_party",
        "momentum",
        "weight_decay",
        "schedule",
        "warmup_steps",
        "decay_steps",
        "decay_gamma",
        "record",
        "micro_batches",
        "privacy",
        "watermark",
        "chain",  # release once: the lr factor, replay and optimizer reset of the chain
    ),
    "verifier": ("watermark",),
}


def party_settings(cfg: RunConfig, role: str) -> dict[str, Any]:
    """The settings of ``cfg`` a party of ``role`` must share with the data owner."""
    dump = cfg.model_dump(mode="json")
    # The activation noise is the owner's alone (no other party adds or reads it), and an
    # unset one is resolved by the owner's data size, which the other parties do not know.
    dump["privacy"].pop("noise_multiplier")
    return {key: dump[key] for key in SHARED[role]}


def check_settings(mine: dict[str, Any], theirs: Any, name: str) -> None:
    """ProtocolError naming the first setting that differs from the data owner's."""
    if not isinstance(theirs, dict):
        raise ProtocolError("setup carries no settings")
    for key, value in mine.items():
        if theirs.get(key) != value:
            raise ProtocolError(
                f"setting {key} differs: the data owner has {theirs.get(key)!r}, {name} has "
                f"{value!r}; start every party with the same config"
            )
