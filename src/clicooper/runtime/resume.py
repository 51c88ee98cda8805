"""Continuing an in-process run whose process died (``clicooper run --resume DIR``).

A split run writes ``DIR/config.toml`` (its effective settings) before it trains, and
every party checkpoints at step 0 and before every stage close and epoch end
(:mod:`clicooper.runtime.driver`). A process killed at any point (kill -9 included)
leaves either the old or the new checkpoint of each party (atomic renames), the
append-only ledger, the owner secret and every party's keys. Resuming rebuilds every
party from them and rolls back to the last step all parties checkpointed, exactly as
the recovery after a lost party does: the steps after it are replayed once, in the
same batch order with the same noise, and a stage close that was under way is
finished without appending again the records the ledger holds. ``results.json``
is written only when a run finishes, so its presence marks a finished run.

``clicooper launch --resume DIR`` does the same for a launched run whose owner process
(the ``launch`` process itself) died: :func:`clicooper.runtime.deploy.launcher.launch` starts
the nodes of the run's own one-session pool again on their state (``DIR/deploy/pool``),
with the run's certificate bundles and addresses, and continues the session on them as
``run --resume`` continues a ``run --pool`` run (each node serves it afresh from its
checkpoints); the rollback above is the same one.
"""

from __future__ import annotations

from pathlib import Path

from clicooper.common.files import write_file
from clicooper.config import ConfigError, RunConfig
from clicooper.runtime import checkpoint as ckpt
from clicooper.runtime.deploy.peers import config_toml
from clicooper.runtime.rundirs import RUN_CONFIG, RunDir


def save_run_config(out_dir: Path, cfg: RunConfig) -> None:
    """``out_dir/config.toml``: what ``--resume`` rebuilds the run from."""
    write_file(RunDir(out_dir).config, config_toml(cfg).encode(), 0o644)


#: What marks a run ``clicooper launch`` started (the file of its own one-session pool).
LAUNCH_MARK = RunDir(Path()).launch_pool / "pool.toml"
#: What marks a run on a pool's nodes (``run --pool``, ``launch``: its session and chain).
POOL_MARK = RunDir(Path()).pool_mark


def resumable_config(out_dir: Path, launched: bool = False) -> RunConfig:
    """The settings of the unfinished run in ``out_dir``; ValueError (one line) if there
    is none: not a run directory, a finished run, a run of another kind (``launched``:
    a ``clicooper launch`` run is wanted, else an in-process one), no checkpoint."""
    out_dir = Path(out_dir)
    command = "launch" if launched else "run"
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir} is not a run directory: nothing to resume")
    if RunDir(out_dir).results.exists():
        raise ValueError(f"{out_dir} holds a finished run (results.json): nothing to resume")
    if not RunDir(out_dir).config.is_file():
        raise ValueError(
            f"{out_dir} is not a run directory that can be resumed (no {RUN_CONFIG}): "
            f"give the directory of a split run `clicooper {command}` started"
        )
    try:
        cfg = RunConfig.load(RunDir(out_dir).config)
    except ConfigError as exc:
        raise ValueError(f"{RunDir(out_dir).config}: {exc}") from None
    if cfg.mode == "centralized":
        raise ValueError(f"{out_dir}: only split runs can be resumed (this one is centralized)")
    _check_kind(out_dir, cfg, launched)
    if not ckpt.steps(RunDir(out_dir).checkpoints("do")):
        raise ValueError(
            f"{out_dir} has no checkpoint yet (the run died before its first step): "
            f"start it again with `clicooper {command} ... --overwrite`"
        )
    return cfg


def _check_kind(out_dir: Path, cfg: RunConfig, launched: bool) -> None:
    """``clicooper run --resume`` continues in-process runs, ``launch --resume`` launched
    ones; a run over gRPC with parties served by hand is resumed by neither (its parties'
    directories are on other machines). ``run --resume`` continues a ``run --pool`` run
    on its pool's nodes too."""
    was_launched = cfg.transport == "grpc" and (out_dir / LAUNCH_MARK).is_file()
    if cfg.transport == "grpc" and not was_launched and (out_dir / POOL_MARK).is_file():
        return
    if launched and not was_launched:
        if cfg.transport == "inprocess":
            raise ValueError(
                f"{out_dir} is an in-process run: resume it with `clicooper run --resume`"
            )
        raise ValueError(f"{out_dir} is not a run `clicooper launch` started: nothing to resume")
    if not launched and was_launched:
        raise ValueError(
            f"{out_dir} is a `clicooper launch` run: resume it with `clicooper launch --resume`"
        )
    if not launched and cfg.transport != "inprocess":
        raise ValueError(
            f"{out_dir}: only in-process runs and `clicooper launch` runs can be resumed"
        )
