"""Which ``run`` flag sets which config key, and the effective default that ``--help`` shows.

A flag left unset takes its value from ``--config`` or, failing that, from
:class:`clicooper.config.RunConfig`; so ``--help`` shows the config's default, with the
small-data defaults that apply on digits, instead of typer's bare "None".
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from clicooper.config import (
    DEFAULT_LR,
    NOISE_BY_SIZE,
    ONCE_MODEL,
    ONCE_TARGET_EPSILON,
    RELEASE_BY_SIZE,
    SMALL_DATA_DEFAULTS,
    RunConfig,
)

RUN_FLAG_KEYS: dict[str, str] = {
    "dataset": "dataset",
    "mode": "mode",
    "trainers": "trainers",
    "epochs": "epochs",
    "seed": "seed",
    "model": "model",
    "cut": "cut",
    "batch_size": "batch_size",
    "lr": "lr",
    "optimizer": "optimizer",
    "schedule": "schedule",
    "warmup_steps": "warmup_steps",
    "weight_decay": "weight_decay",
    "device": "device",
    "train_subset": "train_subset",
    "test_subset": "test_subset",
    "micro_batches": "micro_batches",
    "record": "record",
    "threads": "threads",
    "checkpoint_steps": "checkpoint_steps",
    "owner_secret": "owner_secret",
    "transport": "transport",
    "noise_multiplier": "privacy.noise_multiplier",
    "clip_norm": "privacy.clip_norm",
    "mechanism": "privacy.mechanism",
    "target_epsilon": "privacy.target_epsilon",
    "delta": "privacy.delta",
    "release": "privacy.release",
    "head_source": "head.source",
    "warm_epochs": "chain.warm_epochs",
    "denoise": "chain.denoise",
    "replay": "chain.replay",
    "fresh_optimizer": "chain.fresh_optimizer",
    "release_lr_factor": "chain.release_lr_factor",
    "noise_at_inference": "privacy.noise_at_inference",
    "gradient_noise": "privacy.gradient_noise_multiplier",
    "gradient_clip": "privacy.gradient_clip_norm",
    "expansion": "labels.expansion",
    "decoys": "labels.decoys",
    "label_mode": "labels.mode",
    "watermark": "watermark.enabled",
    "stage_steps": "watermark.stage_steps",
    "channels_last": "images.layout",
    "minmax_scale": "images.minmax_scale",
}

# What an unset (None) setting means, where "none" would not say.
_NONE_MEANS = {
    "cut": "the preset's default cut",
    "batch_size": "32 below 10,000 training samples, else 128",
    "train_subset": "all",
    "test_subset": "all",
    "owner_secret": "a fresh one",
    "weight_decay": "the optimizer's (adamw 0.01, else 0)",
    "privacy.noise_multiplier": "{1:g} below {0:,} training samples, else {2:g}".format(
        *NOISE_BY_SIZE
    ),
    "privacy.target_epsilon": (
        f"release once {ONCE_TARGET_EPSILON:g} unless --noise-multiplier is given; "
        "every-epoch none: --noise-multiplier decides"
    ),
    "watermark.stage_steps": "one stage per epoch",
    "privacy.release": "{1} below {0:,} training samples, else {2} (clicooper mode; "
    "every-epoch where a setting needs the head to train, or with served parties)".format(
        *RELEASE_BY_SIZE
    ),
}


def config_overrides(flags: dict[str, Any]) -> dict[str, Any]:
    """The dotted config keys that the given ``run`` flags set (None: unset)."""
    return {RUN_FLAG_KEYS[name]: value for name, value in flags.items() if name in RUN_FLAG_KEYS}


def effective_default(key: str) -> str:
    """The value ``key`` takes when neither the flag nor ``--config`` sets it."""
    model: type[BaseModel] = RunConfig
    *parents, leaf = key.split(".")
    for part in parents:
        model = model.model_fields[part].annotation  # type: ignore[assignment]
    value = model.model_fields[leaf].default
    if key == "dataset":
        return "auto: fashion-mnist when installed, else digits"
    if key == "lr":
        return "; ".join(f"{release}: {lr:g}" for release, lr in DEFAULT_LR.items())
    if key == "model":
        value = f"{value}; with release once {ONCE_MODEL.get(value, value)}"
    text = _NONE_MEANS.get(key, "none") if value is None else _show(value)
    small = [f"{name}: {d[key]}" for name, d in SMALL_DATA_DEFAULTS.items() if key in d]
    return "; ".join([text, *small])


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def show_config_defaults(command: Callable[..., Any]) -> None:
    """Set each config flag's ``show_default`` to the config's effective default.

    The annotations are evaluated once and stored back (they are strings under
    ``from __future__ import annotations``, and each evaluation makes new option objects).
    """
    hints = typing.get_type_hints(command, include_extras=True)
    for name in inspect.signature(command).parameters:
        key = RUN_FLAG_KEYS.get(name)
        for info in getattr(hints[name], "__metadata__", ()) if key else ():
            if hasattr(info, "show_default"):
                info.show_default = effective_default(key)
    command.__annotations__.update(hints)
