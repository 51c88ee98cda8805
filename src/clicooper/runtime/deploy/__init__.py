"""Real deployment: one OS process per party over gRPC with mutual TLS (DESIGN §8).

One module per role:

* :mod:`.peers`: the **peers file** (TOML: every party's ``host:port`` and the
  session id), :class:`~.peers.Deployment` (the data owner's view of it) and
  :func:`~.peers.config_toml` (a run config as TOML);
* :mod:`.settings`: the settings a trainer or the verifier must share with the
  data owner, and the check that refuses a data owner whose settings differ;
* :mod:`.host`: :class:`~.host.PartyHost` is the trainer or verifier process: it
  builds its party when the data owner sends ``setup`` (a trainer builds its
  segment from its own config and the seed exactly as the in-process session
  does) and :func:`~.host.serve` runs it;
* :mod:`.remote`: :class:`~.remote.Remote` is the data owner's side: it brings
  every party into an epoch (at start and after a failure, see
  :mod:`clicooper.runtime.driver` for the resume protocol), sets them up, and
  shuts them down;
* :mod:`.launcher`: :func:`~.launcher.launch` brings up a one-session pool of its
  own on 127.0.0.1 (:class:`~.launcher.LaunchPool`: a node process per trainer and
  for the verifier, fresh certificates, each process only its own bundle), runs the
  data owner's session on it in this process exactly as ``run --pool`` does
  (:mod:`clicooper.node.pool`), and takes it down.

The transport that moves between *transport epochs* (session id
``<session>.<epoch>`` with fresh sequence counters on every link) is
:class:`clicooper.runtime.transport.epoch.EpochTransport`. A party process starts
in the ``<session>.join`` epoch and waits for the data owner to move it to the
current epoch.

Moving parties between epochs. The owner first asks every live party, in the
old epoch, to ``rekey`` to epoch e; then it switches itself and pings each
party in epoch e. A party that refuses the ping is in another session: it was
restarted (it is in ``join``), so the owner sends it ``rekey`` through a
one-off ``join`` client. A party that cannot be reached is waited for until
``resume_timeout``. Messages of an earlier epoch are refused by the session
check of the receiving transport, so nothing sent before a failure can be
delivered after it, and replays stay impossible after counters restart.
"""
