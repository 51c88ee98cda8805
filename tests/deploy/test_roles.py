"""Messages are authorised by role, against real parties over gRPC with real certificates.

A malicious t2 takes part in a clicooper run and, at the start of stage 2, sends
honest t1 every control op only the data owner may send (a made-up stage link
would frame t1: its next record would fail in the ledger; a restore would roll it
back; a 13-digit checkpoint step would never be pruned), sends the verifier
audits for an attested and for an unopened stage, and answers the owner in the
verifier's place. Every one is refused or dropped: the run needs no recovery,
every attestation is ok, and the ledger, the audit copies and t1's checkpoints
are those of an honest run.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from cc_helpers import quick_config
from conftest import WM
from served import Served

from clicooper.common.messages import Kind, Message
from clicooper.node.processes import free_ports
from clicooper.parties.data_owner import DataOwner
from clicooper.parties.watermarking import record_to_meta
from clicooper.runtime import checkpoint
from clicooper.runtime.certs import create_certificates
from clicooper.runtime.deploy.host import PartyHost
from clicooper.runtime.session import run
from clicooper.runtime.transport.grpc import GrpcTransport
from clicooper.runtime.verification import verify_run
from clicooper.watermark import Ledger, Record, load_segment, segment_hash, sign

CONTROL_ATTACKS = {
    "stage_begin": {"stage": 2, "link": os.urandom(32).hex()},
    "stage_end": {"stage": 2, "prev": os.urandom(32).hex(), "session_id": os.urandom(16).hex()},
    "finish": {},
    "register": {},
    "checkpoint": {"step": 10**12 + 7},
    "restore": {"step": 0},
}


class MaliciousT2(PartyHost):
    """t2 that plays honestly, except for the attacks it sends when stage 2 begins."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.errors: list[str] = []  # the ERRORs t1 and the verifier answer the attacks with
        self.attacked = threading.Event()

    def handle(self, msg: Message) -> None:
        if msg.kind == Kind.ERROR:
            self.errors.append(f"{msg.sender}: {msg.meta.get('error')}")
        op = msg.meta.get("op")
        if op == "stage_begin" and msg.meta.get("stage") == 2 and not self.attacked.is_set():
            self._attack_t1(msg.step)
            self._attack_verifier(msg.step)
            self.attacked.set()
        if op == "stage_end" and msg.sender == "do":
            forged = {"op": "stage_end", "party": "t2", "stage": msg.meta["stage"], "ber": 0.0}
            forged |= {"verdict": "ok", "tip": os.urandom(32).hex()}
            self.send(Message(Kind.REPLY, msg.step, "t2", "do", {}, forged))
        super().handle(msg)

    def _attack_t1(self, step: int) -> None:
        for op, meta in CONTROL_ATTACKS.items():
            self.send(Message(Kind.CONTROL, step, "t2", "t1", {}, {"op": op, **meta}))

    def _attack_verifier(self, step: int) -> None:
        """Signed records of t2 for stage 1 (attested) and stage 7 (not open), with junk."""
        chain = self.party.chain
        junk = {"w": torch.full((64,), 7.0)}
        for stage in (1, 7):
            body = {"segment_hash": segment_hash(junk).hex(), "bits_hash": "0" * 64, "ber": 0.0}
            body |= {"loss_mean": 0.0, "loss_last": 0.0, "steps": 1, "time": 0.0, "param": "w"}
            record = Record(
                session_id=self.party.session["session_id"],
                stage=stage,
                party="t2",
                kind="trainer",
                public_key=chain.key.public_bytes().hex(),
                prev=os.urandom(32).hex(),
                body=body,
            )
            meta = {"record": record_to_meta(sign(record, chain.key))}
            self.send(Message(Kind.AUDIT, step, "t2", "verifier", junk, meta))


def test_a_malicious_trainer_cannot_steer_t1_the_verifier_or_the_owner(tmp_path, digits):
    cfg = quick_config(
        **WM, trainers=2, epochs=2, batch_size=16, train_subset=160, transport="grpc"
    )
    out = tmp_path / "run"
    served = Served(cfg, out, tmp_path / "certs", verifier=True).start({"t2": MaliciousT2})
    try:
        session = run(cfg, out, data=digits.limit(160, 100, seed=0), deployment=served.deployment())
    finally:
        served.stop()
    t2 = served.hosts["t2"]
    assert t2.attacked.is_set()
    # t1 refused each control op for t2's role, the verifier both audits
    refused = [e for e in t2.errors if e.startswith("t1: t1 refused control op")]
    assert sorted(op for op in CONTROL_ATTACKS if any(f"'{op}'" in e for e in refused)) == sorted(
        CONTROL_ATTACKS
    ), t2.errors
    assert all("only do may send it" in e for e in refused)
    assert sum(e.startswith("verifier: verifier refused a record") for e in t2.errors) == 2
    assert len(t2.errors) == len(CONTROL_ATTACKS) + 2, t2.errors
    # the run went on as if nothing happened: no recovery, t1 not rolled back, ledger ok
    results = session.results
    assert results["transport"]["recoveries"] == []
    assert results["transport"]["steps_applied"] == {"t1": 20, "t2": 20}
    assert results["watermark"]["attestations_failed"] == 0
    assert results["watermark"]["verified"], results["watermark"]["first_failure"]
    assert verify_run(out).ok
    with Ledger.open(out / "ledger.sqlite", readonly=True) as ledger:
        records = ledger.records()
    verdicts = [
        (r.stage, r.body["subject"], r.body["verdict"]) for r in records if r.kind == "attestation"
    ]
    assert verdicts == [(1, "t1", "ok"), (1, "t2", "ok"), (2, "t1", "ok"), (2, "t2", "ok")]
    # no audit copy for the refused records: stage 1's copy is the attested segment
    attested = {(r.stage, r.party): r.body["segment_hash"] for r in records if r.kind == "trainer"}
    copy = load_segment(out / "audit" / "1" / "t2.safetensors")
    assert segment_hash(copy).hex() == attested[(1, "t2")]
    assert sorted(p.name for p in (out / "audit").iterdir()) == ["1", "2"]
    # t1 wrote no checkpoint for the 13-digit step (it would never have been pruned)
    assert all(len(str(s)) <= 12 for s in checkpoint.steps(out / "checkpoints" / "t1"))
    assert not [p for p in (out / "checkpoints" / "t1").iterdir() if "10000000000007" in p.name]


def _owner_and_peers(tmp_path: Path, peer: str) -> tuple[DataOwner, GrpcTransport, GrpcTransport]:
    """The owner (trainers t1, t2) and raw transports of t1 and ``peer``, over real gRPC."""
    names = ["do", "t1", peer]
    certs = tmp_path / "certs"
    create_certificates(names, certs)
    peers = {p: f"127.0.0.1:{port}" for p, port in zip(names, free_ports(3), strict=True)}

    def transport(name: str) -> GrpcTransport:
        others = {p: a for p, a in peers.items() if p != name}
        return GrpcTransport(name, peers[name], others, certs / name, "s-roles", send_timeout=10.0)

    do, t1, other = (transport(n).start() for n in names)
    do.recv_timeout = 20.0
    return DataOwner(do, torch.nn.Linear(2, 2), 2, 0.1), t1, other


def test_the_owner_takes_a_reply_only_from_the_party_it_asked(tmp_path):
    """t2 answers first, in t1's place: its reply is dropped and t1's is the answer."""
    owner, t1, t2 = _owner_and_peers(tmp_path, "t2")
    try:
        answer: dict[str, Message] = {}
        asking = threading.Thread(
            target=lambda: answer.update(r=owner.control("t1", "checkpoints"))
        )
        asking.start()
        request = t1.recv("t1", timeout=10)
        assert (request.sender, request.meta["op"]) == ("do", "checkpoints")
        forged = {"op": "checkpoints", "steps": [999]}
        t2.send(Message(Kind.REPLY, request.step, "t2", "do", {}, forged))
        t1.send(
            Message(Kind.REPLY, request.step, "t1", "do", {}, {"op": "checkpoints", "steps": [3]})
        )
        asking.join(timeout=20)
        assert answer["r"].sender == "t1"
        assert answer["r"].meta["steps"] == [3]
    finally:
        for transport in (owner.transport, t1, t2):
            transport.close()


def test_the_owner_takes_a_stage_verdict_only_from_the_verifier(tmp_path):
    """The verdict on t1's record comes from the verifier: t1's own is dropped, and the
    verifier's is checked like every reply (a malformed one fails, to be recovered)."""
    owner, t1, verifier = _owner_and_peers(tmp_path, "verifier")
    try:
        answer: dict[str, Any] = {}

        def ask() -> None:
            try:
                answer["reply"] = owner.control("t1", "stage_end", reply_from="verifier", stage=1)
            except Exception as exc:  # noqa: BLE001 (the test reads it)
                answer["error"] = exc

        asking = threading.Thread(target=ask)
        asking.start()
        request = t1.recv("t1", timeout=10)
        verdict = {"op": "stage_end", "party": "t1", "stage": 1, "ber": 0.0, "verdict": "ok"}
        verdict["tip"] = os.urandom(32).hex()
        t1.send(Message(Kind.REPLY, request.step, "t1", "do", {}, verdict))  # dropped
        bad = {**verdict, "ber": "low"}
        verifier.send(Message(Kind.REPLY, request.step, "verifier", "do", {}, bad))
        asking.join(timeout=20)
        # t1's well-formed verdict was not taken; the verifier's is checked and refused
        assert "reply" not in answer
        assert "field 'ber' must be a finite number" in str(answer["error"])
    finally:
        for transport in (owner.transport, t1, verifier):
            transport.close()


# -- control arguments (what even the data owner may not ask) ---------------------------


def _chained_trainer(tmp_path: Path) -> Any:
    """t1 of 2 with its watermark chain at stage 1 and checkpoints, on the in-process hub."""
    from clicooper.config import WatermarkConfig
    from clicooper.parties.trainer import Trainer
    from clicooper.parties.watermarking import TrainerChain
    from clicooper.runtime.transport.inprocess import InProcessTransport

    transport = InProcessTransport()
    trainer = Trainer(1, 2, torch.nn.Linear(8, 8), 0.1)
    TrainerChain(trainer, WatermarkConfig(bits=16), tmp_path / "t1")
    checkpoint.attach_trainer(trainer, tmp_path / "ck")
    transport.attach(trainer)
    transport.add_mailbox("do")
    trainer.handle(_control("stage_begin", stage=1, link="ab" * 32))
    transport.recv("do")
    return trainer


def _control(op: str, sender: str = "do", **meta: Any) -> Message:
    return Message(Kind.CONTROL, 0, sender, "t1", {}, {"op": op, **meta})


BAD_CONTROL = {
    "checkpoint of a 13-digit step": (_control("checkpoint", step=10**12), "integer in [0"),
    "checkpoint of a step not applied": (_control("checkpoint", step=3), "applied 0 steps"),
    "checkpoint step a string": (_control("checkpoint", step="0"), "field 'step'"),
    "checkpoint step a bool": (_control("checkpoint", step=False), "field 'step'"),
    "restore of a negative step": (_control("restore", step=-1), "field 'step'"),
    "restore without a step": (_control("restore"), "no field 'step'"),
    "stage_begin link not hex": (_control("stage_begin", stage=2, link="zz" * 32), "'link'"),
    "stage_begin link short": (_control("stage_begin", stage=2, link="ab" * 16), "32 bytes"),
    "stage_begin going back": (
        _control("stage_begin", stage=1, link="cd" * 32),
        "not move forward",
    ),
    "stage_end of another stage": (
        _control("stage_end", stage=2, prev="ab" * 32, session_id="cd" * 16),
        "cannot end stage 2",
    ),
    "stage_end without a session": (_control("stage_end", stage=1, prev="ab" * 32), "session"),
    "control from the verifier": (_control("finish", sender="verifier"), "only do may"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONTROL))
def test_trainer_refuses_bad_control_and_stays_as_it_was(tmp_path, case) -> None:
    from clicooper.common.messages import ProtocolError

    trainer = _chained_trainer(tmp_path)
    before = (trainer.chain.stage, trainer.chain.link, trainer.steps_applied)
    weights = [p.detach().clone() for p in trainer.segment.parameters()]
    msg, expected = BAD_CONTROL[case]
    with pytest.raises(ProtocolError, match=re.escape(expected)):
        trainer.handle(msg)
    assert (trainer.chain.stage, trainer.chain.link, trainer.steps_applied) == before
    assert all(
        torch.equal(a, b) for a, b in zip(weights, trainer.segment.parameters(), strict=True)
    )
    assert checkpoint.steps(tmp_path / "ck") == []


def test_trainer_takes_a_register_reply_only_from_the_verifier_and_only_when_asked(
    tmp_path,
) -> None:
    from clicooper.common.messages import ProtocolError

    trainer = _chained_trainer(tmp_path)
    reply = {"op": "register", "session_id": "ab" * 16}
    for sender in ("t2", "do", "verifier"):  # nothing was asked yet: even the verifier's
        with pytest.raises(ProtocolError):
            trainer.handle(Message(Kind.REPLY, 0, sender, "t1", {}, reply))
    assert trainer.session == {}


def test_remote_collects_replies_only_from_the_parties_it_asked(tmp_path) -> None:
    """Remote._collect (setup, over real gRPC): t2, not asked, answers first and t1 twice;
    only t1's first answer is taken."""
    from clicooper.runtime.deploy.peers import Deployment
    from clicooper.runtime.deploy.remote import Remote

    names = ["do", "t1", "t2"]
    certs = tmp_path / "certs"
    create_certificates(names, certs)
    peers = {p: f"127.0.0.1:{port}" for p, port in zip(names, free_ports(3), strict=True)}
    remote = Remote(
        Deployment(peers, "s-remote", certs / "do", step_timeout=20.0), ["t1"], {"t1": {}}
    )
    remote.transport.rekey(1)
    t1, t2 = (
        GrpcTransport(n, peers[n], {"do": peers["do"]}, certs / n, "s-remote.1").start()
        for n in ("t1", "t2")
    )
    try:
        t2.send(Message(Kind.REPLY, 0, "t2", "do", {}, {"op": "setup", "ready": True}))
        t1.send(Message(Kind.REPLY, 0, "t1", "do", {}, {"op": "setup", "ready": True, "n": 1}))
        t1.send(Message(Kind.REPLY, 0, "t1", "do", {}, {"op": "setup", "ready": True, "n": 2}))
        replies = remote._collect("setup")
        assert list(replies) == ["t1"]
        assert replies["t1"].meta["n"] == 1
    finally:
        for transport in (remote.transport, t1, t2):
            transport.close()


VERIFIER_REFUSES = {
    "open from a trainer": (Kind.CONTROL, "t1", {"op": "open"}, "only do may send it"),
    "ledger from a trainer": (Kind.CONTROL, "t2", {"op": "ledger", "stage": 1}, "only do may"),
    "checkpoint of a 13-digit step": (
        Kind.CONTROL,
        "do",
        {"op": "checkpoint", "step": 10**12},
        "field 'step' must be an integer",
    ),
    "ledger of a stage not a number": (Kind.CONTROL, "do", {"op": "ledger", "stage": "1"}, "stage"),
    "a bare record from a trainer": (Kind.RECORD, "t1", {"record": {}}, "only do may send it"),
    "registration of a non-party": (Kind.REGISTER, "t1x", {"party": "t1x"}, "not a party"),
    "registration as another party": (Kind.REGISTER, "t2", {"party": "t1"}, "cannot register"),
}


@pytest.mark.parametrize("case", sorted(VERIFIER_REFUSES))
def test_verifier_takes_each_operation_only_from_the_party_entitled(tmp_path, case) -> None:
    from clicooper.common.messages import ProtocolError
    from clicooper.parties.verifier import Verifier
    from clicooper.runtime.transport.inprocess import InProcessTransport

    verifier = Verifier(tmp_path / "run")
    checkpoint.attach_verifier(verifier, tmp_path / "ck")
    InProcessTransport().attach(verifier)
    kind, sender, meta, expected = VERIFIER_REFUSES[case]
    with pytest.raises(ProtocolError, match=re.escape(expected)):
        verifier.handle(Message(kind, 0, sender, "verifier", {}, meta))
    assert verifier.registered == {} and verifier.ledger is None
    assert checkpoint.steps(tmp_path / "ck") == []
    assert not (tmp_path / "run").exists()
