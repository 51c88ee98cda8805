"""Release once, as the parties run it: the owner's single noisy release of each training
record, and the first trainer's cache of the releases (``privacy.release = "once"``).

**Chunks.** The training records are cut into ``chunks`` runs of consecutive record ids
(:func:`rows_per_chunk`). Chunk k's release is ``clip(head(x[ids])) + noise``, the head
frozen, the noise drawn from a generator seeded with HKDF(owner secret,
``"activation-noise/release-once/<k>"``). It is a fixed function of the owner's secret
and data: sending chunk k again (to a t1 that lost it) sends the very same values, which
tells t1 nothing new and is not another release. The owner does not take that on trust:
it keeps the SHA-256 of each chunk's first release and refuses a resend that differs
(a head that is not deterministic would otherwise release its records twice).
``counts`` holds each record's distinct releases: 1 once the phase is over.

**Protocol.** Before the first training step the owner asks t1 which chunks it holds
(control op ``releases`` with the session's release ``tag``), then sends each missing
chunk as a RELEASE message (tensors ``ids`` and ``x``; meta ``tag``, ``chunk``,
``chunks``, ``records``), one at a time, each answered by t1's REPLY (op ``release``)
once t1 has written it to disk. After every recovery the owner asks again, so a
restarted t1 that kept its files is sent nothing. Training steps carry only record ids
to t1 (FORWARD, tensor ``ids``); t1 reads its cached releases and never sends a gradient
to the owner: its BACKWARD to the owner is an empty acknowledgement that it applied the
step, and the owner runs no backward pass.

**Public set and labels.** A second release of the same kind, ``set = "public"``, carries
the clean activations of the head source's public split (public data: no noise, no
privacy cost) for the chain's warm start (``chain.warm_epochs``); t1 caches it apart, in
``releases/public``. With ``chain.denoise = "post-mean"`` each chunk also carries its
records' pseudo-labels (tensor ``y``, the values the last trainer is sent every step) and
the noise's standard deviation (meta ``noise_std``): once t1 holds every chunk it trains
on each release's class-posterior mean (:mod:`clicooper.privacy.readouts`), computed from
the releases alone.

**Cache.** t1 keeps chunk k as ``<party dir>/releases/chunk-<k>.safetensors`` (ids, x,
and the tag and counts in the header), written atomically (clicooper.common.files,
mode 0600) before it acknowledges the chunk; a restarted t1 reads them back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from clicooper.common.checks import meta_float, meta_hex, meta_int
from clicooper.common.files import private_dir, write_private
from clicooper.common.messages import Kind, Message, ProtocolError
from clicooper.privacy import readouts
from clicooper.privacy.activation import ActivationNoise
from clicooper.privacy.secrets import OwnerSecret

log = logging.getLogger(__name__)

#: Most chunks a release may have (the ``releases`` reply lists those held).
MAX_CHUNKS = 4096
#: Most training records one release may cover.
MAX_RECORDS = 10**8
#: What a chunk aims at: a few MiB per message, at most this many records.
CHUNK_BYTES = 8 << 20
CHUNK_ROWS = 4096
#: Most bytes of releases t1 holds in memory (a peer cannot make it allocate more).
MAX_CACHE_BYTES = 8 << 30
TAG_BYTES = 16
#: t1's cache directory, under its party directory (``<out>/parties/t1``).
RELEASES_DIR = "releases"
#: The release sets: the private records' noisy release, the public split's clean one.
SETS = ("private", "public")
#: The public set's cache, under RELEASES_DIR.
PUBLIC_DIR = "public"
#: Most pseudo-classes a label tensor may name (config: expansion 64 x classes, decoys).
MAX_LABEL = 1 << 20
_FILE = re.compile(r"^chunk-(\d{1,6})\.safetensors$")
_META_KEY = "clicooper-release"


def rows_per_chunk(records: int, row_bytes: int) -> int:
    """Records per chunk: about CHUNK_BYTES a message, and at most MAX_CHUNKS chunks."""
    if records < 1 or row_bytes < 1:
        raise ValueError(f"need records and row bytes, got {records} and {row_bytes}")
    wanted = min(CHUNK_ROWS, max(1, CHUNK_BYTES // row_bytes))
    return max(wanted, math.ceil(records / MAX_CHUNKS))


def noise_seed(secret: OwnerSecret, chunk: int) -> int:
    """The secret seed of chunk ``chunk``'s noise (the same for every send of it)."""
    return secret.derive_seed(f"activation-noise/release-once/{chunk}")


class OwnerRelease:
    """The data owner's side: which chunks are released, and the release of each."""

    def __init__(
        self,
        head: nn.Module,
        noise: ActivationNoise | None,
        secret: OwnerSecret,
        x: torch.Tensor,
        tag: str | None = None,
        labels: torch.Tensor | None = None,
        public: bool = False,
    ) -> None:
        """``head``: frozen; ``x``: the training images, record id = row; ``tag``: the
        session's release tag (fresh from the OS CSPRNG by default); ``labels``: the
        records' pseudo-labels, sent with them (``chain.denoise = "post-mean"``);
        ``public``: the public split's clean activations (``noise`` only clips them).
        ``noise`` None (mode vanilla, the baseline): every set is sent as ``head(x)``, not
        clipped, not noised."""
        self.head, self.noise, self.secret, self.x = head, noise, secret, x
        self.labels, self.set = labels, "public" if public else "private"
        if labels is not None and len(labels) != len(x):
            raise ValueError("release labels need one pseudo-label per record")
        self.records = len(x)
        self.tag = tag or os.urandom(TAG_BYTES).hex()
        with torch.no_grad():
            row = head(x[:1])
        self.rows = rows_per_chunk(self.records, row[0].numel() * row.element_size())
        self.chunks = math.ceil(self.records / self.rows)
        self.counts = torch.zeros(self.records, dtype=torch.int32)
        self.digests: dict[int, str] = {}
        self.kept: dict[int, torch.Tensor] = {}  # what was sent: the owner's readouts read it
        self.resent = 0  # chunks sent again, the same bytes (t1 had lost them)
        self.pending: list[int] | None = None  # None: ask t1 what it holds first

    @property
    def done(self) -> bool:
        """Every chunk is at t1, as far as t1 said when last asked."""
        return self.pending == []

    def ids(self, chunk: int) -> torch.Tensor:
        return torch.arange(chunk * self.rows, min((chunk + 1) * self.rows, self.records))

    def payload(self, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, release)`` of ``chunk``; counted as released at its first build.

        RuntimeError when a resend would not be the same bytes as the first release.
        """
        ids = self.ids(chunk)
        released = self.released(chunk)
        digest = hashlib.sha256(released.contiguous().numpy().tobytes()).hexdigest()
        if chunk not in self.digests:  # the first build of this chunk: released now
            self.digests[chunk] = digest
            self.counts[ids] += 1
            self.kept[chunk] = released
        elif self.digests[chunk] == digest:
            self.resent += 1
        else:
            raise RuntimeError(
                f"release chunk {chunk} would differ from its first release (the head is not "
                "deterministic): refusing to release its records a second time"
            )
        return ids, released

    def released(self, chunk: int) -> torch.Tensor:
        """Chunk ``chunk``'s release: the frozen head, clipped, plus its seeded noise (none for
        the public set; neither without ``noise``, the vanilla baseline). A pure function of
        the owner's secret and data: it counts nothing."""
        ids = self.ids(chunk)
        weight = next(self.head.parameters(), None)  # the head's device (a GPU owner)
        x = self.x[ids] if weight is None else self.x[ids].to(weight.device)
        with torch.no_grad():
            z = self.head(x)
        if self.noise is None:
            return z.cpu()
        clipped = self.noise.clip(z).cpu()
        if self.set == "public":
            return clipped
        generator = torch.Generator().manual_seed(noise_seed(self.secret, chunk))
        return clipped + self.noise.noise(clipped.shape, generator).to(clipped.dtype)

    def message(self, chunk: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The RELEASE message of ``chunk``: tensors and meta (counted by :meth:`payload`)."""
        ids, x = self.payload(chunk)
        tensors = {"ids": ids, "x": x}
        meta: dict[str, Any] = {"tag": self.tag, "chunk": chunk, "chunks": self.chunks}
        meta.update(records=self.records, set=self.set)
        if self.labels is not None:
            tensors["y"] = self.labels[ids].to(torch.int64)
            meta["noise_std"] = 0.0 if self.set == "public" else self.noise_std
        return tensors, meta

    def everything(self) -> torch.Tensor:
        """Every record's release, in record order (rebuilt, uncounted, where not kept: a
        resumed owner), for the owner's own readouts of what it released."""
        parts = [self.kept.get(k) for k in range(self.chunks)]
        return torch.cat([self.released(k) if p is None else p for k, p in enumerate(parts)])

    @property
    def noise_std(self) -> float:
        """The per-coordinate standard deviation of the noise (Laplace: sqrt(2) b)."""
        if self.noise is None:
            return 0.0
        scale = self.noise.noise_multiplier * self.noise.clip_norm
        return scale * math.sqrt(2.0) if self.noise.mechanism == "laplace" else scale

    def per_record(self) -> dict[str, int]:
        """Distinct releases per training record: min and max over the records."""
        return {
            "min": int(self.counts.min()),
            "max": int(self.counts.max()),
            "records": self.records,
        }

    def summary(self) -> dict[str, Any]:
        return {
            "chunks": self.chunks,
            "rows_per_chunk": self.rows,
            "resent_chunks": self.resent,
            "releases_per_record": self.per_record(),
        }


def release_caches(party_dir: Path, resume: bool) -> tuple[ReleaseCache, ReleaseCache]:
    """t1's caches (private releases, public set) under ``party_dir``: read back on a resume,
    emptied for a new session."""
    private = ReleaseCache(Path(party_dir) / RELEASES_DIR)
    public = ReleaseCache(Path(party_dir) / RELEASES_DIR / PUBLIC_DIR)
    for cache in (private, public):
        if resume:
            cache.load()
        else:
            cache.clear()
    return private, public


class ReleaseCache:
    """t1's side: the releases it was sent, in memory and in ``directory``."""

    def __init__(self, directory: Path, max_bytes: int = MAX_CACHE_BYTES) -> None:
        self.directory, self.max_bytes = Path(directory), max_bytes
        self._reset()

    def _reset(self) -> None:
        self.tag: str | None = None
        self.records = self.n_chunks = 0
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None  # pseudo-labels, when the owner sends them
        self.noise_std: float | None = None
        self.held: torch.Tensor | None = None
        self.chunks: set[int] = set()
        self.denoised: torch.Tensor | None = None  # class-posterior means, once complete

    # -- disk ---------------------------------------------------------------------------

    def _files(self) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        found = ((_FILE.fullmatch(p.name), p) for p in self.directory.iterdir())
        return sorted((int(m.group(1)), p) for m, p in found if m)

    def clear(self) -> None:
        """Forget every release, on disk too (a new session)."""
        for _, path in self._files():
            path.unlink(missing_ok=True)
        self._reset()

    def load(self) -> int:
        """Read the chunks on disk back (a restarted t1); the number read.

        A file that does not read back as a chunk of the same release is removed: the
        owner sends that chunk again, the same bytes, at no privacy cost.
        """
        self._reset()
        for chunk, path in self._files():
            try:
                data = path.read_bytes()
                tensors = st_load(data)
                header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
                meta = json.loads(header["__metadata__"][_META_KEY])
                probe = Message(Kind.RELEASE, 0, "t1", "t1", {}, meta)
                self._store(probe, tensors.get("ids"), tensors.get("x"), chunk, tensors.get("y"))
            except (OSError, SafetensorError, ValueError, KeyError, TypeError) as exc:
                log.warning("release cache: dropping %s (%s)", path, exc)
                path.unlink(missing_ok=True)
        return len(self.chunks)

    # -- the protocol ---------------------------------------------------------------------

    def held_chunks(self, msg: Message) -> dict[str, Any]:
        """Answer to the owner's ``releases``: the chunks held of the release ``tag``.

        Releases of another tag are another session's: they are dropped.
        """
        tag = meta_hex(msg, "tag", TAG_BYTES)
        if self.tag not in (None, tag):
            log.warning("release cache: dropping the releases of another session")
            self.clear()
        return {"chunks": sorted(self.chunks)}

    def add(self, msg: Message) -> int:
        """Store a RELEASE message (checked) on disk, then in memory; its chunk."""
        ids, x = msg.tensor("ids"), msg.tensor("x")
        y = msg.tensors.get("y")
        chunk = meta_int(msg, "chunk", 0, MAX_CHUNKS - 1)
        meta = self._store(msg, ids, x, chunk, y, dry_run=True)
        private_dir(self.directory)
        saved = {"ids": ids.contiguous(), "x": x.contiguous()}
        if y is not None:
            saved["y"] = y.contiguous()
        blob = st_save(saved, metadata={_META_KEY: json.dumps(meta)})
        write_private(self.directory / f"chunk-{chunk}.safetensors", blob)
        self._store(msg, ids, x, chunk, y)
        return chunk

    def _store(
        self,
        msg: Message,
        ids: torch.Tensor | None,
        x: torch.Tensor | None,
        chunk: int,
        y: torch.Tensor | None = None,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """Check a chunk against the release held so far, then keep it (unless ``dry_run``)."""
        tag = meta_hex(msg, "tag", TAG_BYTES)
        chunks = meta_int(msg, "chunks", 1, MAX_CHUNKS)
        records = meta_int(msg, "records", 1, MAX_RECORDS)
        if meta_int(msg, "chunk", 0, chunks - 1) != chunk:
            raise ProtocolError(f"release chunk {chunk} names another chunk")
        if self.tag is not None and (tag, chunks, records) != (
            self.tag,
            self.n_chunks,
            self.records,
        ):
            raise ProtocolError(
                "release chunk of another release (tag, chunks or records differ from the "
                "chunks t1 holds)"
            )
        if ids is None or ids.dtype != torch.int64 or ids.ndim != 1 or not 1 <= len(ids) <= records:
            raise ProtocolError("release ids must be a non-empty 1-D int64 tensor of record ids")
        if int(ids.min()) < 0 or int(ids.max()) >= records or len(ids.unique()) != len(ids):
            raise ProtocolError(f"release ids must be distinct record ids in [0, {records})")
        if x is None or not x.is_floating_point() or x.ndim < 2 or len(x) != len(ids):
            raise ProtocolError("release x must be a floating tensor with one row per id")
        if self.x is not None and (x.shape[1:] != self.x.shape[1:] or x.dtype != self.x.dtype):
            raise ProtocolError(
                f"release rows {x.dtype} {tuple(x.shape[1:])} differ from the rows held "
                f"({self.x.dtype} {tuple(self.x.shape[1:])})"
            )
        size = records * x[0].numel() * x.element_size()
        if size > self.max_bytes:
            raise ProtocolError(
                f"a release of {records} records of {tuple(x.shape[1:])} needs {size} bytes, "
                f"over t1's release cache limit of {self.max_bytes} bytes"
            )
        meta = {"tag": tag, "chunk": chunk, "chunks": chunks, "records": records}
        noise_std = self._check_labels(msg, ids, y)
        if y is not None:
            meta["noise_std"] = noise_std
        if dry_run:
            return meta
        if self.x is None:
            self.tag, self.n_chunks, self.records = tag, chunks, records
            self.x = torch.zeros((records, *x.shape[1:]), dtype=x.dtype)
            self.held = torch.zeros(records, dtype=torch.bool)
            if y is not None:
                self.y, self.noise_std = torch.zeros(records, dtype=torch.int64), noise_std
        self.x[ids] = x
        if y is not None:
            self.y[ids] = y
        self.held[ids] = True
        self.chunks.add(chunk)
        self.denoised = None
        return meta

    def _check_labels(
        self, msg: Message, ids: torch.Tensor, y: torch.Tensor | None
    ) -> float | None:
        """A chunk's pseudo-labels and noise std: one int64 label per id, with a noise std,
        in every chunk or in none; the noise std the same in every chunk."""
        if (y is None) != (self.y is None) and self.x is not None:
            raise ProtocolError("release chunks must all carry pseudo-labels y, or none")
        if y is None:
            return None
        if y.dtype != torch.int64 or y.shape != ids.shape:
            raise ProtocolError("release y must be a 1-D int64 tensor with one label per id")
        if int(y.min()) < 0 or int(y.max()) >= MAX_LABEL:
            raise ProtocolError(f"release labels must lie in [0, {MAX_LABEL})")
        noise_std = meta_float(msg, "noise_std", 0.0, 1e6)
        if self.noise_std is not None and noise_std != self.noise_std:
            raise ProtocolError("release chunks name different noise_std")
        return noise_std

    @property
    def complete(self) -> bool:
        return self.x is not None and len(self.chunks) == self.n_chunks

    def training_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """What the chain trains on for record ``ids``: the cached releases, or (with
        pseudo-labels) their class-posterior means, computed once every chunk is held."""
        rows = self.lookup(ids)
        if self.y is None or not self.noise_std:
            return rows
        if self.denoised is None:
            if not self.complete:
                raise ProtocolError("t1 trains on denoised releases only once it holds all")
            classes = int(self.y.max()) + 1
            posterior = readouts.class_posterior(self.x, self.y, classes, self.noise_std)
            self.denoised = readouts.posterior_means(self.x, self.y, posterior)
        return self.denoised[ids]

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The cached releases of record ``ids`` (a copy); ProtocolError for any not held."""
        if ids.dtype != torch.int64 or ids.ndim != 1 or len(ids) == 0:
            raise ProtocolError("training ids must be a non-empty 1-D int64 tensor")
        if self.x is None or int(ids.min()) < 0 or int(ids.max()) >= self.records:
            raise ProtocolError(f"t1 holds no release of some of these records ({self.records})")
        if not bool(self.held[ids].all()):
            missing = int((~self.held[ids]).sum())
            raise ProtocolError(f"t1 holds no release of {missing} record(s) of this batch")
        return self.x[ids]
