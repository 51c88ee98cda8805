"""Safe file writing: every secret, key, weights file and certificate goes through here.

:func:`write_file` writes ``data`` to ``path`` with ``mode``; :func:`write_private`
is the same for files nobody else may read (secrets, keys, weights: 0600 by
default); :func:`private_dir` makes a directory only its owner can enter (0700).
Why each step (the threat: another local user, or a compromised peer process,
that can create names in a run directory before or while we write):

- **The parent directory is opened once, with O_DIRECTORY | O_NOFOLLOW,** and
  every later step (create, rename, clean-up) is relative to that descriptor.
  A symlink at the parent is refused, and swapping the directory for a
  symlink after the check changes nothing: the descriptor still names the
  directory that was checked.
- **A symlink at the target is refused** (lstat, one-line
  :class:`UnsafePathError`). The file it points to is never opened: the
  refusal is there to report tampering; even without it ``os.replace``
  would replace the link itself, never write through it. Likewise a hard link
  at the target only loses its name; the other file is not modified.
- **The temporary file has a fresh name** (``.<name>.<16 hex digits from the
  CSPRNG>.tmp``) in the target's own directory, **opened with O_CREAT |
  O_EXCL | O_NOFOLLOW | O_WRONLY | O_CLOEXEC.** O_EXCL fails if anything
  already has that name, be it a file, a symlink or a dangling symlink, so a
  pre-planted name can neither redirect the write to a file of the planter's
  choice nor hand the planter a file it already holds open (which would let it
  read the secret). O_NOFOLLOW says the same for symlinks explicitly; a clash
  just draws another name. A fixed name (``<name>.tmp``) would let anyone who
  can predict it plant such a trap once for every future write.
- **The mode is set with fchmod on the open descriptor before any byte is
  written**: the ``open`` mode is masked by the umask, so the result would
  depend on the caller's environment; fchmod makes it exactly ``mode``, and
  the secret is never readable by others, not even for a moment.
- **fsync, then os.replace onto the target, then fsync of the directory.**
  ``rename(2)`` within one file system is atomic: every reader sees either the
  old complete file or the new complete one, never a half-written one, and the
  fsyncs make that hold across a crash too.
- **On any failure** (a full disk, an interrupt) the temporary file is removed
  and the target keeps its old contents.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
_TMP_TRIES = 16
_CREATE = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class UnsafePathError(ValueError):
    """A path that cannot be written safely: a symlink, or not a regular file or directory."""


def write_file(path: Path | str, data: bytes, mode: int) -> Path:
    """Write ``data`` to ``path`` atomically with file mode exactly ``mode`` (see module doc)."""
    path = Path(path)
    dir_fd = _open_dir(path.parent)
    try:
        _check_target(path, dir_fd)
        tmp = _write_temp(path, dir_fd, data, mode)
        try:
            os.replace(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            _unlink(tmp, dir_fd)
            raise
        with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def write_private(path: Path | str, data: bytes, mode: int = PRIVATE_FILE) -> Path:
    """:func:`write_file` for secrets, keys and weights: ``mode`` gives others no access."""
    if mode & 0o007:
        raise ValueError(f"a private file is not accessible to others, got mode {mode:o}")
    return write_file(path, data, mode)


def ensure_dir(directory: Path | str, mode: int = PRIVATE_DIR) -> Path:
    """Create ``directory`` and missing parents, each new one with ``mode`` set explicitly.

    Existing directories keep their mode (this may be a user's folder); a
    symlink or a non-directory at ``directory`` raises :class:`UnsafePathError`.
    """
    directory = Path(directory)
    missing = []
    probe = directory
    while not os.path.lexists(probe) and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for new in reversed(missing):
        with contextlib.suppress(FileExistsError):  # created meanwhile: checked below
            os.mkdir(new, mode)
            fd = _open_dir(new)
            try:
                os.fchmod(fd, mode)  # mkdir's mode is masked by the umask
            finally:
                os.close(fd)
    os.close(_open_dir(directory))
    return directory


def private_dir(directory: Path | str) -> Path:
    """Make ``directory`` (created if missing) a 0700 directory of the current user.

    Refused with :class:`UnsafePathError`: a symlink, a non-directory, or a
    directory owned by another user (chmod would fail, and its owner could
    read or swap whatever is written there).
    """
    directory = ensure_dir(directory)
    fd = _open_dir(directory)
    try:
        owner = os.fstat(fd).st_uid
        if owner != os.geteuid():
            raise UnsafePathError(
                f"{directory} belongs to another user (uid {owner}): "
                "choose a directory of your own for private files"
            )
        os.fchmod(fd, PRIVATE_DIR)
    finally:
        os.close(fd)
    return directory


def _open_dir(directory: Path) -> int:
    """A descriptor of ``directory`` itself (O_NOFOLLOW: a symlink there is refused)."""
    if os.path.islink(directory):
        raise UnsafePathError(
            f"{directory} is a symbolic link: refusing to write through it; "
            "remove the link or use a real directory"
        )
    try:
        return os.open(directory, _DIRECTORY)
    except OSError as exc:  # ENOTDIR: not a directory; ELOOP: a link swapped in meanwhile
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        raise UnsafePathError(
            f"{directory} is not a directory (or was replaced by a link): "
            "remove it or choose another path"
        ) from None


def _check_target(path: Path, dir_fd: int) -> None:
    try:
        st = os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(
            f"{path} is a symbolic link: refusing to write a private file through it; "
            "remove the link and run again"
        )
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(f"{path} exists and is not a regular file: remove it or move it")


def _write_temp(path: Path, dir_fd: int, data: bytes, mode: int) -> str:
    """Name of a new, fsynced temporary file in ``dir_fd`` holding ``data`` with ``mode``."""
    for _ in range(_TMP_TRIES):
        tmp = f".{path.name[:200]}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, _CREATE, PRIVATE_FILE, dir_fd=dir_fd)
            break
        except FileExistsError:  # planted or a clash: never reuse it
            continue
    else:
        raise UnsafePathError(f"no free temporary name beside {path}: is the directory full?")
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        _unlink(tmp, dir_fd)
        raise
    return tmp


def _unlink(name: str, dir_fd: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=dir_fd)
