"""The one check of a number argument: an int or a real in range, else the caller's error.

Every layer takes counts, rates, times and sizes from its callers, and each
needs the same rules: ``True`` is an ``int`` to Python but never a count or
a rate, so bool is refused; NaN is refused; infinity only where the caller
says it means something (no delay bound, no detour limit). The error is the
caller's own type (``NetworkError``, ``SimError``, ``argparse``'s), so its
handlers still catch it, and the message names the field and the rule.

CPython's standard library only, so hal/, agent/ and tools/ may all use it
(not the meter-side code in emulator/: MicroPython has no ``numbers``).
"""

from __future__ import annotations

import math
import numbers
import operator


def _int_rule(min: int | None, max: int | None) -> str:
    if min is not None and max is not None:
        return f"an integer in {min}..{max}"
    if min is not None:
        return f"an integer >= {min}"
    if max is not None:
        return f"an integer <= {max}"
    return "an integer"


def require_int(name: str, value: object, *, min: int | None = None, max: int | None = None,
                error: type[Exception] = ValueError,
                type_error: type[Exception] | None = None) -> int:
    """``value`` as an int in [min, max]; int and numpy integers pass, bool, 8.0 and "8" do not.

    ``error`` (built from one message) is raised for a value out of range,
    ``type_error`` (default: ``error``) for one that is not an integer at all.
    """
    rule = _int_rule(min, max)
    if isinstance(value, bool):
        raise (type_error or error)(f"{name} must be {rule}, got {value!r}")
    try:
        n = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise (type_error or error)(f"{name} must be {rule}, got {value!r}") from None
    if (min is not None and n < min) or (max is not None and n > max):
        raise error(f"{name} must be {rule}, got {n!r}")
    return n


def _real_rule(min: float | None, above: float | None, max: float | None,
               allow_inf: bool) -> str:
    bounds = " and ".join(f"{op} {x:g}" for op, x in ((">", above), (">=", min), ("<=", max))
                          if x is not None)
    kind = "a number" if allow_inf else "a finite number"
    return f"{kind} {bounds}".rstrip() + (" (inf allowed)" if allow_inf else "")


def require_real(name: str, value: object, *, min: float | None = None,
                 above: float | None = None, max: float | None = None, allow_inf: bool = False,
                 error: type[Exception] = ValueError,
                 type_error: type[Exception] | None = None) -> float:
    """``value`` as a float within the bounds; any real number but bool, never NaN.

    ``min`` and ``max`` are inclusive, ``above`` is an exclusive lower bound
    (``above=0`` for a rate or a capacity). Infinity passes only with
    ``allow_inf`` (and the bounds). Errors as for ``require_int``.
    """
    rule = _real_rule(min, above, max, allow_inf)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise (type_error or error)(f"{name} must be {rule}, got {value!r}")
    try:
        x = float(value)
    except OverflowError:  # an int beyond the float range
        x = math.inf if value > 0 else -math.inf
    if (math.isnan(x) or (math.isinf(x) and not allow_inf)
            or (above is not None and x <= above) or (min is not None and x < min)
            or (max is not None and x > max)):
        raise error(f"{name} must be {rule}, got {x!r}")
    return x
