"""Per-party devices (clicooper.runtime.device): resolution, errors, and a CUDA run."""

from __future__ import annotations

import pytest
import torch
from cc_helpers import quick_config

from clicooper.config import ConfigError, RunConfig
from clicooper.runtime.deploy.host import PartyHost
from clicooper.runtime.device import party_device, resolve_device
from clicooper.runtime.session import run
from clicooper.runtime.verification import verify_run

NO_CUDA = not torch.cuda.is_available()
MPS = torch.backends.mps.is_available()


def test_auto_resolves_by_the_documented_order():
    expected = "cuda" if not NO_CUDA else "mps" if MPS else "cpu"
    assert resolve_device("auto").type == expected
    cfg = RunConfig.load(device="cpu", devices={"t1": "auto"})
    assert party_device(cfg, "t2") == torch.device("cpu")
    assert party_device(cfg, "t1").type == expected


@pytest.mark.skipif(not NO_CUDA or MPS, reason="needs a machine without CUDA or MPS")
def test_auto_is_the_cpu_here(tmp_path, small_digits):
    session = run(quick_config(mode="vanilla", epochs=1), tmp_path / "run", data=small_digits)
    assert session.results["devices"] == {"do": "cpu", "t1": "cpu", "t2": "cpu"}


def test_bad_device_names_are_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"device: unknown device 'gpu': choose auto, cpu, cuda"):
        RunConfig.load(device="gpu")
    with pytest.raises(ConfigError, match="unknown device 'cuda:x'"):
        RunConfig.load(devices={"t1": "cuda:x"})


@pytest.mark.skipif(not NO_CUDA, reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_one_line_and_exit_2(tmp_path, cli_inprocess):
    code, err, _ = cli_inprocess("run", "--dataset", "digits", "--out", str(tmp_path / "x"),
                                 "--device", "cuda")  # fmt: skip
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "device cuda is not available here" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "x").exists()
    # a served trainer checks its own device when it starts, before any setup
    cfg = RunConfig.load(dataset="digits", devices={"t1": "cuda"})
    with pytest.raises(ConfigError, match="device cuda is not available"):
        PartyHost("trainer", "t1", cfg, tmp_path)
    PartyHost("trainer", "t2", cfg, tmp_path)  # t2 keeps the default


@pytest.mark.skipif(not NO_CUDA, reason="checks the error on a machine without CUDA")
def test_serve_device_flag_is_the_process_own_and_checked_at_start(tmp_path, cli_inprocess):
    from clicooper.runtime.certs import create_certificates
    from clicooper.runtime.deploy.peers import write_peers

    create_certificates(["do", "t1", "t2"], tmp_path / "pki")
    peers = {"do": "127.0.0.1:1", "t1": "127.0.0.1:2", "t2": "127.0.0.1:3"}
    write_peers(tmp_path / "peers.toml", "s", peers)
    (tmp_path / "cfg.toml").write_text('dataset = "digits"\nmode = "vanilla"\n')
    args = ["serve", "trainer", "--config", str(tmp_path / "cfg.toml"), "--name", "t1",
            "--listen", peers["t1"], "--certs", str(tmp_path / "pki" / "t1"),
            "--peers", str(tmp_path / "peers.toml"), "--out", str(tmp_path / "t1")]  # fmt: skip
    code, err, _ = cli_inprocess(*args, "--device", "cuda")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "device cuda is not available" in lines[0], err
    code, err, _ = cli_inprocess(*args, "--device", "tpu")
    assert code == 2 and "unknown device 'tpu'" in err


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
def test_trainers_on_cuda_match_the_cpu_run(tmp_path, small_digits):
    """The owner and t1 on the GPU, t2 on the CPU: the same training as all on the CPU
    (up to float rounding); with the watermark chain the ledger verifies (segment hashes
    come from CPU copies) with checkpoints taken from GPU state."""
    on_gpu = {"device": "cpu", "devices": {"do": "cuda", "t1": "cuda"}}
    cfg = quick_config(mode="vanilla", trainers=2, epochs=2)
    cpu = run(cfg.model_copy(update={"device": "cpu"}), tmp_path / "cpu", data=small_digits)
    gpu = run(cfg.model_copy(update=on_gpu), tmp_path / "gpu", data=small_digits)
    assert gpu.results["devices"] == {"do": "cuda", "t1": "cuda", "t2": "cpu"}
    for a, b in zip(cpu.model.parameters(), gpu.model.parameters(), strict=True):
        assert b.device.type == "cpu"  # handed back on the CPU
        torch.testing.assert_close(a, b, atol=5e-3, rtol=1e-3)
    assert abs(cpu.results["accuracy"]["test"] - gpu.results["accuracy"]["test"]) <= 0.02
    wm = {"watermark.strength": 0.01, "privacy.noise_multiplier": 0.1, "checkpoint_steps": 5}
    marked_cfg = quick_config(trainers=2, epochs=2, **wm).model_copy(update=on_gpu)
    marked = run(marked_cfg, tmp_path / "marked", data=small_digits)
    assert marked.results["watermark"]["verified"], marked.results["watermark"]["first_failure"]
    assert marked.results["watermark"]["attestations_failed"] == 0
    assert verify_run(tmp_path / "marked").ok
