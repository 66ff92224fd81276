"""The one test of an integer setting (config keys, CLI flags, API arguments): each caller words
its own error, naming the key, the value and the fix."""

from __future__ import annotations

import numbers


def int_in(value, lo=None, hi=None) -> bool:
    """Whether ``value`` is an integer (numpy's count, bool does not) within [``lo``, ``hi``]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return False
    return (lo is None or value >= lo) and (hi is None or value <= hi)
