"""Bytes in, bytes out: parse memory sizes as users write them and format them back.

Internally every size is an int of bytes. "GB" means 10^9 bytes and "GiB" 2^30, exactly as
written; a bare "G" is read as GB, the way card makers print capacities ("24G").
"""

from __future__ import annotations

import re

from vramplan.errors import UsageError

KIB, MIB, GIB, TIB = 2**10, 2**20, 2**30, 2**40
KB, MB, GB, TB = 10**3, 10**6, 10**9, 10**12

_SUFFIXES = {
    "": 1, "b": 1,
    "k": KB, "kb": KB, "kib": KIB,
    "m": MB, "mb": MB, "mib": MIB,
    "g": GB, "gb": GB, "gib": GIB,
    "t": TB, "tb": TB, "tib": TIB,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str) -> int:
    """"16GB" -> 16_000_000_000, "16GiB" -> 17_179_869_184, "24G" -> 24_000_000_000."""
    match = _SIZE.match(str(text))
    if not match or match.group(2).lower() not in _SUFFIXES:
        raise UsageError(f"cannot read {text!r} as a memory size (write e.g. 16GB, 16GiB or 24G)")
    value = int(round(float(match.group(1)) * _SUFFIXES[match.group(2).lower()]))
    if value <= 0:
        raise UsageError(f"memory size {text!r} must be positive (at least one byte)")
    return value


def unit_of(text: str) -> str:
    """The display unit a user's size implies: "GiB" for binary suffixes, else "GB"."""
    match = _SIZE.match(str(text))
    return "GiB" if match and match.group(2).lower().endswith("ib") else "GB"


def to_unit(nbytes: int | float, unit: str = "GiB") -> float:
    return nbytes / {"GiB": GIB, "GB": GB, "MiB": MIB, "MB": MB}[unit]


def format_bytes(nbytes: int | float, unit: str = "GiB", digits: int = 2) -> str:
    """12.34 GiB; negative sizes keep their sign (a shortfall)."""
    return f"{to_unit(nbytes, unit):.{digits}f} {unit}"


def round_up(nbytes: int, multiple: int) -> int:
    return -(-nbytes // multiple) * multiple
