"""The optimality certificate and the Lagrangian dual bound of a routing program.

For any multipliers u (tokens), v (experts), lam (groups), weak duality gives

    OPT <= g(u, v, lam) = sum_ij (S_ij - u_i - v_j - lam_g(i))_+
                          + psi(u; tmin, tmax) + psi(v; emin, emax) + psi(lam; blo, bhi),
    psi(y; lo, hi) = sum_b (y_b * hi_b if y_b >= 0 else y_b * lo_b),

(the dual of the LP relaxation with mu_ij = (S_ij - ...)_+ for the x_ij <= 1 bounds). A mask
whose objective reaches g at some multipliers is optimal, and the multipliers are the
certificate: checking it needs no solver and no trust in one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from usmoe_lp.errors import ShapeMismatch
from usmoe_lp.lp.problem import RoutingProblem


@dataclass(frozen=True, eq=False)
class Certificate:
    """Whether a 0/1 routing is optimal for a :class:`RoutingProblem`, and why.

    Attributes:
        primal: sum of scores of the certified mask (float64).
        dual: an upper bound on the program's optimum from explicit dual multipliers; equal to
            the optimum when ``optimal`` is False and the optimum could be computed.
        gap: ``dual - primal`` (>= 0 up to rounding).
        optimal: proven: the mask is feasible and reaches the dual bound in exact arithmetic
            (``status == "optimal"``). Never True for a mask that is not optimal; False when
            the certificate could not decide (``status == "undecided"``).
        feasible: the mask meets every constraint of the program.
        integral: the LP relaxation solution behind the bound is integral (True for the closed
            form, which constructs an integral vertex; None when no LP solution was involved).
        max_fractionality: max |x - round(x)| of that LP solution.
        ties: entries tied at an optimal threshold where the tie is free (0 <=> unique optimum
            for the closed form); None when unknown (LP-certified combined programs).
        log10_optimal_masks: log10 of the number of optimal 0/1 masks (0.0 <=> unique); None
            when unknown.
        margin: the smallest gap between a selected entry and the best alternative in its
            block (the largest unselected entry, or 0 where the count may shrink or grow); > 0
            means a unique optimum, 0 a tie, < 0 a mask that is not greedy-ordered. For combined
            programs it is measured on the reduced costs S_ij - u_i - v_j - lam_g at the LP
            duals (min over selected minus max over unselected); degenerate duals can make it
            0 without a tie. None for an infeasible mask under LP duals.
        backend: where the dual multipliers came from (``closed_form``, ``flow``, ``highs``).
        seconds: wall time of the certification.
        tolerance: a bound on the float64 rounding error of ``gap`` (relative to the magnitude
            of the scores and multipliers summed); the optimality decision itself is exact and
            does not use it.
        duals: the multipliers by block: ``token`` (T,), ``expert`` (N,), ``budget`` (G,).
        message: a one-line human-readable verdict.
        status: ``optimal`` (proven), ``not_optimal`` (proven: a better feasible mask exists),
            ``infeasible`` (the mask breaks a constraint) or ``undecided`` (the multipliers or
            the float64 numbers do not allow a decision; the message says why).
    """

    primal: float
    dual: float
    gap: float
    optimal: bool
    feasible: bool
    integral: bool | None
    max_fractionality: float | None
    ties: int | None
    log10_optimal_masks: float | None
    margin: float | None
    backend: str
    seconds: float
    tolerance: float
    duals: dict[str, np.ndarray] = field(default_factory=dict)
    message: str = ""
    status: str = ""

    @property
    def decided(self) -> bool:
        """False when the certificate could not tell whether the mask is optimal."""
        return self.status != "undecided"

    @property
    def unique(self) -> bool | None:
        """True when the optimum is attained by exactly one 0/1 mask (None when unknown)."""
        if self.log10_optimal_masks is None:
            return None
        return self.log10_optimal_masks == 0.0

    def to_dict(self) -> dict:
        """JSON-ready summary (duals omitted)."""
        return {
            "primal": self.primal, "dual": self.dual, "gap": self.gap, "optimal": self.optimal,
            "status": self.status, "feasible": self.feasible, "integral": self.integral,
            "max_fractionality": self.max_fractionality, "ties": self.ties,
            "log10_optimal_masks": self.log10_optimal_masks, "margin": self.margin,
            "backend": self.backend, "seconds": self.seconds, "message": self.message,
        }


def _psi(y: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    return float(np.sum(np.where(y >= 0, y * hi, y * lo)))


def dual_bound(problem: RoutingProblem, duals: dict[str, np.ndarray]) -> float:
    """Evaluate the Lagrangian bound g (module docstring) at ``duals``; >= OPT for any duals.

    duals: mapping with optional keys ``token`` (T,), ``expert`` (N,), ``budget`` (G,) float;
    a missing block counts as 0.
    """
    S = problem.scores
    T, N = S.shape
    R = S.copy()
    total = 0.0
    if "token" in duals:
        u = np.asarray(duals["token"], dtype=np.float64)
        R -= u[:, None]
        total += _psi(u, *problem.block_bounds("token"))
    if "expert" in duals:
        v = np.asarray(duals["expert"], dtype=np.float64)
        R -= v[None, :]
        total += _psi(v, *problem.block_bounds("expert"))
    if "budget" in duals:
        lam = np.asarray(duals["budget"], dtype=np.float64)
        R -= lam[problem.group_ids][:, None]
        total += _psi(lam, *problem.block_bounds("budget"))
    np.maximum(R, 0.0, out=R)
    return float(R.sum()) + total


def reduced_scores(problem: RoutingProblem, duals: dict[str, np.ndarray]) -> np.ndarray:
    """(T, N) float64 reduced costs S_ij - u_i - v_j - lam_g(i)."""
    R = problem.scores.copy()
    if "token" in duals:
        R -= np.asarray(duals["token"])[:, None]
    if "expert" in duals:
        R -= np.asarray(duals["expert"])[None, :]
    if "budget" in duals:
        R -= np.asarray(duals["budget"])[problem.group_ids][:, None]
    return R


def feasibility_violations(problem: RoutingProblem, mask: np.ndarray) -> list[str]:
    """Human-readable list of the constraints a (T, N) bool mask violates (empty if feasible)."""
    out: list[str] = []
    rows = mask.sum(axis=1)
    cols = mask.sum(axis=0)
    checks = [("token", rows, "experts for token"), ("expert", cols, "tokens for expert")]
    if problem.budget is not None:
        checks.append(("budget", np.bincount(problem.group_ids, weights=rows,
                                             minlength=problem.num_groups).astype(np.int64),
                       "selections in group"))
    for block, counts, what in checks:
        lo, hi = problem.block_bounds(block)
        bad = np.flatnonzero((counts < lo) | (counts > hi))
        if bad.size:
            b = int(bad[0])
            out.append(f"{bad.size} {block} constraint(s) violated, e.g. {int(counts[b])} {what} {b} "
                       f"outside [{int(lo[b])}, {int(hi[b])}]")
    return out


def as_mask(problem: RoutingProblem, mask) -> np.ndarray:
    """Validate a routing mask for ``problem``: (T, N) bool, or 0/1 numbers, or a torch tensor.

    Raises:
        ShapeMismatch: wrong shape, or entries other than 0 and 1.
    """
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    X = np.asarray(mask)
    if X.shape != problem.shape:
        raise ShapeMismatch(f"mask has shape {X.shape}; the program's scores have shape {problem.shape}")
    if X.dtype != bool:
        if not np.all((X == 0) | (X == 1)):
            raise ShapeMismatch("mask must be boolean or 0/1; for fractional x use the LP backends")
        X = X.astype(bool)
    return X
