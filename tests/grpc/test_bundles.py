"""Per-party credentials: a party loads only its own bundle (issue 9, point 4).

Whoever holds the CA key can issue a certificate for any name, and whoever
holds ``do.key`` can speak as the data owner. So a certificate folder that
holds either (or any private key but the party's own, under any file name) is
refused by every party process before it starts, with one line naming the
file; the party's own bundle works, over a real mutual-TLS connection.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from cc_helpers import quick_config
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from clicooper.common.messages import Kind, Message
from clicooper.runtime.certs import create_certificates, issue_bundle, load_party_credentials
from clicooper.runtime.deploy.peers import config_toml, write_peers
from clicooper.runtime.transport.grpc import GrpcTransport

pytestmark = pytest.mark.timeout(60)
PARTIES = ["do", "t1", "t2", "verifier"]


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """A fresh ``certs init`` output: ``ca/`` and a bundle per party."""
    create_certificates(PARTIES, tmp_path / "certs")
    return tmp_path / "certs"


def _refused(certs: Path, party: str = "t1") -> str:
    with pytest.raises(ValueError) as err:
        load_party_credentials(certs, party)
    message = str(err.value)
    assert "\n" not in message
    return message


def _key(path: Path) -> PrivateKeyTypes:
    return serialization.load_pem_private_key(path.read_bytes(), None)


# -- what a bundle may hold ------------------------------------------------------------------


def test_each_party_loads_its_own_bundle(out: Path) -> None:
    for party in PARTIES:
        ca, cert, key = load_party_credentials(out / party, party)
        assert key == (out / party / f"{party}.key").read_bytes()
        assert ca == (out / "ca/ca.pem").read_bytes()


def test_the_whole_init_folder_is_refused_naming_the_ca_key_and_the_bundle(out: Path) -> None:
    message = _refused(out)
    assert message.startswith(f"{out / 'ca/ca.key'} is the session CA's private key")
    assert f"pass t1's own bundle ({out / 't1'})" in message


def test_the_ca_folder_is_refused(out: Path) -> None:
    assert _refused(out / "ca").startswith(f"{out / 'ca/ca.key'} is the session CA's")


def test_the_ca_key_beside_the_bundle_is_refused(out: Path) -> None:
    shutil.copy(out / "ca/ca.key", out / "t1/ca.key")
    assert _refused(out / "t1").startswith(f"{out / 't1/ca.key'} is the session CA's")


def test_another_partys_bundle_is_refused(out: Path) -> None:
    message = _refused(out / "t2")
    assert message.startswith(f"{out / 't2/t2.key'} is t2's private key")
    assert f"pass t1's own bundle ({out / 't1'})" in message


def test_another_partys_key_beside_the_bundle_is_refused(out: Path) -> None:
    shutil.copy(out / "do/do.key", out / "t1/do.key")
    assert _refused(out / "t1").startswith(f"{out / 't1/do.key'} is do's private key")


def _der(path: Path) -> bytes:
    return _key(path).private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _encrypted(path: Path) -> bytes:
    return _key(path).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pass"),
    )


@pytest.mark.parametrize(
    ("name", "content", "whose"),
    [
        ("notes.txt", lambda o: (o / "ca/ca.key").read_bytes(), "the session CA's"),
        ("backup.pem", lambda o: (o / "do/do.key").read_bytes(), "another party's"),
        (
            "ca.pem",
            lambda o: (o / "ca/ca.pem").read_bytes() + (o / "ca/ca.key").read_bytes(),
            "the session CA's",
        ),
        ("blob", lambda o: _der(o / "do/do.key"), "another party's"),
        ("locked", lambda o: _encrypted(o / "t2/t2.key"), "an unreadable"),
    ],
    ids=["ca-key-renamed", "do-key-renamed", "ca-key-inside-ca-pem", "do-key-as-der", "encrypted"],
)
def test_a_renamed_foreign_key_is_refused_by_its_content(out: Path, name, content, whose) -> None:
    data = content(out)
    (out / "t1" / name).write_bytes(data)
    message = _refused(out / "t1")
    assert message.startswith(f"{out / 't1' / name} holds {whose} private key, not t1's")
    assert "keep only t1.key, t1.pem and ca.pem" in message


def test_a_renamed_key_is_named_by_the_certificate_beside_it(out: Path) -> None:
    (out / "t1/old.pem").write_bytes((out / "do/do.pem").read_bytes())
    (out / "t1/old.txt").write_bytes((out / "do/do.key").read_bytes())
    assert _refused(out / "t1").startswith(f"{out / 't1/old.txt'} holds do's private key")


def test_a_foreign_key_in_a_subdirectory_is_found(out: Path) -> None:
    (out / "t1/old").mkdir()
    (out / "t1/old/k").write_bytes((out / "ca/ca.key").read_bytes())
    assert "holds the session CA's private key" in _refused(out / "t1")


def test_a_copy_of_the_partys_own_key_is_accepted(out: Path) -> None:
    (out / "t1/backup.txt").write_bytes((out / "t1/t1.key").read_bytes())
    load_party_credentials(out / "t1", "t1")


def test_a_key_readable_by_others_is_refused(out: Path) -> None:
    os.chmod(out / "t1/t1.key", 0o644)
    with pytest.raises(PermissionError, match=r"t1\.key is accessible to other users.*chmod 600"):
        load_party_credentials(out / "t1", "t1")


def test_a_directory_that_is_no_bundle_is_refused_without_reading_it_all(out: Path) -> None:
    for i in range(70):
        (out / "t1" / f"f{i}").write_bytes(b"x")
    assert "is not a party bundle" in _refused(out / "t1")


def test_a_fifo_in_the_bundle_does_not_block_loading(out: Path) -> None:
    os.mkfifo(out / "t1/pipe")
    load_party_credentials(out / "t1", "t1")


# -- certs issue --------------------------------------------------------------------------


def test_issue_adds_a_party_signed_by_the_same_ca(out: Path) -> None:
    bundle = issue_bundle(out / "ca", "t3", out)
    assert bundle == out / "t3"
    assert {p.name for p in bundle.iterdir()} == {"t3.key", "t3.pem", "ca.pem"}
    assert (bundle / "ca.pem").read_bytes() == (out / "ca/ca.pem").read_bytes()
    load_party_credentials(bundle, "t3")


def test_issue_refuses_a_ca_key_that_does_not_match(out: Path, tmp_path: Path) -> None:
    create_certificates(["t1"], tmp_path / "other")
    shutil.copy(tmp_path / "other/ca/ca.key", out / "ca/ca.key")
    with pytest.raises(ValueError, match=r"ca\.key does not match"):
        issue_bundle(out / "ca", "t3", out)
    assert not (out / "t3").exists()


# -- party processes ----------------------------------------------------------------------


def _deployment_files(tmp_path: Path) -> tuple[Path, Path]:
    config, peers = tmp_path / "config.toml", tmp_path / "peers.toml"
    config.write_text(config_toml(quick_config(trainers=2)))
    write_peers(peers, "s", {p: f"127.0.0.1:{20000 + i}" for i, p in enumerate(PARTIES)})
    return config, peers


def _serve(cli_inprocess, tmp_path: Path, certs: Path) -> tuple[int, str]:
    config, peers = _deployment_files(tmp_path)
    code, err, outp = cli_inprocess(
        "serve", "trainer", "--name", "t1", "--config", str(config),
        "--listen", "127.0.0.1:20001", "--certs", str(certs), "--peers", str(peers),
        "--out", str(tmp_path / "run"),
    )  # fmt: skip
    return code, " ".join((err + outp).split())


def test_serve_refuses_the_shared_folder_in_one_line(cli_inprocess, out: Path, tmp_path) -> None:
    code, text = _serve(cli_inprocess, tmp_path, out)
    assert code == 2
    assert "ca.key is the session CA's private key" in text and "t1's own bundle" in text
    assert "Traceback" not in text and not (tmp_path / "run").exists()


def test_serve_refuses_another_partys_key_under_another_name(
    cli_inprocess, out: Path, tmp_path
) -> None:
    (out / "t1/extra.pem").write_bytes((out / "do/do.key").read_bytes())
    code, text = _serve(cli_inprocess, tmp_path, out / "t1")
    assert code == 2 and "extra.pem holds another party's private key, not t1's" in text


def test_the_owner_refuses_a_folder_with_the_ca_key(cli_inprocess, out: Path, tmp_path) -> None:
    _, peers = _deployment_files(tmp_path)
    code, err, outp = cli_inprocess(
        "run", "--dataset", "digits", "--transport", "grpc", "--peers", str(peers),
        "--certs", str(out / "ca"), "--out", str(tmp_path / "run"),
    )  # fmt: skip
    text = " ".join((err + outp).split())
    assert code == 2 and "ca.key is the session CA's private key" in text, text
    assert "do's own bundle" in text


def test_certs_init_and_issue_print_where_each_bundle_goes(cli_inprocess, tmp_path) -> None:
    out = tmp_path / "pki"
    code, err, text = cli_inprocess("certs", "init", "--parties", "do,t1", "--out", str(out))
    text = err + text
    assert code == 0, text
    assert f"t1: {out / 't1'}" in text and "ca.key stays with you" in text
    code, err, text = cli_inprocess(
        "certs", "issue", "--ca", str(out / "ca"), "--party", "t2", "--out", str(out)
    )
    assert code == 0 and f"t2: {out / 't2'}" in err + text, err + text
    code, err, _ = cli_inprocess(
        "certs", "issue", "--ca", str(out / "t1"), "--party", "t3", "--out", str(out)
    )
    assert code == 2 and "missing" in err and "ca.key" in err


# -- a real mutual-TLS connection, each side with its own bundle --------------------------------


def test_two_parties_talk_over_mtls_with_their_own_bundles(out: Path) -> None:
    t2 = GrpcTransport("t2", "127.0.0.1:0", {}, out / "t2", "s").start()
    try:
        t1 = GrpcTransport("t1", "127.0.0.1:0", {"t2": f"127.0.0.1:{t2.port}"}, out / "t1", "s")
        try:
            t1.send(Message(Kind.FORWARD, 3, "t1", "t2", {"x": torch.arange(5.0)}))
            got = t2.recv("t2", timeout=10)
        finally:
            t1.close()
    finally:
        t2.close()
    assert got.sender == "t1" and got.step == 3 and torch.equal(got.tensors["x"], torch.arange(5.0))


def test_the_transport_refuses_the_shared_folder(out: Path) -> None:
    with pytest.raises(ValueError, match="is the session CA's private key"):
        GrpcTransport("t1", "127.0.0.1:0", {}, out, "s")
