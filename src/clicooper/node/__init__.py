"""Trainer and verifier nodes: long-running processes that serve many sessions at once.

* :mod:`.state`: a node's sessions (in memory, or SQLite in WAL mode, which survives a
  restart) and their states;
* :mod:`.admission`: capacity and two-phase admission (reserve with a TTL, commit,
  abort; a reservation lapses when it is not committed in time);
* :mod:`.link`: one session's transport on a node (epochs without a server of its own);
* :mod:`.server`: :class:`~.server.Node`, the TLS server that routes every message by
  session id to that session's party, each bound to the certificates of its owner and
  chain;
* :mod:`.client`: the owner's side: admission on every node of a chain or on none, and
  the deployment of its session.
"""
