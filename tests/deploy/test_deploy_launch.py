"""`clicooper launch`: real processes on 127.0.0.1.

Vanilla split learning has no secret randomness, so the same seed must give
the same weights (hence the same accuracy) over gRPC with 4 micro-batches in
flight as in-process without pipelining. (A clicooper launch through the CLI,
with its run directory and ledger, is in test_deploy_resume.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from cc_helpers import quick_config
from conftest import alive, cli, env, pids, wait_for

from clicooper.runtime.certs import load_party_credentials
from clicooper.runtime.deploy.launcher import launch
from clicooper.runtime.session import run

# a cosine schedule and t2's own lr: served trainers take both from their config and setup.
# SGD: 4 micro-batch gradients summed differ from one batch's by rounding only, which
# Adam (dividing by sqrt(v)) can lift to 1e-2 where a gradient is near zero on some CPUs.
VANILLA = {"mode": "vanilla", "trainers": 3, "epochs": 2, "train_subset": 320,
           "schedule": "cosine", "lr_per_party": {"t2": 3e-2}, "optimizer": "sgd",
           "lr": 5e-2}  # fmt: skip


def _params(session):
    return [p.detach() for p in session.model.parameters()]


@pytest.fixture(scope="module")
def inprocess(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("inproc") / "run"
    return run(quick_config(**VANILLA), out, data=digits.limit(320, 200, seed=0))


@pytest.fixture(scope="module")
def over_grpc(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("grpc") / "run"
    cfg = quick_config(**VANILLA, micro_batches=4)
    return out, launch(cfg, out, data=digits.limit(320, 200, seed=0), send_timeout=10)


def test_same_seed_same_training_in_process_and_over_grpc_with_pipelining(inprocess, over_grpc):
    """4 micro-batches in flight across 3 trainer processes: same maths as one batch in-process."""
    out, session = over_grpc
    assert session.results["transport"]["name"] == "grpc"
    assert session.results["transport"]["steps_applied"] == {"t1": 20, "t2": 20, "t3": 20}
    # over gRPC the owner timed 4 micro-batches against 1 (parties.pipelining), in-process
    # every step has the configured count
    used = session.results["transport"]["micro_batches"]
    assert set(used) == {"1", "4"} and sum(used.values()) == 20
    assert inprocess.results["transport"]["micro_batches"] == {"1": 20}
    # 4 micro-batch gradients summed differ from one batch's only by rounding (summation
    # order); a lost or repeated micro-batch moves the weights by far more
    for a, b in zip(_params(inprocess), _params(session), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert abs(inprocess.results["accuracy"]["test"] - session.results["accuracy"]["test"]) < 0.005
    # the segments were written by the trainer processes, the head by the owner
    assert {p.name for p in (out / "segments").iterdir()} == {
        f"t{i}.safetensors" for i in (1, 2, 3)
    }


def test_each_process_reports_its_own_compute(inprocess, over_grpc):
    """The trainers' FLOPs come from their processes' finish replies: the same counts as
    in-process (FLOPs are linear in the batch, so 4 micro-batches add up to one batch)."""
    local, remote = inprocess.results["compute"], over_grpc[1].results["compute"]
    assert remote["flops"] == local["flops"] and set(remote["flops"]) == {"do", "t1", "t2", "t3"}
    assert remote["owner_share"] == local["owner_share"] > 0
    assert remote["inference_flops"] == local["inference_flops"]
    assert set(remote["cpu_seconds"]) == {"do", "t1", "t2", "t3"}
    assert all(seconds > 0 for seconds in remote["cpu_seconds"].values())


def test_launch_builds_the_owner_light_preset_at_every_trainer(tmp_path):
    """``launch --model cnn-light``: each served trainer builds its segment of the preset."""
    data = _grey28(96)
    cfg = quick_config(model="cnn-light", mode="vanilla", epochs=1, train_subset=None)
    local = run(cfg, tmp_path / "inproc", data=data)
    remote = launch(cfg, tmp_path / "grpc", data=data, send_timeout=10)
    for a, b in zip(_params(local), _params(remote), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert remote.results["compute"]["flops"] == local.results["compute"]["flops"]
    assert remote.results["compute"]["owner_share"] <= 0.10


def _grey28(n: int):
    """``n`` random 28x28 grey images in 4 classes (enough to train one epoch on)."""
    from clicooper.data.base import Dataset, Split

    g = torch.Generator().manual_seed(0)
    split = Split(torch.rand(n, 1, 28, 28, generator=g), torch.arange(n) % 4)
    return Dataset("grey28", split, split.subset(torch.arange(n // 2)), 4)


CLICOOPER = {"trainers": 2, "epochs": 2, "train_subset": 320, "watermark.enabled": False}


def _bundles_hold_only_their_own_keys(certs: Path, parties: list[str]) -> None:
    """``certs/<party>`` holds that party's key, certificate and the CA's; no CA key anywhere."""
    assert {p.name for p in certs.iterdir()} == {"ca", *parties}
    assert {p.name for p in (certs / "ca").iterdir()} == {"ca.pem"}  # the CA key was never kept
    for party in parties:
        assert {p.name for p in (certs / party).iterdir()} == {
            f"{party}.key",
            f"{party}.pem",
            "ca.pem",
        }
        load_party_credentials(certs / party, party)
    assert sorted(k.relative_to(certs) for k in certs.rglob("*.key")) == sorted(
        Path(party, f"{party}.key") for party in parties
    )


def test_a_launched_run_gave_each_party_only_its_own_bundle(over_grpc):
    out, _ = over_grpc
    _bundles_hold_only_their_own_keys(out / "certs", ["do", "t1", "t2", "t3"])
    assert not [p for p in out.rglob("*") if p.name == "ca.key"]


def test_clicooper_with_the_same_owner_secret_trains_the_same_over_grpc(tmp_path, digits):
    """Noise and permutation come from the owner secret; without the watermark (whose fresh
    trainer secrets are the only other randomness) the gRPC run with 2 micro-batches in
    flight trains the same weights as the in-process run."""
    data = digits.limit(320, 200, seed=0)
    local = run(quick_config(**CLICOOPER), tmp_path / "inproc", data=data)
    secret = tmp_path / "inproc" / "owner" / "owner.secret"
    cfg = quick_config(**CLICOOPER, micro_batches=2, owner_secret=secret)
    remote = launch(cfg, tmp_path / "grpc", data=data, send_timeout=10)
    assert remote.results["transport"]["name"] == "grpc"
    assert remote.results["privacy"]["epsilon"] == local.results["privacy"]["epsilon"] > 0
    for a, b in zip(_params(local), _params(remote), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert abs(local.results["accuracy"]["test"] - remote.results["accuracy"]["test"]) < 0.005
    fresh = run(quick_config(**CLICOOPER), tmp_path / "fresh", data=data)  # another secret
    assert not all(
        torch.allclose(a, b, atol=1e-5) for a, b in zip(_params(local), _params(fresh), strict=True)
    )


def _node_argv_holds_only_its_own(run: Path, name: str, pid: int, role: str) -> None:
    """A node process of the launch's own pool: ``node start ROLE``, capacity 1, its own
    bundle and state and no other party's bundle on its command line."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    assert argv[argv.index("node") + 1 : argv.index("node") + 3] == ["start", role]
    assert Path(argv[argv.index("--certs") + 1]) == run / "certs" / name
    assert Path(argv[argv.index("--state") + 1]) == run / "deploy/pool/nodes" / name
    assert argv[argv.index("--capacity") + 1] == "1"
    others = [p for p in ("do", "ca", "t1", "t2", "verifier") if p != name]
    assert not any(str(run / "certs" / other) in a for a in argv for other in others)


def test_each_node_holds_only_its_bundle_and_ctrl_c_twice_stops_every_process_with_130(
    tmp_path,
):
    """The launch's own pool: a node process per party (capacity 1), each started with its
    own bundle and no other, its state under deploy/; then Ctrl-C, twice, stops them all."""
    out = tmp_path / "run"
    argv = cli("launch", "--dataset", "digits", "--model", "mlp", "--trainers", "2")
    argv += ["--epochs", "50", "--out", str(out)]  # clicooper: a verifier node as well
    proc = subprocess.Popen(
        argv, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        wait_for(lambda: len(pids(out)) == 3, 120, "the trainer and verifier nodes")
        wait_for(lambda: (out / "deploy" / "pool.json").is_file(), 120, "the session admitted")
        time.sleep(1.0)
        children = pids(out)
        assert set(children) == {"t1", "t2", "verifier"}
        assert all(alive(p) for p in children.values())
        for name, pid in children.items():
            role = "verifier" if name == "verifier" else "trainer"
            _node_argv_holds_only_its_own(out, name, pid, role)
        _bundles_hold_only_their_own_keys(out / "certs", ["do", "t1", "t2", "verifier"])
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        time.sleep(0.2)
        if proc.poll() is None:  # an impatient user presses it again during the cleanup
            proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=60)  # one CI run under a parallel benchmark took > 30 s
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"launch ignored Ctrl-C for 60 s: {proc.communicate()[1][-2000:]!r}")
        assert code == 130, proc.stderr.read()[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    time.sleep(0.2)
    assert not [n for n, p in children.items() if alive(p)]
    mine = [p for p in os.listdir("/proc") if p.isdigit()]
    for pid in mine:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        assert str(out) not in cmdline or not alive(int(pid)), f"process {pid} left: {cmdline}"
