"""Exact optimality proofs from a solver's float multipliers (no tolerance anywhere).

A feasible mask X is optimal iff some multipliers (u, v, lam) meet complementary slackness
exactly: reduced costs R_ij = S_ij - u_i - v_j - lam_g(i) >= 0 where X selects, <= 0 where it
does not, and u_b > 0 only where block b sits at its upper count bound, u_b < 0 only at its lower
one (then the Lagrangian bound equals the objective: every term of the gap is zero).

A solver's multipliers meet these conditions only up to rounding (the reduced cost of a basic
variable is 1e-17 instead of 0). :func:`proves_optimal` rebuilds exact rational multipliers from
them, in ``fractions.Fraction``, so that the reduced costs of the tight entries
(|R| <= TIGHT_REL * scale) are exactly 0:

* when the token and the expert blocks both bind, along the connected components of the tight
  entries: there u_i + lam_g(i) + v_j = S_ij fixes a component's multipliers up to one shift,
  and the shifts and the budget multipliers are then chosen exactly inside the intervals the
  sign rules allow (nearest the solver's values), so that a budget multiplier that must equal a
  sum of scores is that sum, not its float64 rounding;
* otherwise the budget multipliers are kept as given and each tight entry fixes its row's.

Every condition is then checked exactly: in float64 with a rigorous error bound where that
decides, in rationals where it does not. The float multipliers are only a hint; a wrong hint
makes the proof fail (undecided), never succeed wrongly.
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


class _Exact:
    """A vector of exact multipliers: float64 values, each exact as it stands, with rational
    overrides where the exact value is not a float (``base`` then holds its rounding)."""

    __slots__ = ("base", "over")

    def __init__(self, base) -> None:
        self.base = np.array(base, dtype=np.float64)
        self.over: dict[int, Fraction] = {}

    def __getitem__(self, b: int) -> Fraction:
        q = self.over.get(b)
        return Fraction(float(self.base[b])) if q is None else q

    def __setitem__(self, b: int, q: Fraction) -> None:
        f = float(q)
        self.base[b] = f
        if Fraction(f) == q:
            self.over.pop(b, None)
        else:
            self.over[b] = q


def _sign_ok(vec: _Exact, count, lo, hi) -> bool:
    """Complementary slackness of a block's multipliers, exactly."""
    y = vec.base
    bad = ((y > 0) & (count != hi)) | ((y < 0) & (count != lo))
    for b, q in vec.over.items():
        bad[b] = (q > 0 and count[b] != hi[b]) or (q < 0 and count[b] != lo[b])
    return not bad.any()


def _sign_range(count, lo, hi) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) float bounds the sign rules put on each row's multiplier (0 or +-inf)."""
    return np.where(count > lo, 0.0, -np.inf), np.where(count < hi, 0.0, np.inf)


def proves_optimal(problem: RoutingProblem, X: np.ndarray, duals: dict[str, np.ndarray]) -> bool:
    """True iff exact multipliers rebuilt from ``duals`` prove the feasible mask X (T, N) optimal."""
    S = problem.scores
    T, N = S.shape
    blocks = problem.blocks
    counts = _counts(problem, X)
    gid = problem.group_ids
    lam = np.zeros(problem.num_groups)
    if "budget" in blocks:
        lam = np.asarray(duals.get("budget", lam), dtype=np.float64)
        if lam.shape != (problem.num_groups,) or not np.all(np.isfinite(lam)):
            return False
    sides = [f for f in ("token", "expert") if f in blocks]
    floats = {}
    for f, size in (("token", T), ("expert", N)):
        y = np.asarray(duals.get(f, np.zeros(size)), dtype=np.float64) if f in sides else np.zeros(size)
        if y.shape != (size,) or not np.all(np.isfinite(y)):
            return False
        floats[f] = y
    R = S - lam[gid][:, None] - floats["token"][:, None] - floats["expert"][None, :]
    scale = float(np.max(np.abs(S)) + np.max(np.abs(lam)) + max(np.max(np.abs(y)) for y in floats.values()))
    tight = np.nonzero(np.abs(R) <= TIGHT_REL * scale)
    if tight[0].size > MAX_EXACT_ENTRIES:
        return False
    if len(sides) == 2:
        rebuilt = _rebuild_components(problem, tight, floats, lam, counts)
    elif sides and "budget" in blocks:
        rebuilt = _rebuild_with_budget(problem, tight, floats, lam, counts, sides[0])
    elif sides:
        rebuilt = _rebuild(problem, tight, floats, lam, counts, sides[0]), _Exact(lam)
    else:
        rebuilt = {}, _Exact(_budget_only(problem, X, lam, TIGHT_REL * scale))
    if rebuilt is None:
        return False
    exact, lam_q = rebuilt
    if "budget" in blocks and not _sign_ok(lam_q, counts["budget"], *problem.block_bounds("budget")):
        return False
    for f in sides:
        if not _sign_ok(exact[f], counts[f], *problem.block_bounds(f)):
            return False
    return _reduced_costs_ok(problem, X, lam_q, exact)


def _budget_only(problem, X, lam, tol: float) -> np.ndarray:
    """Budget multipliers of a program with no binding token or expert block, each moved (by at most ``tol``, its
    float rounding) into [largest unselected score, smallest selected score] of its group where it falls just
    outside: there every reduced cost has its sign, and the moved value is a score, exact as it stands (a solver's
    threshold can be a few ulps off the score it equals)."""
    S = problem.scores
    gid = problem.group_ids
    lam = np.array(lam, dtype=np.float64)
    for g in range(problem.num_groups):
        rows = gid == g
        sel, uns = S[rows][X[rows]], S[rows][~X[rows]]
        lo = float(uns.max()) if uns.size else -np.inf
        hi = float(sel.min()) if sel.size else np.inf
        if lo <= hi:
            moved = min(max(float(lam[g]), lo), hi)
            if abs(moved - lam[g]) <= tol:
                lam[g] = moved
    return lam


def _rebuild(problem, tight, floats, lam, counts, side):
    """One binding block, no budget: each tight entry fixes its row's multiplier exactly,
    S_ij - lam_g; rows strictly inside their bounds get 0."""
    S = problem.scores
    gid = problem.group_ids
    ti, tj = tight
    vec = _Exact(floats[side])
    lo, hi = problem.block_bounds(side)
    inside = (counts[side] > lo) & (counts[side] < hi)
    vec.base[inside] = 0.0
    rows = ti if side == "token" else tj
    rows_u, first = np.unique(rows, return_index=True)
    keep = ~inside[rows_u]
    for b, i, j in zip(rows_u[keep].tolist(), ti[first][keep].tolist(), tj[first][keep].tolist(), strict=True):
        vec[b] = Fraction(float(S[i, j])) - Fraction(float(lam[gid[i]]))
    return {side: vec}


def _rebuild_with_budget(problem, tight, floats, lam, counts, side):
    """One of the token/expert blocks binds, and the budget: exact (multipliers, budget ones).

    With the expert block free (v = 0) a tight entry reads u_i + lam_g(i) = S_ij; with the token
    block free (u = 0) it reads lam_g(i) + v_j = S_ij. Either way it joins two rows (token-group
    or group-expert), and a connected component of such joins is fixed up to one shift, chosen
    exactly within the sign rules of both kinds of rows (:func:`_two_kinds`)."""
    T, N = problem.shape
    G = problem.num_groups
    S = problem.scores
    gid = problem.group_ids
    ti, tj = tight
    g_rows = (counts["budget"], *problem.block_bounds("budget"))
    if side == "token":  # rows: tokens (u) and groups (lam)
        first = np.unique(ti, return_index=True)[1]
        edges = [(i, int(gid[i]), float(S[i, j])) for i, j in zip(ti[first].tolist(), tj[first].tolist(), strict=True)]
        a_rows = (counts["token"], *problem.block_bounds("token"))
        got = _two_kinds(T, G, edges, floats["token"], lam, a_rows, g_rows, roots_b_first=True)
        return None if got is None else ({"token": got[0]}, got[1])
    pairs: dict[tuple[int, int], float] = {}
    for i, j in zip(ti.tolist(), tj.tolist(), strict=True):
        pairs.setdefault((int(gid[i]), j), float(S[i, j]))
    edges = [(g, j, val) for (g, j), val in pairs.items()]
    e_rows = (counts["expert"], *problem.block_bounds("expert"))
    got = _two_kinds(G, N, edges, lam, floats["expert"], g_rows, e_rows)
    return None if got is None else ({"expert": got[1]}, got[0])


def _two_kinds(n_a, n_b, edges, hint_a, hint_b, rows_a, rows_b, roots_b_first: bool = False):
    """Exact multipliers y_a (n_a,) and y_b (n_b,) with y_a + y_b = value on a spanning forest of
    ``edges`` (a, b, value), each component shifted (y_a + delta, y_b - delta) into the sign
    rules of its rows (rows_*: count, lo, hi arrays), delta nearest 0 (None when no exact choice
    exists). A row on no edge keeps its hint, clipped into its sign range. Components are rooted
    at a budget group where they have one (its given multiplier is then kept unless a sign rule
    moves it): groups are the a rows, or the b rows with ``roots_b_first``."""
    out = []
    for hint, rows in ((hint_a, rows_a), (hint_b, rows_b)):
        low, high = _sign_range(*rows)
        out.append(_Exact(np.clip(hint, low, high)))
    adj: dict[int, list[tuple[int, float]]] = {}
    for a, b, val in edges:
        adj.setdefault(a, []).append((n_a + b, val))
        adj.setdefault(n_a + b, []).append((a, val))
    hints = np.concatenate([np.asarray(hint_a, dtype=np.float64), np.asarray(hint_b, dtype=np.float64)])
    cnt = np.concatenate([rows_a[0], rows_b[0]]).tolist()
    lo = np.concatenate([rows_a[1], rows_b[1]]).tolist()
    hi = np.concatenate([rows_a[2], rows_b[2]]).tolist()
    value: dict[int, Fraction] = {}
    for root in sorted(adj, key=lambda node: ((node < n_a) == roots_b_first, node)):
        if root in value:
            continue
        value[root] = Fraction(float(hints[root]))
        members = [root]
        queue = deque([root])
        while queue:
            node = queue.popleft()
            for other, val in adj[node]:
                if other not in value:
                    value[other] = Fraction(val) - value[node]
                    members.append(other)
                    queue.append(other)
        low = high = None
        for node in members:
            y, plus = value[node], node < n_a  # the row's multiplier: y + delta (a) or y - delta (b)
            if cnt[node] < hi[node]:  # multiplier <= 0
                high, low = (_min(high, -y), low) if plus else (high, _max(low, y))
            if cnt[node] > lo[node]:  # multiplier >= 0
                high, low = (high, _max(low, -y)) if plus else (_min(high, y), low)
        if low is not None and high is not None and low > high:
            return None
        delta = low if (low is not None and low > 0) else (high if (high is not None and high < 0) else Fraction(0))
        for node in members:
            if node < n_a:
                out[0][node] = value[node] + delta
            else:
                out[1][node - n_a] = value[node] - delta
    return out[0], out[1]


def _rebuild_components(problem, tight, floats, lam, counts):
    """Token and expert blocks both bind: exact (multipliers by side, budget multipliers).

    On a component C of the tight entries, w_i + v_j = S_ij with w_i = u_i + lam_g(i) fixes
    (w, v) up to one shift delta_C (w + delta_C, v - delta_C); the root's float multipliers give
    base values. The sign rules are then interval constraints: on delta_C (experts), on
    delta_C - lam_g (tokens of group g) and on lam_g (groups). The budget multipliers are chosen
    first, nearest the given ones within the bounds every component implies, then each delta_C
    nearest 0 (None when no exact choice exists). A token or expert on no tight entry keeps its
    float multiplier, clipped into its sign range.
    """
    T, N = problem.shape
    S = problem.scores
    gid = problem.group_ids
    G = problem.num_groups
    ti, tj = tight
    adj: dict[int, list[tuple[int, int, int]]] = {}
    for i, j in zip(ti.tolist(), tj.tolist(), strict=True):
        adj.setdefault(i, []).append((T + j, i, j))
        adj.setdefault(T + j, []).append((i, i, j))
    u_f, v_f = floats["token"], floats["expert"]
    lam_f = [Fraction(float(x)) for x in lam]
    gid_l = gid.tolist()
    value: dict[int, Fraction] = {}
    components: list[list[int]] = []
    for root in sorted(adj):
        if root in value:
            continue
        value[root] = (Fraction(float(u_f[root])) + lam_f[gid_l[root]]) if root < T else Fraction(float(v_f[root - T]))
        members = [root]
        queue = deque([root])
        while queue:
            node = queue.popleft()
            for other, i, j in adj[node]:
                if other not in value:
                    value[other] = Fraction(float(S[i, j])) - value[node]
                    members.append(other)
                    queue.append(other)
        components.append(members)

    t_cnt, t_lo, t_hi = counts["token"], *problem.block_bounds("token")
    e_cnt, e_lo, e_hi = counts["expert"], *problem.block_bounds("expert")
    # Per component: delta in [low, high]; per group touched: delta - lam_g in [A_g, B_g].
    spans = []
    for members in components:
        low = high = None
        touched: dict[int, list] = {}
        for node in members:
            y = value[node]
            if node < T:  # u = y + delta - lam_g
                box = touched.setdefault(gid_l[node], [None, None])
                if t_cnt[node] < t_hi[node]:
                    box[1] = _min(box[1], -y)
                if t_cnt[node] > t_lo[node]:
                    box[0] = _max(box[0], -y)
            else:  # v = y - delta
                j = node - T
                if e_cnt[j] < e_hi[j]:
                    low = _max(low, y)
                if e_cnt[j] > e_lo[j]:
                    high = _min(high, y)
        spans.append((low, high, touched))

    if "budget" in problem.blocks:
        lam_q = _budget_multipliers(problem, counts, lam_f, spans)
        if lam_q is None:
            return None
    else:
        lam_q = [Fraction(0)] * G
    t_low, t_high = _sign_range(t_cnt, t_lo, t_hi)
    e_low, e_high = _sign_range(e_cnt, e_lo, e_hi)
    u = _Exact(np.clip(u_f, t_low, t_high))
    v = _Exact(np.clip(v_f, e_low, e_high))
    for g in [g for g in range(G) if lam_q[g] != lam_f[g]]:  # tokens on no tight entry follow lam_g
        for i in np.flatnonzero(gid == g).tolist():
            if i not in value:
                q = Fraction(float(u_f[i])) + lam_f[g] - lam_q[g]
                if (t_low[i] == 0 and q < 0) or (t_high[i] == 0 and q > 0):
                    q = Fraction(0)  # clipped into the sign range
                u[i] = q
    for members, (low, high, touched) in zip(components, spans, strict=True):
        for g, (a, b) in touched.items():
            if a is not None:
                low = _max(low, lam_q[g] + a)
            if b is not None:
                high = _min(high, lam_q[g] + b)
        if low is not None and high is not None and low > high:
            return None
        delta = low if (low is not None and low > 0) else (high if (high is not None and high < 0) else Fraction(0))
        for node in members:
            if node < T:
                u[node] = value[node] + delta - lam_q[gid_l[node]]
            else:
                v[node - T] = value[node] - delta
    lam_vec = _Exact(lam)
    for g in range(G):
        lam_vec[g] = lam_q[g]
    return {"token": u, "expert": v}, lam_vec


def _budget_multipliers(problem, counts, lam_f, spans):
    """Exact budget multipliers within every component's implied bounds, nearest the given
    ones: unary bounds lam_g in [lo_g, hi_g] and pairwise lam_g - lam_h <= w (two groups in one
    component), the latter met by lowering (at most G rounds); None if none fits."""
    G = problem.num_groups
    b_cnt = counts["budget"].tolist()
    b_lo, b_hi = (b.tolist() for b in problem.block_bounds("budget"))
    lo: list[Fraction | None] = [Fraction(0) if b_cnt[g] > b_lo[g] else None for g in range(G)]
    hi: list[Fraction | None] = [Fraction(0) if b_cnt[g] < b_hi[g] else None for g in range(G)]
    pairs: list[tuple[int, int, Fraction]] = []  # lam_g - lam_h <= w
    for low, high, touched in spans:
        for g, (a, b) in touched.items():
            if low is not None and b is not None:  # delta >= low and delta <= lam_g + b
                lo[g] = _max(lo[g], low - b)
            if high is not None and a is not None:  # delta <= high and delta >= lam_g + a
                hi[g] = _min(hi[g], high - a)
            if a is not None and b is not None and a > b:
                return None
            for h, (_a2, b2) in touched.items():
                if h != g and a is not None and b2 is not None:  # lam_g + a <= delta <= lam_h + b2
                    pairs.append((g, h, b2 - a))
    lam = []
    for g in range(G):
        if lo[g] is not None and hi[g] is not None and lo[g] > hi[g]:
            return None
        x = lam_f[g]
        if lo[g] is not None and x < lo[g]:
            x = lo[g]
        if hi[g] is not None and x > hi[g]:
            x = hi[g]
        lam.append(x)
    for _ in range(G + 1):
        changed = False
        for g, h, w in pairs:
            if lam[g] - lam[h] > w:
                lam[g] = lam[h] + w
                changed = True
        if not changed:
            break
    if any(lo[g] is not None and lam[g] < lo[g] for g in range(G)):
        return None
    if any(lam[g] - lam[h] > w for g, h, w in pairs):
        return None
    return lam


def _reduced_costs_ok(problem, X, lam_q: _Exact, exact: dict[str, _Exact]) -> bool:
    """Every reduced cost has the sign X needs, decided in float64 with an error bound and in
    rationals where the bound does not decide."""
    S = problem.scores
    T, N = S.shape
    gid = problem.group_ids
    u_q = exact.get("token", _Exact(np.zeros(T)))
    v_q = exact.get("expert", _Exact(np.zeros(N)))
    u, v, lam = u_q.base, v_q.base, lam_q.base
    lam_t = lam[gid]
    R = ((S - lam_t[:, None]) - u[:, None]) - v[None, :]
    bound = (4 * EPS * (np.abs(S) + np.abs(lam_t)[:, None] + np.abs(u)[:, None] + np.abs(v)[None, :])
             + np.spacing(np.abs(lam_t))[:, None] + np.spacing(np.abs(u))[:, None]
             + np.spacing(np.abs(v))[None, :] + 8 * _TINY)
    if np.any(X & (R < -bound)) or np.any(~X & (R > bound)):
        return False
    ui, uj = np.nonzero(np.abs(R) <= bound)
    if ui.size > MAX_EXACT_ENTRIES:
        return False
    for i, j in zip(ui.tolist(), uj.tolist(), strict=True):
        r = Fraction(float(S[i, j])) - lam_q[int(gid[i])] - u_q[i] - v_q[j]
        if (X[i, j] and r < 0) or (not X[i, j] and r > 0):
            return False
    return True


def _min(a: Fraction | None, b: Fraction) -> Fraction:
    return b if a is None or b < a else a


def _max(a: Fraction | None, b: Fraction) -> Fraction:
    return b if a is None or b > a else a
