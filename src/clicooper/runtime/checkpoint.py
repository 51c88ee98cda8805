"""Atomic per-party checkpoints: safetensors for tensors, JSON for scalars, never pickle.

One checkpoint is one file ``<dir>/step-<s>.safetensors``: the tensors (segment
or head, flattened optimizer state, RNG states) plus a JSON document in the
safetensors header (``__metadata__["clicooper"]``) with every scalar: step,
counters, the lr scheduler's position, the party's ledger position. Tensors are
saved from CPU copies and loaded onto the party's device by ``load_state_dict``. It is written by
:func:`clicooper.common.files.write_private` (mode 0600, in a 0700 directory):
a unique temporary file, fsynced, then renamed over the final name
(``os.replace``), so a crash leaves either the old or the new checkpoint,
never half of one. The last :data:`KEEP` checkpoints are kept: after a crash
in the middle of a checkpoint round the parties still share an earlier step.

The optimizer's ``state_dict`` is flattened by hand: its tensors become
``optim.state.<param>.<key>``, its non-tensor per-parameter values and its
``param_groups`` go to JSON. ``torch.save`` is pickle and is never used.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from clicooper.common.files import private_dir, write_private
from clicooper.runtime.optim import load_scheduler, scheduler_state

KEEP = 3
_NAME = re.compile(r"^step-(\d{1,12})\.safetensors$")
_META_KEY = "clicooper"
_OPTIM = "optim.state."


class CheckpointError(ValueError):
    """A checkpoint that is missing or cannot be read."""


def save(
    directory: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> Path:
    """Write checkpoint ``step`` in ``directory`` (mode 0700) and prune to the last KEEP."""
    private_dir(directory)
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    doc = json.dumps({**meta, "step": step}, sort_keys=True, allow_nan=False)
    path = directory / f"step-{step}.safetensors"
    write_private(path, st_save(clean, metadata={_META_KEY: doc}))
    for old in steps(directory)[:-KEEP]:
        (directory / f"step-{old}.safetensors").unlink(missing_ok=True)
    return path


def steps(directory: Path) -> list[int]:
    """Steps of the checkpoints in ``directory``, ascending (none: empty list)."""
    if not directory.is_dir():
        return []
    found = (_NAME.fullmatch(p.name) for p in directory.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def load(directory: Path, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and scalars of checkpoint ``step``; :class:`CheckpointError` if unreadable."""
    path = directory / f"step-{step}.safetensors"
    try:
        data = path.read_bytes()
        tensors = st_load(data)
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size])
        meta = json.loads(header["__metadata__"][_META_KEY])
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint for step {step} in {directory}") from None
    except (SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a clicooper checkpoint ({exc})") from None
    if meta.get("step") != step:
        raise CheckpointError(f"{path} holds step {meta.get('step')}, not {step}")
    return tensors, meta


# -- state flattening ----------------------------------------------------------------


def module_tensors(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().clone() for k, v in module.state_dict().items()}


def load_module(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    start = len(prefix) + 1
    state = {k[start:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    module.load_state_dict(state, strict=True)


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    """``(tensors, json)`` of ``optimizer.state_dict()`` without pickle."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{_OPTIM}{index}.{key}"] = value.detach().clone()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], doc: Any
) -> None:
    """Inverse of :func:`optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(_OPTIM):
            index, key = name[len(_OPTIM) :].split(".", 1)
            state.setdefault(int(index), {})[key] = value.clone()
    for index, entries in doc["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    groups = [
        {k: tuple(v) if k == "betas" else v for k, v in group.items()}
        for group in doc["param_groups"]
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    """The global torch RNG state and the states of ``generators`` (uint8 tensors)."""
    out = {"rng.torch": torch.get_rng_state()}
    out.update({f"rng.{name}": gen.get_state() for name, gen in generators.items()})
    return out


def load_rng(tensors: dict[str, torch.Tensor], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    for name, gen in generators.items():
        gen.set_state(tensors[f"rng.{name}"])


def common_step(available: dict[str, list[int]]) -> int:
    """The last step every party has a checkpoint of; CheckpointError if there is none."""
    sets = [set(v) for v in available.values()]
    shared = set.intersection(*sets) if sets else set()
    if not shared:
        listing = ", ".join(f"{p}: {v or 'none'}" for p, v in available.items())
        raise CheckpointError(f"no checkpoint step common to every party ({listing})")
    return max(shared)


# -- party handlers ---------------------------------------------------------------------
#
# A party answers three control ops from the data owner: ``checkpoint`` (save
# the state after ``step``), ``checkpoints`` (list saved steps) and ``restore``
# (go back to ``step``). The data owner coordinates them (see runtime.driver).


def attach_trainer(trainer: Any, directory: Path) -> None:
    """Let ``trainer`` checkpoint to and restore from ``directory``."""

    def checkpoint(msg: Any) -> dict[str, Any]:
        step = int(msg.meta["step"])
        opt_tensors, opt_doc = optimizer_state(trainer.optimizer)
        tensors = {**module_tensors(trainer.segment, "segment"), **opt_tensors, **rng_tensors({})}
        chain = trainer.chain.state() if trainer.chain is not None else {}
        meta = {
            "steps_applied": trainer.steps_applied,
            "optim": opt_doc,
            "sched": scheduler_state(trainer.scheduler),
            "chain": chain,
            "compute": trainer.compute.state(),
        }
        save(directory, step, tensors, meta)
        return {"step": step}

    def restore(msg: Any) -> dict[str, Any]:
        step = int(msg.meta["step"])
        tensors, meta = load(directory, step)
        load_module(trainer.segment, tensors, "segment")
        trainer.reset_transient()
        load_optimizer(trainer.optimizer, tensors, meta["optim"])
        load_scheduler(trainer.scheduler, meta["sched"])
        load_rng(tensors, {})
        trainer.steps_applied = int(meta["steps_applied"])
        trainer.compute.load_state(meta.get("compute"))
        if trainer.chain is not None:
            trainer.chain.load_state(meta["chain"])
        return {"step": step, "steps_applied": trainer.steps_applied}

    trainer.control_handlers.update(
        checkpoint=checkpoint,
        checkpoints=lambda msg: {"steps": steps(directory)},
        restore=restore,
    )


def attach_verifier(verifier: Any, directory: Path) -> None:
    """Checkpoints of the verifier: its ledger position (the ledger itself is transactional).

    The ledger is append-only, so ``restore`` cannot rewind it; it reports the
    position instead, and the data owner skips the records already appended
    (``ledger`` lists them for a stage).
    """

    def position() -> dict[str, Any]:
        ledger = verifier.ledger
        rows = ledger.rows() if ledger is not None else []
        tip = ledger.tip().hex() if ledger is not None else ""
        return {"records": len(rows), "tip": tip}

    def checkpoint(msg: Any) -> dict[str, Any]:
        step = int(msg.meta["step"])
        save(directory, step, {}, position())
        return {"step": step}

    def restore(msg: Any) -> dict[str, Any]:
        step = int(msg.meta["step"])
        load(directory, step)  # the checkpoint must exist
        return {"step": step, **position()}

    verifier.control_handlers.update(
        checkpoint=checkpoint,
        checkpoints=lambda msg: {"steps": steps(directory)},
        restore=restore,
        ledger=lambda msg: {"done": verifier.stage_records(int(msg.meta["stage"]))},
    )
