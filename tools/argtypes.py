"""argparse value types shared by the desk commands: a bad number is one clear line."""

from __future__ import annotations

import argparse

from hal.require import require_int, require_real

# argparse puts "argument --name:" in front of the message, so the field is named.
_VALUE = "value"


def positive_int(text: str) -> int:
    return require_int(_VALUE, int(text), min=1, error=argparse.ArgumentTypeError)


def nonneg_int(text: str) -> int:
    return require_int(_VALUE, int(text), min=0, error=argparse.ArgumentTypeError)


def positive_float(text: str) -> float:
    return require_real(_VALUE, float(text), above=0.0, error=argparse.ArgumentTypeError)


def nonneg_float(text: str) -> float:
    return require_real(_VALUE, float(text), min=0.0, error=argparse.ArgumentTypeError)
