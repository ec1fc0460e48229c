"""Whose fault it is, as h11 says it: our caller's (local) or a peer's (remote).

``LocalProtocolError``: the runtime misused the node core (an event it
cannot be given in this state, an action result for nothing asked). That is
a bug in the caller, raised at once. ``RemoteProtocolError``: a peer or a
meter sent something that is not a message; the core answers such input
with a refusal and a reason instead of raising, so this type marks what a
decoder rejects before the core sees it.
"""

from __future__ import annotations


class LocalProtocolError(Exception):
    """The node core was driven wrongly by its own runtime."""


class RemoteProtocolError(ValueError):
    """A peer or a meter sent garbage."""
