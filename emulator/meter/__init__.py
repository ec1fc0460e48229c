"""Emulated meters: the meter's side of the DL/T 698.45 link and the meter protocol.

``frame``, ``apdu`` and ``meter`` keep to the subset of Python MicroPython
runs (checked with pyright against micropython-unix-stubs, and run under real
MicroPython in tests/test_meter_micropython.py), so they can move onto a
meter's MCU; crypto, randomness and the clock come in through a ``Shim``.
``shim`` is the CPython platform (``cryptography``), and ``python -m
emulator.meter`` runs a bank of meters on a link. This package imports
nothing itself, so MicroPython can import its modules without CPython's.
"""
