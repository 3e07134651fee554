"""The exhaustive oracle: every 0/1 mask of a tiny routing program, enumerated (T*N <= 20).

An independent check of the other backends, sharing no code with them: it reads the program's
fields (scores, count bounds, budget, groups) and nothing else of ``usmoe_lp.lp``. For a program
of n = T*N entries, mask m in [0, 2^n) selects entry k (row-major flat index) iff bit k of m is
set. The masks' counts (per token, expert and group) and objectives are built for all 2^n masks at
once by doubling: the table for entries 0..k is the table for 0..k-1 followed by the same table
plus entry k (numpy, no Python loop over masks).

Exact arithmetic, no tolerance: each score s is split into base-2^48 digits on a grid common to
the program, s = sum_l d_l 2^(e - 48 (l + 1)) with d_l integers (|d_0| <= 2^48, 0 <= d_l < 2^48
below), so a mask's digit sums (at most 20 terms, below 2^53) are exact in float64; after
carrying, comparing masks is comparing digit vectors lexicographically. Among the optimal masks
the one with the smallest number m is returned; its objective is the correctly rounded sum of its
scores (``math.fsum``). Cost: about 2^n * (T + N + G + levels) operations, ~0.1 s at n = 20.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from usmoe_lp.errors import UnsupportedProblem
from usmoe_lp.lp.problem import RoutingProblem

EXHAUSTIVE_MAX_ENTRIES = 20
"""Largest T*N that :func:`solve_exhaustive` enumerates (2^20 masks, ~50 MB of tables)."""

_DIGIT = 48  # bits per digit: a sum of 20 digits stays below 2^53 (exact in float64)


def check_size(problem: RoutingProblem) -> None:
    """Raise :class:`UnsupportedProblem` when ``problem`` has more than
    :data:`EXHAUSTIVE_MAX_ENTRIES` entries."""
    T, N = problem.shape
    if T * N > EXHAUSTIVE_MAX_ENTRIES:
        raise UnsupportedProblem(
            f"the exhaustive backend enumerates all 2^(T*N) masks and stops at T*N = {EXHAUSTIVE_MAX_ENTRIES}; "
            f"this program is {T}x{N} = {T * N} entries (use closed_form, flow or highs)")


@lru_cache(maxsize=4)
def _count_table(T: int, N: int, gid: bytes) -> np.ndarray:
    """(T + N + G, 2^n) int8: the count of each token, each expert and each group, per mask."""
    groups = np.frombuffer(gid, dtype=np.int64)
    G = int(groups.max()) + 1
    table = np.zeros((T + N + G, 2**(T * N)), dtype=np.int8)
    for k in range(T * N):
        i, j = divmod(k, N)
        step = np.zeros((T + N + G, 1), dtype=np.int8)
        step[[i, T + j, T + N + groups[i]]] = 1
        np.add(table[:, :2**k], step, out=table[:, 2**k:2**(k + 1)])
    table.setflags(write=False)
    return table


def _digits(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact digits of the scores on a grid common to the program.

    Returns (digits (L, n), bases (L,)) with scores = sum_l digits[l] * g_l exactly, g_0 =
    max(2^(e - 48), 2^-1074) where 2^e > max |scores|, g_l = g_(l-1) / bases[l] (bases[l] a power
    of two <= 2^48; less only where the grid meets the smallest subnormal); |digits| <= 2^48,
    each entry's digits of its sign.
    """
    s = scores.ravel().astype(np.float64)
    sign = np.sign(s)
    rest = np.abs(s)  # digits of |s|, then signed: truncating a positive number is exact
    peak = float(rest.max())
    if peak == 0.0:
        return np.zeros((1, s.size)), np.ones(1)
    tiny = math.ldexp(1.0, -1074)
    grid = max(math.ldexp(1.0, math.frexp(peak)[1] - _DIGIT), tiny)
    digits, bases = [], [1.0]
    while True:
        d = np.floor(rest / grid)  # rest / grid < 2^48 (a power-of-two division: exact or < 1)
        digits.append(sign * d)
        rest = rest - d * grid  # exact: the bits of rest below the grid
        if not np.any(rest):
            return np.stack(digits), np.array(bases[:len(digits)])
        finer = max(grid * 2.0**-_DIGIT, tiny)
        bases.append(grid / finer)
        grid = finer


def _objective_table(digits: np.ndarray, bases: np.ndarray) -> np.ndarray:
    """(L, 2^n) exact digit sums of every mask (``_digits`` of a program), carried so that the
    lexicographic order over L is the order of the true sums (one program at a time: the table,
    ~1 MiB at n = 16, stays in cache)."""
    L, n = digits.shape
    table = np.zeros((L, 2**n))
    for k in range(n):  # sums of at most 20 digits of |d| <= 2^48: exact
        np.add(table[:, :2**k], digits[:, k:k + 1], out=table[:, 2**k:2**(k + 1)])
    for level in range(L - 1, 0, -1):  # carry: every digit below the top into [0, base)
        carry = np.floor(table[level] / bases[level])
        table[level] -= carry * bases[level]
        table[level - 1] += carry
    return table


def _feasible(problem: RoutingProblem, counts: np.ndarray) -> np.ndarray:
    """(2^n,) bool: the masks meeting every bound of ``problem`` (read from its fields)."""
    T, N = problem.shape
    lo = [problem.token_min, problem.expert_min]
    hi = [problem.token_max, problem.expert_max]
    if problem.budget is not None:
        lo.append(problem.budget if problem.budget_sense == "==" else np.zeros_like(problem.budget))
        hi.append(problem.budget)
    lo, hi = np.concatenate(lo), np.concatenate(hi)
    ok = np.ones(counts.shape[1], dtype=bool)
    for row, a, b in zip(counts, lo.tolist(), hi.tolist(), strict=False):  # no budget: group rows unread
        if a > 0:
            ok &= row >= a
        if b < T * N:
            ok &= row <= b
    return ok


def _bounds_key(problem: RoutingProblem) -> tuple:
    arrays = (problem.token_min, problem.token_max, problem.expert_min, problem.expert_max)
    budget = None if problem.budget is None else (problem.budget.tobytes(), problem.budget_sense)
    return tuple(a.tobytes() for a in arrays) + (budget,)


def solve_exhaustive_batch(problems: Sequence[RoutingProblem]):
    """The 0/1 optimum of every program by enumeration (module docstring).

    Args:
        problems: routing programs of at most :data:`EXHAUSTIVE_MAX_ENTRIES` entries each, any
            shapes and kinds (programs of one shape and groups share the count table, programs
            with equal bounds the feasible set).

    Returns:
        One ``usmoe_lp.lp.backends.RawResult`` per program: x (T, N) float64 0/1 (the optimal
        mask of smallest number), objective (float64, correctly rounded), status ``optimal`` or
        ``infeasible`` (no mask meets the bounds), duals None, seconds (the group's time, split
        evenly).

    Raises:
        UnsupportedProblem: a program with T*N > :data:`EXHAUSTIVE_MAX_ENTRIES`.
    """
    from usmoe_lp.lp.backends import RawResult  # the result type only; no solver code

    for p in problems:
        check_size(p)
    out: list = [None] * len(problems)
    by_shape: dict[tuple, list[int]] = {}
    for i, p in enumerate(problems):
        by_shape.setdefault((p.shape, p.group_ids.tobytes()), []).append(i)
    for ((T, N), gid), members in by_shape.items():
        t0 = time.perf_counter()
        n = T * N
        counts = _count_table(T, N, gid)
        feasible: dict[tuple, np.ndarray] = {}
        for i in members:
            p = problems[i]
            key = _bounds_key(p)
            if key not in feasible:
                feasible[key] = _feasible(p, counts)
            cand = feasible[key].copy()
            if not cand.any():
                out[i] = (np.zeros((T, N)), math.nan, "infeasible",
                          f"exhaustive: none of the 2^{n} masks meets the bounds of the {p.name} program")
                continue
            for level in _objective_table(*_digits(p.scores)):
                cand &= level == level[cand].max()
            m = int(np.argmax(cand))
            x = ((m >> np.arange(n)) & 1).astype(np.float64).reshape(T, N)
            obj = math.fsum(p.scores.ravel()[x.ravel() > 0].tolist())
            out[i] = (x, obj, "optimal", f"exhaustive: optimal among 2^{n} masks")
        seconds = (time.perf_counter() - t0) / len(members)
        for i in members:
            x, obj, status, msg = out[i]
            out[i] = RawResult(x, obj, status, msg, None, seconds)
    return out


def solve_exhaustive(problem: RoutingProblem, time_limit: float | None = None):
    """:func:`solve_exhaustive_batch` of one program (``time_limit`` is not used: the cost is
    fixed, ~0.1 s at T*N = 20)."""
    return solve_exhaustive_batch([problem])[0]
