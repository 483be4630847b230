"""What counts as a number where a caller or a JSON body gives one.

Python reads True as 1 and compares 1.5 with 1, so a range check alone lets a bool or a fraction through as a count
nobody meant (max_batch_rows=True served one row; report_rows=1.5 was a TypeError deep in a slice). Every check of a
count, a token id or a weight asks these two, so the rule is written once.
"""

from __future__ import annotations

import math


def is_count(value) -> bool:
    """An integer that is not a bool: what a count (rows, slots, tokens, a seed) or a token id takes."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """An int or a float that is not a bool, NaN or infinite: what a weight, a density or a budget in MB takes."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
