"""The node core: one terminal's data path, sans-I/O (events in, actions out).

Read top to bottom: ``events`` (what happens to a terminal), ``core.Node``
(what it decides), ``actions`` (what it asks the runtime to do). Each key
operation walks ``opstate``'s machine (``operation`` holds one in flight);
``endorser`` answers a peer's proposal (and never equivocates);
``reconcile`` squares the key store with the chain at boot; ``reading``
opens meter readings sealed under the current key; ``errors`` says whose
fault a misuse is. ``agent/terminal.py`` is the runtime that carries the
actions out against the chain, the key store and the peers.
"""
