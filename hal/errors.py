"""Whose fault an error is, said once for the whole firmware (h11's two exception types).

Every layer that refuses something says whose fault it was by deriving its
own error from one of these, so a caller can tell a bug to fix from input to
refuse without knowing the layer:

- ``LocalProtocolError``: our caller misused us (a value our own code built
  wrong, a call out of order, a limit its own sends exceeded). A bug on this
  terminal, raised at once; never answered to a peer.
- ``RemoteProtocolError``: the peer sent garbage (a frame, a peer's message,
  a record read back from flash that is not one). The DESIGN "Bad input" rule:
  refuse it with a reason, count it, carry on.

A layer's own class keeps its old bases beside these (``DecodeError`` is
still a ``ValueError``), so every existing ``except`` still catches it.
"""

from __future__ import annotations


class LocalProtocolError(Exception):
    """Our caller's fault: it asked for something this code cannot do; fix the caller."""


class RemoteProtocolError(ValueError):
    """The peer's fault: bytes from outside that are not a valid message; refuse and count them.

    A ValueError, as malformed input is everywhere in Python.
    """


__all__ = ["LocalProtocolError", "RemoteProtocolError"]
