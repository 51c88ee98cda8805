"""One training run in any mode, writing the run directory of DESIGN §10.

``centralized``: one ordinary model (:mod:`clicooper.runtime.centralized`).
``vanilla``: split learning without defences. ``clicooper``: activation noise, secret
label obfuscation (and the watermark chain). All three use the same architecture,
seed, data and batch order, so their accuracies and times compare directly. With
``privacy.release = "once"`` vanilla is release once's baseline: the same frozen head and
warm start, each record's clean ``head(x)`` sent to t1 once (no epsilon).

:func:`run` assembles a split run in one pass: the parties from the party factory
(:mod:`clicooper.runtime.factory`: in this process, or remote ones of
:mod:`clicooper.runtime.deploy`), the data owner, the chain, the
:class:`~clicooper.runtime.driver.Driver`; the run directory is
:class:`~clicooper.runtime.rundirs.RunDir`, privacy reporting
:mod:`clicooper.privacy.report`, verification :mod:`clicooper.runtime.verification`.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn

from clicooper.common.files import private_dir, write_private
from clicooper.config import RunConfig, WatermarkConfig
from clicooper.data import Dataset, Split, default_dataset, load_dataset
from clicooper.models import SplitModel
from clicooper.models.assembly import ModelFactory, preset_factory
from clicooper.models.presets import DEFAULT_CUT
from clicooper.parties import DataOwner, Trainer, Verifier
from clicooper.parties.releases import OwnerRelease
from clicooper.parties.watermarking import OwnerChain
from clicooper.privacy.activation import ActivationNoise
from clicooper.privacy.labels import LabelObfuscator
from clicooper.privacy.release import FrozenHead, frozen_head
from clicooper.privacy.report import noise_multiplier, privacy_report, releases_once
from clicooper.privacy.secrets import SECRET_FILE, OwnerSecret
from clicooper.runtime import compute
from clicooper.runtime.centralized import run_centralized
from clicooper.runtime.deploy.peers import Deployment
from clicooper.runtime.device import party_devices
from clicooper.runtime.driver import Driver, ProgressFn
from clicooper.runtime.factory import (
    build_local,
    connect_remote,
    load_remote_segments,
    local_parties,
    open_chain,
)
from clicooper.runtime.optim import OptimSettings, run_steps
from clicooper.runtime.resume import resumable_config, save_run_config
from clicooper.runtime.rundirs import (
    RELEASES_FILE,
    HistoryLog,
    RunDir,
    discard_run,
    prepare_run_dir,
)
from clicooper.runtime.verification import run_anchor, verify_run
from clicooper.watermark.anchor import fingerprint
from clicooper.watermark.embed import WatermarkWarning, capacity_note, select_weight, stage_note


@dataclass
class Session:
    """What a finished run leaves in memory besides its run directory."""

    results: dict[str, Any]
    owner: DataOwner | None
    trainers: list[Trainer]
    model: nn.Module
    dataset: Dataset


def resolve_dataset(cfg: RunConfig, data: Dataset | None) -> Dataset:
    """The configured dataset, limited to the configured subsets."""
    if data is None:
        name = default_dataset() if cfg.dataset == "auto" else cfg.dataset
        data = load_dataset(
            name, seed=cfg.seed, layout=cfg.images.layout, minmax=cfg.images.minmax_scale
        )
    return data.limit(cfg.train_subset, cfg.test_subset, cfg.seed)


def resolve_run(
    cfg: RunConfig, data: Dataset | None, served: bool = False
) -> tuple[RunConfig, Dataset]:
    """The run's dataset (:func:`resolve_dataset`) and ``cfg`` with its size-dependent
    defaults resolved for it (:meth:`RunConfig.for_data`: release, model, lr, batch size,
    noise). ``served``: trainers served by hand, who read ``privacy.release`` from their
    own copy of the config and cannot know the owner's data size, so an unset release is
    every-epoch there, as it is at them. Idempotent: a resolved config stays as it is."""
    data = resolve_dataset(cfg, data)
    if served:
        cfg = cfg.with_release("every-epoch")
    return cfg.for_data(len(data.train)), data


def run(
    cfg: RunConfig,
    out_dir: Path | str,
    data: Dataset | None = None,
    model_factory: ModelFactory | None = None,
    progress: ProgressFn | None = None,
    overwrite: bool = False,
    deployment: Deployment | None = None,
    resume: bool = False,
) -> Session:
    """Train in ``cfg.mode`` and write ``out_dir``; returns the session.

    With ``cfg.transport == "grpc"`` the trainers and the verifier are remote
    processes described by ``deployment``; this process is the data owner.
    ``resume``: continue the unfinished run in ``out_dir`` (in-process; with
    ``deployment``, one ``clicooper launch`` started) from its last checkpoint, with the
    settings it saved (``out_dir/config.toml``; ``cfg`` is not used) and its owner secret
    (:mod:`clicooper.runtime.resume`).
    """
    if resume:
        cfg = resumable_config(Path(out_dir), launched=deployment is not None)
    if cfg.transport == "grpc" and (deployment is None or model_factory is not None):
        raise ValueError(
            "transport grpc needs the parties' addresses (--peers FILE --certs DIR) and a "
            "preset model; or use `clicooper launch`"
        )
    out_dir = Path(out_dir)
    rundir = RunDir(out_dir)
    # Read and build first: a bad secret file, dataset, model or cut fails before the run
    # directory is touched (an --overwrite run keeps the old one).
    secret = OwnerSecret.read(cfg.owner_secret) if cfg.owner_secret else None
    if resume and cfg.mode == "clicooper":
        secret = OwnerSecret.read(rundir.owner / SECRET_FILE)
    # size-dependent defaults (release, model, lr, batch, noise), recorded in config.toml below
    cfg, data = resolve_run(cfg, data, served=deployment is not None)
    # Small per-party models gain little from intra-op threads, and oversubscribed
    # threads spin: one thread per process is several times faster on a busy machine.
    # Set before the frozen head is pretrained: its float sums depend on the thread count,
    # so a vanilla and a clicooper run of one config get the same head bit for bit.
    torch.set_num_threads(cfg.threads)
    factory = model_factory or preset_factory(cfg, data)
    split = factory(data.num_classes)
    devices = party_devices(cfg, local_parties(cfg))  # an unusable device fails here
    # release once: the frozen head first (a head source that cannot be had fails here)
    head = frozen_head(cfg, data, split) if releases_once(cfg) else None
    if head is not None and head.data is not None:
        data = head.data  # a public split was carved off: the owner trains on the rest
    if not resume:
        prepare_run_dir(out_dir, overwrite)
        save_run_config(out_dir, cfg)
    torch.manual_seed(cfg.seed)
    first_step = _FirstStep(progress)
    try:
        if cfg.mode == "centralized":
            log = HistoryLog(rundir.history, cfg, None, progress)
            results, model = run_centralized(cfg, data, factory, first_step, log, devices["do"])
            session = Session(results, None, [], model, data)
        else:
            session = _run_split(
                cfg, data, factory, out_dir, first_step, deployment, secret, devices, resume, head
            )
    except BaseException:
        if not first_step.seen and not resume:  # nothing trained: nothing may block a rerun
            discard_run(out_dir)
        raise
    session.results.update(_describe(cfg, data, session))
    session.results["devices"] = {party: str(device) for party, device in devices.items()}
    rundir.results.write_text(json.dumps(session.results, indent=2))
    return session


class _FirstStep:
    """The progress callback, noting whether any training step has happened."""

    def __init__(self, progress: ProgressFn | None) -> None:
        self.progress, self.seen = progress, False
        self.epoch_done = getattr(progress, "epoch_done", None)

    def __call__(self, epoch: int, batch: int, batches: int, loss: float) -> None:
        self.seen = True
        if self.progress:
            self.progress(epoch, batch, batches, loss)


def _run_split(
    cfg: RunConfig,
    data: Dataset,
    factory: ModelFactory,
    out_dir: Path,
    progress: ProgressFn | None,
    deployment: Deployment | None = None,
    secret: OwnerSecret | None = None,
    devices: dict[str, torch.device] | None = None,
    resume: bool = False,
    head: FrozenHead | None = None,
) -> Session:
    """``secret``: the owner secret to reuse (``owner_secret`` setting); None makes one.
    ``devices``: of the parties in this process (default: all on the CPU). ``resume``:
    every party from its files and checkpoints in ``out_dir`` (see :func:`run`).
    ``head``: release once, with this frozen head (None: the head trains)."""
    devices = devices or {}
    defended = cfg.mode == "clicooper"
    owner_dir = private_dir(RunDir(out_dir).owner)
    secret = secret or OwnerSecret.generate()
    labels = (
        LabelObfuscator(
            secret, data.num_classes, cfg.labels.expansion, cfg.labels.decoys, cfg.labels.mode
        )
        if defended
        else None
    )
    n_outputs = labels.pseudo_classes if labels else data.num_classes
    split = factory(n_outputs)
    if head is not None:
        split.head = head.module
    noise = None
    if defended:
        noise = ActivationNoise(
            cfg.privacy.clip_norm,
            noise_multiplier(cfg),
            cfg.privacy.mechanism,
            seed=secret.derive_seed("activation-noise"),
        )
        if not resume:
            secret.save(owner_dir)

    wm = cfg.watermark
    with_chain = defended and wm.enabled
    parties = [f"t{i}" for i in range(1, cfg.trainers + 1)] + (["verifier"] if with_chain else [])
    if with_chain:
        _warn_capacity(split, wm, wm.stage_steps or -(-len(data.train) // cfg.batch_size))
    warm = warm_epochs(cfg) if head is not None and head.public is not None else 0
    replay = cfg.chain.replay and head is not None and head.public is not None
    public = head.public if warm or replay else None
    public_steps = -(-len(public) // cfg.batch_size) if public is not None else 0
    warm_steps = warm * public_steps
    total_steps = run_steps(cfg, len(data.train)) + warm_steps + replay * cfg.epochs * public_steps
    optim = OptimSettings.from_config(cfg, total_steps, warm_steps)
    remote, trainers, verifier = None, [], None
    if cfg.transport == "grpc":
        remote = connect_remote(
            cfg, deployment, parties, data.image_shape, n_outputs, with_chain, optim, resume
        )
        transport = remote.transport
    else:
        transport, trainers, verifier = build_local(
            cfg, split, out_dir, parties, optim, devices, resume, with_chain
        )
    release = public_release = public_targets = None
    if head is not None:
        release = OwnerRelease(split.head, noise, secret, data.train.x)
    if public is not None:  # the warm start's clean public activations, a release set apart
        public_release = OwnerRelease(split.head, noise, secret, public.x, public=True)
        public_targets = labels.encode_public(public.y) if labels else public.y
    owner = DataOwner(
        transport,
        split.head,
        cfg.trainers,
        optim,
        noise,
        labels,
        cfg.micro_batches,
        cfg.privacy.noise_at_inference,
        device=devices.get("do", "cpu"),
        release=release,
        public=public_release,
        public_targets=public_targets,
        adaptive=transport.concurrent and not cfg.record,  # recorded rows need the fixed split
    )
    chain = None
    if with_chain:
        chain = open_chain(owner, trainers, secret, owner_dir, out_dir, wm, resume)
        chain.total_steps = optim.total_steps
    if labels is not None:
        _fit_labels(labels, owner, data)
        if release is not None and cfg.chain.denoise == "post-mean":  # t1 denoises with them
            release.labels = labels.encode(data.train.y, torch.arange(len(data.train)))

    driver = Driver(
        owner,
        chain,
        data,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        parties=parties,
        checkpoint_dir=RunDir(out_dir).checkpoints("do"),  # always: a run that dies can be resumed
        checkpoint_steps=cfg.checkpoint_steps,
        recovery=remote,
        progress=progress,
        on_epoch=HistoryLog(RunDir(out_dir).history, cfg, noise, progress, owner),
        resume=resume,
        public=public,
        warm_epochs=warm,
        replay=replay,
    )
    driver.epochs += warm
    with owner.compute.active():  # in-process, the other parties' handlers pause it
        history = driver.run()
    # each epoch sends every sample's gradient back once (Tn -> T(n-1)), in both modes; the
    # warm start's epochs carry public records only
    training_releases = owner.releases if release is None else len(history) - warm
    if release is not None:
        owner.releases = release.per_record()["max"]  # 1: the release before training
    if noise is not None and cfg.privacy.noise_at_inference:
        owner.releases += 1  # the test pass released noisy activations too
    finished = {name: owner.control(name, "finish").meta for name in owner.trainers}
    bytes_sent = remote.close() if remote else transport.bytes_sent
    if remote is not None and remote.deployment.collect is not None:
        remote.deployment.collect(out_dir)  # nodes: their ledger and segments, here
    if verifier is not None:
        verifier.close()
    _save_owner(owner_dir, owner, labels, cfg.record)
    if release is not None:  # what was released, per record (the run's own audit trail)
        write_private(owner_dir / RELEASES_FILE, st_save({"counts": release.counts}))
    results = {
        "accuracy": {"test": history[-1]["test_accuracy"], "train": history[-1]["train_accuracy"]},
        "history": history,
        "timing": {
            "train_seconds": driver.train_seconds,
            "train_cpu_seconds": driver.train_cpu_seconds,
        },
        "transport": {
            "name": cfg.transport,
            "bytes_sent": bytes_sent,
            "steps": owner.step,
            # steps begun at each micro-batch count (over gRPC the owner times them)
            "micro_batches": {str(n): steps for n, steps in sorted(owner.micros.used.items())},
            "steps_applied": {name: meta["steps_applied"] for name, meta in finished.items()},
            "recoveries": driver.recoveries,
        },
        "privacy": privacy_report(cfg, noise, owner.releases, training_releases, release, head),
        "compute": _compute(owner, finished, verifier if with_chain else None, head, public),
        "watermark": _watermark_summary(chain, out_dir, wm) if chain else {"enabled": False},
    }
    if release is not None:
        results["readouts"] = _readouts(owner, release, data, history, warm)
    if public_release is not None:  # the warm start's clean public set: sends, not releases
        results["privacy"]["public_set"] = public_release.summary()
    if chain:  # per trainer and stage: how many bits the stage-end seal had to deepen
        sealed = {name: list(meta.get("sealed_bits", [])) for name, meta in finished.items()}
        results["watermark"]["sealed_bits"] = sealed
    if remote is not None:
        load_remote_segments(split, out_dir)
    for party in (owner, *trainers):  # the finished model and parties, back on the CPU
        party.device = torch.device("cpu")
    return Session(results, owner, trainers, split.full().cpu(), data)


def _fit_labels(labels: LabelObfuscator, owner: DataOwner, data: Dataset) -> None:
    """Fix the training records' sub-labels; the head pass that feature mode clusters is
    the owner's work (keyed mode needs no features, so no pass)."""
    if labels.mode != "feature" or labels.expansion == 1:
        labels.fit(torch.empty(len(data.train), 0), data.train.y)
        return
    with torch.no_grad(), owner.compute.active(), owner.compute.count(None):
        z = [owner.head(x.to(owner.device)).cpu() for x in data.train.x.split(4096)]
        labels.fit(torch.cat(z), data.train.y)


def _readouts(
    owner: DataOwner,
    release: OwnerRelease,
    data: Dataset,
    history: list[dict[str, Any]],
    warm: int,
) -> dict[str, Any]:
    """The simple readouts of the same releases beside the chain (issue 10, point 4).

    The owner fits nearest class mean and logistic regression on what it released to t1,
    with the true labels, and scores them on the clean test activations, as the chain is
    scored; ``public_only`` is the chain's test accuracy at the end of its warm start.
    Reporting, not training: outside the compute meters.
    """
    from clicooper.privacy import readouts

    r = release.everything().flatten(1)
    test = torch.cat([z.cpu() for z in owner.head_outputs(data.test.x)]).flatten(1)
    k, y = data.num_classes, data.train.y
    out = {
        name: {"test": readouts.accuracy(fit(r, y, k)(test), data.test.y)}
        for name, fit in (("ncm", readouts.ncm), ("logistic", readouts.logistic))
    }
    out["chain"] = {"test": history[-1]["test_accuracy"]}
    if warm:
        out["public_only"] = {"test": history[warm - 1]["test_accuracy"]}
    out["note"] = (
        "ncm and logistic: fitted by the owner on the releases it sent t1 (true labels), "
        "scored on clean test activations; public_only: the chain after its warm start on "
        "the public split, before any release"
    )
    return out


def _compute(
    owner: DataOwner,
    finished: dict[str, dict[str, Any]],
    verifier: Verifier | None,
    head: FrozenHead | None = None,
    public: Split | None = None,
) -> dict[str, Any]:
    """Every party's FLOPs and CPU seconds: the owner's own meter, each trainer's from its
    (checked) ``finish`` reply. In-process also the verifier's CPU seconds and, apart as
    ``verifier_flops``, its FLOPs: it audits and trains nothing, so it is not in the
    owner's share (over gRPC it runs in its own process and is not asked).

    Release once: a head pretrained on public data (``head``) adds its pretraining FLOPs,
    and the head's pass over the public split for the warm start (``public``), to whoever
    ran them (``head.pretrain_by``): the owner, or the trainers, credited to t1, which
    holds the public set (``compute.head_pretrain`` says which)."""
    reports = {"do": owner.compute.report()}
    reports.update({name: meta["compute"] for name, meta in finished.items()})
    extra = _pretrain_flops(head, public)
    if extra is not None:
        runner, flops = extra
        party = "do" if runner == "owner" else "t1"
        reports[party] = {**reports[party], "flops": int(reports[party]["flops"]) + flops}
    summary = compute.summary(reports)
    if extra is not None:
        summary["head_pretrain"] = {"flops": extra[1], "runner": extra[0], "credited_to": party}
    if verifier is not None:
        summary["cpu_seconds"]["verifier"] = round(verifier.compute.cpu_seconds, 6)
        summary["verifier_flops"] = sum(verifier.compute.flops.values())
    return summary


def _pretrain_flops(head: FrozenHead | None, public: Split | None) -> tuple[str, int] | None:
    """(runner, FLOPs) of building a release-once head on public data and, with a warm
    start, of its pass over the public split; None when nobody pretrained."""
    info = head.privacy if head is not None else {}
    runner, flops = info.get("pretrain_runner"), int(info.get("pretrain_flops") or 0)
    if runner not in ("owner", "trainers"):
        return None
    if public is not None:
        flops += len(public) * int(info.get("forward_flops_per_record") or 0)
    return runner, flops


def _warn_capacity(split: SplitModel, wm: WatermarkConfig, stage_steps: int) -> None:
    """Warn when stages are short, and per trainer when its marked tensor is small for B."""
    notes = [stage_note(stage_steps)] if wm.strength > 0 and wm.schedule == "always" else []
    for i, segment in enumerate(split.segments, start=1):
        weight = dict(segment.named_parameters())[select_weight(segment)]
        notes.append(capacity_note(f"t{i}", weight.numel(), wm.bits))
    for note in filter(None, notes):
        warnings.warn(note, WatermarkWarning, stacklevel=3)


def _watermark_summary(chain: OwnerChain, out_dir: Path, wm: WatermarkConfig) -> dict[str, Any]:
    """The verifier's verdicts, its trust anchor and an offline verification of the run."""
    anchor = run_anchor(out_dir)
    report = verify_run(out_dir, wm, anchor=anchor)
    last: dict[str, Any] = {}
    for verdict in chain.verdicts:
        last[verdict["party"]] = verdict
    return {
        "enabled": True,
        "bits": wm.bits,
        "strength": wm.strength,
        "stages": chain.stage,
        "ber_threshold": wm.ber_threshold,
        "final_ber": {p: v["ber"] for p, v in last.items()},
        "attestations_failed": sum(v["verdict"] != "ok" for v in chain.verdicts),
        "verified": report.ok,
        "first_failure": report.first_failure,
        "anchor": None if anchor is None else fingerprint(anchor.value),
        "anchored": report.anchored,
        "bers_checked": report.bers_checked,
    }


def warm_epochs(cfg: RunConfig) -> int:
    """Epochs of the chain's warm start on public data: release once with a head source
    that brings public data (``public``), else none."""
    return cfg.chain.warm_epochs if releases_once(cfg) and cfg.head.source == "public" else 0


def _save_owner(
    owner_dir: Path, owner: DataOwner, labels: LabelObfuscator | None, record: int
) -> None:
    """The head, the sub-label assignment and the step log, all mode 0600."""
    state = {k: v.detach().cpu().contiguous() for k, v in owner.head.state_dict().items()}
    write_private(owner_dir / "head.safetensors", st_save(state))
    if labels is not None and labels.sub_labels is not None:
        write_private(owner_dir / "sublabels.safetensors", st_save({"sub": labels.sub_labels}))
    if record and owner.log.steps:
        log = {
            "step": torch.tensor(owner.log.steps),
            "epoch": torch.tensor(owner.log.epochs),
            "count": torch.tensor([len(s) for s in owner.log.sample_ids]),
            "sample_ids": torch.cat(owner.log.sample_ids),
        }
        write_private(owner_dir / "steps.safetensors", st_save(log))


def _describe(cfg: RunConfig, data: Dataset, session: Session) -> dict[str, Any]:
    labels = session.owner.labels if session.owner else None
    return {
        "mode": cfg.mode,
        "dataset": data.name,
        "seed": cfg.seed,
        "config": cfg.model_dump(mode="json"),
        "data": {"train": len(data.train), "test": len(data.test), "classes": data.num_classes},
        "model": {
            "preset": cfg.model,
            "cut": cfg.cut or DEFAULT_CUT[cfg.model],
            "trainers": cfg.trainers,
            "parameters": sum(p.numel() for p in session.model.parameters()),
        },
        "labels": {
            "expansion": labels.expansion if labels else 1,
            "mode": labels.mode if labels else None,
            "decoys": labels.decoys if labels else 0,
            "pseudo_classes": labels.pseudo_classes if labels else data.num_classes,
        },
        "privacy": session.results.get("privacy", privacy_report(cfg, None, 0, 0)),
    }
