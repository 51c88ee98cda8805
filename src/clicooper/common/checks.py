"""Checks on what a peer sends: who may send it, and the type and range of each field.

Every value that crosses a party boundary is the peer's claim. A party checks the
sender's role before it acts (:func:`require_sender`) and each field before it uses
one (:func:`meta_int` and friends), so a malformed message is a one-line
:class:`~clicooper.common.messages.ProtocolError` naming the field, never a
KeyError or a TypeError deep in the code that uses it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from typing import Any

from clicooper.common.messages import Message, ProtocolError

#: The largest step or stage a peer may name: checkpoint file names carry at most 12 digits.
MAX_STEP = 10**12 - 1
_HEX = re.compile(r"(?:[0-9a-f]{2})+")


class Unauthorized(ProtocolError):
    """A message from a party whose role does not entitle it to send it.

    Raised before the receiver changes any state, so the receiver stays usable.
    """


def require_sender(msg: Message, allowed: Collection[str], what: str, receiver: str) -> None:
    """:class:`Unauthorized` unless ``msg`` comes from one of ``allowed``."""
    if msg.sender not in allowed:
        who = " or ".join(sorted(allowed)) or "nobody"
        raise Unauthorized(f"{receiver} refused {what} from {msg.sender}: only {who} may send it")


def _field(msg: Message, key: str) -> Any:
    if key not in msg.meta:
        raise ProtocolError(f"{msg.kind} from {msg.sender} has no field {key!r}")
    return msg.meta[key]


def _bad(msg: Message, key: str, value: Any, want: str) -> ProtocolError:
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return ProtocolError(f"{msg.kind} from {msg.sender}: field {key!r} must be {want}, got {shown}")


def as_int(msg: Message, key: str, value: Any, lo: int = 0, hi: int = MAX_STEP) -> int:
    """``value`` (field ``key`` of ``msg``) as an int in ``[lo, hi]`` (bools are not ints)."""
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _bad(msg, key, value, f"an integer in [{lo}, {hi}]")
    return value


def meta_int(msg: Message, key: str, lo: int = 0, hi: int = MAX_STEP) -> int:
    """Field ``key`` of ``msg``: an int in ``[lo, hi]``."""
    return as_int(msg, key, _field(msg, key), lo, hi)


def meta_float(msg: Message, key: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    """Field ``key`` of ``msg``: a finite number in ``[lo, hi]``."""
    value = _field(msg, key)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not lo <= value <= hi:
        raise _bad(msg, key, value, f"a finite number in [{lo}, {hi}]")
    return float(value)


def meta_hex(msg: Message, key: str, n_bytes: int) -> str:
    """Field ``key`` of ``msg``: ``n_bytes`` bytes as lowercase hex."""
    value = _field(msg, key)
    if not isinstance(value, str) or len(value) != 2 * n_bytes or not _HEX.fullmatch(value):
        raise _bad(msg, key, value, f"{n_bytes} bytes of lowercase hex")
    return value


def meta_ints(msg: Message, key: str, max_len: int) -> list[int]:
    """Field ``key`` of ``msg``: a list of at most ``max_len`` ints in ``[0, MAX_STEP]``."""
    value = _field(msg, key)
    if not isinstance(value, list) or len(value) > max_len:
        raise _bad(msg, key, value, f"a list of at most {max_len} steps")
    return [as_int(msg, key, v) for v in value]


def meta_dict(msg: Message, key: str) -> dict[str, Any]:
    """Field ``key`` of ``msg``: a JSON object."""
    value = _field(msg, key)
    if not isinstance(value, dict):
        raise _bad(msg, key, value, "an object")
    return value
