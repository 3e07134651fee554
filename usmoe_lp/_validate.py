"""Shared input checks (numpy and torch alike) with messages that name the problem, and the one
definition of every numerical tolerance of the package.

Tolerances (read these, never write a literal elsewhere):

* ``EPS``: float64 unit roundoff bound (2**-52). Gaps between float64 sums are compared against
  :func:`rounding_bound`, which scales with the magnitude of what was summed; there is no
  absolute tolerance anywhere, so scores at 1e-12 are judged exactly as scores at 1.
* ``DECIMAL_SLACK``: relative slack when a decimal parameter (``kbar``, ``capacity_factor``)
  times a count should land on an integer or a half (``1.1 * 10 = 11.000000000000002``).
* ``HALF_SLACK``: the same for ``round_half_up`` (``0.35 * 10 = 3.4999999999999996`` -> 4); smaller,
  because a value just below a half must still round down.
* ``INTEGRALITY_TOL``: how far an LP solution entry x in [0, 1] may sit from 0 or 1 and still be
  called integral (x is dimensionless, so this one is absolute by nature).
* ``TIGHT_REL``: relative size below which an LP reduced cost is treated as tight when exact dual
  multipliers are rebuilt from a solver's float ones (a hint only: the final check is exact).
"""

from __future__ import annotations

import math
import operator

import numpy as np

from usmoe_lp.errors import InvalidParameter, InvalidScores

EPS = float(np.finfo(np.float64).eps)
DECIMAL_SLACK = 1e-9
HALF_SLACK = 1e-12
INTEGRALITY_TOL = 1e-9
TIGHT_REL = 1e-9
MAX_EXACT_INT = 2**53  # integers up to this magnitude are exact in float64
INT64_MAX = int(np.iinfo(np.int64).max)


def rounding_bound(terms: int, magnitude: float) -> float:
    """Upper bound on the float64 rounding error of summing ``terms`` values whose absolute values
    add up to ``magnitude`` (Higham's gamma_n, doubled for safety)."""
    return 2.0 * max(int(terms), 1) * EPS * float(magnitude)


# ----------------------------------------------------------------------------- scores
def _dtype_problem(kind: str, dtype, name: str) -> str | None:
    """Why a dtype cannot hold routing scores (None when it can). One rule for numpy and torch:
    real floats and integers pass; complex, bool, strings and objects do not."""
    if kind == "c":
        return (f"{name} has complex dtype {dtype}; routing scores are real: pass .real "
                "explicitly if the imaginary part is meant to be dropped")
    if kind == "b":
        return (f"{name} has dtype bool; routing scores are real numbers (a mask given as scores?); "
                "convert with .astype(float) / .double() if 0/1 scores are meant")
    if kind not in "fiu":
        return f"{name} must be a real numeric array, got dtype {dtype}"
    return None


def _check_exact_ints(values: np.ndarray, name: str) -> None:
    big = (values > MAX_EXACT_INT) | (values < -MAX_EXACT_INT)  # in the integer dtype: exact
    if np.any(big):
        first = tuple(int(v) for v in np.argwhere(big)[0])
        raise InvalidScores(
            f"{name} has {int(big.sum())} integer entries beyond 2**53 in magnitude (first at index "
            f"{first}); float64 cannot represent them exactly, so ties and order could change: "
            "rescale them or pass floats you have rounded deliberately")


def as_float64_scores(scores, name: str = "scores") -> np.ndarray:
    """``scores`` (numpy array, nested list or torch tensor of any real dtype) as a new float64
    numpy array, converted exactly, or :class:`InvalidScores`.

    bfloat16/float16/float32 convert exactly; integers convert exactly up to 2**53 in magnitude
    and are rejected beyond; complex, bool, string and object arrays are rejected.
    """
    if hasattr(scores, "detach") and hasattr(scores, "dtype"):  # a torch tensor
        t = scores.detach().cpu()
        problem = _dtype_problem(_torch_kind(t), t.dtype, name)
        if problem:
            raise InvalidScores(problem)
        if t.is_floating_point():
            return t.double().numpy().copy()
        arr = t.numpy()
    else:
        try:
            arr = np.asarray(scores)
        except (TypeError, ValueError) as exc:
            raise InvalidScores(f"{name} must be a real numeric array: {exc}") from None
        problem = _dtype_problem(arr.dtype.kind, arr.dtype, name)
        if problem:
            raise InvalidScores(problem)
    if arr.dtype.kind in "iu":
        _check_exact_ints(arr, name)
    out = np.array(arr, dtype=np.float64, order="C", copy=True)
    if arr.dtype.kind == "f" and arr.dtype.itemsize > 8 and np.any(out != arr):
        raise InvalidScores(f"{name} of dtype {arr.dtype} do not convert exactly to float64")
    return out


def _torch_kind(t) -> str:
    import torch

    if t.dtype == torch.bool:
        return "b"
    if t.is_complex():
        return "c"
    if t.is_floating_point():
        return "f"
    return "i"


def as_score_tensor(scores, name: str = "scores"):
    """``scores`` as a real floating torch tensor for the routers and score functions.

    Floating tensors are kept as they are (their own dtype, device); integers become float64,
    exactly (rejected beyond 2**53); numpy arrays and lists go through :func:`as_float64_scores`
    unless already floating. Complex, bool, string and object input raise :class:`InvalidScores`.
    """
    import torch

    if isinstance(scores, torch.Tensor):
        problem = _dtype_problem(_torch_kind(scores), scores.dtype, name)
        if problem:
            raise InvalidScores(problem)
        if scores.is_floating_point():
            return scores
        if bool(((scores > MAX_EXACT_INT) | (scores < -MAX_EXACT_INT)).any()):
            _check_exact_ints(scores.detach().cpu().numpy(), name)
        return scores.double()
    arr = np.asarray(scores) if not isinstance(scores, np.ndarray) else scores
    if arr.dtype.kind == "f" and arr.dtype.itemsize <= 8:
        return torch.from_numpy(np.ascontiguousarray(arr))
    return torch.from_numpy(as_float64_scores(arr, name))


def _non_finite_message(name: str, n_nan: int, n_inf: int, first: tuple[int, ...]) -> str:
    return (f"{name} has {n_nan} NaN and {n_inf} Inf entries (first at index {first}); "
            "routing needs finite values — mask padding with padding_mask instead of -inf")


def check_finite_numpy(scores: np.ndarray, name: str = "scores") -> None:
    """Raise :class:`InvalidScores` if ``scores`` is empty or has a NaN or an Inf."""
    if scores.size == 0:
        raise InvalidScores(f"{name} is empty (shape {tuple(scores.shape)}); need T >= 1 and N >= 1")
    if not np.isfinite(scores).all():
        bad = np.argwhere(~np.isfinite(scores))
        n_nan = int(np.isnan(scores).sum())
        raise InvalidScores(_non_finite_message(name, n_nan, int(bad.shape[0]) - n_nan,
                                                tuple(int(v) for v in bad[0])))


def check_finite_torch(values, name: str = "scores") -> None:
    """Raise :class:`InvalidScores` if the torch tensor ``values`` has a NaN or an Inf.

    A float64 sum is finite iff every entry is, barring overflow, which falls through to the
    elementwise test: one pass in the common case.
    """
    import torch

    if bool(torch.isfinite(values.sum(dtype=torch.float64))) or bool(torch.isfinite(values).all()):
        return
    bad = ~torch.isfinite(values)
    n_nan = int(torch.isnan(values).sum())
    raise InvalidScores(_non_finite_message(name, n_nan, int(bad.sum()) - n_nan,
                                            tuple(int(v) for v in bad.nonzero()[0])))


def check_summable(scores: np.ndarray, name: str = "scores") -> None:
    """Raise :class:`InvalidScores` when float64 sums of ``scores`` could overflow.

    A certificate sums at most ~4 T*N terms each at most ~2 max|S| in magnitude; scores beyond
    float64 max / (8 T*N) could make an objective inf and a gap NaN.
    """
    limit = float(np.finfo(np.float64).max) / (8.0 * scores.size)
    peak = float(np.max(np.abs(scores))) if scores.size else 0.0
    if peak > limit:
        raise InvalidScores(
            f"{name} are too large to sum in float64: max |{name}| = {peak:.3g}, but with "
            f"{scores.size} entries sums stay finite only up to {limit:.3g}; divide the {name} by "
            "a positive constant (routing is unchanged by positive scaling)")


# ----------------------------------------------------------------------------- padding masks
PADDING_CONVENTION = ("padding_mask must be bool with True where the token is padding; from a "
                      "Hugging Face attention_mask (1 = real token) use padding_mask = attention_mask == 0")


def check_padding_mask(padding_mask, name: str = "padding_mask"):
    """Return ``padding_mask`` as a bool torch tensor, or :class:`InvalidParameter`.

    Only bool is accepted: an int 0/1 mask is ambiguous (a Hugging Face ``attention_mask`` has
    1 for real tokens, the opposite polarity), so it is rejected with the conversion to use.
    """
    import torch

    pm = padding_mask if isinstance(padding_mask, torch.Tensor) else torch.as_tensor(np.asarray(padding_mask))
    if pm.dtype != torch.bool:
        raise InvalidParameter(f"{name} has dtype {pm.dtype}; {PADDING_CONVENTION}")
    return pm


# ----------------------------------------------------------------------------- parameters
def check_int(value, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """Return ``value`` as an exact Python int, or raise :class:`InvalidParameter` naming ``name``.

    Integers (Python, numpy, 0-d torch) are taken exactly, at any size; integral floats
    (``2.0``) are accepted; ``2.5``, strings, bools and None are not. ``high`` defaults to the
    int64 range, so a value that would wrap in a fixed-width array is refused here.
    """
    if isinstance(value, (bool, np.bool_, str, bytes)) or value is None:
        raise InvalidParameter(f"{name} must be an integer, got {value!r}")
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    try:
        out = operator.index(value)
    except TypeError:
        if isinstance(value, complex) or not isinstance(value, (int, float, np.floating)):
            raise InvalidParameter(f"{name} must be an integer, got {value!r}") from None
        as_float = float(value)
        if not math.isfinite(as_float) or as_float != int(as_float):
            raise InvalidParameter(
                f"{name} must be an integer, got {value!r}; for a fractional average use kbar=, "
                "which rounds half up and reports the realised budget") from None
        out = int(as_float)
    if low is not None and out < low:
        raise InvalidParameter(f"{name} must be >= {low}, got {out}")
    top = INT64_MAX if high is None else high
    if out > top:
        raise InvalidParameter(f"{name} must be <= {top}, got {out}")
    return out


def check_real(value, name: str, *, low: float | None = None, high: float | None = None,
               low_open: bool = False) -> float:
    """Return ``value`` as a finite float in [low, high] (``(low, high]`` with ``low_open``), or
    raise :class:`InvalidParameter` naming ``name``. Strings, bools, complex and None are refused."""
    if isinstance(value, (bool, np.bool_, str, bytes, complex)) or value is None:
        raise InvalidParameter(f"{name} must be a real number, got {value!r}")
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InvalidParameter(f"{name} must be a real number, got {value!r}") from None
    below = low is not None and (out < low or (low_open and out == low))
    above = high is not None and out > high
    if not math.isfinite(out) or below or above:
        if low is not None and high is not None:
            want = f"lie in {'(' if low_open else '['}{low:g}, {high:g}]"
        elif low is not None:
            want = f"be a finite number {'>' if low_open else '>='} {low:g}"
        else:
            want = "be a finite number" + ("" if high is None else f" <= {high:g}")
        raise InvalidParameter(f"{name} must {want}, got {value!r}")
    return out


def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves away from zero for x >= 0 (2.5 -> 3, not 2).

    This is the rounding rule for a fractional k-bar: c = round_half_up(kbar * tokens).
    A tiny relative slack absorbs binary representation error (0.35 * 10 = 3.4999999999999996 -> 4).
    """
    return int(np.floor(x + 0.5 + HALF_SLACK * max(1.0, abs(x))))


def ceil_decimal(x: float) -> int:
    """ceil(x), with ``DECIMAL_SLACK`` absorbing float error in a decimal factor
    (1.1 * 10 = 11.000000000000002 -> 11)."""
    return int(math.ceil(x - DECIMAL_SLACK * max(1.0, x)))
