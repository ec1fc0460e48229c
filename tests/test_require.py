"""The shared number check (hal/require.py): what passes, and whose error the rest raises."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest

from hal.require import require_int, require_real


class FieldError(ValueError):
    """Stands for a caller's own error type (NetworkError, SimError, ...)."""


@pytest.mark.parametrize("value", [1, 255, np.int64(7), np.uint8(3)])
def test_integers_in_range_pass_as_int(value: object) -> None:
    n = require_int("count", value, min=1, max=255)
    assert n == value and type(n) is int


@pytest.mark.parametrize("value", [True, False, 2.0, 2.5, "2", None, math.nan])
def test_what_is_not_an_integer_is_refused_with_the_type_error(value: object) -> None:
    with pytest.raises(TypeError, match=r"^count must be an integer >= 0, got "):
        require_int("count", value, min=0, error=FieldError, type_error=TypeError)
    with pytest.raises(FieldError, match="count"):
        require_int("count", value, min=0, error=FieldError)


@pytest.mark.parametrize("value, rule", [(0, "an integer in 1..8"), (9, "an integer in 1..8")])
def test_an_integer_out_of_range_names_field_rule_and_value(value: int, rule: str) -> None:
    with pytest.raises(FieldError, match=f"^hops must be {rule}, got {value}$"):
        require_int("hops", value, min=1, max=8, error=FieldError, type_error=TypeError)


def test_an_integer_bound_on_one_side_only() -> None:
    assert require_int("n", -5) == -5
    with pytest.raises(ValueError, match="n must be an integer <= 3"):
        require_int("n", 4, max=3)


@pytest.mark.parametrize("value", [1, 0.5, np.float32(0.25), np.int64(1), 10**20])
def test_reals_in_range_pass_as_float(value: object) -> None:
    x = require_real("rate", value, above=0.0)
    assert x == float(value) and type(x) is float


@pytest.mark.parametrize("value", [True, "1.0", None, 1j])
def test_what_is_not_a_real_number_is_refused(value: object) -> None:
    with pytest.raises(TypeError, match="rate must be a finite number > 0"):
        require_real("rate", value, above=0.0, type_error=TypeError)


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf, -math.inf, 10**400])
def test_zero_negative_nan_and_infinity_are_not_a_rate(value: float) -> None:
    with pytest.raises(FieldError, match=r"^rate must be a finite number > 0, got "):
        require_real("rate", value, above=0.0, error=FieldError)


def test_infinity_passes_only_where_the_caller_allows_it_and_nan_never() -> None:
    assert require_real("max_delay", math.inf, above=0.0, allow_inf=True) == math.inf
    with pytest.raises(ValueError, match=r"max_delay must be a number > 0 \(inf allowed\)"):
        require_real("max_delay", math.nan, above=0.0, allow_inf=True)
    with pytest.raises(ValueError, match="must be a number >= 0"):
        require_real("detour", -math.inf, min=0.0, allow_inf=True)


def test_inclusive_and_exclusive_bounds() -> None:
    assert require_real("delivery", 1.0, above=0.0, max=1.0) == 1.0
    assert require_real("wait", 0.0, min=0.0) == 0.0
    assert require_real("offset", -3.5) == -3.5
    for bad in (0.0, 1.0000001):
        with pytest.raises(ValueError, match=r"delivery must be a finite number > 0 and <= 1"):
            require_real("delivery", bad, above=0.0, max=1.0)


def test_the_callers_error_type_is_raised_as_is() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="value must be an integer >= 1"):
        require_int("value", 0, min=1, error=argparse.ArgumentTypeError)
