"""Exact optimality proofs from a solver's float multipliers (no tolerance anywhere).

A feasible mask X is optimal iff some multipliers (u, v, lam) meet complementary slackness
exactly: reduced costs R_ij = S_ij - u_i - v_j - lam_g(i) >= 0 where X selects, <= 0 where it
does not, and u_b > 0 only where block b sits at its upper count bound, u_b < 0 only at its lower
one (then the Lagrangian bound equals the objective: every term of the gap is zero).

A solver's multipliers meet these conditions only up to rounding (the reduced cost of a basic
variable is 1e-17 instead of 0). :func:`proves_optimal` rebuilds exact rational multipliers from
them: the budget multipliers are kept as given, and the token/expert multipliers are recomputed in
``fractions.Fraction`` along a spanning forest of the tight entries (|R| <= TIGHT_REL * scale), so
that those reduced costs are exactly 0. Every condition is then checked exactly: in float64 with
a rigorous error bound where that decides, in rationals where it does not. The float multipliers
are only a hint; a wrong hint makes the proof fail (undecided), never succeed wrongly.
"""

from __future__ import annotations

from collections import deque
from fractions import Fraction

import numpy as np

from usmoe_lp._validate import EPS, TIGHT_REL
from usmoe_lp.lp.problem import RoutingProblem

MAX_EXACT_ENTRIES = 500_000  # beyond this many tight or undecided entries, give up (undecided)
_TINY = float(np.finfo(np.float64).smallest_subnormal)


def exact_sign_of_difference(S: np.ndarray, better: np.ndarray, base: np.ndarray) -> int:
    """sign(objective(better) - objective(base)) for (T, N) bool masks, exactly."""
    diff = [Fraction(float(v)) for v in S[better & ~base]] + [-Fraction(float(v)) for v in S[base & ~better]]
    total = sum(diff, Fraction(0))
    return (total > 0) - (total < 0)


def _counts(problem: RoutingProblem, X: np.ndarray):
    rows = X.sum(axis=1)
    groups = np.bincount(problem.group_ids, weights=rows, minlength=problem.num_groups).astype(np.int64)
    return {"token": rows, "expert": X.sum(axis=0), "budget": groups}


def _sign_ok(values, count, lo, hi) -> bool:
    """Complementary slackness of block multipliers (Fractions or floats), exactly."""
    for y, c, a, b in zip(values, count.tolist(), lo.tolist(), hi.tolist(), strict=True):
        if (y > 0 and c != b) or (y < 0 and c != a):
            return False
    return True


def proves_optimal(problem: RoutingProblem, X: np.ndarray, duals: dict[str, np.ndarray]) -> bool:
    """True iff exact multipliers rebuilt from ``duals`` prove the feasible mask X (T, N) optimal."""
    S = problem.scores
    T, N = S.shape
    fams = problem.families
    counts = _counts(problem, X)
    gid = problem.group_ids
    lam = np.zeros(problem.num_groups)
    if "budget" in fams:
        lam = np.asarray(duals.get("budget", lam), dtype=np.float64)
        if lam.shape != (problem.num_groups,) or not np.all(np.isfinite(lam)):
            return False
        if not _sign_ok(lam.tolist(), counts["budget"], *problem.family_bounds("budget")):
            return False
    sides = [f for f in ("token", "expert") if f in fams]
    floats = {}
    for f, size in (("token", T), ("expert", N)):
        y = np.asarray(duals.get(f, np.zeros(size)), dtype=np.float64) if f in sides else np.zeros(size)
        if y.shape != (size,) or not np.all(np.isfinite(y)):
            return False
        floats[f] = y
    A = S - lam[gid][:, None]
    R = A - floats["token"][:, None] - floats["expert"][None, :]
    scale = float(np.max(np.abs(S)) + np.max(np.abs(lam)) + max(np.max(np.abs(y)) for y in floats.values()))
    exact = _rebuild(problem, X, A, R, floats, lam, sides, counts, TIGHT_REL * scale) if sides else {}
    if exact is None:
        return False
    for f in sides:
        if not _sign_ok(exact[f], counts[f], *problem.family_bounds(f)):
            return False
    return _reduced_costs_ok(problem, X, lam, exact, floats)


def _rebuild(problem, X, A, R, floats, lam, sides, counts, tight_tol):
    """Exact Fraction multipliers of the token/expert sides along tight entries (None: give up)."""
    T, N = problem.shape
    ti, tj = np.nonzero(np.abs(R) <= tight_tol)
    if ti.size > MAX_EXACT_ENTRIES:
        return None
    gid = problem.group_ids
    S = problem.scores

    def a_exact(i: int, j: int) -> Fraction:
        return Fraction(float(S[i, j])) - Fraction(float(lam[gid[i]]))

    offset = {"token": 0, "expert": T}
    size = {"token": T, "expert": N}
    value: list[Fraction | None] = [None] * (T + N)
    queue: deque[int] = deque()
    for f in sides:  # blocks strictly inside their bounds need a zero multiplier
        lo, hi = problem.family_bounds(f)
        for b in np.flatnonzero((counts[f] > lo) & (counts[f] < hi)).tolist():
            value[offset[f] + b] = Fraction(0)
            queue.append(offset[f] + b)
    if len(sides) == 1:  # each tight entry fixes its block's multiplier alone
        f = sides[0]
        blocks = ti if f == "token" else tj
        for b, i, j in zip(blocks.tolist(), ti.tolist(), tj.tolist(), strict=True):
            if value[offset[f] + b] is None:
                value[offset[f] + b] = a_exact(i, j)
    else:
        adj: list[list[tuple[int, int, int]]] = [[] for _ in range(T + N)]
        for i, j in zip(ti.tolist(), tj.tolist(), strict=True):
            adj[i].append((T + j, i, j))
            adj[T + j].append((i, i, j))
        roots = iter(range(T + N))
        while True:
            while queue:
                node = queue.popleft()
                for other, i, j in adj[node]:
                    if value[other] is None:
                        value[other] = a_exact(i, j) - value[node]
                        queue.append(other)
            root = next((r for r in roots if value[r] is None), None)
            if root is None:
                break
            f = "token" if root < T else "expert"
            value[root] = Fraction(float(floats[f][root - offset[f]]))
            queue.append(root)
    out = {}
    for f in sides:
        vals = value[offset[f]:offset[f] + size[f]]
        out[f] = [Fraction(float(floats[f][b])) if v is None else v for b, v in enumerate(vals)]
    return out


def _reduced_costs_ok(problem, X, lam, exact, floats) -> bool:
    """Every reduced cost has the sign X needs, decided in float64 with an error bound and in
    rationals where the bound does not decide."""
    S = problem.scores
    T, N = S.shape
    gid = problem.group_ids
    u_q = exact.get("token", [Fraction(0)] * T)
    v_q = exact.get("expert", [Fraction(0)] * N)
    u = np.array([float(x) for x in u_q]) if "token" in exact else np.zeros(T)
    v = np.array([float(x) for x in v_q]) if "expert" in exact else np.zeros(N)
    lam_t = lam[gid]
    R = ((S - lam_t[:, None]) - u[:, None]) - v[None, :]
    bound = (4 * EPS * (np.abs(S) + np.abs(lam_t)[:, None] + np.abs(u)[:, None] + np.abs(v)[None, :])
             + np.spacing(np.abs(u))[:, None] + np.spacing(np.abs(v))[None, :] + 8 * _TINY)
    if np.any(X & (R < -bound)) or np.any(~X & (R > bound)):
        return False
    ui, uj = np.nonzero(np.abs(R) <= bound)
    if ui.size > MAX_EXACT_ENTRIES:
        return False
    for i, j in zip(ui.tolist(), uj.tolist(), strict=True):
        r = Fraction(float(S[i, j])) - Fraction(float(lam[gid[i]])) - u_q[i] - v_q[j]
        if (X[i, j] and r < 0) or (not X[i, j] and r > 0):
            return False
    return True
