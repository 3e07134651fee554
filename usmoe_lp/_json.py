"""The one conversion of results to JSON-ready plain Python (used by every ``to_dict``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def json_ready(value: Any) -> Any:
    """``value`` as plain JSON types: NaN and +-Inf become None, numpy scalars and arrays become
    Python numbers and lists, tuples become lists, mapping keys become strings (floats as ``%g``).

    >>> json_ready({"a": float("nan"), 0.5: np.int64(3), "v": np.array([1.0, np.inf])})
    {'a': None, '0.5': 3, 'v': [1.0, None]}
    """
    if isinstance(value, Mapping):
        return {(k if isinstance(k, str) else f"{k:g}" if isinstance(k, float) else str(k)): json_ready(v)
                for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [json_ready(v) for v in value.tolist()]
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        v = float(value)
        return v if math.isfinite(v) else None
    return value
