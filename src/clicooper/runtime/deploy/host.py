"""The served party: a trainer or the verifier in its own process (``clicooper serve``)."""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
from pathlib import Path
from typing import Any

from clicooper.common.checks import MAX_STEP, Unauthorized, require_sender
from clicooper.common.messages import Kind, Message, ProtocolError
from clicooper.config import RunConfig
from clicooper.models.assembly import preset_segment
from clicooper.parties.recorder import Recorder
from clicooper.parties.releases import ReleaseCache, release_caches
from clicooper.parties.trainer import Trainer, pending_limit
from clicooper.parties.verifier import Verifier
from clicooper.parties.watermarking import TrainerChain
from clicooper.privacy import gradient
from clicooper.runtime import checkpoint as ckpt
from clicooper.runtime.certs import validate_party_name
from clicooper.runtime.deploy.settings import SHARED, check_settings, party_settings
from clicooper.runtime.device import party_device
from clicooper.runtime.optim import OptimSettings
from clicooper.runtime.rundirs import RunDir
from clicooper.runtime.transport.base import Party
from clicooper.runtime.transport.epoch import EpochTransport
from clicooper.watermark.anchor import fingerprint

log = logging.getLogger(__name__)
#: Messages a party drops after a failure until it is restored (stale work).
_WORK = (Kind.FORWARD, Kind.BACKWARD, Kind.LABELS, Kind.INFER, Kind.RELEASE)


class PartyHost(Party):
    """A trainer or the verifier in its own process, built when the data owner sends setup."""

    def __init__(self, role: str, name: str, cfg: RunConfig, out_dir: Path) -> None:
        if role not in SHARED:
            raise ValueError(f"unknown role {role!r}: serve trainer or verifier")
        # A served party knows no data size: an unset release is every-epoch, as at the data
        # owner of a run over served parties (clicooper.runtime.session.resolve_run).
        cfg = cfg.with_release("every-epoch")
        self.role, self.name, self.cfg, self.out_dir = role, validate_party_name(name), cfg, out_dir
        self.run_dir = RunDir(out_dir)
        if role == "verifier" and name != "verifier":
            raise ValueError("the verifier's name is 'verifier'")
        if role == "trainer":
            self.index = _trainer_number(name, cfg.trainers)
            self.device = party_device(cfg, name)  # this process's own: checked at start
        self.party: Trainer | Verifier | None = None
        self.broken = False  # a send failed: drop stale work until restored

    def handle(self, msg: Message) -> None:
        """Control ops only from the data owner; ERRORs are logged, never answered."""
        if msg.kind == Kind.ERROR:
            log.warning("%s: %s reported: %s", self.name, msg.sender, msg.meta.get("error", ""))
            return
        op = msg.meta.get("op") if msg.kind == Kind.CONTROL else None
        if msg.kind == Kind.CONTROL:
            require_sender(msg, {"do"}, f"control op {op!r}", self.name)
        if op in ("setup", "status"):
            answer = self._setup(msg.meta) if op == "setup" else self._status(msg.meta)
            self.send(Message(Kind.REPLY, msg.step, self.name, "do", {}, {"op": op, **answer}))
            return
        if self.party is None:
            raise ProtocolError(f"{self.name} is not set up yet: the data owner sends setup first")
        if self.broken and msg.kind in _WORK:
            return
        self.party.handle(msg)
        if op == "restore":
            self.broken = False

    def _status(self, meta: dict[str, Any]) -> dict[str, Any]:
        bytes_sent = getattr(self.transport, "bytes_sent", 0)
        return {
            "ping": meta.get("ping"),
            "probe": bool(meta.get("probe")),
            "ready": self.party is not None,
            "bytes_sent": bytes_sent,
        }

    def _setup(self, meta: dict[str, Any]) -> dict[str, Any]:
        check_settings(party_settings(self.cfg, self.role), meta.get("settings"), self.name)
        if self.party is None:
            resume = bool(meta.get("resume"))
            self.party = (
                self._trainer(meta, resume) if self.role == "trainer" else self._verifier(resume)
            )
            self.party.transport = self.transport
            log.info("%s: set up (%s)", self.name, "resumed" if resume else "fresh")
        return {"ready": True}

    def _checkpoint_dir(self, resume: bool) -> Path:
        directory = self.run_dir.checkpoints(self.name)
        if not resume and directory.exists():
            shutil.rmtree(directory)  # a new session: old checkpoints must not be resumed
        return directory

    def _trainer(self, meta: dict[str, Any], resume: bool) -> Trainer:
        cfg = self.cfg
        shape = tuple(int(v) for v in meta["image_shape"])
        segment = preset_segment(cfg, shape, int(meta["n_outputs"]), self.index)
        total_steps, phase_steps = meta.get("total_steps", 1), meta.get("phase_steps", 0)
        if not isinstance(total_steps, int) or not 1 <= total_steps <= MAX_STEP:
            raise ProtocolError(f"setup: total_steps must be an integer 1 .. {MAX_STEP}")
        if not isinstance(phase_steps, int) or not 0 <= phase_steps <= total_steps:
            raise ProtocolError("setup: phase_steps must be an integer 0 .. total_steps")
        releases, public = self._release_caches(resume)
        trainer = Trainer(
            self.index,
            cfg.trainers,
            segment,
            OptimSettings.from_config(cfg, total_steps, phase_steps),
            self.out_dir,
            Recorder(cfg.record),
            gradient.for_trainer(cfg, self.index),
            max_pending=pending_limit(cfg.micro_batches),
            device=self.device,
            releases=releases,
            public=public,
        )
        if meta.get("chain"):
            party_dir = self.run_dir.party(self.name)
            try:
                TrainerChain(trainer, cfg.watermark, party_dir, resume=resume)
            except (OSError, ValueError) as exc:
                raise ProtocolError(
                    f"{self.name} cannot resume its watermark keys: {exc}"
                ) from None
        ckpt.attach_trainer(trainer, self._checkpoint_dir(resume))
        return trainer

    def _release_caches(self, resume: bool) -> tuple[ReleaseCache | None, ReleaseCache | None]:
        """t1's caches of the owner's releases and the public set (release once): read back
        on a resume, so the owner need not send any again; emptied for a new session."""
        if self.index != 1 or self.cfg.privacy.release != "once":
            return None, None
        private, public = release_caches(self.run_dir.party(self.name), resume)
        if resume:
            log.info(
                "%s: %d release chunks and %d public chunks read back from its cache",
                self.name,
                len(private.chunks),
                len(public.chunks),
            )
        return private, public

    def _verifier(self, resume: bool) -> Verifier:
        wm = self.cfg.watermark
        args = (wm.bits, wm.ber_threshold, wm.keep_audit_stages)
        if resume and self.run_dir.ledger.is_file():
            verifier = Verifier.resume(self.out_dir, *args)
        else:
            verifier = Verifier(self.out_dir, *args)
        log.info("verifier: trust anchor %s (publish it)", fingerprint(verifier.key.public_bytes()))
        ckpt.attach_verifier(verifier, self._checkpoint_dir(resume))
        return verifier

    def close(self) -> None:
        if isinstance(self.party, Verifier):
            self.party.close()


def _trainer_number(name: str, n_trainers: int) -> int:
    if name[:1] == "t" and name[1:].isdigit() and 1 <= int(name[1:]) <= n_trainers:
        return int(name[1:])
    raise ValueError(f"trainer name {name!r} must be t1 .. t{n_trainers} (the config's trainers)")


def serve(
    host: PartyHost,
    transport: EpochTransport,
    stop: threading.Event,
    poll: float = 0.2,
) -> None:
    """Run ``host`` until the data owner says shutdown or ``stop`` is set.

    Starts in the ``join`` epoch. A rejected message is answered with an ERROR
    to its sender and serving goes on; a failed send marks the host broken
    (see :class:`PartyHost`) and is reported the same way. An ERROR is never
    answered (two parties would bounce ERRORs forever), and a message refused
    for its sender's role (:class:`Unauthorized`) leaves the host as it was.
    """
    host.transport = transport
    transport.rekey(None)
    try:
        while not stop.is_set():
            try:
                msg = transport.recv(host.name, timeout=poll)
            except TimeoutError:
                continue
            if msg.kind == Kind.CONTROL and msg.sender == "do":
                op = msg.meta.get("op")
                if op == "shutdown":
                    log.info("%s: shutdown requested", host.name)
                    return
                if op == "rekey":
                    _rekey(transport, msg, host.name)
                    continue
            _handle(host, transport, msg)
    finally:
        host.close()
        transport.close()


def _rekey(transport: EpochTransport, msg: Message, name: str) -> None:
    epoch = msg.meta.get("epoch")
    if isinstance(epoch, int) and epoch != transport.epoch and epoch > (transport.epoch or 0):
        log.info("%s: moving to transport epoch %d", name, epoch)
        transport.rekey(epoch)


def _handle(host: PartyHost, transport: EpochTransport, msg: Message) -> None:
    try:
        host.handle(msg)
    except Exception as exc:  # one bad message must not end the party: report and go on
        host.broken = host.broken or not isinstance(exc, Unauthorized)
        expected = isinstance(exc, ProtocolError | ConnectionError | ValueError | OSError)
        log.log(
            logging.WARNING if expected else logging.ERROR,
            "%s: %s from %s failed: %s",
            host.name,
            msg.kind,
            msg.sender,
            exc,
            exc_info=not expected,
        )
        if msg.kind == Kind.ERROR:
            return
        error = Message(Kind.ERROR, msg.step, host.name, msg.sender, {}, {"error": str(exc)[:500]})
        with contextlib.suppress(ProtocolError, ConnectionError):
            transport.send(error, timeout=5.0)
