"""Issue 9: the forged claim and the fabricated ledger both fail, on real runs (CLI).

The forgery of the issue, at B = 16 so that the search is short: a trainer of run A
(t2, holding its own watermark secret) wants to claim a segment from an unrelated
run B. It rewrites the signature bytes of the record that closes stage 2 until the
HMAC target bits of its stage 3 agree with the bits extracted from B's segment, and
writes that signature and its link back. The old ``claim`` took its inputs from the
ledger without verifying it, and held. Now the claim verifies the run first,
anchored, and refuses.
"""

from __future__ import annotations

import json
import os

import torch

from clicooper.watermark import load_segment
from clicooper.watermark.chain import target_bits
from clicooper.watermark.claim import claim
from clicooper.watermark.embed import projection
from clicooper.watermark.ledger import Ledger
from clicooper.watermark.records import from_canonical, link_of

P_VALUE = "1e-3"  # B = 16: 15 of 16 matching bits give p = 2.6e-4; a claim at 1e-6 needs B >= 20


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def one_line_error(err: str) -> str:
    assert "Traceback" not in err, err
    line = last_line(err)
    assert line.startswith("error: "), err
    return line


def extracted_bits(secret: bytes, stage: int, n_bits: int, weight: torch.Tensor) -> torch.Tensor:
    """``[(A w) > 0]``: the bits a claim reads from a suspect tensor (independent of the link)."""
    matrix = projection(secret, stage, n_bits, weight.numel())
    return (matrix @ weight.detach().flatten().float() > 0).float()


def forge_stage_close(run_dir, secret: bytes, suspect: torch.Tensor, tamper) -> int:
    """The issue's search: signature bytes of stage 2's last record until stage 3's bits fit."""
    with Ledger.open(run_dir / "ledger.sqlite", readonly=True) as ledger:
        rows = ledger.rows()
    closing = [row for row in rows if row.stage == 2][-1]
    want = extracted_bits(secret, 3, 16, suspect)
    tries = 0
    while True:
        tries += 1
        assert tries <= 500_000, "the search found no signature (expected about 3,800 tries)"
        signature = os.urandom(8) + closing.signature[8:]
        forged_link = link_of(closing.canonical, signature)
        if int((target_bits(secret, forged_link, 2, 3, 16) == want).sum()) >= 15:
            break
    conn = tamper.raw_db(run_dir / "ledger.sqlite")  # drop the triggers, write it back
    conn.execute(
        "UPDATE records SET signature = ?, link = ? WHERE seq = ?",
        (signature, forged_link.hex(), closing.seq),
    )
    conn.close()
    return tries


def old_claim(run_dir, party: str, suspect_state: dict, secret: bytes):
    """What the old ``claim`` command did: inputs straight from the ledger, no verification."""
    with Ledger.open(run_dir / "ledger.sqlite", readonly=True) as ledger:
        records = [from_canonical(r.canonical, r.signature) for r in ledger.rows()]
        stage_end = {
            r.stage: link_of(row.canonical, row.signature)
            for r, row in zip(records, ledger.rows(), strict=True)
        }
        latest = [r for r in records if r.party == party][-1]
        com = ledger.party(party).commitment
    return claim(
        suspect_state,
        secret,
        com,
        stage_end[latest.stage - 1],
        int(party[1:]),
        latest.stage,
        latest.body["param"],
        16,
        float(P_VALUE),
    )


def test_forged_stage_close_no_longer_makes_a_claim_hold(
    anchored_runs, run_a, tamper, cli_inprocess
) -> None:
    secret = (run_a / "parties" / "t2" / "watermark.secret").read_bytes()
    suspect_path = anchored_runs.b / "segments" / "t2.safetensors"
    suspect = load_segment(suspect_path)
    before = old_claim(run_a, "t2", suspect, secret)  # chance agreement only
    with Ledger.open(run_a / "ledger.sqlite", readonly=True) as ledger:
        name = [r for r in ledger.records() if r.party == "t2"][-1].body["param"]
    assert before.n_bits == 16 and before.matching < 16
    tries = forge_stage_close(run_a, secret, suspect[name], tamper)
    forged = old_claim(run_a, "t2", suspect, secret)
    assert forged.holds and forged.matching >= 15, (tries, forged.reason)  # the old hole

    args = ["claim", str(run_a), "--party", "t2", "--segment", str(suspect_path)]
    code, err, _ = cli_inprocess(*args, "--anchor", anchored_runs.anchor, "--p-value", P_VALUE)
    line = one_line_error(err)
    assert code == 1, err
    assert line.startswith("error: claim refused: the run does not verify: record ")
    assert "(stage 2, verifier): signature does not verify" in line
    assert "holds" not in err
    code, err, _ = cli_inprocess("verify", str(run_a), "--anchor", anchored_runs.anchor)
    assert code == 1 and "signature does not verify" in one_line_error(err)
    code, err, _ = cli_inprocess("verify", str(run_a))  # also without an anchor
    assert code == 1 and "signature does not verify" in one_line_error(err)


def test_honest_claim_needs_the_anchor_and_holds_with_it(anchored_runs, cli_inprocess) -> None:
    run_dir = anchored_runs.a
    args = ["claim", str(run_dir), "--party", "t2", "--segment"]
    args.append(str(run_dir / "segments" / "t2.safetensors"))
    code, err, _ = cli_inprocess(*args)
    line = one_line_error(err)
    assert code == 2 and "claim needs --anchor" in line and "published" in line
    code, err, out = cli_inprocess(*args, "--anchor", anchored_runs.anchor, "--p-value", P_VALUE)
    assert code == 0, err
    assert "matching bits 16/16" in err + out and "the claim holds" in err + out
    code, err, _ = cli_inprocess(*args, "--anchor", "ab" * 32, "--p-value", P_VALUE)
    assert code == 1 and "trust anchor mismatch" in one_line_error(err)


def _fabricated_run(chain) -> None:
    """Lay a fabricated chain out as a run directory: secrets where the CLI looks for them."""
    (chain.root / "verifier").mkdir()
    secrets = {name: secret.hex() for name, secret in chain.secrets.items()}
    (chain.root / "verifier" / "watermark_secrets.json").write_text(json.dumps(secrets))
    for name, secret in chain.secrets.items():
        (chain.root / "parties" / name).mkdir(parents=True)
        (chain.root / "parties" / name / "watermark.secret").write_bytes(secret)


def test_fabricated_ledger_with_fresh_keys_fails_against_the_real_anchor(
    anchored_runs, chain, cli_inprocess
) -> None:
    """Every key fresh, the verifier's too: self-consistent, and unanchored."""
    _fabricated_run(chain)
    code, err, out = cli_inprocess("verify", str(chain.root))
    assert code == 0, err
    line = last_line(err)
    assert line.startswith("chain holds: 15 records verified; BERs re-checked;")
    assert "self-consistent but UNANCHORED" in line

    code, err, _ = cli_inprocess("verify", str(chain.root), "--anchor", anchored_runs.anchor)
    line = one_line_error(err)
    assert code == 1 and "trust anchor mismatch" in line and anchored_runs.anchor in line
    segment = str(chain.final_dir / "t1.safetensors")
    code, err, _ = cli_inprocess(
        "claim",
        str(chain.root),
        "--party",
        "t1",
        "--segment",
        segment,
        "--anchor",
        anchored_runs.anchor,
    )
    line = one_line_error(err)
    assert code == 1 and line.startswith("error: claim refused") and "trust anchor" in line
    # against its own (unpublished) verifier key the fabrication is consistent: only the
    # anchor published when the real session ran tells them apart
    own = chain.keys["verifier"].public_bytes().hex()
    code, err, _ = cli_inprocess("verify", str(chain.root), "--anchor", own)
    assert code == 0 and "anchored to verifier key" in last_line(err)
