"""File hygiene: secrets, keys and weights are written safely (clicooper.common.files).

Adversarial: symlinks planted at every secret's path, files planted at temporary
names, a failure in the middle of a write, umask 0, and the modes of every
secret and weights file of a real run on digits.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cc_helpers import quick_config
from torch import nn

from clicooper.common import files
from clicooper.common.files import (
    UnsafePathError,
    ensure_dir,
    private_dir,
    write_file,
    write_private,
)
from clicooper.config import WatermarkConfig
from clicooper.parties import Trainer
from clicooper.parties.watermarking import TrainerChain
from clicooper.privacy.secrets import SECRET_FILE, OwnerSecret
from clicooper.runtime.certs import create_certificates
from clicooper.runtime.session import run
from clicooper.watermark.keys import PartyKey

VICTIM = b"the attacker's target: must stay as it is\n"


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file elsewhere that a planted symlink points to."""
    path = tmp_path / "elsewhere" / "victim"
    path.parent.mkdir()
    path.write_bytes(VICTIM)
    path.chmod(0o644)
    return path


def _assert_untouched(link: Path, victim: Path) -> None:
    assert link.is_symlink() and os.readlink(link) == str(victim)
    assert victim.read_bytes() == VICTIM and _mode(victim) == 0o644


# ---- the writer -----------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077])
def test_modes_are_set_explicitly_whatever_the_umask(tmp_path: Path, mask: int) -> None:
    with _umask(mask):
        secret = write_private(tmp_path / "s", b"x")
        cert = write_file(tmp_path / "c.pem", b"y", 0o644)
        group = write_private(tmp_path / "w", b"z", 0o640)
        made = private_dir(tmp_path / "a" / "b")
    assert (_mode(secret), _mode(cert), _mode(group)) == (0o600, 0o644, 0o640)
    assert _mode(made) == 0o700 and _mode(made.parent) == 0o700  # new parents too
    assert secret.read_bytes() == b"x"


def test_rewriting_tightens_an_existing_file_and_replaces_its_inode(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_bytes(b"old")
    path.chmod(0o666)
    other = tmp_path / "hardlink"
    os.link(path, other)  # a hard link at the target loses its name, not its contents
    write_private(path, b"new")
    assert path.read_bytes() == b"new" and _mode(path) == 0o600
    assert other.read_bytes() == b"old" and _mode(other) == 0o666


def test_private_file_modes_exclude_others(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not accessible to others"):
        write_private(tmp_path / "s", b"x", 0o644)
    assert not (tmp_path / "s").exists()


def test_symlink_at_the_target_is_refused(tmp_path: Path, victim: Path) -> None:
    link = tmp_path / "secret"
    link.symlink_to(victim)
    with pytest.raises(UnsafePathError, match="is a symbolic link"):
        write_private(link, b"secret bytes")
    _assert_untouched(link, victim)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "secret"]


def test_dangling_symlink_at_the_target_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "secret"
    link.symlink_to(tmp_path / "would-be-created")
    with pytest.raises(UnsafePathError):
        write_private(link, b"secret bytes")
    assert not (tmp_path / "would-be-created").exists()


def test_symlinked_directory_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o755)
    link = tmp_path / "owner"
    link.symlink_to(real)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        write_private(link / "owner.secret", b"s")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        private_dir(link)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        ensure_dir(link)
    assert list(real.iterdir()) == [] and _mode(real) == 0o755  # not chmod-ed through the link


def test_non_regular_target_and_non_directory_parent_are_refused(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(UnsafePathError, match="not a regular file"):
        write_private(tmp_path / "d", b"x")
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(UnsafePathError, match="not a directory"):
        write_private(tmp_path / "f" / "x", b"x")
    with pytest.raises(UnsafePathError, match="not a directory"):
        private_dir(tmp_path / "f")


def test_planted_temporary_names_do_not_matter(
    tmp_path: Path, victim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "owner.secret"
    # The fixed names the old writers used, planted as links to the victim.
    old_names = [tmp_path / "owner.secret.tmp", tmp_path / ".owner.secret.tmp"]
    old_names.append(tmp_path / f".owner.secret.{os.getpid()}.tmp")
    for name in old_names:
        name.symlink_to(victim)
    # The attacker even guesses the first random name: a link and then a file of its own.
    draws = iter(["aa" * 8, "bb" * 8, "cc" * 8])
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: next(draws))
    guessed_link = tmp_path / f".owner.secret.{'aa' * 8}.tmp"
    guessed_link.symlink_to(victim)
    guessed_file = tmp_path / f".owner.secret.{'bb' * 8}.tmp"
    guessed_file.write_bytes(b"planted")
    guessed_file.chmod(0o666)
    write_private(target, b"the secret")
    assert target.read_bytes() == b"the secret" and _mode(target) == 0o600
    for link in [*old_names, guessed_link]:
        _assert_untouched(link, victim)
    assert guessed_file.read_bytes() == b"planted"  # never opened, so never shared
    assert not (tmp_path / f".owner.secret.{'cc' * 8}.tmp").exists()  # renamed onto the target


def test_temporary_names_are_unique(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *, dir_fd=None):
        if dir_fd is not None:
            seen.append(path)
            assert flags & os.O_EXCL and flags & os.O_NOFOLLOW and flags & os.O_CREAT
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(files.os, "open", spy)
    for _ in range(20):
        write_private(tmp_path / "k", b"x")
    assert len(set(seen)) == 20 and all(len(n) == len(".k..tmp") + 16 for n in seen)


@pytest.mark.parametrize("failing", ["write", "fsync", "replace"])
def test_failure_mid_write_keeps_the_old_target_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    target = tmp_path / "head.safetensors"
    write_private(target, b"old contents")
    real = getattr(os, failing)
    calls = []

    def broken(*args, **kwargs):
        calls.append(args)
        if failing == "write" and len(calls) == 1:  # a partial write first, then a full disk
            return real(args[0], args[1][:3])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, failing, broken)
    with pytest.raises(OSError, match="No space left"):
        write_private(target, b"new contents, longer than the old")
    monkeypatch.undo()
    assert target.read_bytes() == b"old contents" and _mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["head.safetensors"]


def test_interrupt_mid_write_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_private(tmp_path / "k", b"x")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_private_dir_tightens_and_refuses_a_foreign_directory(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    os.chmod(loose, 0o777)
    assert _mode(private_dir(loose)) == 0o700
    if os.geteuid() == 0:  # root: chown a directory to another user
        foreign = tmp_path / "foreign"
        foreign.mkdir()
        os.chown(foreign, 12345, 12345)
        with pytest.raises(UnsafePathError, match="belongs to another user"):
            private_dir(foreign)


# ---- every secret path of the project ----------------------------------------------------------


def test_symlink_at_the_owner_secret_is_refused(tmp_path: Path, victim: Path) -> None:
    owner = private_dir(tmp_path / "owner")
    link = owner / SECRET_FILE
    link.symlink_to(victim)
    with pytest.raises(UnsafePathError):
        OwnerSecret.generate().save(owner)
    _assert_untouched(link, victim)


@pytest.mark.parametrize("planted", ["key", "secret"])
def test_symlink_at_a_trainer_key_or_watermark_secret_is_refused(
    tmp_path: Path, victim: Path, planted: str
) -> None:
    from clicooper.parties.watermarking import KEY_FILE
    from clicooper.parties.watermarking import SECRET_FILE as WM_SECRET

    party_dir = private_dir(tmp_path / "parties" / "t1")
    link = party_dir / (KEY_FILE if planted == "key" else WM_SECRET)
    link.symlink_to(victim)
    trainer = Trainer(1, 1, nn.Linear(32, 32), lr=0.01)
    with pytest.raises(UnsafePathError):
        TrainerChain(trainer, WatermarkConfig(), party_dir)
    _assert_untouched(link, victim)


def test_symlink_at_a_party_key_is_refused(tmp_path: Path, victim: Path) -> None:
    link = tmp_path / "do.key"
    link.symlink_to(victim)
    with pytest.raises(UnsafePathError):
        PartyKey.generate().save(link)
    _assert_untouched(link, victim)


@pytest.mark.parametrize("planted", ["verifier.key", "watermark_secrets.json"])
def test_symlink_at_the_verifiers_key_or_secrets_is_refused(
    tmp_path: Path, victim: Path, planted: str
) -> None:
    from clicooper.parties import Verifier

    verifier = Verifier(tmp_path / "run")
    for name in ("do", "t1"):  # as their `register` messages leave it
        public = PartyKey.generate().public_bytes().hex()
        verifier.registered[name] = {"party": name, "public_key": public}
    verifier.registered["t1"]["watermark_secret"] = os.urandom(32).hex()
    link = private_dir(tmp_path / "run" / "verifier") / planted
    link.symlink_to(victim)
    with pytest.raises(UnsafePathError):
        verifier.open()
    _assert_untouched(link, victim)
    assert verifier.ledger is None


def test_symlink_at_a_tls_key_is_refused(tmp_path: Path, victim: Path, cli_inprocess) -> None:
    # Learn where `certs init` puts t1's key (one folder today, a bundle per party later),
    # then plant a link there in a fresh folder of the same layout.
    create_certificates(["do", "t1"], tmp_path / "first")
    (key,) = (p for p in (tmp_path / "first").rglob("*.key") if p.stem == "t1")
    relative = key.relative_to(tmp_path / "first")
    out = private_dir(tmp_path / "certs")
    for parent in reversed(relative.parents[:-1]):
        private_dir(out / parent)
    link = out / relative
    link.symlink_to(victim)
    code, err, _ = cli_inprocess("certs", "init", "--parties", "do,t1", "--out", str(out))
    assert code == 2 and "symbolic link" in err and len(err.strip().splitlines()) == 1, err
    _assert_untouched(link, victim)


# ---- a real run ---------------------------------------------------------------------------------

SECRET_SUFFIXES = (".safetensors", ".key", ".secret", ".sqlite", ".pem")
PRIVATE_DIRS = ("owner", "owner/checkpoints", "parties/t1", "parties/t2", "verifier")


@pytest.mark.filterwarnings("ignore::clicooper.watermark.embed.WatermarkWarning")
def test_no_secret_or_weights_file_of_a_run_is_readable_by_others(
    tmp_path: Path, small_digits
) -> None:
    """A real in-process run on digits under umask 0: every mode is set explicitly."""
    out = tmp_path / "run"
    cfg = quick_config(trainers=2, epochs=2, checkpoint_steps=5, record=20)
    with _umask(0):
        session = run(cfg, out, data=small_digits)
    assert session.results["watermark"]["verified"]
    found = {p.relative_to(out).as_posix(): _mode(p) for p in out.rglob("*") if p.is_file()}
    private = {
        name: mode
        for name, mode in found.items()
        if name.endswith(SECRET_SUFFIXES) or name.startswith(("owner/", "parties/", "verifier/"))
    }
    expected = {
        "ledger.sqlite",
        "owner/owner.secret",
        "owner/do.key",
        "owner/head.safetensors",
        "segments/t1.safetensors",
        "segments/t2.safetensors",
        "parties/t1/watermark.secret",
        "verifier/verifier.key",
        "verifier/watermark_secrets.json",
        "records/t1.safetensors",
        "audit/1/t2.safetensors",
    }
    assert expected <= set(private), sorted(set(expected) - set(private))
    assert any(n.startswith("owner/checkpoints/step-") for n in private)
    public = {"verifier/anchor.txt"}  # the trust anchor: a public key, meant to be published
    assert public <= set(found)
    loose = {n: f"{m:o}" for n, m in private.items() if m != 0o600 and n not in public}
    assert loose == {}
    for name in PRIVATE_DIRS:
        assert _mode(out / name) == 0o700, name
    assert not [n for n in found if n.endswith(".tmp")]
