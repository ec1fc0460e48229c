"""Whose fault it is, as h11 says it: our caller's (local) or a peer's (remote).

``LocalProtocolError``: the runtime misused the node core (an event it
cannot be given in this state, an action result for nothing asked). That is
a bug in the caller, raised at once. ``RemoteProtocolError``: a peer or a
meter sent something that is not a message; the core answers such input
with a refusal and a reason instead of raising, so this type marks what a
decoder rejects before the core sees it.

Both are the firmware-wide types of ``hal/errors.py``, re-exported here so
the node's callers import them beside the node: one ``except
LocalProtocolError`` catches the node core's, a link session's and a
codec's alike.
"""

from __future__ import annotations

from hal.errors import LocalProtocolError, RemoteProtocolError

__all__ = ["LocalProtocolError", "RemoteProtocolError"]
