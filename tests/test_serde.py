import pytest
import torch

from clicooper.common.messages import Kind, Message, ProtocolError
from clicooper.common.serde import decode_message, decode_tensors, encode_message, encode_tensors


def test_message_round_trip_keeps_values_dtypes_and_meta():
    msg = Message(
        Kind.FORWARD,
        7,
        "do",
        "t1",
        {"x": torch.randn(3, 4), "ids": torch.arange(3)},
        {"micro": 1, "w": 0.5},
    )
    back = decode_message(encode_message(msg))
    assert (back.kind, back.step, back.sender, back.receiver) == (Kind.FORWARD, 7, "do", "t1")
    assert torch.equal(back.tensors["x"], msg.tensors["x"])
    assert back.tensors["ids"].dtype == torch.int64
    assert back.meta == {"micro": 1, "w": 0.5}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_tensors_are_rejected(bad):
    data = encode_tensors({"x": torch.tensor([1.0, bad])})
    with pytest.raises(ProtocolError, match="NaN or Inf"):
        decode_tensors(data)


@pytest.mark.parametrize("blob", [b"", b"\x00" * 7, b"garbage" * 10, b"\xff" * 8 + b"{}"])
def test_malformed_bytes_are_a_protocol_error(blob):
    with pytest.raises(ProtocolError):
        decode_message(blob)


def test_missing_header_fields_are_rejected():
    data = encode_tensors({"x": torch.zeros(1)}, {"kind": "forward"})
    with pytest.raises(ProtocolError, match="header"):
        decode_message(data)


def test_unknown_kind_is_rejected():
    data = encode_tensors(
        {}, {"kind": "exec", "step": "1", "sender": "do", "receiver": "t1", "meta": "{}"}
    )
    with pytest.raises(ProtocolError):
        decode_message(data)


def test_missing_tensor_names_the_tensor():
    msg = Message(Kind.FORWARD, 1, "do", "t1")
    with pytest.raises(ProtocolError, match="'x'"):
        msg.tensor("x")


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(128, 64),
        torch.randn(3, 4, 5).to(torch.bfloat16),
        torch.randn(7).to(torch.float16),
        torch.randn(5, 2, dtype=torch.float64),
        torch.arange(40, dtype=torch.int64).reshape(4, 10),
        torch.randn(8, 6).t(),  # non-contiguous: encoded as a contiguous copy
        torch.zeros(0, 3),
        torch.tensor(2.5),
    ],
)
def test_one_tensor_encoding_is_byte_identical_to_safetensors_save(tensor):
    """The fast path for single-tensor messages writes exactly what safetensors.torch.save does."""
    from safetensors.torch import save

    meta = {"kind": "forward"}
    expected = save({"x": tensor.contiguous()}, metadata=meta)
    assert encode_tensors({"x": tensor}, meta) == expected
    assert torch.equal(decode_tensors(expected)["x"], tensor)
