"""A finished session's files, from its nodes into its owner's run directory (``Fetch``).

Once a session is over, each node of its chain holds that party's artifacts in its
session directory, laid out as a run directory (:class:`~clicooper.runtime.rundirs.RunDir`):
the verifier's ledger, audit copies, keys and anchor; each trainer's final segment and
party directory (keys, watermark secret, release caches); every party's checkpoints.
:func:`fetch` asks a node for them over the ``Fetch`` RPC (mutual TLS, as the owner's own
certificate) and writes them into the run directory, so a run on nodes on other machines
ends with the same run directory as an in-process run, and ``clicooper verify`` works on it.

The node answers only the session's owner, and only once the session has finished or
been aborted (:meth:`clicooper.node.admission.Admission.ended`). The owner trusts no byte
of the answer: every path must be one of that party's artifact paths
(:func:`allowed_path`), a clean relative path of safe names, each file whole and once, the
mode 0600 or 0644, and the total under ``max_bytes``. Files are written with
:func:`~clicooper.common.files.write_file` (no symlink followed, atomic), so a lying node
can neither write outside its party's part of the run directory nor overwrite another
party's files.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath

from clicooper.common.files import ensure_dir, write_file
from clicooper.common.messages import Kind, Message, ProtocolError
from clicooper.node.admission import NOT_ENDED, REFUSAL_KEY
from clicooper.node.client import NodeAddress, Owner
from clicooper.proto import FileChunk
from clicooper.runtime.rundirs import RunDir

#: Bytes of file data in one FileChunk (well under the 4 MiB envelope limit).
CHUNK_BYTES = 1 << 20
#: The most a node may send for one party of one session, by default (release caches of
#: a full Fashion-MNIST run are a few hundred MiB).
MAX_FETCH_BYTES = 8 << 30
_MODES = (0o600, 0o644)
_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")  # no leading dot: no temp files


class NotFinished(Exception):
    """The node still serves the session: its files are not final yet."""


def artifact_paths(run: RunDir, party: str) -> tuple[list[Path], list[Path]]:
    """``(files, trees)``: where ``party``'s artifacts are in the run directory ``run``."""
    if party == "verifier":
        return [run.ledger], [run.audit, run.verifier, run.checkpoints(party)]
    return [run.segment(party)], [run.party(party), run.checkpoints(party)]


def party_files(session_dir: Path, party: str) -> Iterator[tuple[str, Path]]:
    """Each artifact of ``party`` in a node's session directory: (relative path, file).

    Regular files only (a symlink is never followed), in a fixed order."""
    files, trees = artifact_paths(RunDir(session_dir), party)
    found = [f for f in files if f.is_file() and not f.is_symlink()]
    for tree in trees:
        if tree.is_dir() and not tree.is_symlink():
            found += [p for p in sorted(tree.rglob("*")) if p.is_file() and not p.is_symlink()]
    for path in found:
        yield path.relative_to(session_dir).as_posix(), path


def stream_files(
    session_dir: Path, party: str, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[FileChunk]:
    """The node's answer to ``Fetch``: every file of :func:`party_files`, in slices."""
    for rel, path in party_files(session_dir, party):
        data = path.read_bytes()
        mode = 0o644 if path.stat().st_mode & 0o044 else 0o600  # a public file stays public
        for start in range(0, max(len(data), 1), chunk_bytes):
            yield FileChunk(
                path=rel, mode=mode, size=len(data), data=data[start : start + chunk_bytes]
            )


def allowed_path(party: str, rel: str) -> bool:
    """Whether ``rel`` is a clean relative path of safe names, at or under one of
    ``party``'s artifact paths (:func:`artifact_paths`)."""
    pure = PurePosixPath(rel)
    if pure.is_absolute() or pure.as_posix() != rel or not pure.parts:
        return False
    if not all(_NAME.fullmatch(part) for part in pure.parts):
        return False  # rejects '..', '.', empty and hidden names
    base = Path("/run")
    files, trees = artifact_paths(RunDir(base), party)
    target = base / pure
    return target in files or any(target.is_relative_to(t) and target != t for t in trees)


def receive_files(
    chunks: Iterable[FileChunk], party: str, out_dir: Path, node: str, max_bytes: int
) -> list[str]:
    """Check ``chunks`` (a node's answer) and write each file into ``out_dir``; the paths
    written. ProtocolError naming ``node`` and what is wrong; a file before the wrong
    chunk is written whole, none is written in part."""
    written: list[str] = []
    current: FileChunk | None = None
    data = bytearray()
    total = 0

    def refuse(why: str) -> ProtocolError:
        return ProtocolError(f"node {node} sent a bad file for {party}: {why}")

    def finish() -> None:
        if current is None:
            return
        if len(data) != current.size:
            raise refuse(f"{current.path} ended after {len(data)} of its {current.size} bytes")
        dest = Path(out_dir) / current.path
        ensure_dir(dest.parent)
        write_file(dest, bytes(data), current.mode)
        written.append(current.path)

    for chunk in chunks:
        if current is None or chunk.path != current.path:
            finish()
            if chunk.path in written:
                raise refuse(f"{chunk.path} twice")
            if not allowed_path(party, chunk.path):
                raise refuse(f"{ascii(chunk.path[:200])} is not one of its artifact paths")
            if chunk.mode not in _MODES:
                raise refuse(f"{chunk.path} has mode {chunk.mode:o}, not 600 or 644")
            total += chunk.size
            if total > max_bytes:
                raise refuse(f"more than max_bytes {max_bytes} in all")
            current, data = chunk, bytearray()
        elif (chunk.mode, chunk.size) != (current.mode, current.size):
            raise refuse(f"{chunk.path} changed its mode or size between slices")
        data += chunk.data
        if len(data) > current.size:
            raise refuse(f"{current.path} has more than its {current.size} bytes")
    finish()
    return written


def fetch_request(node: str, session: str) -> Message:
    """The CONTROL message of a ``Fetch`` (sent as ``do`` in an ``admit.<nonce>`` session)."""
    return Message(Kind.CONTROL, 0, "do", node, {}, {"op": "fetch", "session": session})


def fetch(
    owner: Owner,
    node: NodeAddress,
    party: str,
    session: str,
    out_dir: Path,
    *,
    timeout: float = 60.0,
    max_bytes: int = MAX_FETCH_BYTES,
) -> list[str]:
    """Bring ``party``'s files of ``session`` from ``node`` into ``out_dir``; waits up to
    ``timeout`` seconds for the node to finish the session. The paths written."""
    from clicooper.proto import FETCH_METHOD, Envelope
    from clicooper.runtime.certs import load_party_credentials
    from clicooper.runtime.transport.grpc_wire import open_channel

    credentials = load_party_credentials(owner.certs_dir, owner.name)
    channel = open_channel(node.address, node.name, credentials)
    call = channel.unary_stream(
        FETCH_METHOD,
        request_serializer=Envelope.SerializeToString,
        response_deserializer=FileChunk.FromString,
    )
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                return _fetch_once(call, node, party, session, out_dir, timeout, max_bytes)
            except NotFinished as exc:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{node.name} did not finish session {session}: {exc}"
                    ) from None
                time.sleep(0.1)
    finally:
        channel.close()


def _fetch_once(
    call: Callable[..., Iterable[FileChunk]],
    node: NodeAddress,
    party: str,
    session: str,
    out_dir: Path,
    timeout: float,
    max_bytes: int,
) -> list[str]:
    """One ``Fetch`` (a fresh nonce) on the node's channel; NotFinished while it serves."""
    import grpc

    from clicooper.runtime.transport.grpc_wire import UNREACHABLE, rpc_status, split_message

    nonce = f"admit.{os.urandom(12).hex()}"
    (request,) = split_message(fetch_request(node.name, session), nonce, 1)
    try:
        return receive_files(call(request, timeout=timeout), party, out_dir, node.name, max_bytes)
    except grpc.RpcError as exc:
        code, details = rpc_status(exc)
        if _refusal(exc) == NOT_ENDED:
            raise NotFinished(details) from None
        if code in UNREACHABLE:
            raise ConnectionError(f"{node.name} at {node.address}: {details}") from None
        raise ProtocolError(f"{node.name} refused to send {party}'s files: {details}") from None


def _refusal(exc: Exception) -> str | None:
    """The kind of refusal a node named in the call's trailing metadata, if any."""
    trailers = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    return dict(trailers or ()).get(REFUSAL_KEY)


def remote_collector(
    owner: Owner, chain: dict[str, NodeAddress], session: str, timeout: float = 60.0
) -> Callable[[Path], None]:
    """The ``collect`` of a session on nodes: every party's files from its node
    (:func:`fetch`), into the run directory, wherever the nodes run."""

    def collect(out_dir: Path) -> None:
        for party, node in chain.items():
            try:
                fetch(owner, node, party, session, out_dir, timeout=timeout)
            except (ProtocolError, ConnectionError, TimeoutError) as exc:
                raise type(exc)(
                    f"{exc} (the session's files stay on {node.name}; nothing there is lost)"
                ) from None

    return collect
