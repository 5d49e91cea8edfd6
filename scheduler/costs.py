"""Exact attribution of one batch's device time to the requests in it.

A batch's measured device time (integer nanoseconds) times the replica's share
of its device is the batch's charge. The charge is split among the batch's
requests in proportion to their rows by largest remainder (Hamilton's method),
so the parts are integers that add up to the charge exactly: summed over any
set of batches, the tenants' parts equal the batches' charges to the nanosecond.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction


def charge_ns(device_ns: int, share: float) -> int:
    """The batch's charge: device time times the replica's device share, in integer ns.

    ``share`` is converted exactly (a float is a binary fraction) and the product
    rounded half-to-even once, here, so every consumer agrees on the same integer.
    """
    if device_ns < 0 or share < 0:
        raise ValueError("device time and share must be >= 0")
    return round(Fraction(device_ns) * Fraction(share))


def split_by_rows(total: int, rows: Sequence[int]) -> list[int]:
    """Split ``total`` in proportion to ``rows``; the parts sum to ``total`` exactly.

    Each part gets the floor of its exact quota; the units left over go one each
    to the largest fractional remainders, ties to the earlier request (batch
    order), so the split is deterministic.
    """
    if total < 0:
        raise ValueError("total must be >= 0")
    if not rows or any(r < 1 for r in rows):
        raise ValueError("every request has at least one row")
    all_rows = sum(rows)
    parts = [total * r // all_rows for r in rows]
    # The remainder of each quota, scaled by all_rows to stay in integers.
    remainders = [total * r % all_rows for r in rows]
    left = total - sum(parts)
    by_remainder = sorted(range(len(rows)), key=lambda i: (-remainders[i], i))
    for i in by_remainder[:left]:
        parts[i] += 1
    return parts
