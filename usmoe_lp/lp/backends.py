"""Solver backends for routing programs: HiGHS (highspy, LP relaxation), SciPy MILP, PuLP/CBC.

Every backend sees the same constraint rows, built once from :class:`RoutingProblem`:
one row per token (if the token block binds), per expert, and per budget group. Variables are
the flattened (row-major) entries x_{i*N+j}. The matrix is built directly in CSC form (each
variable touches at most three rows), which is what keeps HiGHS fast: SciPy's bundled HiGHS
1.12 spends >20 s in presolve on the single dense budget row at 1024x64 where highspy >= 1.15
takes 0.2 s (benchmarks/results.md).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import numpy as np

from usmoe_lp.errors import SolverError
from usmoe_lp.lp.problem import RoutingProblem


@dataclass(frozen=True, eq=False)
class RawResult:
    """What a backend returns before certification (internal)."""

    x: np.ndarray  # (T, N) float64
    objective: float
    status: str  # optimal | infeasible | time_limit | error
    message: str
    duals: dict[str, np.ndarray] | None
    seconds: float


@dataclass(frozen=True, eq=False)
class ConstraintRows:
    """CSC pattern of the constraint matrix: ``index`` (nnz,), ``start`` (n+1,), row bounds."""

    blocks: tuple[str, ...]
    offsets: dict[str, int]
    index: np.ndarray
    start: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    @property
    def num_rows(self) -> int:
        return int(self.lo.size)


def constraint_rows(problem: RoutingProblem) -> ConstraintRows:
    """Build the rows of every binding block and the CSC column pattern of the matrix."""
    T, N = problem.shape
    blocks = problem.blocks
    per_var, offsets, lo, hi = [], {}, [], []
    row = 0
    for block in blocks:
        a, b = problem.block_bounds(block)
        offsets[block] = row
        if block == "token":
            per_var.append(np.repeat(np.arange(T), N) + row)
        elif block == "expert":
            per_var.append(np.tile(np.arange(N), T) + row)
        else:
            per_var.append(np.repeat(problem.group_ids, N) + row)
        lo.append(a)
        hi.append(b)
        row += a.size
    k = len(per_var)
    if k:
        index = np.stack(per_var, axis=1).ravel().astype(np.int32)
    else:
        index = np.zeros(0, dtype=np.int32)
    start = np.arange(0, T * N * k + 1, k, dtype=np.int32) if k else np.zeros(T * N + 1, np.int32)
    lo_arr = np.concatenate(lo).astype(np.float64) if lo else np.zeros(0)
    hi_arr = np.concatenate(hi).astype(np.float64) if hi else np.zeros(0)
    return ConstraintRows(tuple(blocks), offsets, index, start, lo_arr, hi_arr)


def _split_duals(problem: RoutingProblem, rows: ConstraintRows, y: np.ndarray) -> dict[str, np.ndarray]:
    out = {}
    for block in rows.blocks:
        off = rows.offsets[block]
        size = problem.block_bounds(block)[0].size
        out[block] = np.asarray(y[off:off + size], dtype=np.float64)
    return out


# ----------------------------------------------------------------------------- HiGHS (highspy)
def highs_strategy(problem: RoutingProblem) -> tuple[str, str]:
    """(solver, presolve) for HiGHS on this program, chosen from measurements (highspy 1.15.1,
    2 cores, Gaussian scores; see benchmarks/results.md).

    HiGHS's presolve is fast on sparse rows (Token Choice) and removes a lone ``<= c`` budget
    row entirely (16384x128: 8 s; 23 s without presolve), but it is pathological on dense rows
    that it cannot remove: Expert Choice at 4096x64 took 13 s (0.5 s without), ``== 2T`` 335 s
    (1.2 s without, IPM), the capped program 14.6 s (1.6 s without, IPM). IPM runs crossover, so
    the solution is still a vertex.
    """
    blocks = problem.blocks
    if not blocks or blocks == ("token",) or (blocks == ("budget",) and problem.budget_sense == "<="):
        return "choose", "choose"
    if blocks == ("expert",):
        return "choose", "off"
    return "ipm", "off"


def solve_highs(problem: RoutingProblem, time_limit: float | None = None,
                solver: str = "auto", presolve: str = "auto") -> RawResult:
    """LP relaxation through highspy; a basic (vertex) solution with row duals.

    ``solver``: HiGHS ``solver`` option (``choose``, ``simplex``, ``ipm``) or ``auto``
    (:func:`highs_strategy`); ``presolve``: ``on``, ``off``, ``choose`` or ``auto``. IPM runs
    crossover, so the result is a vertex whichever is used.
    """
    auto_solver, auto_presolve = highs_strategy(problem)
    solver = auto_solver if solver == "auto" else solver
    presolve = auto_presolve if presolve == "auto" else presolve
    try:
        import highspy
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise SolverError("backend 'highs' needs highspy>=1.15: pip install highspy") from exc
    t0 = time.perf_counter()
    T, N = problem.shape
    n = T * N
    rows = constraint_rows(problem)
    h = _quiet_highs(highspy)
    h.setOptionValue("log_to_console", False)
    h.setOptionValue("solver", solver)
    h.setOptionValue("presolve", presolve)
    h.setOptionValue("run_crossover", "on")
    if time_limit is not None:
        h.setOptionValue("time_limit", float(time_limit))
    lp = highspy.HighsLp()
    lp.num_col_ = n
    lp.num_row_ = rows.num_rows
    scale = _power_of_two_scale(problem.scores)
    lp.col_cost_ = problem.scores.ravel() * scale  # exact: HiGHS's tolerances are absolute
    lp.col_lower_ = np.zeros(n)
    lp.col_upper_ = np.ones(n)
    # A lower bound of 0 on a count is implied by x >= 0; stating it makes a ranged row, and
    # HiGHS's presolve then takes ~20 s on the dense budget row at 1024x64 instead of 0.1 s.
    lp.row_lower_ = np.where(rows.lo > 0, rows.lo, -np.inf)
    lp.row_upper_ = rows.hi
    lp.sense_ = highspy.ObjSense.kMaximize
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = rows.start
    lp.a_matrix_.index_ = rows.index
    lp.a_matrix_.value_ = np.ones(rows.index.size)
    h.passModel(lp)
    h.run()
    status = h.getModelStatus()
    text = h.modelStatusToString(status)
    sol = h.getSolution()
    ok = status == highspy.HighsModelStatus.kOptimal
    x = np.asarray(sol.col_value, dtype=np.float64).reshape(T, N) if ok else np.zeros((T, N))
    duals = None
    if ok and sol.dual_valid:
        duals = _split_duals(problem, rows, np.asarray(sol.row_dual) / scale)
    obj = float(h.getInfo().objective_function_value) / scale if ok else math.nan
    message = f"HiGHS: {text}"
    if _status(text) == "error":
        message += (f" (HiGHS could not solve the LP relaxation of {problem.describe()}; scores span "
                    f"[{problem.scores.min():.3g}, {problem.scores.max():.3g}]; try backend='closed_form' "
                    "for single-block programs, 'flow' for the capped form, or 'cbc')")
    return RawResult(x, obj, _status(text), message, duals, time.perf_counter() - t0)


def _power_of_two_scale(scores: np.ndarray) -> float:
    """2**-e with 2**e the binade of max |scores|: brings the largest score into [0.5, 1), where
    HiGHS's absolute tolerances (1e-7) are relative ones; multiplying by a power of two is exact
    (barring underflow of entries ~1e-300 smaller than the largest)."""
    peak = float(np.max(np.abs(scores))) if scores.size else 0.0
    if peak == 0.0 or not math.isfinite(peak):
        return 1.0
    return math.ldexp(1.0, -math.frexp(peak)[1])


def _quiet_highs(highspy):
    """A ``Highs`` instance, its C++ start-up banner kept off our stdout."""
    import os
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            h = highspy.Highs()
            h.setOptionValue("output_flag", False)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    return h


def _status(text: str) -> str:
    t = text.lower()
    if t == "optimal":
        return "optimal"
    if "infeasible" in t:
        return "infeasible"
    if "time limit" in t:
        return "time_limit"
    return "error"


# ----------------------------------------------------------------------------- SciPy MILP
def solve_milp(problem: RoutingProblem, time_limit: float | None = None) -> RawResult:
    """The 0/1 integer program through ``scipy.optimize.milp`` (HiGHS branch and bound).

    Slow on the budget program beyond ~4k variables (SciPy's HiGHS presolve; benchmarks/results.md).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csc_array

    t0 = time.perf_counter()
    T, N = problem.shape
    n = T * N
    rows = constraint_rows(problem)
    constraints = []
    if rows.num_rows:
        A = csc_array((np.ones(rows.index.size), rows.index, rows.start), shape=(rows.num_rows, n))
        constraints.append(LinearConstraint(A, rows.lo, rows.hi))
    options = {"disp": False}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    scale = _power_of_two_scale(problem.scores)  # exact; SciPy's HiGHS tolerances are absolute
    res = milp(c=-problem.scores.ravel() * scale, integrality=np.ones(n), bounds=Bounds(0, 1),
               constraints=constraints, options=options)
    status = {0: "optimal", 1: "time_limit", 2: "infeasible"}.get(res.status, "error")
    if res.x is None:
        return RawResult(np.zeros((T, N)), math.nan, status, f"scipy.milp: {res.message}", None,
                         time.perf_counter() - t0)
    x = np.asarray(res.x, dtype=np.float64).reshape(T, N)
    return RawResult(x, float(-res.fun) / scale, status, f"scipy.milp: {res.message}", None,
                     time.perf_counter() - t0)


# ----------------------------------------------------------------------------- PuLP / CBC
def solve_cbc(problem: RoutingProblem, time_limit: float | None = None) -> RawResult:
    """The 0/1 integer program through PuLP and its bundled CBC (an independent code base)."""
    try:
        import pulp
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise SolverError("backend 'cbc' needs PuLP: pip install pulp") from exc
    t0 = time.perf_counter()
    T, N = problem.shape
    n = T * N
    prob = pulp.LpProblem("routing", pulp.LpMaximize)
    if hasattr(prob, "add_variable"):  # PuLP >= 3.3; constructing LpVariable directly is deprecated
        xs = [prob.add_variable(f"x{v}", 0, 1, cat=pulp.LpBinary) for v in range(n)]
    else:  # pragma: no cover - older PuLP
        xs = [pulp.LpVariable(f"x{v}", lowBound=0, upBound=1, cat=pulp.LpBinary) for v in range(n)]
    scale = _power_of_two_scale(problem.scores)  # exact; CBC's tolerances are absolute
    prob += pulp.LpAffineExpression(zip(xs, (problem.scores.ravel() * scale).tolist(), strict=True))
    rows = constraint_rows(problem)
    k = len(rows.blocks)
    members: list[list[int]] = [[] for _ in range(rows.num_rows)]
    for v in range(n):
        for r in rows.index[v * k:(v + 1) * k]:
            members[r].append(v)
    for r, vs in enumerate(members):
        expr = pulp.LpAffineExpression([(xs[v], 1.0) for v in vs])
        lo, hi = rows.lo[r], rows.hi[r]
        if lo == hi:
            prob += expr == lo
        else:
            if lo > 0:
                prob += expr >= lo
            if hi < len(vs):
                prob += expr <= hi
    with warnings.catch_warnings():
        # PuLP 3.3 deprecates its bundled CBC (PULP_CBC_CMD) for 4.0; it is still the one CBC
        # that installs from PyPI without a compiler, so we keep it until 4.0 ships.
        warnings.simplefilter("ignore", DeprecationWarning)
        cmd = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit)
    try:
        prob.solve(cmd)
    except pulp.PulpSolverError as exc:
        raise SolverError(f"CBC failed: {exc}") from exc
    text = pulp.LpStatus[prob.status]
    status = {"Optimal": "optimal", "Infeasible": "infeasible"}.get(text, "error")
    if status == "optimal" and prob.sol_status == pulp.LpSolutionIntegerFeasible:
        status, text = "time_limit", "time limit reached with an integer-feasible solution"
    x = np.array([v.varValue or 0.0 for v in xs], dtype=np.float64).reshape(T, N)
    obj = float(np.sum(problem.scores * x)) if status != "infeasible" else math.nan
    return RawResult(x, obj, status, f"CBC: {text}", None, time.perf_counter() - t0)
