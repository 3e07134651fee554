"""Shared input checks (numpy and torch alike) with messages that name the problem."""

from __future__ import annotations

import numpy as np

from usmoe_lp.errors import InvalidParameter, InvalidScores


def check_finite_numpy(scores: np.ndarray, name: str = "scores") -> None:
    """Raise :class:`InvalidScores` if ``scores`` is empty or has a NaN or an Inf."""
    if scores.size == 0:
        raise InvalidScores(f"{name} is empty (shape {tuple(scores.shape)}); need T >= 1 and N >= 1")
    if not np.isfinite(scores).all():
        bad = np.argwhere(~np.isfinite(scores))
        n_nan = int(np.isnan(scores).sum())
        n_inf = int(bad.shape[0]) - n_nan
        first = tuple(int(v) for v in bad[0])
        raise InvalidScores(
            f"{name} has {n_nan} NaN and {n_inf} Inf entries (first at index {first}); "
            "routing programs need finite scores — mask padding with padding_mask instead of -inf"
        )


def check_int(value, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """Return ``value`` as an int, or raise :class:`InvalidParameter` naming ``name``.

    Integral floats (``2.0``) are accepted; ``2.5`` is not.
    """
    if isinstance(value, bool) or value is None:
        raise InvalidParameter(f"{name} must be an integer, got {value!r}")
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise InvalidParameter(f"{name} must be an integer, got {value!r}") from None
    if not np.isfinite(as_float) or as_float != int(as_float):
        raise InvalidParameter(
            f"{name} must be an integer, got {value!r}; for a fractional average use kbar=, "
            "which rounds half up and reports the realised budget"
        )
    out = int(as_float)
    if low is not None and out < low:
        raise InvalidParameter(f"{name} must be >= {low}, got {out}")
    if high is not None and out > high:
        raise InvalidParameter(f"{name} must be <= {high}, got {out}")
    return out


def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves away from zero for x >= 0 (2.5 -> 3, not 2).

    This is the rounding rule for a fractional k-bar: c = round_half_up(kbar * tokens).
    A tiny relative slack absorbs binary representation error (1.5 * 3 = 4.5 exactly -> 5).
    """
    return int(np.floor(x + 0.5 + 1e-12 * max(1.0, abs(x))))
