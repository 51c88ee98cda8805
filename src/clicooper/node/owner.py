"""The owner's side of a pool: one owner's session on a pool's nodes (``run --pool``).

:func:`pool_run` runs one owner's session on a pool: the owner gets a certificate of its
own from the pool's CA (in the run directory, ``certs/<owner>``) unless it brings one,
the chain is the least busy trainers (:func:`~clicooper.node.pool.pick_chain`), and
:func:`run_on_chain` admits the session on every node of the chain or on none, records
it in ``deploy/pool.json`` and runs it; once it is over each node sends its ledger, segments,
party directories and checkpoints into the run directory (:mod:`.artifacts`).
:func:`pool_resume` continues such a run after its owner process died.
``clicooper launch`` is :func:`run_on_chain` on a one-session pool of its own
(:class:`clicooper.runtime.deploy.launcher.LaunchPool`).
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

from clicooper.common.files import ensure_dir, private_dir, write_file
from clicooper.config import RunConfig
from clicooper.node.pool import Pool, PoolNode, pick_chain
from clicooper.node.processes import free_ports
from clicooper.runtime.certs import issue_bundle, load_party_credentials
from clicooper.runtime.rundirs import RunDir, prepare_launch_dir

# torch and gRPC load in the functions that use them (the session, the admission client)


def pool_run(
    pool_file: Path,
    cfg: RunConfig,
    out_dir: Path | str,
    overwrite: bool = False,
    owner_certs: Path | None = None,
    **run_args: Any,
) -> Any:
    """One owner's session on the pool; the run directory is a launched run's.

    ``owner_certs``: the owner's own bundle, issued by the pool's operator (``certs issue
    --ca POOL/certs/ca``); the owner's name is its folder's. Without it a bundle is issued
    here from the pool's CA key, which only an owner that may read that key can do (a
    pool on one machine under one user): each run then has an owner name of its own.
    """
    from clicooper.runtime.session import resolve_run

    pool = Pool.load(pool_file)
    out_dir = Path(out_dir)
    # the nodes are admitted with the resolved release, model and lr (party_settings)
    cfg, run_args["data"] = resolve_run(cfg, run_args.get("data"))
    cfg = cfg.model_copy(update={"transport": "grpc"})
    chain = pick_chain(pool, cfg)
    if owner_certs is not None:  # refused before anything is written: not its own bundle
        load_party_credentials(Path(owner_certs), Path(owner_certs).name)
    prepare_launch_dir(out_dir, overwrite)
    if owner_certs is None:
        name = f"owner-{secrets.token_hex(6)}"
        owner_certs = issue_bundle(pool.ca, name, private_dir(RunDir(out_dir).certs))
    return run_on_chain(pool, chain, cfg, out_dir, Path(owner_certs), **run_args)


def run_on_chain(
    pool: Pool,
    chain: dict[str, PoolNode],
    cfg: RunConfig,
    out_dir: Path,
    owner_certs: Path,
    *,
    hooks: dict[str, Any] | None = None,
    abort_on_failure: bool = True,
    **run_args: Any,
) -> Any:
    """Admit a new session of the owner of ``owner_certs`` (its name is the folder's) on
    every node of ``chain`` (party -> node) or on none, record it in the run directory
    (``deploy/pool.json``, what ``--resume`` continues) and run it.

    ``cfg`` is resolved (:func:`~clicooper.runtime.session.resolve_run`) and ``out_dir``
    prepared; ``hooks``: more :class:`~clicooper.runtime.deploy.peers.Deployment` fields
    (timeouts, ``supervise``, ``watch``); ``abort_on_failure``: see :func:`_run_session`.
    """
    from clicooper.node.client import NodeAddress, Owner, admit
    from clicooper.runtime.deploy.settings import party_settings

    name = Path(owner_certs).name
    owner = Owner(name, Path(owner_certs), f"127.0.0.1:{free_ports(1)[0]}")
    session = secrets.token_hex(8)
    addresses = {party: NodeAddress(n.name, n.address) for party, n in chain.items()}
    settings = {p: party_settings(cfg, "verifier" if p == "verifier" else "trainer") for p in chain}
    admit(owner, session, addresses, settings)
    mark = {
        "pool": str(pool.file.resolve()),
        "session": session,
        "owner": name,
        "owner_certs": str(Path(owner_certs).resolve()),
        "owner_address": owner.address,
        "chain": {p: {"name": n.name, "address": n.address, "state": str(n.state)}
                  for p, n in chain.items()},
    }  # fmt: skip
    run_dir = RunDir(out_dir)
    ensure_dir(run_dir.deploy)
    write_file(run_dir.pool_mark, json.dumps(mark, indent=2).encode(), 0o644)
    return _run_session(cfg, out_dir, mark, False, hooks, abort_on_failure, **run_args)


def pool_resume(
    cfg: RunConfig,
    out_dir: Path | str,
    *,
    hooks: dict[str, Any] | None = None,
    abort_on_failure: bool = True,
    **run_args: Any,
) -> Any:
    """Continue the ``run --pool`` run in ``out_dir`` whose owner process died, on its
    session's nodes: each serves the session again from its checkpoints (``rejoin``), and
    the run goes on from the last step every party checkpointed."""
    from clicooper.common.messages import ProtocolError
    from clicooper.node.client import NodeAddress, Owner

    out_dir = Path(out_dir)
    mark = session_mark(out_dir)
    owner = Owner(mark["owner"], Path(mark["owner_certs"]), mark["owner_address"])
    for party, node in mark["chain"].items():
        try:
            owner.request(NodeAddress(node["name"], node["address"]), "rejoin", 60.0,
                          session=mark["session"])  # fmt: skip
        except (ProtocolError, ConnectionError) as exc:
            raise ValueError(f"{out_dir} cannot be resumed: {party}: {exc}") from None
    run_args.pop("overwrite", None)
    return _run_session(cfg, out_dir, mark, True, hooks, abort_on_failure, **run_args)


def session_mark(out_dir: Path) -> dict[str, Any]:
    """What ``deploy/pool.json`` of a run on nodes records: session, owner and chain."""
    path = RunDir(out_dir).pool_mark
    try:
        mark = json.loads(path.read_text())
        if not isinstance(mark, dict) or not isinstance(mark.get("chain"), dict):
            raise ValueError("no chain")
        return mark
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a session of a pool: {exc}") from None


def _run_session(
    cfg: RunConfig,
    out_dir: Path,
    mark: dict[str, Any],
    resume: bool,
    hooks: dict[str, Any] | None,
    abort_on_failure: bool,
    **run_args: Any,
) -> Any:
    """Run (or resume) the admitted session of ``mark`` and record the pool in results.json.

    On a failure (bad data, a failed chain, Ctrl-C) the nodes are told to let the session
    go, unless ``abort_on_failure`` is false (a launch's own pool: its nodes stop, and the
    session stays active on their state for ``launch --resume``).
    """
    from clicooper.node.artifacts import remote_collector
    from clicooper.node.client import NodeAddress, Owner, abort, node_deployment
    from clicooper.runtime.session import run

    session = mark["session"]
    owner = Owner(mark["owner"], Path(mark["owner_certs"]), mark["owner_address"])
    addresses = {p: NodeAddress(n["name"], n["address"]) for p, n in mark["chain"].items()}
    deployment = node_deployment(
        owner,
        session,
        addresses,
        collect=remote_collector(owner, addresses, session),
        **(hooks or {}),
    )
    try:
        result = run(cfg, out_dir, deployment=deployment, resume=resume, **run_args)
    except BaseException:
        if abort_on_failure:
            abort(owner, session, addresses.values())
        raise
    result.results["transport"]["pool"] = {
        "session": session,
        "owner": owner.name,
        "chain": {party: n.name for party, n in addresses.items()},
    }
    RunDir(out_dir).results.write_text(json.dumps(result.results, indent=2))
    return result
