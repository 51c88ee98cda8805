"""The verifier: neutral keeper of the ledger (DESIGN §5).

It registers every party's public key (and each trainer's watermark secret,
of which the ledger stores only the commitment), opens the session, appends
records only after checking them, audits every trainer's segment at every
stage and attests to the result. It never receives inputs, labels or the
label secret.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from clicooper.common.checks import Unauthorized, meta_int, require_sender
from clicooper.common.messages import Kind, Message, ProtocolError
from clicooper.privacy.secrets import private_dir, write_private
from clicooper.runtime.compute import ComputeMeter
from clicooper.runtime.rundirs import RunDir
from clicooper.runtime.transport.base import Party
from clicooper.watermark import (
    Ledger,
    LedgerError,
    PartyKey,
    Record,
    StageWatermark,
    bits_hash,
    commitment,
    load_segment,
    save_segment,
    segment_hash,
    sign,
)
from clicooper.watermark.anchor import write_anchor
from clicooper.watermark.records import TRAINER_NAME, trainer_index

SECRETS_FILE = "watermark_secrets.json"
#: The step (or stage) argument of each control op, checked before a handler reads it.
_STEP_ARGS = {"checkpoint": "step", "restore": "step", "ledger": "stage"}


class Verifier(Party):
    """Opens a session, keeps the ledger, audits segments."""

    name = "verifier"

    def __init__(
        self,
        run_dir: Path | None = None,
        n_bits: int = 256,
        ber_threshold: float = 0.05,
        keep_audit_stages: int | None = None,
    ) -> None:
        self.session_id = os.urandom(16)
        self.nonce = os.urandom(16)
        self.registered: dict[str, dict[str, Any]] = {}
        self.run_dir = run_dir
        self.n_bits, self.ber_threshold = n_bits, ber_threshold
        self.keep_audit_stages = keep_audit_stages
        self.key = PartyKey.generate()
        self.ledger: Ledger | None = None
        self._stage_links: dict[int, bytes] = {}  # link that closed stage t (0: genesis)
        self.control_handlers: dict[str, Callable[[Message], dict[str, Any]]] = {}
        self.compute = ComputeMeter()  # its FLOPs and CPU seconds, kept off the owner's

    @classmethod
    def resume(
        cls,
        run_dir: Path,
        n_bits: int = 256,
        ber_threshold: float = 0.05,
        keep_audit_stages: int | None = None,
    ) -> Verifier:
        """A restarted verifier: ledger, key and secrets from ``run_dir``.

        A trainer record whose attestation was lost in the crash is attested
        now, from the audit copy kept before the record was appended.
        """
        self = cls(run_dir, n_bits, ber_threshold, keep_audit_stages)
        vdir = RunDir(run_dir).verifier
        try:
            self.key = PartyKey.load(vdir / "verifier.key")
            raw = json.loads((vdir / SECRETS_FILE).read_text())
            self.secrets = {k: bytes.fromhex(v) for k, v in raw.items()}
            self.ledger = Ledger.open(RunDir(run_dir).ledger)
        except (OSError, ValueError, LedgerError) as exc:
            raise ProtocolError(f"verifier cannot resume from {run_dir}: {exc}") from None
        self.session_id, self.nonce = self.ledger.session_id, self.ledger.nonce
        self.registered = {entry.name: {} for entry in self.ledger.parties()}
        self._stage_links = {0: self.ledger.genesis}
        last = None
        for row, record in zip(self.ledger.rows(), self.ledger.records(), strict=True):
            if record.kind == "attestation" and record.body["subject"] == f"t{len(self.secrets)}":
                self._stage_links[record.stage] = bytes.fromhex(row.link)
            last = (row, record)
        if last is not None and last[1].kind == "trainer":
            row, record = last
            path = RunDir(run_dir).audit / str(record.stage) / f"{record.party}.safetensors"
            self._attest(record, load_segment(path), bytes.fromhex(row.link))
        return self

    def stage_records(self, stage: int) -> dict[str, dict[str, Any]]:
        """Records of ``stage`` already in the ledger: ``do``'s link, trainers' verdicts."""
        done: dict[str, dict[str, Any]] = {}
        for row, record in zip(self.ledger.rows(), self.ledger.records(), strict=True):
            if record.stage != stage:
                continue
            if record.kind == "do":
                done["do"] = {"tip": row.link}
            elif record.kind == "attestation":
                body = record.body
                done[body["subject"]] = {
                    "stage": stage,
                    "party": body["subject"],
                    "ber": body["ber"],
                    "verdict": body["verdict"],
                    "tip": row.link,
                }
        return done

    def handle(self, msg: Message) -> None:
        handler = {
            Kind.REGISTER: self._on_register,
            Kind.CONTROL: self._on_control,
            Kind.RECORD: self._on_record,
            Kind.AUDIT: self._on_audit,
        }.get(msg.kind)
        if handler is None:
            raise ProtocolError(f"verifier does not accept {msg.kind} messages")
        with self.compute.active(), self.compute.count(None):  # rare: count each time
            handler(msg)

    def _reply(self, to: str, step: int, **meta: Any) -> None:
        self.send(Message(Kind.REPLY, step, self.name, to, {}, meta))

    def _on_register(self, msg: Message) -> None:
        """The data owner and each trainer register once, as themselves, before open."""
        if msg.sender != "do" and not TRAINER_NAME.fullmatch(msg.sender):
            raise Unauthorized(f"verifier refused registration from {msg.sender}: not a party")
        if msg.meta.get("party") != msg.sender or msg.sender in self.registered:
            raise ProtocolError(f"{msg.sender} cannot register (again or as another party)")
        if self.ledger is not None:
            raise ProtocolError("the session is already open: registration is closed")
        self.registered[msg.sender] = dict(msg.meta)
        self._reply(
            msg.sender,
            msg.step,
            op="register",
            session_id=self.session_id.hex(),
            nonce=self.nonce.hex(),
        )

    def _on_control(self, msg: Message) -> None:
        op = msg.meta.get("op")
        require_sender(msg, {"do"}, f"control op {op!r}", self.name)
        if op in _STEP_ARGS:
            meta_int(msg, _STEP_ARGS[op])
        if op in self.control_handlers:
            answer = self.control_handlers[op](msg)
            self.send(Message(Kind.REPLY, msg.step, self.name, "do", {}, {**answer, "op": op}))
            return
        if op != "open":
            raise ProtocolError(f"verifier does not take control op {op!r}")
        self.open()
        self._reply(
            "do", msg.step, op="open", session_id=self.session_id.hex(), tip=self.ledger.tip().hex()
        )

    def open(self) -> None:
        """Create the ledger: parties do, t1..tn, verifier with keys and commitments."""
        if self.run_dir is None:
            raise ProtocolError("the verifier has no run directory for its ledger")
        trainers = sorted((n for n in self.registered if n != "do"), key=trainer_index)
        if "do" not in self.registered or not trainers:
            raise ProtocolError("the data owner and at least one trainer must register first")
        parties = [("do", bytes.fromhex(self.registered["do"]["public_key"]), None)]
        secrets = {}
        for name in trainers:
            info = self.registered[name]
            secrets[name] = bytes.fromhex(info["watermark_secret"])
            parties.append((name, bytes.fromhex(info["public_key"]), commitment(secrets[name])))
        parties.append((self.name, self.key.public_bytes(), None))
        vdir = private_dir(RunDir(self.run_dir).verifier)
        self.key.save(vdir / "verifier.key")
        write_private(
            vdir / SECRETS_FILE, json.dumps({k: v.hex() for k, v in secrets.items()}).encode()
        )
        self.secrets = secrets
        self.ledger = Ledger.create(
            RunDir(self.run_dir).ledger, self.session_id, self.nonce, parties, self.n_bits
        )
        write_anchor(vdir, self.key.public_bytes())  # the trust anchor, apart from the ledger
        self._stage_links = {0: self.ledger.genesis}

    def _append(self, record: Record) -> bytes:
        try:
            return self.ledger.append(record)
        except LedgerError as exc:
            raise ProtocolError(f"verifier refused a record: {exc}") from None

    def _on_record(self, msg: Message) -> None:
        from clicooper.parties.watermarking import record_from_meta

        require_sender(msg, {"do"}, "bare records", self.name)
        record = record_from_meta(msg.meta.get("record"))
        if record.party != "do":
            raise ProtocolError(f"do sent a record for {record.party}")
        self._reply("do", msg.step, op="record", tip=self._append(record).hex())

    def _on_audit(self, msg: Message) -> None:
        """Check a trainer's record, keep a copy of its segment, append, attest.

        Only a trainer, for its own record, in its turn: the record must be the one the
        ledger accepts next (signed by the trainer's registered key, ``prev`` = tip, its
        slot of the open stage). So nothing is written for a record that would be
        refused, and an attested stage's copy is never written again. The copy is
        written before the append, so a verifier restarted in between still attests.
        """
        from clicooper.parties.watermarking import record_from_meta

        if self.ledger is None:
            raise ProtocolError("no session is open")
        record = record_from_meta(msg.meta.get("record"))
        if record.party != msg.sender or record.kind != "trainer":
            raise Unauthorized(f"verifier refused {msg.sender}'s audit of {record.party}'s record")
        try:
            self.ledger.check(record)
        except LedgerError as exc:
            raise ProtocolError(f"verifier refused a record: {exc}") from None
        state = {k: v.contiguous() for k, v in msg.tensors.items()}
        save_segment(
            RunDir(self.run_dir).audit / str(record.stage) / f"{record.party}.safetensors", state
        )
        verdict = self._attest(record, state, self._append(record))
        self._reply("do", msg.step, op="stage_end", party=record.party, **verdict)

    def _attest(self, record: Record, state: dict[str, torch.Tensor], subject_link: bytes) -> dict:
        """Append the signed attestation of ``record``; its stage, BER, verdict and link."""
        hash_ok = segment_hash(state).hex() == record.body["segment_hash"]
        ber = self._ber(record, state)
        ok = hash_ok and ber is not None and ber <= self.ber_threshold
        attestation = sign(
            Record(
                session_id=self.session_id.hex(),
                stage=record.stage,
                party=self.name,
                kind="attestation",
                public_key=self.key.public_bytes().hex(),
                prev=subject_link.hex(),
                body={
                    "subject": record.party,
                    "subject_link": subject_link.hex(),
                    "ber": ber,
                    "verdict": "ok" if ok else "fail",
                    "time": time.time(),
                },
            ),
            self.key,
        )
        tip = self._append(attestation)
        if trainer_index(record.party) == len(self.secrets):
            self._stage_links[record.stage] = tip
            self._prune_audit(record.stage)
        return {
            "stage": record.stage,
            "ber": ber,
            "verdict": "ok" if ok else "fail",
            "tip": tip.hex(),
        }

    def _ber(self, record: Record, state: dict[str, torch.Tensor]) -> float | None:
        """BER of the segment against the bits of its stage, derived from the previous stage."""
        param = record.body.get("param")
        weight = state.get(param) if isinstance(param, str) else None
        prev = self._stage_links.get(record.stage - 1)
        if weight is None or prev is None:
            return None
        mark = StageWatermark.derive(
            self.secrets[record.party],
            prev,
            trainer_index(record.party),
            record.stage,
            param,
            weight.numel(),
            self.n_bits,
        )
        if bits_hash(mark.bits).hex() != record.body["bits_hash"]:
            return 1.0  # the trainer embedded bits other than this stage's
        return mark.ber(state)

    def _prune_audit(self, stage: int) -> None:
        if self.keep_audit_stages is None:
            return
        old = RunDir(self.run_dir).audit / str(stage - self.keep_audit_stages)
        if old.is_dir():
            shutil.rmtree(old)

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()
