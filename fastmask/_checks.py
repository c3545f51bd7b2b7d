"""The argument checks of fastmask, in one place (ops, nn, attacks, the configs, the CLI).

Each check takes the argument's name and value, returns the value as the caller
uses it, or raises BadValue (a ValueError) / BadType (a TypeError) whose message
is one line naming the argument and the value: "steps must be >= 1, got 0". The
configs (dataclasses) spell it "steps=0 must be >= 1" (field()), the command line
"argument --pgd-steps: '0' must be >= 1" (cli.py); the rule is the same.
"""
import math
import numbers

__all__ = ["BadValue", "BadType", "number", "finite", "fill", "integer", "positive_int", "nonneg_int", "u64", "ratio",
           "eps", "bounds", "positive", "nonneg", "choice", "norm", "mask_args", "field",
           "NORMS", "MODES", "SCOPES", "CHANNELS"]

NORMS = ("inf", "2")
MODES = ("pixel", "block", "blur")
SCOPES = ("sample", "fixed")
CHANNELS = ("shared", "separate")


class _Bad:
    """name, value and what the value must be; str() is the function-argument spelling."""

    def __init__(self, name, value, must, shown=None):
        self.name, self.value, self.must = name, value, must
        super().__init__(f"{name} {must}, got {repr(value) if shown is None else shown}")


class BadValue(_Bad, ValueError):
    pass


class BadType(_Bad, TypeError):
    pass


def number(name, value):
    """A real number (bool refused), not NaN; returned as float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BadType(name, value, "must be a real number", f"{value!r} ({type(value).__name__})")
    value = float(value)
    if math.isnan(value):
        raise BadValue(name, value, "must not be NaN")
    return value


def finite(name, value):
    value = fill(name, value)
    if not math.isfinite(value):
        raise BadValue(name, value, "must be finite")
    return value


def fill(name, value):
    """Any real number, NaN and infinities included (a value to write, not a bound)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BadType(name, value, "must be a real number", f"{value!r} ({type(value).__name__})")
    return float(value)


def positive(name, value):
    value = number(name, value)
    if not value > 0:
        raise BadValue(name, value, "must be > 0", f"{value}")
    return value


def nonneg_int(name, value):
    return integer(name, value, 0)


def nonneg(name, value):
    value = number(name, value)
    if value < 0:
        raise BadValue(name, value, "must be >= 0", f"{value}")
    return value


def integer(name, value, lo=None):
    """An int (bool refused), >= lo when given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise BadValue(name, value, "must be an integer" + ("" if lo is None else f" >= {lo}"))
    if lo is not None and value < lo:
        raise BadValue(name, value, f"must be >= {lo}")
    return int(value)


def positive_int(name, value):
    return integer(name, value, 1)


def u64(name, value):
    """A seed or an offset: an integer in [0, 2^64), returned as int64 two's complement (the C++ schema)."""
    if type(value) is int and 0 <= value < 2 ** 63:  # the common case first: this runs on every mask draw
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise BadType(name, value, "must be an integer in [0, 2**64)", f"{value!r} ({type(value).__name__})")
    value = int(value)
    if not 0 <= value < 2 ** 64:
        raise BadValue(name, value, "must be in [0, 2**64)", f"{value}")
    return value - 2 ** 64 if value >= 2 ** 63 else value


def ratio(name, value):
    value = number(name, value)
    if not 0.0 <= value <= 1.0:
        raise BadValue(name, value, "must be in [0, 1]", f"{value}")
    return value


def eps(name, value):
    value = number(name, value)
    if value < 0:
        raise BadValue(name, value, "must be >= 0", f"{value}")
    return value


def bounds(lo, hi):
    lo, hi = number("lo", lo), number("hi", hi)
    if lo > hi:
        raise BadValue("lo", lo, "must be <= hi", f"lo={lo}, hi={hi}")
    return lo, hi


def choice(name, value, choices):
    if value not in choices:
        raise BadValue(name, value, f"must be one of {', '.join(map(repr, choices))}")
    return value


def norm(name, value):
    """'inf' or '2' (also math.inf and 2). One spelling per norm: 'l2', 'linf' are refused."""
    if not isinstance(value, str) and isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = "inf" if value == math.inf else ("2" if value == 2 else value)
    return choice(name, value, NORMS)


def mask_args(ratio_, mode, scope, channels):
    """The mask arguments of the ops and FeatureMask: (ratio, mode, scope, channels), checked."""
    return (ratio("ratio", ratio_), choice("mode", mode, MODES), choice("scope", scope, SCOPES),
            choice("channels", channels, CHANNELS))


def field(check, name, value, *args):
    """check(name, value, *args) for a config field: the error reads "name=value must ..."."""
    try:
        return check(name, value, *args)
    except (BadValue, BadType) as e:
        raise ValueError(f"{name}={value!r} {e.must}") from None
