"""The watermark chain as the parties run it (DESIGN §5).

Per stage t, with ``L`` the link that closed stage t-1 (genesis for t = 1):

1. every trainer derives its stage watermark from ``(w_i, L, i, t)`` and adds
   the regulariser to its loss while it trains;
2. at the end of the stage the data owner appends its record (head hash,
   label-secret commitment); then each trainer in chain order signs a record
   (segment hash, bits hash, self-measured BER, loss statistics) and sends it
   with its segment to the verifier, which checks the segment against the
   record, extracts the bits, keeps an audit copy, appends the record and its
   own signed attestation;
3. the link of the last attestation is ``L`` for stage t+1.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from clicooper.common.checks import meta_hex, meta_int
from clicooper.common.messages import Kind, Message, ProtocolError
from clicooper.config import WatermarkConfig
from clicooper.privacy.secrets import private_dir, write_private
from clicooper.watermark import (
    InputMoments,
    PartyKey,
    Record,
    StageWatermark,
    bits_hash,
    new_watermark_secret,
    segment_hash,
    select_weight,
    sign,
)

KEY_FILE = "party.key"
LINK_BYTES = 32  # a ledger link: SHA-256
SESSION_BYTES = 16  # the verifier's session id
SECRET_FILE = "watermark.secret"


class TrainerChain:
    """A trainer's side of the chain: its key, its watermark secret, the stage's mark."""

    def __init__(
        self, trainer: Any, settings: WatermarkConfig, party_dir: Path, resume: bool = False
    ) -> None:
        """``resume``: reload the key and secret of ``party_dir`` (a restarted trainer)."""
        self.trainer = trainer
        self.settings = settings
        if resume:
            self.key = PartyKey.load(party_dir / KEY_FILE)
            self.secret = (party_dir / SECRET_FILE).read_bytes()
        else:
            self.key = PartyKey.generate()
            self.secret = new_watermark_secret()
            private_dir(party_dir)
            self.key.save(party_dir / KEY_FILE)
            write_private(party_dir / SECRET_FILE, self.secret)
        self.param = select_weight(trainer.segment)
        # the seal's metric: the marked layer's outputs on this stage's training inputs
        self.inputs = (
            InputMoments(trainer.segment, self.param) if settings.seal_metric == "inputs" else None
        )
        self.mark: StageWatermark | None = None
        self.stage, self.link = 0, ""
        self.losses: list[float] = []
        self.steps = 0
        self.sealed: list[int] = []  # per stage: bits the seal had to deepen
        trainer.registration = {
            "public_key": self.key.public_bytes().hex(),
            "watermark_secret": self.secret.hex(),  # to the verifier only (DESIGN §5)
            "param": self.param,
        }
        trainer.chain = self
        trainer.control_handlers["stage_begin"] = self.begin
        trainer.control_handlers["stage_end"] = self.end
        trainer.loss_observers.append(self._observe)

    def begin(self, msg: Message) -> dict[str, Any] | None:
        """Start stage ``stage`` from ``link``; stages only move forward (a restore rewinds)."""
        stage, link = meta_int(msg, "stage", 1), meta_hex(msg, "link", LINK_BYTES)
        if stage <= self.stage:
            raise ProtocolError(
                f"{self.trainer.name} is at stage {self.stage}: stage_begin {stage} does not "
                "move forward"
            )
        self.start(stage, link)
        self.losses, self.steps = [], 0
        return {"stage": stage}

    def start(self, stage: int, link_hex: str) -> None:
        """Derive stage ``stage``'s watermark from the link that closed the stage before."""
        self.stage, self.link = stage, link_hex
        if self.inputs is not None:
            self.inputs.reset()
        link = bytes.fromhex(link_hex)
        weight = dict(self.trainer.segment.named_parameters())[self.param]
        self.mark = StageWatermark.derive(
            self.secret,
            link,
            self.trainer.index,
            stage,
            self.param,
            weight.numel(),
            self.settings.bits,
            self.settings.strength,
        )
        pushing = self.settings.strength > 0 and self.settings.schedule == "always"
        self.trainer.regulariser = self.mark.regulariser if pushing else None

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the stage, its link, the stage's losses and step count."""
        if self.mark is None:
            return {}
        return {
            "stage": self.stage,
            "link": self.link,
            "losses": self.losses,
            "steps": self.steps,
            "sealed": self.sealed,
            "inputs": self.inputs.state() if self.inputs is not None else {},
        }

    def load_state(self, state: dict[str, Any]) -> None:
        if state:
            self.start(int(state["stage"]), state["link"])
            self.losses, self.steps = list(state["losses"]), int(state["steps"])
            self.sealed = [int(n) for n in state.get("sealed", [])]
            if self.inputs is not None:
                self.inputs.load_state(state.get("inputs", {}))

    def _observe(self, loss: float | None, applied: bool) -> None:
        if loss is not None:
            self.losses.append(loss)
        self.steps += int(applied)

    def end(self, msg: Message) -> dict[str, Any] | None:
        """Seal the stage's bits, then hand in the segment (:meth:`commit`)."""
        self._stage_mark()
        self._check_end(msg)  # before the seal changes the segment
        if self.settings.strength > 0 and (self.settings.seal or self.settings.schedule == "seal"):
            mark, ridge = self._stage_mark(), self.settings.seal_ridge
            self.sealed.append(mark.seal(self.trainer.segment, inputs=self.inputs, ridge=ridge))
        return self.commit(msg)

    def _check_end(self, msg: Message) -> None:
        """A stage_end names this trainer's stage, a link and the session (checked first)."""
        stage = meta_int(msg, "stage", 1)
        meta_hex(msg, "prev", LINK_BYTES)
        meta_hex(msg, "session_id", SESSION_BYTES)
        if stage != self.stage:
            raise ProtocolError(
                f"{self.trainer.name} is at stage {self.stage}: it cannot end stage {stage}"
            )

    def _stage_mark(self) -> StageWatermark:
        if self.mark is None:
            raise ProtocolError(f"{self.trainer.name} got stage_end before stage_begin")
        return self.mark

    def commit(self, msg: Message) -> dict[str, Any] | None:
        """Sign this stage's record and send it with the segment to the verifier."""
        mark = self._stage_mark()
        state = {k: v.detach().clone() for k, v in self.trainer.segment.state_dict().items()}
        losses = self.losses or [0.0]
        record = sign(
            Record(
                session_id=msg.meta["session_id"],
                stage=int(msg.meta["stage"]),
                party=self.trainer.name,
                kind="trainer",
                public_key=self.key.public_bytes().hex(),
                prev=msg.meta["prev"],
                body={
                    "segment_hash": segment_hash(state).hex(),
                    "bits_hash": bits_hash(mark.bits).hex(),
                    "ber": mark.ber(state),
                    "loss_mean": sum(losses) / len(losses),
                    "loss_last": losses[-1],
                    "steps": self.steps,
                    "time": time.time(),
                    "param": self.param,
                },
            ),
            self.key,
        )
        self.trainer.send(
            Message(
                Kind.AUDIT,
                msg.step,
                self.trainer.name,
                "verifier",
                state,
                {"record": record_to_meta(record)},
            )
        )
        return None  # the verifier answers the data owner once the record is appended


def record_to_meta(record: Record) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(record)


def record_from_meta(meta: Any) -> Record:
    if not isinstance(meta, dict):
        raise ProtocolError("a record must be a JSON object")
    try:
        return Record(**meta)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed record: {exc}") from None


class OwnerChain:
    """The data owner's side: opens the session, closes stages in chain order."""

    def __init__(
        self, owner: Any, key: PartyKey, label_commitment: bytes, settings: WatermarkConfig
    ) -> None:
        self.owner, self.key, self.settings = owner, key, settings
        self.label_commitment = label_commitment.hex()
        self.session_id = ""
        self.link = ""
        self.stage = 0
        self.steps_in_stage = 0
        self.verdicts: list[dict[str, Any]] = []
        self.total_steps = 0  # steps the run will take; set by the session

    def open(self) -> None:
        """Register every party with the verifier, open the ledger, start stage 1."""
        do = self.owner
        do.transport.send(
            Message(
                Kind.REGISTER,
                do.step,
                do.name,
                "verifier",
                {},
                {"party": do.name, "public_key": self.key.public_bytes().hex()},
            )
        )
        self._expect_reply("register")
        for name in do.trainers:
            do.control(name, "register")
        reply = do.control("verifier", "open")
        self.session_id, self.link = reply.meta["session_id"], reply.meta["tip"]
        self._begin(1)

    def _begin(self, stage: int) -> None:
        self.stage, self.steps_in_stage = stage, 0
        for name in self.owner.trainers:
            self.owner.control(name, "stage_begin", stage=stage, link=self.link)

    def count_step(self, step: int) -> bool:
        """Count ``step`` in the stage; True when the stage must close after it."""
        self.steps_in_stage += 1
        size = self.settings.stage_steps
        return bool(size and self.steps_in_stage >= size and self.total_steps - step >= size)

    def epoch_close_due(self) -> bool:
        """True when stages are epochs and this one has steps to close."""
        return not self.settings.stage_steps and self.steps_in_stage > 0

    def state(self) -> dict[str, Any]:
        """The owner's ledger position, for a checkpoint."""
        keys = ("session_id", "link", "stage", "steps_in_stage", "verdicts")
        return {k: getattr(self, k) for k in keys}

    def load_state(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def close_stage(self, more: bool, done: dict[str, dict[str, Any]] | None = None) -> None:
        """Append the stage's records in chain order, then begin the next stage.

        ``done`` (after a crash) holds the records of this stage already in the
        ledger, by party: ``{"tip": link}`` for ``do``, the verifier's verdict
        with ``tip`` = link of the attestation for trainers. They are not sent again.
        """
        done = done or {}
        do = self.owner
        if "do" in done:
            self.link = done["do"]["tip"]
        else:
            self._send_record()
        for name in do.trainers:
            meta = done[name] if name in done else self._end(name)
            self.link = meta["tip"]
            self.verdicts.append({k: meta[k] for k in ("stage", "party", "ber", "verdict")})
        self.steps_in_stage = 0
        if more:
            self._begin(self.stage + 1)

    def _end(self, name: str) -> dict[str, Any]:
        """Trainer ``name`` hands in its segment; the verifier's verdict on it (only the
        verifier's, and only about ``name``'s record of this stage, is taken)."""
        meta = self.owner.control(
            name,
            "stage_end",
            reply_from="verifier",
            stage=self.stage,
            prev=self.link,
            session_id=self.session_id,
        ).meta
        if meta["party"] != name or meta["stage"] != self.stage:
            raise ProtocolError(
                f"the verifier answered stage_end of {name} at stage {self.stage} with the "
                f"verdict on {meta['party']} at stage {meta['stage']}"
            )
        return meta

    def _send_record(self) -> None:
        do = self.owner
        record = sign(
            Record(
                session_id=self.session_id,
                stage=self.stage,
                party=do.name,
                kind="do",
                public_key=self.key.public_bytes().hex(),
                prev=self.link,
                body={
                    "head_hash": segment_hash(do.head.state_dict()).hex(),
                    "label_commitment": self.label_commitment,
                    "steps": do.step,
                    "time": time.time(),
                },
            ),
            self.key,
        )
        do.transport.send(
            Message(
                Kind.RECORD, do.step, do.name, "verifier", {}, {"record": record_to_meta(record)}
            )
        )
        self.link = self._expect_reply("record").meta["tip"]

    def _expect_reply(self, op: str) -> Message:
        return self.owner.expect_reply("verifier", op)
