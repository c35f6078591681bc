"""The error every bad input raises, and the valid ranges of numeric settings."""
from __future__ import annotations

import numbers


class L2OError(ValueError):
    """Bad input or an unmet precondition. The message is one line saying what is
    wrong and what is valid; the CLI prints it and exits with code 2."""


class Range:
    """The valid values of a numeric setting: lo..hi, each end open or closed, all
    finite; `integer` admits only ints. `check` returns the value or raises L2OError
    naming the setting, the value and what is valid."""

    def __init__(self, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False,
                 integer: bool = False) -> None:
        self.lo, self.hi, self.lo_open, self.hi_open, self.integer = lo, hi, lo_open, hi_open, integer

    def __str__(self) -> str:
        if self.integer:
            return f"an integer in {self.lo}..{self.hi}"
        return (f"a finite number in {'(' if self.lo_open else '['}{self.lo:g}, "
                f"{self.hi:g}{')' if self.hi_open else ']'}")

    def contains(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):  # numpy scalars are Real too
            return False
        if self.integer and not isinstance(v, numbers.Integral):
            return False
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return bool(above and below)  # False for NaN; inf is outside every finite range

    def check(self, name: str, v):
        if not self.contains(v):
            raise L2OError(f"{name} must be {self}, got {v!r}")
        return v

    def parse(self, s: str):
        """A command-line string -> the value (L2OError if malformed or out of range)."""
        try:
            v = int(s) if self.integer else float(s)
        except ValueError:
            raise L2OError(f"expected {self}, got {s!r}") from None
        if not self.contains(v):
            raise L2OError(f"must be {self}, got {s}")
        return v
