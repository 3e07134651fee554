"""Shrink a failing instance to a minimal counterexample.

Delta-debugging over the two axes (Zeller & Hildebrandt 2002, "Simplifying and isolating
failure-inducing input"): remove halves, then quarters, ..., then single tokens (rows) and
experts (columns) while the claim still fails, alternating axes until no single removal keeps
it failing; then try a smaller k, and finally simpler values (scores rounded to 0, 1 or 2
decimals) when the rounded matrix still fails. The result is 1-minimal in rows and columns:
removing any one token or expert makes the claim hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from usmoe_lp.errors import UsmoeLpError
from usmoe_lp.verify.claims import Check, Claim, Context


@dataclass(frozen=True)
class Shrunk:
    """A minimal failing instance: scores (T', N') float64, k, and the failing check."""

    scores: np.ndarray
    k: int
    check: Check
    evaluations: int
    exhausted: bool  # True if the evaluation budget ran out before 1-minimality was reached


def _failing(claim: Claim, S: np.ndarray, k: int, ctx: Context) -> Check | None:
    if S.shape[0] < 1 or S.shape[1] < 1 or k > S.shape[1] or k < 1:
        return None
    try:
        res = claim.check_one(S, k, ctx)  # a batch of one: the same check as the runner's
    except UsmoeLpError:
        return None
    return res if (res is not None and not res.passed) else None


def shrink(claim: Claim, scores: np.ndarray, k: int, ctx: Context, max_evaluations: int = 600) -> Shrunk:
    """Smallest (fewest tokens, then experts) sub-matrix of ``scores`` on which ``claim`` fails.

    scores: (T, N) float64 on which the claim fails for this ``k``.
    """
    S = np.array(scores, dtype=np.float64)
    evals = 0
    current = _failing(claim, S, k, ctx)
    evals += 1
    if current is None:
        raise ValueError(f"claim {claim.id} does not fail on the given instance; nothing to shrink")

    def attempt(cand: np.ndarray, kk: int) -> Check | None:
        nonlocal evals
        if evals >= max_evaluations:
            return None
        evals += 1
        return _failing(claim, cand, kk, ctx)

    def minimize(S: np.ndarray, k: int, current: Check) -> tuple[np.ndarray, int, Check]:
        changed = True
        while changed and evals < max_evaluations:
            changed = False
            for axis in (0, 1):
                chunk = max(1, S.shape[axis] // 2)
                while chunk >= 1 and evals < max_evaluations:
                    i = 0
                    while i < S.shape[axis] and S.shape[axis] > 1:
                        cand = np.delete(S, np.arange(i, min(i + chunk, S.shape[axis])), axis=axis)
                        res = attempt(cand, k)
                        if res is not None:
                            S, current, changed = cand, res, True
                        else:
                            i += chunk
                    chunk //= 2
            for kk in range(1, k):
                res = attempt(S, kk)
                if res is not None:
                    k, current, changed = kk, res, True
                    break
        return S, k, current

    S, k, current = minimize(S, k, current)
    for decimals in (0, 1, 2):
        rounded = np.round(S, decimals) + 0.0  # + 0.0 turns -0.0 into 0.0
        if np.array_equal(rounded, S):
            break
        res = attempt(rounded, k)
        if res is not None:
            # rounding can create ties that let a token or expert go: restore 1-minimality
            S, k, current = minimize(rounded, k, res)
            break
    return Shrunk(S, k, current, evals, evals >= max_evaluations)
