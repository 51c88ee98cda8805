"""Deployment commands: ``certs init``, ``certs issue``, ``serve`` and ``launch`` (DESIGN §8, §11).

``launch`` takes exactly the flags of ``run`` (its signature is copied from
it) plus the gRPC timeouts, and runs the same session on a one-session pool of
its own (a node process per trainer and for the verifier). ``serve`` is one
party served by hand (deployments across machines); ``launch`` does not use it.
"""

from __future__ import annotations

import inspect
import logging
import signal
import threading
import typing
from pathlib import Path
from typing import Annotated, Any

import typer

from clicooper.cli import train as cli_train
from clicooper.cli.app import Opt, app, build_config, fail, interrupted
from clicooper.cli.progress import console
from clicooper.cli.runner import LAUNCH_TIMEOUTS
from clicooper.runtime.certs import create_certificates, issue_bundle, load_party_credentials
from clicooper.runtime.deploy.peers import read_peers

certs_app = typer.Typer(
    no_args_is_help=True, help="Session certificates for mutual TLS between parties."
)
app.add_typer(certs_app, name="certs")


@certs_app.command("init")
def certs_init(
    parties: Annotated[str, Opt(help="comma-separated party names, e.g. do,t1,t2,verifier")],
    out: Annotated[Path, Opt(help="directory for OUT/ca (the CA) and one OUT/<party> bundle each")],
    valid_days: Annotated[int, Opt(help="certificate lifetime in days")] = 30,
    overwrite: Annotated[bool, Opt(help="replace an existing CA (invalidates its certs)")] = False,
) -> None:
    """Create a session CA (OUT/ca) and one bundle per party (OUT/<party>: key, cert, CA cert).

    Give each machine only its party's bundle; ca.key stays with the operator.
    """

    names = [p.strip() for p in parties.split(",") if p.strip()]
    try:
        create_certificates(names, out, valid_days, overwrite=overwrite)
    except (ValueError, FileExistsError, OSError) as exc:
        fail(str(exc).splitlines()[0])
    console.print(f"CA in {out / 'ca'} (ca.key stays with you, offline); one bundle per party:")
    for name in names:
        console.print(f"  {name}: {out / name}  (copy to {name}'s machine only)")


@certs_app.command("issue")
def certs_issue(
    ca: Annotated[Path, Opt(help="the CA folder (OUT/ca of `certs init`: ca.key, ca.pem)")],
    party: Annotated[str, Opt(help="name of the party to add, e.g. t3")],
    out: Annotated[Path, Opt(help="where its bundle goes (as OUT/<party>)")],
    valid_days: Annotated[int, Opt(help="certificate lifetime in days (at most the CA's)")] = 30,
    overwrite: Annotated[bool, Opt(help="replace the party's existing bundle")] = False,
) -> None:
    """Add a party to a session: a bundle for it, signed by the existing CA."""

    try:
        bundle = issue_bundle(ca, party, out, valid_days, overwrite=overwrite)
    except (ValueError, FileExistsError, OSError) as exc:
        fail(str(exc).splitlines()[0])
    console.print(f"  {party}: {bundle}  (copy to {party}'s machine only)")


@app.command()
def serve(
    role: Annotated[str, typer.Argument(help="trainer or verifier")],
    config: Annotated[Path, Opt(help="TOML config: the same as the data owner's")],
    listen: Annotated[str, Opt(help="HOST:PORT this party listens on")],
    certs: Annotated[Path, Opt(help="this party's own bundle (OUT/<name> of `certs init`)")],
    peers: Annotated[Path, Opt(help="peers file (TOML): session id and every party's address")],
    name: Annotated[str | None, Opt(help="party name: t1 .. tn (trainers)")] = None,
    out: Annotated[Path, Opt(help="this party's directory (segments, keys, checkpoints)")] = Path(
        "runs/latest"
    ),
    send_timeout: Annotated[float, Opt(help="seconds one delivery may take")] = 30.0,
    device: Annotated[
        str | None, Opt(help="a trainer's device: auto, cpu, cuda[:N], mps (default: config)")
    ] = None,
) -> None:
    """Run one party (a trainer or the verifier) until the data owner shuts it down."""
    from clicooper.runtime.deploy.host import PartyHost
    from clicooper.runtime.deploy.host import serve as serve_party
    from clicooper.runtime.transport.epoch import EpochTransport

    if role not in ("trainer", "verifier"):
        fail(f"unknown role {role!r}: serve trainer or verifier")
    name = name or ("verifier" if role == "verifier" else None)
    if name is None:
        fail("a trainer needs --name t1 .. tn")
    cfg = build_config(config)
    if device is not None and role == "trainer":  # its own setting wins over the config's
        cfg = build_config(config, device=device, devices={**cfg.devices, name: device})
    try:
        load_party_credentials(certs, name)  # its own bundle only: refused before anything starts
        session, addresses = read_peers(peers)
        if addresses.get(name) != listen:
            addresses = {**addresses, name: listen}
        host = PartyHost(role, name, cfg, out)
        transport = EpochTransport(name, addresses, certs, session, send_timeout, limits=cfg.limits)
    except (ValueError, OSError) as exc:
        fail(str(exc).splitlines()[0])
    import torch

    torch.set_num_threads(cfg.threads)
    # The first optimizer imports torch's compiler stack (seconds): do it before the owner waits.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve_party(host, transport, stop)
    except OSError as exc:  # e.g. the port is taken
        fail(str(exc).splitlines()[0])
    except KeyboardInterrupt:
        interrupted("interrupted")


def _launch(
    send_timeout: float = 30.0, step_timeout: float = 120.0, resume_timeout: float = 120.0, **flags
) -> None:
    token = LAUNCH_TIMEOUTS.set(
        {
            "send_timeout": send_timeout,
            "step_timeout": step_timeout,
            "resume_timeout": resume_timeout,
        }
    )
    transport = None if flags.get("resume") else "grpc"  # a resumed run has its own
    try:
        cli_train.run(**flags, transport=transport, peers=None, certs=None, pool=None)
    except KeyboardInterrupt:
        interrupted("interrupted: every node process was stopped")
    finally:
        LAUNCH_TIMEOUTS.reset(token)


_LAUNCH_RESUME = Annotated[
    Path | None,
    Opt(
        help="continue the unfinished `clicooper launch` run in DIR (its own settings) from "
        "its last checkpoint, after its launch process died"
    ),
]


def _launch_signature() -> inspect.Signature:
    """``run``'s parameters without the deployment ones (``resume`` with its launch help),
    plus the three timeouts."""
    hints = typing.get_type_hints(cli_train.run, include_extras=True)
    hints["resume"] = _LAUNCH_RESUME
    params = [
        p.replace(annotation=hints[p.name])
        for p in inspect.signature(cli_train.run).parameters.values()
        if p.name not in ("transport", "peers", "certs", "pool")
    ]
    for name, default, what in (
        ("send_timeout", 30.0, "seconds one delivery may take"),
        ("step_timeout", 120.0, "seconds the data owner waits for an answer"),
        ("resume_timeout", 120.0, "seconds to wait for a restarted node"),
    ):
        annotation = Annotated[float, Opt(help=what)]
        params.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
            )
        )
    return inspect.Signature(params)


def launch(**kwargs: Any) -> None:
    """Run the session on a one-session pool of its own: a node per trainer and the verifier."""
    _launch(**kwargs)


launch.__signature__ = _launch_signature()  # type: ignore[attr-defined]
launch.__annotations__ = {p.name: p.annotation for p in launch.__signature__.parameters.values()}
app.command()(launch)
