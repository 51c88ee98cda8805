"""``clicooper run``: one training run, in-process, over gRPC or (under ``launch``) launched."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

from clicooper.cli.app import Opt, app, build_config, fail
from clicooper.cli.defaults import config_overrides, show_config_defaults
from clicooper.cli.progress import console, summary_table, training_progress
from clicooper.cli.runner import launching, session_runner
from clicooper.config import RunConfig
from clicooper.runtime.rundirs import RUNS_ROOT, new_run_dir, point_latest


@app.command()
def run(
    dataset: Annotated[
        str | None, Opt(help="digits, fashion-mnist, mnist5k, an IDX dir, .npz or a dir of .npy")
    ] = None,
    channels_last: Annotated[
        bool | None,
        Opt(
            "--channels-last/--channels-first",
            help="axis order of 4-D user images (auto: the axis of size 1, 3 or 4)",
        ),
    ] = None,
    minmax_scale: Annotated[
        bool | None, Opt("--minmax-scale", help="map non-uint8 images to [0, 1] by min and max")
    ] = None,
    mode: Annotated[str | None, Opt(help="centralized, vanilla or clicooper")] = None,
    trainers: Annotated[int | None, Opt(help="trainers in the chain (1-8)")] = None,
    epochs: Annotated[int | None, Opt()] = None,
    seed: Annotated[int | None, Opt()] = None,
    out: Annotated[
        Path | None,
        Opt(help="run directory (default: a new runs/<UTC time>-<mode>, linked as runs/latest)"),
    ] = None,
    config: Annotated[Path | None, Opt(help="TOML config; flags override it")] = None,
    model: Annotated[str | None, Opt(help="mlp, cnn, cnn-light or resnet")] = None,
    cut: Annotated[str | None, Opt(help="named cut point of the preset")] = None,
    batch_size: Annotated[int | None, Opt()] = None,
    lr: Annotated[float | None, Opt(help="base learning rate (per party: lr_per_party)")] = None,
    optimizer: Annotated[str | None, Opt(help="adam, adamw or sgd (every party)")] = None,
    schedule: Annotated[str | None, Opt(help="lr schedule: constant, cosine or step")] = None,
    warmup_steps: Annotated[int | None, Opt(help="linear lr warm-up steps")] = None,
    weight_decay: Annotated[float | None, Opt()] = None,
    device: Annotated[
        str | None, Opt(help="auto, cpu, cuda[:N] or mps (per party: devices in --config)")
    ] = None,
    noise_multiplier: Annotated[float | None, Opt(help="noise std / clip norm")] = None,
    clip_norm: Annotated[float | None, Opt()] = None,
    mechanism: Annotated[str | None, Opt(help="gaussian or laplace")] = None,
    target_epsilon: Annotated[float | None, Opt(help="pick the noise for this epsilon")] = None,
    delta: Annotated[float | None, Opt()] = None,
    release: Annotated[
        str | None,
        Opt(
            help="every-epoch (the head trains) or once: a frozen head, one release per "
            "record (with --mode vanilla: its clean baseline on the same head)"
        ),
    ] = None,
    head_source: Annotated[
        str | None, Opt(help="where the frozen head comes from (--release once)")
    ] = None,
    warm_epochs: Annotated[
        int | None,
        Opt(help="release once: chain epochs on the public split's activations first (0: off)"),
    ] = None,
    denoise: Annotated[
        str | None,
        Opt(help="release once: post-mean (t1 trains on class-posterior means) or none"),
    ] = None,
    replay: Annotated[
        bool | None,
        Opt("--replay/--no-replay", help="release once: the public set in every epoch too"),
    ] = None,
    fresh_optimizer: Annotated[
        bool | None,
        Opt(
            "--fresh-optimizer/--no-fresh-optimizer",
            help="release once: optimizer state restarts when the warm start ends",
        ),
    ] = None,
    release_lr_factor: Annotated[
        float | None, Opt(help="release once: lr multiplier after the warm start")
    ] = None,
    noise_at_inference: Annotated[
        bool | None, Opt("--noise-at-inference/--no-noise-at-inference")
    ] = None,
    gradient_noise: Annotated[
        float | None, Opt(help="last trainer's gradient noise std / gradient clip (0: off)")
    ] = None,
    gradient_clip: Annotated[
        float | None, Opt(help="per-sample L2 clip of the gradients the last trainer sends back")
    ] = None,
    expansion: Annotated[int | None, Opt(help="pseudo-classes per true class (K)")] = None,
    decoys: Annotated[int | None, Opt(help="unused decoy pseudo-classes")] = None,
    label_mode: Annotated[str | None, Opt(help="keyed or feature")] = None,
    train_subset: Annotated[int | None, Opt(help="train on a seeded subset")] = None,
    test_subset: Annotated[int | None, Opt()] = None,
    micro_batches: Annotated[
        int | None,
        Opt(help="micro-batches in flight along the chain (over gRPC: kept where faster)"),
    ] = None,
    record: Annotated[int | None, Opt(help="samples per epoch each party records")] = None,
    watermark: Annotated[
        bool | None, Opt("--watermark/--no-watermark", help="watermark chain (clicooper mode)")
    ] = None,
    stage_steps: Annotated[int | None, Opt(help="watermark stage length in steps")] = None,
    threads: Annotated[int | None, Opt(help="torch threads per process")] = None,
    checkpoint_steps: Annotated[
        int | None, Opt(help="checkpoint every N steps too (0: at epoch and stage ends only)")
    ] = None,
    owner_secret: Annotated[
        Path | None, Opt(help="reuse an earlier run's owner/owner.secret: repeat that run")
    ] = None,
    overwrite: Annotated[bool, Opt(help="replace a run already in --out")] = False,
    resume: Annotated[
        Path | None,
        Opt(
            help="continue the unfinished in-process run in DIR (its own settings) from its "
            "last checkpoint"
        ),
    ] = None,
    transport: Annotated[str | None, Opt(help="inprocess or grpc (with --peers, --certs)")] = None,
    peers: Annotated[Path | None, Opt(help="peers file of served parties (grpc)")] = None,
    certs: Annotated[
        Path | None, Opt(help="the data owner's own bundle, OUT/do (grpc; with --pool: its own)")
    ] = None,
    pool: Annotated[
        Path | None, Opt(help="run on the nodes of this pool (POOL/pool.toml of `pool up`)")
    ] = None,
) -> None:
    """Train with every party in this process (the embedded default)."""
    given = [name for name, value in locals().items() if value is not None and value is not False]
    flags = config_overrides(locals())
    # training's modules (torch) load here, after locals() is read: the other commands skip them
    from clicooper.data import DataError
    from clicooper.runtime.device import party_devices
    from clicooper.runtime.factory import local_parties
    from clicooper.runtime.session import resolve_dataset, resolve_run
    from clicooper.runtime.session import warm_epochs as warm_start_epochs

    flags["images.layout"] = _layout(channels_last)
    if resume is not None:
        cfg, out = _resumed(resume, [name for name in given if name != "resume"])
    else:
        cfg = build_config(config, **flags)
    how = "auto: fashion-mnist when installed, else digits" if dataset is None else "given"
    fresh = out is None
    try:
        party_devices(cfg, local_parties(cfg))  # an unusable device: one line, before the data
        served = cfg.transport == "grpc" and pool is None and not launching()
        data = resolve_dataset(cfg, None)
        why = _release_why(cfg, len(data.train), served)
        cfg, data = resolve_run(cfg, data, served=served)
        console.print(
            f"dataset: {cfg.dataset} ({how}); {_release_line(cfg, why)}model "
            f"{cfg.model}, {cfg.epochs} epochs, batch size {cfg.batch_size}, lr {cfg.lr:g}"
        )
        runner = session_runner(cfg, peers, certs, resume is not None, pool)
        out = new_run_dir(RUNS_ROOT, cfg.mode) if out is None else out
        console.print(f"run directory: {out}")
        with training_progress(cfg.epochs + warm_start_epochs(cfg), cfg.mode) as progress:
            session = runner(cfg, out, data=data, progress=progress, overwrite=overwrite)
    except (DataError, ValueError) as exc:
        if fresh and out is not None:
            _drop_if_empty(out)
        fail(str(exc).splitlines()[0])
    if fresh:
        point_latest(out)
    console.print(summary_table(session.results))
    console.print(f"run directory: {out}")
    anchor = (session.results.get("watermark") or {}).get("anchor")
    if anchor:
        console.print(
            f"trust anchor (verifier key fingerprint): {anchor}\n"
            f"publish it now; `clicooper verify {out} --anchor {anchor}` and `clicooper claim` "
            "check the ledger against it"
        )


def _resumed(run_dir: Path, given: list[str]) -> tuple[RunConfig, Path]:
    """The settings and directory of the run ``--resume`` continues (exit 2 if none):
    an in-process run, or under ``clicooper launch`` a launched one."""
    if given:
        fail(
            f"--resume continues {run_dir} with its own settings ({run_dir}/config.toml): "
            f"leave out --{given[0].replace('_', '-')}"
        )
    from clicooper.runtime.resume import resumable_config

    try:
        return resumable_config(run_dir, launched=launching()), run_dir
    except ValueError as exc:
        fail(str(exc).splitlines()[0])
        raise  # unreachable


def _release_why(cfg: RunConfig, n_train: int, served: bool) -> str:
    """Why an unset release resolves as it does ("" when the config sets it)."""
    if served and cfg.privacy.release is None:
        return (
            "served parties read it from their config and cannot know the data size: set "
            'privacy.release = "once" there for release once'
        )
    return cfg.release_choice(n_train)[1]


def _release_line(cfg: RunConfig, why: str) -> str:
    """``release R (why), `` for a clicooper run."""
    if cfg.mode != "clicooper":
        return ""
    return f"release {cfg.privacy.release}{f' ({why})' if why else ''}, "


def _drop_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):  # only an empty one: a failed fresh run leaves no debris
        path.rmdir()


show_config_defaults(run)


def _layout(channels_last: bool | None) -> str | None:
    if channels_last is None:
        return None
    return "channels-last" if channels_last else "channels-first"
