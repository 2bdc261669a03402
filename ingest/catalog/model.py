"""What the catalog is made of: quantities (frozen values, no I/O)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

__all__ = ["Kind", "Quantity", "normalize"]

Kind = Literal["number", "bool", "state"]

_DROP = str.maketrans("", "", "_-. ")
_DECIMAL = re.compile(r"(?<=\d)[_\-. ](?=\d)")


def normalize(name: str) -> str:
    """The form aliases are compared in: lower case, without ``_ - .`` and spaces, except that a
    separator between two digits is a decimal point (pm2_5 = PM2.5 = pm-2.5, but pm1_0 is not pm10)."""
    s = name.lower()
    if any(c.isdigit() for c in s):
        return ".".join(part.translate(_DROP) for part in _DECIMAL.sub("\0", s).split("\0"))
    return s.translate(_DROP)


@dataclass(frozen=True, slots=True)
class Quantity:
    """A canonical quantity: the unit its readings are stored in, its kind and its two ranges.

    ``possible``: outside it a reading is rejected (out_of_range). ``plausible``: outside it a reading
    is stored with the suspect flag. Either bound may be None (open). ``molar_mass`` (g/mol) makes a
    gas convertible from ppb/ppm to a mass concentration. ``source`` says where the ranges come from.
    """

    name: str
    title: str
    unit: str | None
    kind: Kind = "number"
    possible: tuple[float | None, float | None] | None = None
    plausible: tuple[float | None, float | None] | None = None
    aliases: tuple[str, ...] = ()
    molar_mass: float | None = None
    source: str = ""
    # Names matched exactly (case-sensitive) before any alias: for two firmware names that normalise
    # alike but mean different things (Tasmota's Wifi.RSSI is a percentage, Shelly's wifi.rssi dBm).
    exact: tuple[str, ...] = ()
