from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message

DESCRIPTOR: _descriptor.FileDescriptor

class Envelope(_message.Message):
    __slots__ = (
        "session_id",
        "seq",
        "step",
        "kind",
        "sender",
        "receiver",
        "meta_json",
        "payload",
        "chunk_index",
        "chunk_count",
    )
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_FIELD_NUMBER: _ClassVar[int]
    META_JSON_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    seq: int
    step: int
    kind: str
    sender: str
    receiver: str
    meta_json: str
    payload: bytes
    chunk_index: int
    chunk_count: int
    def __init__(
        self,
        session_id: str | None = ...,
        seq: int | None = ...,
        step: int | None = ...,
        kind: str | None = ...,
        sender: str | None = ...,
        receiver: str | None = ...,
        meta_json: str | None = ...,
        payload: bytes | None = ...,
        chunk_index: int | None = ...,
        chunk_count: int | None = ...,
    ) -> None: ...

class Ack(_message.Message):
    __slots__ = ("ok", "error")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    error: str
    def __init__(self, ok: bool | None = ..., error: str | None = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("path", "mode", "size", "data")
    PATH_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    path: str
    mode: int
    size: int
    data: bytes
    def __init__(
        self,
        path: str | None = ...,
        mode: int | None = ...,
        size: int | None = ...,
        data: bytes | None = ...,
    ) -> None: ...
