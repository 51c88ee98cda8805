"""Runtime: how parties reach each other (transports) and how a session is driven."""
