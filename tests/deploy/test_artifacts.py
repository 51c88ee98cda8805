"""A finished session's files from a node (``Fetch``): what the owner accepts of a node's
answer, and what a node sends. The node is an adversary here: every chunk is checked."""

from __future__ import annotations

import os
import stat

import pytest

from clicooper.common.files import UnsafePathError
from clicooper.common.messages import ProtocolError
from clicooper.node.artifacts import allowed_path, party_files, receive_files, stream_files
from clicooper.proto import FileChunk


def _file(path: str, data: bytes, mode: int = 0o600, size: int | None = None) -> FileChunk:
    return FileChunk(path=path, mode=mode, size=len(data) if size is None else size, data=data)


@pytest.mark.parametrize(
    ("party", "path"),
    [
        ("t1", "segments/t1.safetensors"),
        ("t1", "parties/t1/watermark/secret.safetensors"),
        ("t2", "checkpoints/t2/step-3.safetensors"),
        ("verifier", "ledger.sqlite"),
        ("verifier", "audit/t1/epoch-1.safetensors"),
        ("verifier", "verifier/anchor.txt"),
    ],
)
def test_a_partys_own_artifact_paths_are_accepted(party, path):
    assert allowed_path(party, path)


@pytest.mark.parametrize(
    ("party", "path"),
    [
        ("t1", "segments/t2.safetensors"),  # another trainer's segment
        ("t1", "ledger.sqlite"),  # the verifier's ledger
        ("t1", "parties/t2/secret"),
        ("t1", "owner/secrets.safetensors"),  # the owner's own files
        ("t1", "results.json"),
        ("t1", "parties/t1"),  # the tree itself, not a file in it
        ("t1", "parties/t1/../t2/secret"),
        ("t1", "parties/t1/./secret"),
        ("t1", "parties/t1//secret"),
        ("t1", "/etc/passwd"),
        ("t1", "../outside"),
        ("t1", "parties/t1/.hidden"),
        ("t1", "parties/t1/sp ace"),
        ("t1", ""),
        ("verifier", "checkpoints/t1/step-3.safetensors"),
    ],
)
def test_anything_else_is_refused(party, path):
    assert not allowed_path(party, path)


def test_files_are_written_whole_with_their_modes(tmp_path):
    chunks = [
        _file("segments/t1.safetensors", b"ab", size=5),
        _file("segments/t1.safetensors", b"cde", size=5),
        _file("parties/t1/anchor.txt", b"public", 0o644),
        _file("parties/t1/empty", b""),
    ]
    written = receive_files(chunks, "t1", tmp_path, "trainer-1", 1 << 20)
    assert written == ["segments/t1.safetensors", "parties/t1/anchor.txt", "parties/t1/empty"]
    assert (tmp_path / "segments/t1.safetensors").read_bytes() == b"abcde"
    assert stat.S_IMODE((tmp_path / "segments/t1.safetensors").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "parties/t1/anchor.txt").stat().st_mode) == 0o644
    assert (tmp_path / "parties/t1/empty").read_bytes() == b""


A, B = _file("parties/t1/a", b"x"), _file("parties/t1/b", b"y")


@pytest.mark.parametrize(
    ("chunks", "why", "whole"),
    [
        ([_file("../escape", b"x")], "not one of its artifact paths", []),
        ([A, _file("ledger.sqlite", b"x")], "not one of its artifact paths", ["a"]),
        ([_file("parties/t1/a", b"xy", size=3)], "ended after 2 of its 3 bytes", []),
        ([_file("parties/t1/a", b"xyz", size=2)], "more than its 2 bytes", []),
        ([A, _file("parties/t1/a", b"y", size=2)], "changed its mode or size", []),
        ([A, B, A], "parties/t1/a twice", ["a", "b"]),
        ([_file("parties/t1/a", b"x", 0o4755)], "mode 4755", []),
        ([A, _file("parties/t1/b", b"", size=1 << 40)], "more than max_bytes", ["a"]),
    ],
)
def test_a_lying_node_is_refused_and_no_file_is_written_in_part(tmp_path, chunks, why, whole):
    with pytest.raises(ProtocolError, match=f"node trainer-1 sent a bad file for t1: .*{why}"):
        receive_files(chunks, "t1", tmp_path, "trainer-1", 1 << 20)
    assert not (tmp_path.parent / "escape").exists()
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert files == whole  # the files before the bad chunk, each whole; nothing else


def test_a_symlink_planted_in_the_run_directory_is_not_written_through(tmp_path):
    (tmp_path / "segments").mkdir()
    victim = tmp_path.parent / f"{tmp_path.name}-victim"
    victim.write_bytes(b"keep")
    os.symlink(victim, tmp_path / "segments/t1.safetensors")
    with pytest.raises(UnsafePathError):
        receive_files([_file("segments/t1.safetensors", b"evil")], "t1", tmp_path, "n", 100)
    assert victim.read_bytes() == b"keep"


def test_a_node_sends_only_the_partys_regular_files_and_the_owner_gets_them_back(tmp_path):
    node = tmp_path / "session"
    for rel, data in {
        "segments/t1.safetensors": b"segment",
        "segments/t2.safetensors": b"not t1's",
        "parties/t1/keys/k": b"key" * 1000,
        "checkpoints/t1/step-2.safetensors": b"ckpt",
        "ledger.sqlite": b"not t1's either",
    }.items():
        (node / rel).parent.mkdir(parents=True, exist_ok=True)
        (node / rel).write_bytes(data)
    os.symlink(node / "ledger.sqlite", node / "parties/t1/link")  # never followed
    rels = [rel for rel, _ in party_files(node, "t1")]
    assert rels == ["segments/t1.safetensors", "parties/t1/keys/k",
                    "checkpoints/t1/step-2.safetensors"]  # fmt: skip
    chunks = list(stream_files(node, "t1", chunk_bytes=1000))
    assert len(chunks) == 1 + 3 + 1
    out = tmp_path / "run"
    assert receive_files(chunks, "t1", out, "trainer-1", 1 << 20) == rels
    for rel in rels:
        assert (out / rel).read_bytes() == (node / rel).read_bytes()
