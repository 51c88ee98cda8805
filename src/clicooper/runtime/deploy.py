"""Real deployment: one OS process per party over gRPC with mutual TLS (DESIGN §8).

Pieces:

* a **peers file** (TOML) names every party's ``host:port`` and the session id;
* :class:`EpochTransport` wraps :class:`GrpcTransport` so a party can move to a
  new *transport epoch*: session id ``<session>.<epoch>`` with fresh sequence
  counters on every link. A party process starts in the ``<session>.join``
  epoch and waits for the data owner to move it to the current epoch;
* :class:`PartyHost` is the trainer or verifier process: it builds its party
  when the data owner sends ``setup`` (a trainer builds its segment from its
  own config and the seed exactly as the in-process session does, and refuses
  a data owner whose settings differ) and :func:`serve` runs it;
* :class:`Remote` is the data owner's side: it brings every party into an
  epoch (at start and after a failure, see :mod:`clicooper.runtime.driver`
  for the resume protocol), sets them up, and shuts them down;
* :func:`launch` starts every trainer and the verifier as its own process on
  127.0.0.1 with fresh certificates (each process gets only its own bundle)
  and runs the data owner in this process.

Moving parties between epochs. The owner first asks every live party, in the
old epoch, to ``rekey`` to epoch e; then it switches itself and pings each
party in epoch e. A party that refuses the ping is in another session: it was
restarted (it is in ``join``), so the owner sends it ``rekey`` through a
one-off ``join`` client. A party that cannot be reached is waited for until
``resume_timeout``. Messages of an earlier epoch are refused by the session
check of the receiving transport, so nothing sent before a failure can be
delivered after it, and replays stay impossible after counters restart.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import clicooper
from clicooper.common.checks import MAX_STEP, Unauthorized, require_sender
from clicooper.common.messages import Kind, Message, ProtocolError
from clicooper.config import RunConfig, TransportLimits
from clicooper.models import SplitModel, build_preset, split_blocks
from clicooper.models.presets import DEFAULT_CUT
from clicooper.parties.data_owner import check_reply
from clicooper.parties.recorder import Recorder
from clicooper.parties.releases import ReleaseCache, release_caches
from clicooper.parties.trainer import Trainer, pending_limit
from clicooper.parties.verifier import Verifier
from clicooper.parties.watermarking import TrainerChain
from clicooper.privacy import gradient
from clicooper.runtime import checkpoint as ckpt
from clicooper.runtime.certs import (
    create_certificates,
    load_party_credentials,
    validate_party_name,
)
from clicooper.runtime.device import party_device, party_devices
from clicooper.runtime.optim import OptimSettings
from clicooper.runtime.transport.base import Party, Transport
from clicooper.runtime.transport.grpc import GrpcTransport
from clicooper.watermark.anchor import fingerprint

log = logging.getLogger(__name__)
JOIN = "join"
_WATCH_SLICE = 1.0
#: Seconds of waiting after which the data owner probes its peers (and between probes).
PROBE_AFTER = 3.0
#: Messages a party drops after a failure until it is restored (stale work).
_WORK = (Kind.FORWARD, Kind.BACKWARD, Kind.LABELS, Kind.INFER, Kind.RELEASE)
#: Settings a trainer and a verifier must share with the data owner.
_SHARED = {
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
    ),
    "verifier": ("watermark",),
}


# -- peers file ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Deployment:
    """Where the parties listen, the session id, the certificates and the timeouts.

    ``send_timeout`` bounds one delivery; ``step_timeout`` is the longest the
    data owner waits for an answer before it treats a party as failed;
    ``resume_timeout`` is how long it waits for a lost party to come back.
    ``supervise`` is called while waiting (``launch`` restarts dead children there).
    """

    peers: dict[str, str]
    session: str
    certs_dir: Path
    send_timeout: float = 30.0
    step_timeout: float = 120.0
    resume_timeout: float = 300.0
    supervise: Callable[[], None] | None = None
    watch: Callable[[], None] | None = None

    @classmethod
    def from_file(cls, peers_file: Path, certs_dir: Path, **timeouts: float) -> Deployment:
        """The data owner's deployment; ``certs_dir`` must be its own bundle (``OUT/do``)."""
        session, peers = read_peers(peers_file)
        load_party_credentials(Path(certs_dir), "do")  # refuses the CA key or another's key
        return cls(peers, session, Path(certs_dir), **timeouts)


def read_peers(path: Path) -> tuple[str, dict[str, str]]:
    """``(session, {party: "host:port"})`` from a peers file; ValueError saying what is wrong."""
    try:
        doc = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"peers file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"peers file {path} is not valid TOML: {exc}") from None
    session, parties = doc.get("session"), doc.get("parties")
    if not isinstance(session, str) or not session or "." in session:
        raise ValueError(f'peers file {path} needs session = "<id>" (no dots)')
    if not isinstance(parties, dict) or not parties:
        raise ValueError(f'peers file {path} needs a [parties] table: t1 = "host:port", ...')
    for name, address in parties.items():
        validate_party_name(name)
        if not isinstance(address, str) or ":" not in address:
            raise ValueError(f"peers file {path}: address of {name} must be 'host:port'")
    return session, dict(parties)


def peers_timeouts(path: Path) -> dict[str, float]:
    """The optional ``[timeouts]`` table of a peers file: send, step, resume (seconds)."""
    table = tomllib.loads(Path(path).read_text()).get("timeouts", {})
    names = {"send": "send_timeout", "step": "step_timeout", "resume": "resume_timeout"}
    unknown = set(table) - set(names)
    if unknown or not all(isinstance(v, int | float) and v > 0 for v in table.values()):
        raise ValueError(f"peers file {path}: [timeouts] takes positive send, step, resume")
    return {names[k]: float(v) for k, v in table.items()}


def write_peers(
    path: Path, session: str, peers: dict[str, str], timeouts: dict[str, float] | None = None
) -> None:
    lines = [f"session = {json.dumps(session)}", "", "[parties]"]
    lines += [f"{name} = {json.dumps(address)}" for name, address in peers.items()]
    if timeouts:
        lines += ["", "[timeouts]", *(f"{k} = {float(v)}" for k, v in timeouts.items())]
    path.write_text("\n".join(lines) + "\n")


def config_toml(cfg: RunConfig) -> str:
    """``cfg`` as TOML that :meth:`RunConfig.load` reads back to an equal config."""
    return "\n\n".join(_toml_tables(cfg.model_dump(mode="json"), "")) + "\n"


def _toml_tables(doc: dict[str, Any], name: str) -> list[str]:
    """The ``[name]`` table of ``doc``'s scalars, then one table per nested dict (dotted)."""
    body = [
        f"{k} = {_toml(v)}" for k, v in doc.items() if v is not None and not isinstance(v, dict)
    ]
    tables = ["\n".join([f"[{name}]", *body] if name else body)]
    for key, value in doc.items():
        if isinstance(value, dict):
            tables += _toml_tables(value, f"{name}.{key}" if name else key)
    return tables


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


# -- transport epochs ----------------------------------------------------------------------


class EpochTransport(Transport):
    """A :class:`GrpcTransport` that can be replaced by one for another epoch (same address)."""

    def __init__(
        self,
        name: str,
        peers: dict[str, str],
        certs_dir: Path,
        session: str,
        send_timeout: float = 30.0,
        recv_timeout: float | None = None,
        limits: TransportLimits | None = None,
    ) -> None:
        if name not in peers:
            raise ValueError(f"the peers file has no address for {name}: add `{name} = host:port`")
        self.name, self.peers, self.certs_dir = name, peers, Path(certs_dir)
        self.session, self.send_timeout, self.recv_timeout = session, send_timeout, recv_timeout
        self.limits = limits
        self.epoch: int | None = None
        self.inner: GrpcTransport | None = None
        self.watch: Callable[[], None] | None = None
        self.probe: list[str] = []  # peers to probe while waiting long for a message
        self._probed = 0.0
        self._closed_bytes = 0

    def session_id(self, epoch: int | None) -> str:
        return f"{self.session}.{JOIN if epoch is None else epoch}"

    def rekey(self, epoch: int | None) -> None:
        """Close the current server and listen again on the same address in ``epoch``."""
        if self.inner is not None:
            self._closed_bytes += self.inner.bytes_sent
            self.inner.close()
        self.inner = self._grpc(self.session_id(epoch), self.send_timeout)
        self.inner.start()
        self.epoch = epoch

    def _grpc(self, session_id: str, send_timeout: float) -> GrpcTransport:
        return GrpcTransport(
            self.name,
            self.peers[self.name],
            {p: a for p, a in self.peers.items() if p != self.name},
            self.certs_dir,
            session_id,
            send_timeout=send_timeout,
            limits=self.limits,
        )

    @property
    def bytes_sent(self) -> int:
        return self._closed_bytes + (self.inner.bytes_sent if self.inner else 0)

    def send(self, msg: Message, timeout: float | None = None) -> None:
        if self.inner is None:
            raise ProtocolError(f"transport of {self.name} is not started")
        self.inner.send_timeout = timeout or self.send_timeout
        try:
            self.inner.send(msg)
        finally:
            self.inner.send_timeout = self.send_timeout

    def send_later(self, msg: Message) -> Future[None]:
        if self.inner is None:
            raise ProtocolError(f"transport of {self.name} is not started")
        return self.inner.send_later(msg)

    def send_join(self, msg: Message, timeout: float) -> None:
        """Send ``msg`` in the ``join`` epoch with a one-off client (to a restarted party)."""
        client = self._grpc(self.session_id(None), timeout)
        try:
            client.send(msg)
        finally:
            client.close()

    def recv(self, party: str, timeout: float | None = None) -> Message:
        """The next message; while waiting, :meth:`_check_peers` may report a failure."""
        if self.inner is None:
            raise ProtocolError(f"transport of {self.name} is not started")
        timeout = self.recv_timeout if timeout is None else timeout
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        while True:
            waited = time.monotonic() - start
            self._check_peers(waited)
            left = None if deadline is None else deadline - time.monotonic()
            try:
                msg = self.inner.recv(party, _WATCH_SLICE if left is None else min(left, 1.0))
            except TimeoutError:
                if left is not None and left <= 1.0:
                    raise TimeoutError(f"{party} received no message within {timeout} s") from None
                continue
            if not (msg.kind == Kind.REPLY and msg.meta.get("probe")):
                return msg

    def _check_peers(self, waited: float) -> None:
        """While waiting long: ``watch``, and a liveness probe of every peer in ``probe``.

        A probe is a status request; a dead peer fails it (ConnectionError), a
        restarted one refuses it (ProtocolError: another session). Answers
        are dropped by :meth:`recv`, so the party above never sees them.
        """
        if self.watch is not None:
            self.watch()
        now = time.monotonic()
        if self.probe and waited >= PROBE_AFTER and now - self._probed >= PROBE_AFTER:
            self._probed = now
            for peer in self.probe:
                msg = Message(Kind.CONTROL, 0, self.name, peer, {}, {"op": "status", "probe": True})
                self.send(msg, timeout=PROBE_AFTER)

    def close(self) -> None:
        if self.inner is not None:
            self._closed_bytes += self.inner.bytes_sent
            self.inner.close()
            self.inner = None


# -- the party process ----------------------------------------------------------------------


def party_settings(cfg: RunConfig, role: str) -> dict[str, Any]:
    """The settings of ``cfg`` a party of ``role`` must share with the data owner."""
    dump = cfg.model_dump(mode="json")
    return {key: dump[key] for key in _SHARED[role]}


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


def preset_split(cfg: RunConfig, image_shape: tuple[int, int, int], n_outputs: int) -> SplitModel:
    """The preset model seeded with ``cfg.seed``: every process builds the same weights."""
    torch.manual_seed(cfg.seed)
    blocks = build_preset(cfg.model, image_shape, n_outputs, cfg.trainers)
    return split_blocks(blocks, cfg.cut or DEFAULT_CUT[cfg.model], cfg.trainers)


def preset_segment(
    cfg: RunConfig, image_shape: tuple[int, int, int], n_outputs: int, index: int
) -> torch.nn.Module:
    """Trainer ``index``'s segment, initialised exactly as in the in-process session."""
    return preset_split(cfg, image_shape, n_outputs).segments[index - 1]


class PartyHost(Party):
    """A trainer or the verifier in its own process, built when the data owner sends setup."""

    def __init__(self, role: str, name: str, cfg: RunConfig, out_dir: Path) -> None:
        if role not in _SHARED:
            raise ValueError(f"unknown role {role!r}: serve trainer or verifier")
        self.role, self.name, self.cfg, self.out_dir = role, validate_party_name(name), cfg, out_dir
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
        directory = self.out_dir / "checkpoints" / self.name
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
            party_dir = self.out_dir / "parties" / self.name
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
        private, public = release_caches(self.out_dir / "parties" / self.name, resume)
        if resume:
            log.info(
                "%s: %d release chunks read back from its cache", self.name, len(private.chunks)
            )
        return private, public

    def _verifier(self, resume: bool) -> Verifier:
        wm = self.cfg.watermark
        args = (wm.bits, wm.ber_threshold, wm.keep_audit_stages)
        if resume and (self.out_dir / "ledger.sqlite").is_file():
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
    parent_pid: int | None = None,
    poll: float = 0.2,
) -> None:
    """Run ``host`` until the data owner says shutdown, ``stop`` is set or the parent dies.

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
            if parent_pid is not None and os.getppid() != parent_pid:
                log.warning("%s: launching process is gone; exiting", host.name)
                return
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


# -- the data owner's side ---------------------------------------------------------------------


@dataclass
class Remote:
    """The data owner's handle on remote parties: epochs, setup, recovery, shutdown."""

    deployment: Deployment
    parties: list[str]
    setup: dict[str, dict[str, Any]]  # setup meta per party (without resume)
    limits: TransportLimits | None = None
    transport: EpochTransport = field(init=False)
    epoch: int = 0
    reconnects: int = 0

    def __post_init__(self) -> None:
        d = self.deployment
        missing = [p for p in ["do", *self.parties] if p not in d.peers]
        if missing:
            raise ValueError(f"the peers file has no address for {', '.join(missing)}")
        self.transport = EpochTransport(
            "do", d.peers, d.certs_dir, d.session, d.send_timeout, d.step_timeout, self.limits
        )
        self.transport.watch = d.watch
        self.transport.probe = list(self.parties)

    def start(self) -> None:
        """Bring every party into epoch 1 and set it up for a new session."""
        self._connect(resume=False, wait=self.deployment.resume_timeout)

    def reconnect(self) -> None:
        """After a failure: a new epoch, lost parties waited for, every party set up again."""
        self.reconnects += 1
        self._connect(resume=True, wait=self.deployment.resume_timeout)

    def _connect(self, resume: bool, wait: float) -> None:
        self.transport.probe = []  # no liveness probes while parties are being moved
        try:
            self._move_all(resume, wait)
        finally:
            self.transport.probe = list(self.parties)

    def _move_all(self, resume: bool, wait: float) -> None:
        epoch = self.epoch + 1
        if self.transport.inner is not None:
            for party in self.parties:  # live parties: move in the old epoch
                with contextlib.suppress(ProtocolError, ConnectionError):
                    self.transport.send(self._control(party, "rekey", epoch=epoch), timeout=2.0)
        self.transport.rekey(epoch)
        self.epoch = epoch
        for party in self.parties:
            self._await(party, time.monotonic() + wait)
        for party in self.parties:
            self.transport.send(self._control(party, "setup", resume=resume, **self.setup[party]))
        self._collect("setup")

    def _await(self, party: str, deadline: float) -> None:
        """Until ``party`` answers a ping in the current epoch (moving it there if needed)."""
        ping = 0
        while True:
            if self.deployment.supervise is not None:
                self.deployment.supervise()
            ping += 1
            try:
                self.transport.send(self._control(party, "status", ping=ping), timeout=2.0)
                if self._pong(party, ping):
                    return
            except ProtocolError:  # another session: a restarted party waiting in join
                with contextlib.suppress(ProtocolError, ConnectionError):
                    rekey = self._control(party, "rekey", epoch=self.epoch)
                    self.transport.send_join(rekey, timeout=2.0)
            except ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise ConnectionError(
                    f"{party} did not answer at {self.deployment.peers[party]}: start it (or "
                    "restart it with the same `clicooper serve` command) and run again"
                )
            time.sleep(0.2)

    def _pong(self, party: str, ping: int) -> bool:
        deadline = time.monotonic() + self.deployment.send_timeout + 5.0
        while time.monotonic() < deadline:
            try:
                msg = self.transport.recv("do", timeout=max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                return False
            pong = msg.meta.get("op") == "status" and msg.meta.get("ping") == ping
            if msg.sender == party and pong:
                return True
        return False

    def _collect(self, op: str) -> dict[str, Message]:
        """One checked reply to ``op`` from every party; a message from a party that has
        answered already, or from none of them, is logged and dropped."""
        replies: dict[str, Message] = {}
        while len(replies) < len(self.parties):
            msg = self.transport.recv("do")
            if msg.kind == Kind.REPLY and msg.meta.get("op") == "status":
                continue  # a late answer to a ping
            if msg.sender not in self.parties or msg.sender in replies:
                log.warning("do dropped %s from %s while collecting %s", msg.kind, msg.sender, op)
                continue
            replies[msg.sender] = check_reply(msg, op)
        return replies

    def _control(self, party: str, op: str, **meta: Any) -> Message:
        return Message(Kind.CONTROL, 0, "do", party, {}, {"op": op, **meta})

    def close(self) -> int:
        """Shut every party down; the bytes every party sent (best effort)."""
        total = self.transport.bytes_sent
        with contextlib.suppress(ProtocolError, ConnectionError, TimeoutError):
            for party in self.parties:
                self.transport.send(self._control(party, "status", ping=-1))
            answered: set[str] = set()
            while len(answered) < len(self.parties):
                msg = self.transport.recv("do", timeout=self.deployment.send_timeout)
                sent = msg.meta.get("bytes_sent", 0)
                ping = msg.meta.get("op") == "status" and msg.meta.get("ping") == -1
                if ping and msg.sender in self.parties and msg.sender not in answered:
                    answered.add(msg.sender)
                    total += sent if isinstance(sent, int) and sent >= 0 else 0
        for party in self.parties:
            with contextlib.suppress(ProtocolError, ConnectionError):
                self.transport.send(self._control(party, "shutdown"), timeout=5.0)
        self.transport.close()
        return total


# -- launch: every party its own process on loopback ---------------------------------------------


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (bound, read, released)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


LAUNCH_ARTIFACTS = ("certs", "deploy", "logs")


@dataclass
class Child:
    """A party process started by :class:`Launcher`."""

    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0


class Launcher:
    """Starts, supervises and always stops the trainer and verifier processes of a run."""

    MAX_RESTARTS = 3

    def __init__(self, out_dir: Path, cfg: RunConfig, send_timeout: float = 30.0) -> None:
        self.out_dir, self.cfg = out_dir, cfg
        names = [f"t{i}" for i in range(1, cfg.trainers + 1)]
        if cfg.mode == "clicooper" and cfg.watermark.enabled:
            names.append("verifier")
        self.names = names
        self.session = os.urandom(8).hex()
        ports = free_ports(len(names) + 1)
        self.peers = {p: f"127.0.0.1:{port}" for p, port in zip(["do", *names], ports, strict=True)}
        self.certs_dir = out_dir / "certs"
        self.deploy_dir = out_dir / "deploy"
        self.send_timeout = send_timeout
        self.children: dict[str, Child] = {}

    def bundle(self, name: str) -> Path:
        """``name``'s own certificate bundle: the only one its process is given."""
        return self.certs_dir / name

    def prepare(self) -> None:
        """Certificates (one bundle per party), peers file, config file, log directory.

        The session CA's key is never written: every bundle is issued here at
        once, so no party, nor anything left in the run directory, can issue
        itself another certificate.
        """
        from clicooper.privacy.secrets import private_dir

        create_certificates(["do", *self.names], private_dir(self.certs_dir), keep_ca_key=False)
        self.deploy_dir.mkdir()
        (self.out_dir / "logs").mkdir()
        write_peers(self.deploy_dir / "peers.toml", self.session, self.peers)
        config_file = self.deploy_dir / "config.toml"
        config_file.write_text(config_toml(self.cfg))
        if RunConfig.load(config_file) != self.cfg:
            raise RuntimeError("the launch config does not read back equal (config_toml bug)")

    def argv(self, name: str) -> list[str]:
        role = "verifier" if name == "verifier" else "trainer"
        return [
            sys.executable,
            "-m",
            "clicooper.cli",
            "serve",
            role,
            "--name",
            name,
            "--config",
            str(self.deploy_dir / "config.toml"),
            "--listen",
            self.peers[name],
            "--certs",
            str(self.bundle(name)),
            "--peers",
            str(self.deploy_dir / "peers.toml"),
            "--out",
            str(self.out_dir),
            "--send-timeout",
            str(self.send_timeout),
            "--exit-with-parent",
            str(os.getpid()),
        ]

    def start(self) -> None:
        for name in self.names:
            child = Child(name, self.argv(name), self.out_dir / "logs" / f"{name}.log")
            self.children[name] = child
            self._spawn(child)

    def _spawn(self, child: Child) -> None:
        env = dict(os.environ)
        src = str(Path(clicooper.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        with open(child.log_path, "ab") as log_file:
            child.proc = subprocess.Popen(
                child.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group, stopped as a whole
            )
        self._write_pids()

    def _write_pids(self) -> None:
        pids = {n: c.proc.pid for n, c in self.children.items() if c.proc is not None}
        (self.deploy_dir / "pids.json").write_text(json.dumps({"launcher": os.getpid(), **pids}))

    def watch(self) -> None:
        """ConnectionError when a party process has exited (so the owner recovers at once)."""
        for child in self.children.values():
            if child.proc is not None and child.proc.poll() is not None:
                raise ConnectionError(f"{child.name} exited with status {child.proc.returncode}")

    def supervise(self) -> None:
        """Restart a party process that died (called while the data owner waits for it)."""
        for child in self.children.values():
            if child.proc is None or child.proc.poll() is None:
                continue
            if child.restarts >= self.MAX_RESTARTS:
                tail = child.log_path.read_text(errors="replace").strip().splitlines()[-1:]
                raise RuntimeError(
                    f"{child.name} exited {child.restarts + 1} times (last status "
                    f"{child.proc.returncode}): {' '.join(tail)} (log: {child.log_path})"
                )
            child.restarts += 1
            log.warning("%s exited with %s; restarting it", child.name, child.proc.returncode)
            self._spawn(child)

    def deployment(self, step_timeout: float, resume_timeout: float) -> Deployment:
        return Deployment(
            self.peers,
            self.session,
            self.bundle("do"),
            send_timeout=self.send_timeout,
            step_timeout=step_timeout,
            resume_timeout=resume_timeout,
            supervise=self.supervise,
            watch=self.watch,
        )

    def stop(self, grace: float = 10.0) -> None:
        """Wait ``grace`` s for every child to exit, then SIGTERM, then SIGKILL its group."""
        procs = [c.proc for c in self.children.values() if c.proc is not None]
        _wait_all(procs, grace)
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            alive = [p for p in procs if p.poll() is None]
            for proc in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
            _wait_all(alive, wait)


def _wait_all(procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt so cleanup always runs.

    SIGINT too: a shell without job control starts background commands with SIGINT
    ignored, and Python then keeps it ignored, so `clicooper launch ... &` in a script
    (or a CI job started that way) ignored Ctrl-C and `kill -INT` for good.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, interrupt) for s in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def prepare_launch_dir(out_dir: Path, overwrite: bool) -> None:
    """Like ``prepare_run_dir``, for the launch artifacts too."""
    from clicooper.runtime.session import prepare_run_dir

    present = [n for n in LAUNCH_ARTIFACTS if (out_dir / n).exists()]
    if present and not overwrite:
        raise ValueError(
            f"{out_dir} already holds a run ({present[0]}): choose another --out "
            "or pass --overwrite to replace it"
        )
    prepare_run_dir(out_dir, overwrite)
    for name in present:
        shutil.rmtree(out_dir / name)


def launch(
    cfg: RunConfig,
    out_dir: Path | str,
    data: Any = None,
    progress: Any = None,
    overwrite: bool = False,
    *,
    send_timeout: float = 30.0,
    step_timeout: float = 120.0,
    resume_timeout: float = 120.0,
) -> Any:
    """Run a whole session with each trainer and the verifier in its own process.

    Fresh certificates go to ``out_dir/certs``, one bundle per party (each process
    is given only its own; the CA key is not kept); every process listens on a free
    port of 127.0.0.1; the data owner runs here. Every process started is
    stopped on return, on an error, on Ctrl-C, SIGTERM or SIGHUP, and each
    child also exits by itself if this process dies.
    """
    from clicooper.runtime.session import run

    cfg = cfg.model_copy(update={"transport": "grpc"})
    out_dir = Path(out_dir)
    party_devices(cfg, [f"t{i}" for i in range(1, cfg.trainers + 1)])  # all on this machine
    prepare_launch_dir(out_dir, overwrite)
    launcher = Launcher(out_dir, cfg, send_timeout)
    grace = 0.0  # on an error or an interrupt the children are stopped at once
    with _signals_raise():
        try:
            launcher.prepare()
            launcher.start()
            deployment = launcher.deployment(step_timeout, resume_timeout)
            session = run(cfg, out_dir, data=data, progress=progress, deployment=deployment)
            session.results["transport"]["restarts"] = {
                n: c.restarts for n, c in launcher.children.items()
            }
            (out_dir / "results.json").write_text(json.dumps(session.results, indent=2))
            grace = 10.0  # every party was told to shut down: let it exit by itself
            return session
        finally:
            launcher.stop(grace)
