"""Transports behind one interface, picked by name.

``inprocess``: every party in one process (the embedded default).
``grpc``: one process per party over gRPC with mutual TLS.
"""

from clicooper.runtime.transport.base import Party, Transport
from clicooper.runtime.transport.grpc import GrpcTransport
from clicooper.runtime.transport.inprocess import InProcessTransport

TRANSPORTS: dict[str, type[Transport]] = {"inprocess": InProcessTransport, "grpc": GrpcTransport}

__all__ = ["TRANSPORTS", "GrpcTransport", "InProcessTransport", "Party", "Transport"]
