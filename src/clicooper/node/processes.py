"""Node processes on this machine: free loopback ports, and starting a process of its own."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

#: The source tree this package is imported from (``src``), put on each child's PYTHONPATH.
_SOURCE_ROOT = Path(__file__).resolve().parents[2]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (bound, read, released)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own process group (stopped as a whole), output to ``log_path``,
    with this source tree first on its PYTHONPATH."""
    env = dict(os.environ)
    src = str(_SOURCE_ROOT)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
