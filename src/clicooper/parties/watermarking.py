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

from clicooper.common.messages import Kind, Message, ProtocolError
from clicooper.config import WatermarkConfig
from clicooper.privacy.secrets import private_dir, write_private
from clicooper.watermark import (
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
SECRET_FILE = "watermark.secret"


class TrainerChain:
    """A trainer's side of the chain: its key, its watermark secret, the stage's mark."""

    def __init__(self, trainer: Any, settings: WatermarkConfig, party_dir: Path) -> None:
        self.trainer = trainer
        self.settings = settings
        self.key = PartyKey.generate()
        self.secret = new_watermark_secret()
        private_dir(party_dir)
        self.key.save(party_dir / KEY_FILE)
        write_private(party_dir / SECRET_FILE, self.secret)
        self.param = select_weight(trainer.segment)
        self.mark: StageWatermark | None = None
        self.losses: list[float] = []
        self.steps = 0
        trainer.registration = {
            "public_key": self.key.public_bytes().hex(),
            "watermark_secret": self.secret.hex(),  # to the verifier only (DESIGN §5)
            "param": self.param,
        }
        trainer.control_handlers["stage_begin"] = self.begin
        trainer.control_handlers["stage_end"] = self.end
        trainer.loss_observers.append(self._observe)

    def begin(self, msg: Message) -> dict[str, Any] | None:
        stage, link = int(msg.meta["stage"]), bytes.fromhex(msg.meta["link"])
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
        self.trainer.regulariser = self.mark.regulariser if self.settings.strength > 0 else None
        self.losses, self.steps = [], 0
        return {"stage": stage}

    def _observe(self, loss: float | None, applied: bool) -> None:
        if loss is not None:
            self.losses.append(loss)
        self.steps += int(applied)

    def end(self, msg: Message) -> dict[str, Any] | None:
        """Sign this stage's record and send it with the segment to the verifier."""
        if self.mark is None:
            raise ProtocolError(f"{self.trainer.name} got stage_end before stage_begin")
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
                    "bits_hash": bits_hash(self.mark.bits).hex(),
                    "ber": self.mark.ber(state),
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

    def on_step(self, step: int) -> None:
        """Close a stage every ``stage_steps`` steps; a shorter remainder joins the last stage."""
        self.steps_in_stage += 1
        size = self.settings.stage_steps
        if size and self.steps_in_stage >= size and self.total_steps - step >= size:
            self.close_stage(more=True)

    def on_epoch_end(self, more: bool) -> None:
        if not self.settings.stage_steps and self.steps_in_stage:
            self.close_stage(more)

    def finish(self) -> None:
        """Close a partly done last stage so the final segments match the ledger."""
        if self.steps_in_stage:
            self.close_stage(more=False)

    def close_stage(self, more: bool) -> None:
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
        for name in do.trainers:
            reply = do.control(
                name, "stage_end", stage=self.stage, prev=self.link, session_id=self.session_id
            )
            self.link = reply.meta["tip"]
            self.verdicts.append({k: reply.meta[k] for k in ("stage", "party", "ber", "verdict")})
        self.steps_in_stage = 0
        if more:
            self._begin(self.stage + 1)

    def _expect_reply(self, op: str) -> Message:
        reply = self.owner.transport.recv(self.owner.name)
        if reply.kind != Kind.REPLY or reply.meta.get("op") != op:
            raise ProtocolError(f"do expected the verifier's {op!r} reply, got {reply.kind}")
        return reply
