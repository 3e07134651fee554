"""`solve` and `certify`: the exact path for routing programs.

Backends (``solve(problem, backend=...)``):

=========== ================================================ =======================
backend     what it solves                                   duals / certificate
=========== ================================================ =======================
closed_form the analytic optimum of single-block programs    threshold duals, exact
flow        any program, exactly, by min-cost flow (numpy)   node potentials
highs       LP relaxation, HiGHS via highspy (vertex)        HiGHS row duals
milp        0/1 program, ``scipy.optimize.milp``             certified afterwards
cbc         0/1 program, PuLP + CBC                          certified afterwards
exhaustive  0/1 program, every mask enumerated (T*N <= 20)   certified afterwards
=========== ================================================ =======================

``exhaustive`` (:mod:`usmoe_lp.lp.exhaustive`) shares no code with the other backends: an
independent oracle for tiny programs, exact (no float tolerance in its comparisons).

``flow`` (:mod:`usmoe_lp.lp.flow`) solves every program of at most ``flow.MAX_NODES`` experts plus
budget groups; it is the fast exact path of the capped program (budget + token cap + expert cap),
>10x faster than HiGHS at 16384x128 (benchmarks/bench_capped_flow.py).

Every :class:`Solution` carries a :class:`Certificate`. LP duals are not trusted: they are
plugged into the Lagrangian bound (``certificate.dual_bound``), which is an upper bound on the
optimum for *any* multipliers, so a zero gap proves optimality whatever the solver did.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from usmoe_lp._validate import INTEGRALITY_TOL, rounding_bound
from usmoe_lp.errors import InvalidParameter, SolverError
from usmoe_lp.lp import backends
from usmoe_lp.lp.certificate import (
    Certificate,
    as_mask,
    dual_bound,
    feasibility_violations,
    reduced_scores,
)
from usmoe_lp.lp.closed_form import certify_closed_form, solve_blocks
from usmoe_lp.lp.exact import exact_sign_of_difference, proves_optimal
from usmoe_lp.lp.exhaustive import solve_exhaustive
from usmoe_lp.lp.flow import flow_optimum, flow_unsupported
from usmoe_lp.lp.problem import RoutingProblem

BACKENDS = ("closed_form", "flow", "highs", "milp", "cbc", "exhaustive")


@dataclass(frozen=True, eq=False)
class Solution:
    """Result of :func:`solve`, in the manner of ``scipy.optimize.OptimizeResult``.

    Attributes:
        mask: (T, N) bool, the routing (``x > 0.5`` for LP solutions).
        x: (T, N) float64, the solver's primal solution (fractional only off a vertex).
        objective: the solver's objective value (the LP value for ``highs``).
        status: ``optimal``, ``infeasible``, ``time_limit`` or ``error``.
        message: the solver's own words.
        backend: which backend produced it.
        seconds: wall time of the solve (certification excluded).
        duals: multipliers by block (``token`` (T,), ``expert`` (N,), ``budget`` (G,)) where
            the backend has them, else None.
        certificate: the optimality certificate of ``mask`` (None when the solve failed).
    """

    mask: np.ndarray
    x: np.ndarray
    objective: float
    status: str
    message: str
    backend: str
    seconds: float
    duals: dict[str, np.ndarray] | None
    certificate: Certificate | None

    @property
    def success(self) -> bool:
        return self.status == "optimal"

    @property
    def max_fractionality(self) -> float:
        """max |x - round(x)| over the primal solution (0 for an integral vertex)."""
        return float(np.max(np.abs(self.x - np.round(self.x)))) if self.x.size else 0.0


def solve(problem: RoutingProblem, backend: str = "closed_form", *,
          time_limit: float | None = None, certify_solution: bool = True) -> Solution:
    """Solve a routing program with one backend and certify the result.

    Args:
        problem: the program.
        backend: one of ``closed_form``, ``flow``, ``highs``, ``milp``, ``cbc``, ``exhaustive``
            (module table).
        time_limit: seconds, for the solver backends.
        certify_solution: attach a certificate (closed form when the program is single-block,
            else dual multipliers — the solver's own for ``flow`` and ``highs``, a flow solve
            otherwise, HiGHS where flow does not apply). A ``flow`` routing its own multipliers
            cannot prove (float64 near-ties) is replaced by HiGHS's, and the message says so.

    Returns:
        A :class:`Solution`; check ``.success`` (a failed solve is reported, not raised).

    Raises:
        InvalidParameter: an unknown backend.
        UnsupportedProblem: ``closed_form`` on a program with two or more binding blocks;
            ``flow`` on a program with more than ``flow.MAX_NODES`` experts plus groups;
            ``exhaustive`` on more than ``exhaustive.EXHAUSTIVE_MAX_ENTRIES`` (20) entries.

    >>> import numpy as np
    >>> S = np.array([[0.5, -1.0], [-2.0, -0.2]])
    >>> sol = solve(RoutingProblem.budget(S, 2, sense="<="), backend="highs")
    >>> sol.objective, int(sol.mask.sum()), sol.certificate.optimal
    (0.5, 1, True)
    """
    if backend not in BACKENDS:
        raise InvalidParameter(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "closed_form":
        t0 = time.perf_counter()
        mask, duals = solve_blocks(problem)
        seconds = time.perf_counter() - t0
        cert = certify_closed_form(problem, mask) if certify_solution else None
        return Solution(mask, mask.astype(np.float64), problem.objective(mask), "optimal",
                        "closed form (threshold rule)", backend, seconds, duals, cert)
    if backend == "flow":
        return _solve_flow(problem, time_limit, certify_solution)
    runner = {"highs": backends.solve_highs, "milp": backends.solve_milp, "cbc": backends.solve_cbc,
              "exhaustive": solve_exhaustive}[backend]
    raw = runner(problem, time_limit=time_limit)
    mask = raw.x > 0.5
    cert = None
    if certify_solution and raw.status == "optimal":
        if backend == "highs" and raw.duals is not None:
            cert = certify_with_duals(problem, mask, raw.duals, x=raw.x, backend="highs")
        else:
            cert = certify(problem, mask)
    return Solution(mask, raw.x, raw.objective, raw.status, raw.message, backend, raw.seconds,
                    raw.duals, cert)


def _solve_flow(problem: RoutingProblem, time_limit: float | None, certify_solution: bool) -> Solution:
    """``solve(problem, "flow")``: the flow optimum, certified by its own node potentials.

    Where float64 trouble stops the flow solver, or its multipliers cannot prove its routing
    (near-ties at rounding scale), HiGHS decides instead and the message says so.
    """
    res = flow_optimum(problem, time_limit=time_limit)
    if res.status == "error":
        sol = solve(problem, "highs", time_limit=time_limit, certify_solution=certify_solution)
        return replace(sol, backend="flow", seconds=res.seconds + sol.seconds,
                       message=f"{res.message}; solved by HiGHS instead: {sol.message}")
    x = res.mask.astype(np.float64)
    cert = None
    if certify_solution and res.status == "optimal":
        cert = certify_with_duals(problem, res.mask, res.duals, x=x, backend="flow")
        if not cert.optimal:
            cert = certify(problem, res.mask, backend="highs")
            if not cert.optimal:  # pragma: no cover - the flow optimum proven wrong: report HiGHS's
                sol = solve(problem, "highs", time_limit=time_limit)
                return replace(sol, backend="flow", seconds=res.seconds + sol.seconds,
                               message=f"{res.message}, not proven ({cert.message}); HiGHS: {sol.message}")
            res = replace(res, message=f"{res.message}; proven with HiGHS duals (float64 near-ties)")
    objective = problem.objective(res.mask) if res.status == "optimal" else float("nan")
    return Solution(res.mask, x, objective, res.status, res.message, "flow", res.seconds, res.duals, cert)


def certify(problem: RoutingProblem, mask, *, backend: str = "auto") -> Certificate:
    """Is ``mask`` an optimal 0/1 routing of ``problem``? Exact certificate, see :class:`Certificate`.

    Args:
        problem: the program.
        mask: (T, N) bool or 0/1 array (a torch tensor is accepted via ``numpy()``).
        backend: ``closed_form`` (single-block programs; exact, O(T*N)), ``flow`` (the flow
            solver's node potentials, any program of at most ``flow.MAX_NODES`` experts plus
            groups), ``highs`` (LP duals, any program), both made exact by
            :mod:`usmoe_lp.lp.exact`; or ``auto``: the closed form when it applies, else flow,
            else HiGHS. Multipliers that cannot decide (``flow`` on float64 near-ties) are
            replaced by HiGHS's.

    Returns:
        A :class:`Certificate` whose ``status`` is ``optimal``, ``not_optimal``, ``infeasible``
        or ``undecided``; ``optimal`` is True only for a proof.

    Raises:
        ShapeMismatch: the mask's shape differs from the scores'.
        UnsupportedProblem: ``closed_form`` on a combined program, ``flow`` on too many groups.
        SolverError: the program has no feasible routing, or the LP relaxation could not be solved.
    """
    X = as_mask(problem, mask)
    if backend == "auto":
        if problem.is_single_block:
            backend = "closed_form"
        else:
            backend = "flow" if flow_unsupported(problem) is None else "highs"
    if backend == "closed_form":
        return certify_closed_form(problem, X)
    if backend not in ("flow", "highs"):
        raise InvalidParameter(f"certify backend must be auto, closed_form, flow or highs, not {backend!r}")
    t0 = time.perf_counter()
    if backend == "flow":
        res = flow_optimum(problem)
        if res.status == "optimal":
            cert = certify_with_duals(problem, X, res.duals, x=res.mask.astype(np.float64), backend="flow")
            if cert.decided:
                return _with_seconds(cert, time.perf_counter() - t0)
    raw = backends.solve_highs(problem)
    if raw.status != "optimal" or raw.duals is None:
        raise SolverError(f"could not certify: the LP relaxation did not solve ({raw.message})")
    cert = certify_with_duals(problem, X, raw.duals, x=raw.x, backend="highs")
    return _with_seconds(cert, time.perf_counter() - t0)


def certify_with_duals(problem: RoutingProblem, mask, duals: dict[str, np.ndarray], *,
                       x: np.ndarray | None = None, backend: str = "user") -> Certificate:
    """Certify ``mask`` with given multipliers: gap = g(duals) - objective(mask) (weak duality).

    The decision is exact, with no tolerance: ``optimal`` when exact multipliers rebuilt from
    ``duals`` meet complementary slackness with the mask (:func:`usmoe_lp.lp.exact.proves_optimal`);
    ``not_optimal`` when a better feasible mask is exhibited (the closed-form optimum of a
    single-block program, or the rounded LP solution ``x``); ``undecided`` otherwise — the
    multipliers do not prove it, whatever the float gap says.

    ``x`` (T, N) is the LP solution the duals came from, for the integrality report and as a
    candidate better mask.
    """
    t0 = time.perf_counter()
    X = as_mask(problem, mask)
    primal = problem.objective(X)
    dual = dual_bound(problem, duals)
    gap = dual - primal
    tol = _gap_error_bound(problem, duals)
    violations = feasibility_violations(problem, X)
    feasible = not violations
    ties = log10_masks = margin = None
    exact = None
    if problem.is_single_block and feasible:
        # The block margin and tie count depend on the mask and blocks only, not on which
        # (possibly degenerate) optimal duals the solver returned.
        exact = certify_closed_form(problem, X)
        margin, ties, log10_masks = exact.margin, exact.ties, exact.log10_optimal_masks
    elif feasible:
        R = reduced_scores(problem, duals)
        sel, uns = R[X], R[~X]
        margin = float((sel.min() if sel.size else np.inf) - (uns.max() if uns.size else -np.inf))
    frac = None if x is None else float(np.max(np.abs(x - np.round(x))))
    status, msg = _decide(problem, X, duals, x, feasible, violations, exact, gap)
    return Certificate(
        primal=primal, dual=dual, gap=gap, optimal=status == "optimal", feasible=feasible,
        integral=None if frac is None else frac <= INTEGRALITY_TOL, max_fractionality=frac,
        ties=ties, log10_optimal_masks=log10_masks, margin=margin, backend=backend,
        seconds=time.perf_counter() - t0, tolerance=tol, duals=dict(duals), message=msg,
        status=status,
    )


def _decide(problem, X, duals, x, feasible, violations, exact, gap) -> tuple[str, str]:
    """(status, message) of a dual certificate: exact proofs only (module docstring of exact)."""
    if not feasible:
        return "infeasible", "infeasible: " + "; ".join(violations)
    if proves_optimal(problem, X, duals):
        return "optimal", "optimal (LP dual bound reached, checked in exact arithmetic)"
    if exact is not None and exact.status == "not_optimal":
        return "not_optimal", f"not optimal: {exact.message.removeprefix('not optimal: ')} (exact closed form)"
    if x is not None:
        Y = np.asarray(x) > 0.5
        if not feasibility_violations(problem, Y) and exact_sign_of_difference(problem.scores, Y, X) > 0:
            return "not_optimal", (f"not optimal: the LP solution's mask scores "
                                   f"{problem.objective(Y) - problem.objective(X):.3g} more")
    why = ("the mask is optimal (closed form) but these multipliers do not prove it"
           if exact is not None else "undecided: these multipliers neither prove nor refute it")
    return "undecided", f"not proven optimal: gap {gap:.3g} to the LP dual bound; {why}"


def _gap_error_bound(problem: RoutingProblem, duals: dict[str, np.ndarray]) -> float:
    """Float64 rounding bound of ``dual_bound - objective`` (reported as the certificate's tolerance)."""
    T, N = problem.shape
    mag = float(np.abs(problem.scores).sum())
    for y in duals.values():
        y = np.abs(np.asarray(y, dtype=np.float64))
        if y.size:
            mag += float(y.max()) * T * N + float(y.sum()) * max(T, N)
    return rounding_bound(4 * T * N + T + N + problem.num_groups, mag)
def _with_seconds(cert: Certificate, seconds: float) -> Certificate:
    return replace(cert, seconds=seconds)
