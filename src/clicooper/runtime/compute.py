"""Per-party compute accounting: FLOPs (``FlopCounterMode``) and CPU seconds.

Design (issue 10, point 1). Counting every op under ``FlopCounterMode`` costs a Python
dispatch per op: measured 3.5-6 ms a step on the presets (+20% for the CNN at batch 128,
+300% for the MLP at batch 32), too much for every step. So each party's work is cut into
*blocks* whose FLOPs depend only on a key (the kind of work and its input shapes):

* :meth:`ComputeMeter.count` with a key runs the block under ``FlopCounterMode`` the first
  time the key is seen and adds the cached count every later time: one representative
  step per batch shape, times the steps the party really ran. Work whose cost depends on
  state (the watermark regulariser's lazy schedule) is counted with ``key=None``: under
  the counter every time (a handful of ops).
* :meth:`ComputeMeter.active` marks the party as running, for CPU seconds
  (``time.process_time`` deltas: this process's CPU, every thread).

Every frame lives on one thread-local stack. Entering a frame pauses the one below it
(its counter is closed and its clock stopped) and leaving resumes it, so counts are
disjoint: in-process, the owner's call into the transport runs the trainers' handlers
synchronously, and their work is theirs alone, never the owner's as well.

Under :data:`AUDIT` every block is counted (``flops``) and the cached estimate is kept
beside it (``estimated``): the tests use it to show, in one run, that the two agree.

What is counted: ``FlopCounterMode``'s matrix products and convolutions (plus ``aten.mv``),
forward and backward; element-wise work (activations, pooling, the noise, the optimizer)
is not. What it costs: a known block opens no frame; a party's handling of a message two
clock reads. Measured (training CPU seconds, metered against not): +13% for the smallest
preset (digits MLP at batch 32, 3 ms steps: about 0.1 ms a step); +6% for a 16-step CNN
run at batch 128, most of it the two steps counted under the counter, a one-off.
A checkpoint keeps each meter (:meth:`ComputeMeter.state`), so a rollback counts the
steps it redoes once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

#: Count every block and keep the cache's estimate beside it (tests and audits).
AUDIT = False
BUCKETS = ("train", "infer")


def _mv_flop(a_shape: Any, b_shape: Any, *args: Any, out_shape: Any = None, **kw: Any) -> int:
    """Matrix-vector product ``(m, k) @ (k,)``: ``2 m k`` FLOPs, as ``mm`` counts a column.

    ``FlopCounterMode`` has no formula for ``aten.mv``; the watermark regulariser's
    projection ``A w`` is one, and it is the trainer's work.
    """
    m, k = a_shape
    return 2 * m * k


def _addmv_flop(self_shape: Any, a_shape: Any, b_shape: Any, *args: Any, **kw: Any) -> int:
    return _mv_flop(a_shape, b_shape)


CUSTOM_FLOPS = {torch.ops.aten.mv: _mv_flop, torch.ops.aten.addmv: _addmv_flop}


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts matrix-vector products."""
    return FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS)


@dataclass
class _Frame:
    """One party running (``active``) or one block being counted, on the thread's stack."""

    meter: ComputeMeter
    counting: bool = False  # under a FlopCounterMode while on top of the stack
    flops: int = 0
    mode: FlopCounterMode | None = None
    cpu_start: float = 0.0

    def resume(self, now: float) -> None:
        self.cpu_start = now
        if self.counting:
            self.mode = flop_counter()
            self.mode.__enter__()

    def pause(self, now: float) -> None:
        self.meter.cpu_seconds += now - self.cpu_start
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.flops += self.mode.get_total_flops()
            self.mode = None


_local = threading.local()


def _stack() -> list[_Frame]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


@contextmanager
def _framed(frame: _Frame) -> Iterator[None]:
    """Pause the frame below, run ``frame``, resume the one below: one clock read a switch."""
    stack = _stack()
    now = time.process_time()
    if stack:
        stack[-1].pause(now)
    stack.append(frame)
    frame.resume(now)
    try:
        yield
    finally:
        now = time.process_time()
        frame.pause(now)
        stack.pop()
        if stack:
            stack[-1].resume(now)


@dataclass
class ComputeMeter:
    """One party's training and inference FLOPs and its CPU seconds."""

    flops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BUCKETS, 0))
    estimated: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BUCKETS, 0))
    cpu_seconds: float = 0.0
    counted_blocks: int = 0  # blocks run under the counter (the rest reused a count)
    _cache: dict[Hashable, int] = field(default_factory=dict)

    def _running(self) -> bool:
        """This party is on top of the stack, and no counter is open there."""
        stack = _stack()
        return bool(stack) and stack[-1].meter is self and not stack[-1].counting

    @contextmanager
    def active(self) -> Iterator[None]:
        """This party runs: its CPU seconds accrue, the party below on the stack pauses."""
        if self._running():  # already this party's time: no second frame
            yield
            return
        with _framed(_Frame(self)):
            yield

    @contextmanager
    def count(self, key: Hashable | None, bucket: str = "train") -> Iterator[None]:
        """The FLOPs of the block to ``bucket``; ``key`` fixes them (None: count each time).

        A known key costs no frame: the block's CPU time stays with the frame below (the
        party's ``active`` one), unless a counter is open there, which must not see it.
        """
        if bucket not in BUCKETS:
            raise ValueError(f"unknown compute bucket {bucket!r}: use one of {BUCKETS}")
        cache_key = (bucket, key)
        counting = key is None or AUDIT or cache_key not in self._cache
        stack = _stack()
        if not counting and not (stack and stack[-1].counting):
            yield
            self.flops[bucket] += self._cache[cache_key]
            self.estimated[bucket] += self._cache[cache_key]
            return
        frame = _Frame(self, counting)
        with _framed(frame):
            yield
        cached = frame.flops if key is None else self._cache.setdefault(cache_key, frame.flops)
        self.counted_blocks += counting
        self.flops[bucket] += frame.flops if counting else cached
        self.estimated[bucket] += cached

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (see :meth:`load_state`)."""
        return {"flops": dict(self.flops), "cpu_seconds": self.cpu_seconds}

    def load_state(self, state: Any) -> None:
        """Back to a checkpoint: the FLOPs of the steps that make the model, counted once
        (work rolled back and redone is not counted twice); CPU seconds never go down, and
        a restarted process goes on from the checkpoint's (its own spent, retries included).
        A missing or malformed state (an older checkpoint) leaves the meter as it is."""
        if not isinstance(state, dict) or not isinstance(state.get("flops"), dict):
            return
        flops = {b: state["flops"].get(b) for b in BUCKETS}
        seconds = state.get("cpu_seconds")
        if all(isinstance(v, int) and v >= 0 for v in flops.values()):
            self.flops = flops
            self.estimated = dict(flops)
        if isinstance(seconds, int | float) and seconds >= 0:
            self.cpu_seconds = max(self.cpu_seconds, float(seconds))

    def report(self) -> dict[str, Any]:
        """What a party tells the owner (its ``finish`` reply's ``compute`` field)."""
        return {
            "flops": self.flops["train"],
            "inference_flops": self.flops["infer"],
            "cpu_seconds": round(self.cpu_seconds, 6),
        }


def summary(reports: dict[str, dict[str, Any]], owner: str = "do") -> dict[str, Any]:
    """``results.json``'s ``compute``: per-party FLOPs and CPU seconds, the owner's share.

    ``owner_share`` = owner's training FLOPs / all parties' training FLOPs (None when no
    party counted any).
    """
    flops = {name: int(r["flops"]) for name, r in reports.items()}
    total = sum(flops.values())
    return {
        "flops": flops,
        "inference_flops": {name: int(r["inference_flops"]) for name, r in reports.items()},
        "cpu_seconds": {name: float(r["cpu_seconds"]) for name, r in reports.items()},
        "owner_share": flops.get(owner, 0) / total if total else None,
        "counted_with": "torch.utils.flop_counter.FlopCounterMode (+ aten.mv), one "
        "representative block per batch shape times the blocks run",
    }
