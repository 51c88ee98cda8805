"""Serialisation of messages: tensors as safetensors bytes, metadata as JSON.

safetensors stores raw little-endian buffers plus a JSON header, so decoding
cannot execute code. Decoding also rejects non-finite values, because a NaN
or Inf from a peer would silently poison every later step.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from clicooper.common.messages import Kind, Message, ProtocolError

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def encode_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> bytes:
    """safetensors bytes of ``tensors`` (contiguous CPU copies)."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return st_save(clean, metadata=meta)


def decode_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """Tensors from safetensors bytes; :class:`ProtocolError` on anything malformed."""
    try:
        tensors = st_load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
        raise ProtocolError(f"malformed safetensors payload: {exc}") from None
    for name, value in tensors.items():
        if value.dtype in _FLOAT_DTYPES and not _all_finite(value):
            raise ProtocolError(f"tensor {name!r} holds NaN or Inf values")
    return tensors


def _all_finite(value: torch.Tensor) -> bool:
    """No NaN or Inf in ``value``. A finite sum proves it (NaN and Inf propagate through
    a sum) at a tenth of the cost of ``isfinite``; a sum that overflowed is checked again."""
    return bool(value.sum(dtype=torch.float64).isfinite()) or bool(torch.isfinite(value).all())


def encode_message(msg: Message) -> bytes:
    """A whole message as one safetensors blob; the header carries kind, route and meta."""
    header = {
        "kind": str(msg.kind),
        "step": str(msg.step),
        "sender": msg.sender,
        "receiver": msg.receiver,
        "meta": json.dumps(msg.meta, sort_keys=True),
    }
    return encode_tensors(msg.tensors, header)


def decode_message(data: bytes) -> Message:
    """Inverse of :func:`encode_message`, validating every header field."""
    tensors = decode_tensors(data)
    try:
        header = _read_header(data)
        return Message(
            kind=Kind(header["kind"]),
            step=int(header["step"]),
            sender=str(header["sender"]),
            receiver=str(header["receiver"]),
            tensors=tensors,
            meta=_json_object(header["meta"]),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ProtocolError(f"malformed message header: {exc}") from None


def _read_header(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (the format's documented header)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(bytes(data[8 : 8 + size]))
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        raise ValueError("no metadata")
    return meta


def _json_object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("meta is not a JSON object")
    return value
