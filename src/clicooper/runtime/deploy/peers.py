"""The peers file (every party's ``host:port`` and the session id) and the run config as TOML."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clicooper.config import RunConfig
from clicooper.runtime.certs import load_party_credentials, validate_party_name


@dataclass(frozen=True)
class Deployment:
    """Where the parties listen, the session id, the certificates and the timeouts.

    ``send_timeout`` bounds one delivery; ``step_timeout`` is the longest the
    data owner waits for an answer before it treats a party as failed;
    ``resume_timeout`` is how long it waits for a lost party to come back.
    ``supervise`` is called while waiting (``launch`` starts dead nodes again there).
    On nodes (:mod:`clicooper.node`) the parties are not named after their certificates:
    ``identity`` is the owner's certificate name and ``identities`` each party's; and
    ``collect`` brings the parties' artifacts into the run directory once they are done.
    """

    peers: dict[str, str]
    session: str
    certs_dir: Path
    send_timeout: float = 30.0
    step_timeout: float = 120.0
    resume_timeout: float = 300.0
    supervise: Callable[[], None] | None = None
    watch: Callable[[], None] | None = None
    identity: str | None = None
    identities: dict[str, str] | None = None
    collect: Callable[[Path], None] | None = None

    @classmethod
    def from_file(cls, peers_file: Path, certs_dir: Path, **timeouts: float) -> Deployment:
        """The data owner's deployment; ``certs_dir`` must be its own bundle (``OUT/do``)."""
        session, peers = read_peers(peers_file)
        load_party_credentials(Path(certs_dir), "do")  # refuses the CA key or another's key
        return cls(peers, session, Path(certs_dir), **timeouts)


def read_peers(path: Path) -> tuple[str, dict[str, str]]:
    """``(session, {party: "host:port"})`` from a peers file; ValueError saying what is wrong."""
    try:
        doc = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"peers file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"peers file {path} is not valid TOML: {exc}") from None
    session, parties = doc.get("session"), doc.get("parties")
    if not isinstance(session, str) or not session or "." in session:
        raise ValueError(f'peers file {path} needs session = "<id>" (no dots)')
    if not isinstance(parties, dict) or not parties:
        raise ValueError(f'peers file {path} needs a [parties] table: t1 = "host:port", ...')
    for name, address in parties.items():
        validate_party_name(name)
        if not isinstance(address, str) or ":" not in address:
            raise ValueError(f"peers file {path}: address of {name} must be 'host:port'")
    return session, dict(parties)


def peers_timeouts(path: Path) -> dict[str, float]:
    """The optional ``[timeouts]`` table of a peers file: send, step, resume (seconds)."""
    table = tomllib.loads(Path(path).read_text()).get("timeouts", {})
    names = {"send": "send_timeout", "step": "step_timeout", "resume": "resume_timeout"}
    unknown = set(table) - set(names)
    if unknown or not all(isinstance(v, int | float) and v > 0 for v in table.values()):
        raise ValueError(f"peers file {path}: [timeouts] takes positive send, step, resume")
    return {names[k]: float(v) for k, v in table.items()}


def write_peers(
    path: Path, session: str, peers: dict[str, str], timeouts: dict[str, float] | None = None
) -> None:
    lines = [f"session = {json.dumps(session)}", "", "[parties]"]
    lines += [f"{name} = {json.dumps(address)}" for name, address in peers.items()]
    if timeouts:
        lines += ["", "[timeouts]", *(f"{k} = {float(v)}" for k, v in timeouts.items())]
    path.write_text("\n".join(lines) + "\n")


def config_toml(cfg: RunConfig) -> str:
    """``cfg`` as TOML that :meth:`RunConfig.load` reads back to an equal config."""
    return "\n\n".join(_toml_tables(cfg.model_dump(mode="json"), "")) + "\n"


def _toml_tables(doc: dict[str, Any], name: str) -> list[str]:
    """The ``[name]`` table of ``doc``'s scalars, then one table per nested dict (dotted)."""
    body = [
        f"{k} = {_toml(v)}" for k, v in doc.items() if v is not None and not isinstance(v, dict)
    ]
    tables = ["\n".join([f"[{name}]", *body] if name else body)]
    for key, value in doc.items():
        if isinstance(value, dict):
            tables += _toml_tables(value, f"{name}.{key}" if name else key)
    return tables


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))
