"""Exact, order-independent sums of float64 values (mergeable metric states).

A float64 is an integer multiple of ``2**-1074`` (the smallest subnormal), so
a sum of float64 values is an exact integer in those units. :class:`ExactSum`
keeps that integer (a Python ``int``); adding values in any order, or adding
two partial sums (two shards, two ranks, a resumed run), gives the same
integer, and the mean is the correctly rounded quotient. This is what makes
the metric states of :mod:`tokentm_fast.metrics` mergeable exactly: a data set
split over several processes gives bit-for-bit the numbers of one process.
"""
from __future__ import annotations

import math
from typing import Iterable, Union

import torch

__all__ = ["ExactSum"]

_UNIT_BITS = 1074  # 2**-1074: every float64 is an integer multiple of it


def _units(x: float) -> int:
    """``x`` as an exact integer number of ``2**-1074`` units."""
    if not math.isfinite(x):
        raise ValueError(f"cannot accumulate a non-finite value ({x}) in an exact sum")
    num, den = x.as_integer_ratio()  # den is a power of two <= 2**1074
    return num << (_UNIT_BITS - (den.bit_length() - 1))


class ExactSum:
    """An exact running sum of float64 values.

    ``add(values)`` takes a float, an iterable of floats or a tensor (any shape,
    read as float64); ``merge(other)`` adds another sum; ``value`` is the sum
    and ``mean(n)`` the sum divided by ``n``, both correctly rounded to float64.
    ``to_state()`` / ``from_state()`` give a JSON string (hexadecimal integer).
    """

    __slots__ = ("units",)

    def __init__(self, units: int = 0) -> None:
        self.units = int(units)

    def add(self, values: Union[float, Iterable[float], torch.Tensor]) -> "ExactSum":
        """Add one value or many; returns ``self``."""
        if isinstance(values, torch.Tensor):
            values = values.detach().to("cpu", torch.float64).reshape(-1).tolist()
        elif isinstance(values, (int, float)):
            values = (values,)
        self.units += sum(_units(float(v)) for v in values)
        return self

    def merge(self, other: "ExactSum") -> "ExactSum":
        """Add another exact sum; returns ``self``."""
        self.units += other.units
        return self

    @property
    def value(self) -> float:
        """The sum, correctly rounded to float64."""
        return self.units / (1 << _UNIT_BITS)

    def mean(self, count: int) -> float:
        """``sum / count`` correctly rounded (NaN for ``count == 0``)."""
        return self.units / (int(count) << _UNIT_BITS) if count else float("nan")

    def to_state(self) -> str:
        """JSON-safe state: the integer in hexadecimal."""
        return hex(self.units)

    @classmethod
    def from_state(cls, state: Union[str, int, float]) -> "ExactSum":
        """Inverse of :meth:`to_state` (a plain float, from an older state, is taken exactly)."""
        if isinstance(state, str):
            return cls(int(state, 16))
        return cls(_units(float(state)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExactSum) and other.units == self.units

    def __repr__(self) -> str:
        return f"ExactSum({self.value!r})"
