"""How many micro-batches the data owner's next step is cut into.

Pipelining (``micro_batches`` M > 1) overlaps the owner's head with the chain's work
on the micro-batch before, but it multiplies the chain's messages by M. It pays only
where there is work to overlap and cores to run it at once: with a heavy owner head
and a light chain (the ``cnn`` preset), or on a machine already busy, the extra
messages cost more than the overlap saves (benchmarks/transport.py).

So, where parties do run at once (a networked transport), :class:`MicroBatches` measures
instead of guessing: it alternates blocks of steps at M and at 1 micro-batch, compares
the median step times, and keeps the faster count until the next probe (the wait doubles
each time a probe confirms the count before it, up to ``MAX_PERIOD_STEPS``: on a steady
machine the probes' slower steps cost little). Pipelining is
kept only when it is at least ``margin`` faster, so it is never slower than none (up to
the noise of the probe). Every count is the same maths (the trainers weight and add
their micro-batches' gradients, the owner draws one noise for the whole batch), so the
choice changes the speed, never the update beyond floating-point rounding.

Fixed counts (every step M): the in-process transport (one thread: nothing overlaps,
and its runs are reproducible to the bit) and runs that record rows for the evaluation,
which joins each recorded ``(step, micro)`` row to the owner's log by the configured split.
"""

from __future__ import annotations

import logging
import statistics
from collections import Counter, deque

log = logging.getLogger(__name__)

#: Steps at M micro-batches before the first probe (allocations, connection warm-up).
WARMUP_STEPS = 2
#: Steps of one probe block, and blocks per count in one probe.
BLOCK_STEPS = 3
PROBE_ROUNDS = 2
#: Steps between probes (the machine's load, hence the best count, may change); doubled
#: after each probe that chose the same count as the one before, up to the maximum.
PERIOD_STEPS = 150
MAX_PERIOD_STEPS = 1200
#: How much faster pipelining must be to be kept (fewer messages win a tie).
MARGIN = 0.03


class MicroBatches:
    """The micro-batch count of each step: ``configured`` or, when ``adaptive``, the
    faster of ``configured`` and 1 as measured (see the module docstring)."""

    def __init__(self, configured: int, adaptive: bool) -> None:
        if configured < 1:
            raise ValueError("micro_batches must be at least 1")
        self.configured = configured
        self.adaptive = adaptive and configured > 1
        self.chosen = configured
        self._plan: deque[tuple[int, bool]] = deque()  # (count, timed) of the coming steps
        self._times: dict[int, list[float]] = {}
        self._left = 0  # steps at ``chosen`` before the next probe
        self._period = PERIOD_STEPS
        self._probed: int | None = None  # the count the last probe chose
        self._current: tuple[int, bool] | None = None
        self.used: Counter[int] = Counter()  # steps begun at each count
        if self.adaptive:
            self._plan.extend([(configured, False)] * WARMUP_STEPS)
            self._plan_probe()

    def next(self) -> int:
        """The count of the step about to start."""
        count = self._next()
        self.used[count] += 1
        return count

    def _next(self) -> int:
        if not self.adaptive:
            return self.configured
        if not self._plan and self._left <= 0:
            self._plan_probe()
        if self._plan:
            self._current = self._plan.popleft()
        else:
            self._current = (self.chosen, False)
            self._left -= 1
        return self._current[0]

    def done(self, seconds: float) -> None:
        """The step begun by the last :meth:`next` took ``seconds`` (wall clock)."""
        current, self._current = self._current, None
        if current is None or not current[1]:
            return
        self._times.setdefault(current[0], []).append(seconds)
        if not any(timed for _, timed in self._plan):  # the probe's last timed step
            self._choose()

    def _plan_probe(self) -> None:
        self._times = {}
        for _ in range(PROBE_ROUNDS):
            for count in (self.configured, 1):
                self._plan.extend([(count, True)] * BLOCK_STEPS)

    def _choose(self) -> None:
        piped = statistics.median(self._times.get(self.configured, [float("inf")]))
        single = statistics.median(self._times.get(1, [float("inf")]))
        self.chosen = self.configured if piped < (1 - MARGIN) * single else 1
        confirmed = self.chosen == self._probed
        self._period = min(2 * self._period, MAX_PERIOD_STEPS) if confirmed else PERIOD_STEPS
        self._probed, self._left = self.chosen, self._period
        log.info(
            "do: a step took %.1f ms with %d micro-batches, %.1f ms with 1: %d for %d steps",
            1000 * piped,
            self.configured,
            1000 * single,
            self.chosen,
            self._period,
        )
