"""The analytic optimum and dual certificate of single-block routing programs, in O(T*N).

A single-block program (only token bounds, only expert bounds, or only a budget per group;
papers/routing-as-lp.md §2-3) splits into independent constraint rows — tokens, experts or groups — each
of the form

    max sum_l s_l x_l   s.t.  lo <= sum_l x_l <= hi,  0 <= x_l <= 1.

With s_(r) the r-th largest entry of the row (s_(0) = +inf, s_(L+1) = -inf), the threshold

    u* = clip(0, s_(hi+1), s_(lo))

is an optimal dual: the entries above u* are selected, those below are not, and ties at u*
fill the count up to ``hi`` (u* > 0), ``lo`` (u* < 0), or the fewest needed (u* = 0). Greedy
top-k per row (Token Choice), top-e per column (Expert Choice) and global top-c (USMoE, Prop. 3.1
for ``== c``) are the special cases lo = hi. For ``<= c`` with signed scores u* = 0 drops the
negative entries that plain top-c keeps — the sign caveat of papers/routing-as-lp.md §3.

Certifying a given mask needs no sort: the mask's own boundary values give a dual
u = clip(0, max unselected, min selected) whose bound exceeds the mask's objective by exactly
u * (hi - count) or u * (lo - count); the mask is optimal iff that is 0 and no unselected entry
beats a selected one. The decision is exact (comparisons only, no tolerance).

Tie-breaking is deterministic: among tied entries the lowest flat index (row-major) is taken.
"""

from __future__ import annotations

import math
import time

import numpy as np

from usmoe_lp.errors import UnsupportedProblem
from usmoe_lp.lp.certificate import Certificate, as_mask, dual_bound, feasibility_violations
from usmoe_lp.lp.problem import RoutingProblem

_LN10 = math.log(10.0)


def single_block(problem: RoutingProblem) -> str:
    """The one binding block of ``problem`` (``budget`` when none binds).

    Raises:
        UnsupportedProblem: when two or more blocks bind (use ``flow`` or an LP backend).
    """
    blocks = problem.blocks
    if len(blocks) > 1:
        raise UnsupportedProblem(
            f"the closed form covers single-block programs; this one has {' + '.join(blocks)} "
            "constraints — use backend='flow' (min-cost flow), 'highs' (LP duals) or 'cbc'/'milp' "
            "(integer program)"
        )
    return blocks[0] if blocks else "budget"


# ----------------------------------------------------------------------------- row views
def _group_index(gid: np.ndarray, G: int) -> list[np.ndarray]:
    """The tokens of each group 0..G-1, in token order."""
    order = np.argsort(gid, kind="stable")
    return np.split(order, np.cumsum(np.bincount(gid, minlength=G))[:-1])


def _group_rows(problem: RoutingProblem) -> list[np.ndarray]:
    return _group_index(problem.group_ids, problem.num_groups)


def _row_views(problem: RoutingProblem, block: str, arr: np.ndarray) -> list[np.ndarray]:
    """Views of ``arr`` (T, N) as matrices (B, L) whose rows are the rows of ``block``."""
    if block == "token":
        return [arr]
    if block == "expert":
        return [arr.T]
    if problem.num_groups == 1:
        return [arr.reshape(1, -1)]
    return [arr[idx].reshape(1, -1) for idx in _group_rows(problem)]


# ----------------------------------------------------------------------------- order statistics
def kth_largest(M: np.ndarray, k: np.ndarray) -> np.ndarray:
    """(B,) the k_b-th largest entry of each row of M (B, L); +inf for k = 0, -inf for k > L."""
    B, L = M.shape
    out = np.empty(B, dtype=np.float64)
    out[k <= 0] = np.inf
    out[k > L] = -np.inf
    inner = (k >= 1) & (k <= L)
    for kk in np.unique(k[inner]):
        rows = np.flatnonzero(k == kk)
        sub = M if rows.size == B else M[rows]
        out[rows] = np.partition(sub, L - kk, axis=1)[:, L - kk]
    return out


def row_thresholds(M: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(B,) optimal dual u* = clip(0, s_(hi+1), s_(lo)) of each row of M (B, L); lo, hi (B,) int."""
    upper = kth_largest(M, lo)
    lower = kth_largest(M, hi + 1)
    return np.minimum(np.maximum(0.0, lower), upper)


def fill_rows(M: np.ndarray, u: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(B, L) bool: the optimal mask of each row of M (B, L) for thresholds u (B,), ties filled
    lowest index first."""
    gt = M > u[:, None]
    a = gt.sum(axis=1)
    need = np.where(u > 0, hi - a, np.where(u < 0, lo - a, np.maximum(lo - a, 0)))
    rows = np.flatnonzero(need > 0)  # rows with ties at u to fill (few, unless scores tie a lot)
    if rows.size:
        sub = M if rows.size == M.shape[0] else M[rows]
        eq = sub == u[rows, None]
        gt[rows] |= eq & (np.cumsum(eq, axis=1) <= need[rows, None])
    return gt


def solve_blocks(problem: RoutingProblem) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The closed-form optimum: ((T, N) bool mask, {block: (B,) optimal duals}); the one-program
    case of :func:`solve_blocks_stacked`."""
    block = single_block(problem)
    lo, hi = problem.block_bounds(block)
    masks, u = solve_blocks_stacked(problem.scores[None], block, problem.group_ids, problem.num_groups,
                                    lo[None], hi[None])
    return masks[0], {block: u[0]}


def _stacked_rows(S: np.ndarray, block: str, gid: np.ndarray, G: int):
    """The rows of ``block`` of stacked (B, T, N) arrays: [(matrix (B * R_part, L), row ids
    (R_part,), tokens or None)] whose rows, in order, are rows ``ids`` of every program
    (program-major); ``tokens`` lists the tokens of a budget group's rows."""
    B, T, N = S.shape
    if block == "token":
        return [(S.reshape(B * T, N), np.arange(T), None)]
    if block == "expert":
        return [(S.transpose(0, 2, 1).reshape(B * N, T), np.arange(N), None)]
    if G == 1:
        return [(S.reshape(B, T * N), np.arange(1), None)]
    return [(S[:, idx].reshape(B, -1), np.array([g]), idx) for g, idx in enumerate(_group_index(gid, G))]


def solve_blocks_stacked(S: np.ndarray, block: str, gid: np.ndarray, G: int, lo: np.ndarray,
                         hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form optima of B programs with the same shape, binding ``block`` and groups.

    Args:
        S: (B, T, N) float64 scores.
        block: ``token``, ``expert`` or ``budget``.
        gid: (T,) int64 group of each token; G: number of groups.
        lo, hi: (B, R) int64 count bounds of each row of ``block`` (R = T, N or G).

    Returns:
        ((B, T, N) bool optimal masks, (B, R) float64 optimal duals u* per row); row by row the
        same numbers whatever else is in the stack.
    """
    B, T, N = S.shape
    u = np.empty((B, lo.shape[1]))
    masks = np.empty((B, T, N), dtype=bool)
    for M, ids, tokens in _stacked_rows(S, block, gid, G):
        a, b = lo[:, ids].reshape(-1), hi[:, ids].reshape(-1)
        th = row_thresholds(M, a, b)
        m = fill_rows(M, th, a, b)
        u[:, ids] = th.reshape(B, ids.size)
        if block == "expert":
            masks[:] = m.reshape(B, N, T).transpose(0, 2, 1)
        elif tokens is None:
            masks[:] = m.reshape(B, T, N)
        else:
            masks[:, tokens] = m.reshape(B, tokens.size, N)
    return masks, u


# ----------------------------------------------------------------------------- ties and margins
def _log10_comb(n: int, m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return (math.lgamma(n + 1) - np.array([math.lgamma(x + 1) + math.lgamma(n - x + 1) for x in m])) / _LN10


def _block_multiplicity(M: np.ndarray, u: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    """Per row: (entries tied at u*, log10 of the number of optimal 0/1 selections)."""
    a = (M > u[:, None]).sum(axis=1)
    t = (M == u[:, None]).sum(axis=1)
    ties = np.zeros(M.shape[0], dtype=np.int64)
    logm = np.zeros(M.shape[0], dtype=np.float64)
    for b in np.flatnonzero(t > 0):
        tb, ab = int(t[b]), int(a[b])
        if u[b] > 0:
            picks = np.array([hi[b] - ab])
        elif u[b] < 0:
            picks = np.array([lo[b] - ab])
        else:
            picks = np.arange(max(0, lo[b] - ab), min(tb, hi[b] - ab) + 1)
        if picks.size == 1 and picks[0] in (0, tb):  # C(t, 0) = C(t, t) = 1: unique, exactly
            continue
        logs = _log10_comb(tb, picks)
        top = logs.max()
        ties[b], logm[b] = tb, top + math.log10(np.sum(10.0 ** (logs - top)))
    return ties, logm


def _margins(min_sel, max_unsel, count, lo, hi) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        m = min_sel - max_unsel
    m = np.where(np.isnan(m), np.inf, m)
    m = np.minimum(m, np.where(count > lo, min_sel, np.inf))
    return np.minimum(m, np.where(count < hi, -max_unsel, np.inf))


# ----------------------------------------------------------------------------- certificate


def _mask_stats(S: np.ndarray, X: np.ndarray, block: str, gid: np.ndarray, G: int):
    """Per row of ``block`` of each stacked program: (count, sum selected, min selected, max
    unselected), each (B, R). S (B, T, N) float64, X (B, T, N) bool.

    Selected-side statistics come from the selected entries alone (a gather and ``bincount``,
    which sums each row's entries in index order, so a program's numbers do not depend on the
    others in the stack); only the max over unselected entries needs a dense pass, done in
    cache-sized chunks (whole programs, or row ranges of one) with the selected positions
    overwritten by -inf in a reused buffer. This avoids numpy's slow ``where=`` reductions and
    boolean indexing (10-15x a plain pass at 16384 x 128).
    """
    B, T, N = S.shape
    R = {"token": T, "expert": N}.get(block, G)
    flat = S.reshape(-1)
    idx = np.flatnonzero(X)
    sel = flat[idx]
    prog, rem = np.divmod(idx, T * N) if B > 1 else (0, idx)
    if block == "token":
        row_of = prog * T + rem // N
    elif block == "expert":
        row_of = prog * N + rem % N
    else:
        row_of = (prog + 0 * idx) if G == 1 else prog * G + gid[rem // N]
    count = np.bincount(row_of, minlength=B * R).reshape(B, R)
    sum_sel = np.bincount(row_of, weights=sel, minlength=B * R).astype(np.float64).reshape(B, R)
    min_sel = np.full(B * R, np.inf)
    np.minimum.at(min_sel, row_of, sel)
    min_sel = min_sel.reshape(B, R)

    max_unsel = np.full((B, R), -np.inf)
    rows = max(1, 2**17 // N)  # ~1 MiB of float64 per chunk: cache-resident, few iterations
    if T >= rows:  # row ranges of one program
        spans = [(b, b + 1, r0, min(T, r0 + rows)) for b in range(B) for r0 in range(0, T, rows)]
    else:  # whole programs
        m = max(1, rows // T)
        spans = [(b0, min(B, b0 + m), 0, T) for b0 in range(0, B, m)]
    buf = np.empty(max((b1 - b0) * (r1 - r0) * N for b0, b1, r0, r1 in spans))
    for b0, b1, r0, r1 in spans:
        f0, f1 = b0 * T * N + r0 * N, (b1 - 1) * T * N + r1 * N  # a contiguous range of the stack
        chunk = buf[: f1 - f0]
        np.copyto(chunk, flat[f0:f1])
        lo, hi = np.searchsorted(idx, [f0, f1])
        chunk[idx[lo:hi] - f0] = -np.inf
        c = chunk.reshape(b1 - b0, r1 - r0, N)
        out = max_unsel[b0:b1]
        if block == "token":
            c.max(axis=2, out=out[:, r0:r1])
        elif block == "expert":
            np.maximum(out, c.max(axis=1), out=out)
        elif G == 1:
            np.maximum(out[:, 0], c.max(axis=(1, 2)), out=out[:, 0])
        else:
            per_token = c.max(axis=2)  # (m, r)
            np.maximum.at(out, (np.arange(b1 - b0)[:, None], gid[None, r0:r1]), per_token)
    return count, sum_sel, min_sel, max_unsel


def certify_closed_form(problem: RoutingProblem, mask) -> Certificate:
    """Exact O(T*N) certificate that ``mask`` (T, N) bool is optimal for a single-block program;
    the one-program case of :func:`certify_closed_form_stacked`.

    Fast path: statistics of the mask alone (count, sum, min selected, max unselected per block).
    Only when the mask is not optimal, or the optimum is tied, is the closed-form optimum
    computed (to report the true gap, the optimal duals and the number of optimal masks).

    >>> import numpy as np
    >>> S = np.array([[0.5, -1.0], [-2.0, -0.2]])
    >>> top2 = np.array([[True, False], [False, True]])
    >>> certify_closed_form(RoutingProblem.budget(S, 2, sense="==") , top2).optimal
    True
    >>> cert = certify_closed_form(RoutingProblem.budget(S, 2, sense="<="), top2)
    >>> cert.optimal, round(cert.gap, 12)
    (False, 0.2)
    """
    t0 = time.perf_counter()
    single_block(problem)
    X = as_mask(problem, mask)
    return _certify_stacked([problem], X[None], t0)[0]


def stack_key(problem: RoutingProblem) -> tuple:
    """Single-block programs with equal keys can be certified and solved on stacked arrays
    (same shape, same binding block, same groups; the bounds may differ)."""
    groups = None if problem.groups is None or single_block(problem) != "budget" else problem.groups.tobytes()
    return problem.shape, single_block(problem), groups


def certify_closed_form_stacked(problems, X: np.ndarray) -> list[Certificate]:
    """The closed-form certificates of B single-block programs with one :func:`stack_key`.

    Args:
        problems: B programs (their ``stack_key`` must agree; not re-checked here).
        X: (B, T, N) bool masks, already validated (:func:`~usmoe_lp.lp.certificate.as_mask`).

    Returns:
        One :class:`Certificate` per program, equal field by field (``seconds`` aside: the stack's
        time split evenly) to what :func:`certify_closed_form` gives for it alone.
    """
    return _certify_stacked(problems, X, time.perf_counter())


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0][None] if len(arrays) == 1 else np.stack(arrays)  # one program: a view, no copy


def _certify_stacked(problems, X: np.ndarray, t0: float) -> list[Certificate]:
    p0 = problems[0]
    block = single_block(p0)
    gid, G = p0.group_ids, p0.num_groups
    S = _stack([p.scores for p in problems])
    lo = _stack([p.block_bounds(block)[0] for p in problems])
    hi = _stack([p.block_bounds(block)[1] for p in problems])
    count, sum_sel, min_sel, max_unsel = _mask_stats(S, X, block, gid, G)
    primal = sum_sel.sum(axis=1)
    feasible = np.all((count >= lo) & (count <= hi), axis=1)
    ordered = np.all(max_unsel <= min_sel, axis=1)
    u = np.minimum(np.maximum(0.0, max_unsel), min_sel)
    block_gap = np.where(u > 0, u * (hi - count), np.where(u < 0, u * (lo - count), 0.0))
    margins = _margins(min_sel, max_unsel, count, lo, hi)
    margin = margins.min(axis=1) if margins.shape[1] else np.full(len(problems), np.inf)
    optimal = feasible & ordered & np.all(block_gap == 0, axis=1)
    gap_sum = block_gap.sum(axis=1)

    out = []
    for b, problem in enumerate(problems):
        p_primal = float(primal[b])
        if optimal[b]:
            duals = {block: u[b].copy()}
            dual = p_primal + float(gap_sum[b])
            tied = np.flatnonzero(margins[b] == 0)
            ties, logm = 0, 0.0
            if tied.size:
                ties, logm = _ties(_row_views(problem, block, problem.scores), u[b], lo[b], hi[b], tied)
            msg = "optimal" + (" (unique)" if logm == 0 else f" (tied: 10^{logm:.3g} optimal masks)")
        else:
            best, duals = solve_blocks(problem)
            dual = dual_bound(problem, duals)
            ties, logm = _ties(_row_views(problem, block, problem.scores), duals[block], lo[b], hi[b],
                               np.arange(lo.shape[1]))
            if not feasible[b]:
                msg = "infeasible: " + "; ".join(feasibility_violations(problem, X[b]))
            else:
                msg = f"not optimal: objective {p_primal:.6g} < optimum {problem.objective(best):.6g}"
        ok = bool(optimal[b])
        out.append(dict(
            primal=p_primal, dual=dual, gap=dual - p_primal, optimal=ok, feasible=bool(feasible[b]),
            integral=True, max_fractionality=0.0, ties=ties, log10_optimal_masks=logm, margin=float(margin[b]),
            backend="closed_form", tolerance=0.0, duals=duals, message=msg,
            status="optimal" if ok else ("not_optimal" if feasible[b] else "infeasible"),
        ))
    seconds = (time.perf_counter() - t0) / len(problems)
    return [Certificate(seconds=seconds, **fields) for fields in out]


def _ties(Ms, u, lo, hi, which) -> tuple[int, float]:
    """Sum of tied entries and log10 multiplicity over the blocks listed in ``which``."""
    ties, logm = 0, 0.0
    offsets = np.cumsum([0] + [M.shape[0] for M in Ms])
    for k, M in enumerate(Ms):
        rows = which[(which >= offsets[k]) & (which < offsets[k + 1])] - offsets[k]
        if rows.size == 0:
            continue
        sl = rows + offsets[k]
        t, lm = _block_multiplicity(M[rows], u[sl], lo[sl], hi[sl])
        ties += int(t.sum())
        logm += float(lm.sum())
    return ties, logm
