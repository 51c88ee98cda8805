"""The party factory: every party of a split run, built in this process or connected remotely.

:func:`build_local` makes the trainers and the verifier on the in-process transport;
:func:`connect_remote` sets up remote ones (:mod:`clicooper.runtime.deploy`);
:func:`open_chain` gives every party its watermark keys and opens the ledger. The run
itself (:func:`clicooper.runtime.session.run`) calls these once, in one pass.
"""

from __future__ import annotations

from pathlib import Path

import torch

from clicooper.config import RunConfig, WatermarkConfig
from clicooper.models import SplitModel
from clicooper.parties import DataOwner, Recorder, Trainer, Verifier
from clicooper.parties.releases import release_caches
from clicooper.parties.trainer import pending_limit
from clicooper.parties.watermarking import OwnerChain, TrainerChain
from clicooper.privacy import gradient
from clicooper.privacy.report import releases_once
from clicooper.privacy.secrets import OwnerSecret
from clicooper.runtime import checkpoint
from clicooper.runtime.deploy.peers import Deployment
from clicooper.runtime.deploy.remote import Remote
from clicooper.runtime.deploy.settings import party_settings
from clicooper.runtime.optim import OptimSettings
from clicooper.runtime.rundirs import RunDir
from clicooper.runtime.transport.inprocess import InProcessTransport
from clicooper.watermark import PartyKey


def local_parties(cfg: RunConfig) -> list[str]:
    """The parties this process runs: the owner, and in-process every trainer too."""
    if cfg.mode == "centralized" or cfg.transport == "grpc":
        return ["do"]
    return ["do", *(f"t{i}" for i in range(1, cfg.trainers + 1))]


def build_local(
    cfg: RunConfig,
    split: SplitModel,
    out_dir: Path,
    checkpoint_parties: list[str] | bool,
    optim: OptimSettings,
    devices: dict[str, torch.device],
    resume: bool = False,
    with_chain: bool = False,
) -> tuple[InProcessTransport, list[Trainer], Verifier]:
    """Every party in this process, on the in-process transport (``resume``: every party
    continues from ``out_dir``: t1 keeps its cached releases, the verifier its ledger,
    key and secrets)."""
    transport = InProcessTransport()
    cache = public = None
    if releases_once(cfg):  # t1's caches, in its party directory (a fresh session: empty)
        cache, public = release_caches(RunDir(out_dir).party("t1"), resume)
    trainers = [
        Trainer(
            i,
            cfg.trainers,
            seg,
            optim,
            out_dir,
            Recorder(cfg.record),
            gradient.for_trainer(cfg, i),
            max_pending=pending_limit(cfg.micro_batches),
            device=devices.get(f"t{i}", "cpu"),
            releases=cache if i == 1 else None,
            public=public if i == 1 else None,
        )
        for i, seg in enumerate(split.segments, start=1)
    ]
    wm = cfg.watermark
    make_verifier = Verifier.resume if resume and with_chain else Verifier
    verifier = make_verifier(out_dir, wm.bits, wm.ber_threshold, wm.keep_audit_stages)
    for party in (*trainers, verifier):
        transport.attach(party)
    transport.add_mailbox("do")
    if checkpoint_parties:
        for trainer in trainers:
            checkpoint.attach_trainer(trainer, RunDir(out_dir).checkpoints(trainer.name))
        checkpoint.attach_verifier(verifier, RunDir(out_dir).checkpoints("verifier"))
    return transport, trainers, verifier


def connect_remote(
    cfg: RunConfig,
    deployment: Deployment,
    parties: list[str],
    image_shape: tuple[int, int, int],
    n_outputs: int,
    with_chain: bool,
    optim: OptimSettings,
    resume: bool = False,
) -> Remote:
    """The trainers and the verifier as remote processes, connected and set up (``resume``:
    each from its own files and checkpoints, see :meth:`Remote.start`)."""
    trainer = {
        "settings": party_settings(cfg, "trainer"),
        "image_shape": list(image_shape),
        "n_outputs": n_outputs,
        "chain": with_chain,
        "total_steps": optim.total_steps,  # the lr schedule's length
        "phase_steps": optim.phase_steps,  # release once: the warm start's steps
    }
    setup = {p: trainer for p in parties if p != "verifier"}
    if with_chain:
        setup["verifier"] = {"settings": party_settings(cfg, "verifier")}
    remote = Remote(deployment, parties, setup, cfg.limits)
    remote.start(resume)
    return remote


def load_remote_segments(split: SplitModel, out_dir: Path) -> None:
    """The trainers' final segments, when they wrote them to this run directory."""
    from safetensors.torch import load_file

    for i, segment in enumerate(split.segments, start=1):
        path = RunDir(out_dir).segment(f"t{i}")
        if path.is_file():
            segment.load_state_dict(load_file(str(path)))


def open_chain(
    owner: DataOwner,
    trainers: list[Trainer],
    secret: OwnerSecret,
    owner_dir: Path,
    out_dir: Path,
    wm: WatermarkConfig,
    resume: bool = False,
) -> OwnerChain:
    """Keys for every party, registration with the verifier, the ledger, stage 1; or, on
    ``resume``, the keys of ``out_dir`` (the chain's position comes from a checkpoint)."""
    for trainer in trainers:
        TrainerChain(trainer, wm, RunDir(out_dir).party(trainer.name), resume=resume)
    if resume:
        key = PartyKey.load(owner_dir / "do.key")
    else:
        key = PartyKey.generate()
        key.save(owner_dir / "do.key")
    chain = OwnerChain(owner, key, secret.commitment(), wm)
    if not resume:
        chain.open()
    return chain
