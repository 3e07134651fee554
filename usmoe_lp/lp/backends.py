"""Solver backends for routing programs: HiGHS (highspy, LP relaxation), SciPy MILP, PuLP/CBC.

Every backend sees the same constraint rows, built once from :class:`RoutingProblem`:
one row per token (if the token block binds), per expert, and per budget group. Variables are
the flattened (row-major) entries x_{i*N+j}. The matrix is built directly in CSC form (each
variable touches at most three rows), which is what keeps HiGHS fast: SciPy's bundled HiGHS
1.12 spends >20 s in presolve on the single dense budget row at 1024x64 where highspy >= 1.15
takes 0.2 s (benchmarks/results.md).

HiGHS models are built by :func:`solve_highs_joint` for one program or many: each program is one
diagonal block of one model (``usmoe_lp.lp.batch.solve_highs_batch``: 256 programs of 8x4 in one
call instead of 256), its objective scaled by its own power of two. A program with a large budget
group solved by the simplex method gets a *lifted* formulation (:func:`highs_formulation`):
count columns y_i = sum_j x_ij per token (or z_j = sum_i x_ij per expert), with the budget rows
over the counts, so that no row is dense. That side's multipliers are then the reduced costs of
the count columns: with w_i the link row's multiplier, the reduced cost of x_ij is
S_ij - w_i - v_j and that of y_i is w_i - lam_g(i), so u_i = w_i - lam_g(i) recovers the original
reduced costs S_ij - u_i - v_j - lam_g(i) (on the expert side likewise v_j = w_j - lam).
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from collections.abc import Sequence
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
LIFT_MIN_ENTRIES = 4096
"""A budget group with more token-expert pairs than this is stated through token-count columns when
the simplex method solves it (:func:`highs_formulation`)."""

SIMPLEX_MAX_ENTRIES = 2**17
"""``solver="auto"``: programs with a binding budget and another block (or an ``==`` budget) go to the
dual simplex on the lifted formulation up to this many variables, to IPM beyond (:func:`highs_strategy`)."""


def highs_strategy(problem: RoutingProblem) -> tuple[str, str]:
    """(solver, presolve) for HiGHS on this program, chosen from measurements (highspy 1.15.1,
    2 cores, Gaussian scores; benchmarks/results.md; the lifted formulation measured by hand).

    HiGHS's presolve removes a lone ``<= c`` budget row entirely (16384x128: 8 s; 23 s without
    presolve), but it is pathological on dense rows that it cannot remove: Expert Choice at
    4096x64 took 13 s (0.5 s without), ``== 2T`` 335 s (1.2 s without, IPM), the capped program
    14.6 s (1.6 s without, IPM); on Token Choice it costs more than it saves (CPU time without /
    with: 0.09 / 0.22 s at 1024x64, 0.5 / 1.0 s at 4096x64, 6.1 / 9.0 s at 16384x128). The rest
    go without presolve: up to :data:`SIMPLEX_MAX_ENTRIES` variables to the dual simplex on the lifted
    formulation (:func:`highs_formulation`; 1024x64: ``== c`` 0.18 s, capped 0.1 s, where IPM
    takes 0.5 s and 0.65 s), beyond to IPM, whose work grows about linearly (the simplex's grows
    with iterations x columns). IPM runs crossover, so the solution is still a vertex.
    """
    blocks = problem.blocks
    if not blocks or (blocks == ("budget",) and problem.budget_sense == "<="):
        return "choose", "choose"
    if blocks in (("token",), ("expert",)):
        return "choose", "off"
    T, N = problem.shape
    return ("simplex", "off") if T * N <= SIMPLEX_MAX_ENTRIES else ("ipm", "off")


def highs_formulation(problem: RoutingProblem, solver: str, presolve: str) -> str | None:
    """How HiGHS gets ``problem``: None for the direct model (rows over x), or the side of a
    *lifted* one, ``"token"`` or ``"expert"``: one count column per token, y_i = sum_j x_ij (a
    link row per token), or per expert, z_j = sum_i x_ij (a link row per expert), carrying that
    side's bounds as column bounds, and the budget rows over the counts (T_g or N entries each)
    instead of over x (T_g * N entries).

    The lifted polytope is the image of the original under x -> (x, counts(x)), so vertices,
    optima and integrality are the same. It matters for the simplex method: on a dense budget row
    HiGHS's dual ratio test takes ~1.3 s for one iteration at 1024x64 (``== c``), the lifted
    model 0.18 s in all. Used when a budget group has more than :data:`LIFT_MIN_ENTRIES` pairs,
    the solver is a simplex method and presolve cannot simply drop the row (a lone ``<= c``
    budget); on the expert side when the expert block binds under one budget group (the capped
    program: 2x faster than the token side, 0.1 s at 1024x64, 0.28 s at 2048x64), else on the
    token side.
    """
    if problem.budget is None or solver == "ipm":
        return None
    if problem.blocks == ("budget",) and problem.budget_sense == "<=" and presolve != "off":
        return None
    if int(problem.group_sizes.max()) * problem.shape[1] <= LIFT_MIN_ENTRIES:
        return None
    return "expert" if problem.num_groups == 1 and "expert" in problem.blocks else "token"


@dataclass(frozen=True, eq=False)
class _Pattern:
    """The constraint matrix of one program in a HiGHS model: CSC ``start`` (ncols+1,), ``index``
    and ``value`` (nnz,), first row of each block (``link``: the lifted side's link rows); x
    columns first (row-major), then the counts of the ``lifted`` side (T or N), if any."""

    ncols: int
    nrows: int
    start: np.ndarray
    index: np.ndarray
    value: np.ndarray
    offsets: dict[str, int]
    lifted: str | None


def _pattern(problem: RoutingProblem, lifted: str | None) -> _Pattern:
    T, N = problem.shape
    if lifted is None:
        rows = constraint_rows(problem)
        return _Pattern(T * N, rows.num_rows, rows.start.astype(np.int64), rows.index.astype(np.int64),
                        np.ones(rows.index.size), dict(rows.offsets), None)
    # rows, in order: the other side's rows if they bind, the link rows (sum x - count = 0), the budget rows
    other = "expert" if lifted == "token" else "token"
    tok, exp = np.repeat(np.arange(T), N), np.tile(np.arange(N), T)
    own, their = (tok, exp) if lifted == "token" else (exp, tok)
    sizes = {"token": T, "expert": N}
    offsets, row, per_x = {}, 0, [own]
    if other in problem.blocks:  # each x column: its row of the other side, then its link row
        offsets[other] = 0
        row = sizes[other]
        per_x = [their, own + row]
    offsets["link"] = row
    row += sizes[lifted]
    offsets["budget"] = row
    nrows = row + problem.num_groups
    x_index = np.stack(per_x, axis=1).ravel() if len(per_x) > 1 else per_x[0]
    k = len(per_x)
    L = sizes[lifted]
    gid = problem.group_ids if lifted == "token" else np.zeros(N, dtype=np.int64)  # expert side: one group
    c_index = np.stack([offsets["link"] + np.arange(L), offsets["budget"] + gid], axis=1).ravel()
    index = np.concatenate([x_index, c_index]).astype(np.int64)
    value = np.concatenate([np.ones(x_index.size), np.tile([-1.0, 1.0], L)])
    start = np.concatenate([np.arange(0, T * N * k, k), T * N * k + np.arange(0, 2 * L + 1, 2)])
    return _Pattern(T * N + L, nrows, start.astype(np.int64), index, value, offsets, lifted)


def _pattern_key(problem: RoutingProblem, lifted: str | None) -> tuple:
    """Problems with equal keys have the same constraint matrix (bounds may differ)."""
    groups = None if problem.groups is None else problem.groups.tobytes()
    return problem.shape, problem.blocks, groups, lifted


def _count_lo(lo: np.ndarray) -> np.ndarray:
    # A lower bound of 0 on a count is implied by x >= 0; stating it makes a ranged row, and
    # HiGHS's presolve then takes ~20 s on the dense budget row at 1024x64 instead of 0.1 s.
    return np.where(lo > 0, lo, -np.inf)


def _bounds(problems: Sequence[RoutingProblem], pattern: _Pattern):
    """Stacked (m, ncols) column bounds and (m, nrows) row bounds of same-pattern problems."""
    m = len(problems)
    T, N = problems[0].shape
    col_lo = np.zeros((m, pattern.ncols))
    col_hi = np.ones((m, pattern.ncols))
    row_lo, row_hi = [], []
    for block in pattern.offsets:
        if block == "link":
            side = pattern.lifted
            L = pattern.ncols - T * N
            row_lo.append(np.zeros((m, L)))
            row_hi.append(np.zeros((m, L)))
            col_lo[:, T * N:] = np.stack([getattr(p, f"{side}_min") for p in problems])
            col_hi[:, T * N:] = np.stack([getattr(p, f"{side}_max") for p in problems])
            continue
        if block == "budget":
            hi = np.stack([p.budget for p in problems])
            lo = np.where(np.array([p.budget_sense == "==" for p in problems])[:, None], hi, 0)
        else:
            lo = np.stack([getattr(p, f"{block}_min") for p in problems])
            hi = np.stack([getattr(p, f"{block}_max") for p in problems])
        row_lo.append(_count_lo(lo))
        row_hi.append(hi.astype(np.float64))
    if not row_lo:
        return col_lo, col_hi, np.zeros((m, 0)), np.zeros((m, 0))
    return col_lo, col_hi, np.concatenate(row_lo, axis=1), np.concatenate(row_hi, axis=1)


@dataclass(frozen=True, eq=False)
class _Group:
    """Same-pattern programs placed consecutively in a joint HiGHS model."""

    members: list[int]  # their positions in the input sequence
    problems: list[RoutingProblem]
    pattern: _Pattern
    col: int  # first column of the first program
    row: int  # first row of the first program
    scores: np.ndarray  # (m, T*N) float64
    scales: np.ndarray  # (m,) the power-of-two objective scale of each program


def _build_model(highspy, problems: Sequence[RoutingProblem], lifted: Sequence[bool], integer: bool):
    """One HiGHS model holding every program as a diagonal block (a block-diagonal constraint
    matrix; the objective of each block scaled by its own power of two, see
    :func:`_power_of_two_scale`). Same-pattern programs are tiled from one pattern with numpy.

    Returns (the arguments of ``Highs.passModel``'s array form, [_Group]).
    """
    by_key: dict[tuple, list[int]] = {}
    for i, (p, lift) in enumerate(zip(problems, lifted, strict=True)):
        by_key.setdefault(_pattern_key(p, lift), []).append(i)
    groups: list[_Group] = []
    parts = []  # (start without the last entry, index, value, cost, col lo, col hi, row lo, row hi)
    col = row = nnz = 0
    for members in by_key.values():
        ps = [problems[i] for i in members]
        pat = _pattern(ps[0], lifted[members[0]])
        m = len(ps)
        S = np.stack([p.scores for p in ps]).reshape(m, -1)
        scales = _power_of_two_scales(np.abs(S).max(axis=1))
        cost = np.zeros((m, pat.ncols))
        cost[:, :S.shape[1]] = S * scales[:, None]
        k = np.arange(m)
        nz = pat.index.size
        parts.append((
            (pat.start[None, :-1] + (nnz + k * nz)[:, None]).ravel(),
            (pat.index[None, :] + (row + k * pat.nrows)[:, None]).ravel(),
            np.tile(pat.value, m), cost.ravel(), *(b.ravel() for b in _bounds(ps, pat)),
        ))
        groups.append(_Group(members, ps, pat, col, row, S, scales))
        col += m * pat.ncols
        row += m * pat.nrows
        nnz += m * nz
    cat = [np.concatenate([part[f] for part in parts]) for f in range(8)]
    integrality = np.full(col, 1 if integer else 0, dtype=np.int32)  # HighsVarType: 0 continuous, 1 integer
    # the array form of passModel: numpy buffers straight to HiGHS (setting HighsLp's members
    # converts index arrays element by element, ~0.1 us each)
    model = (col, row, nnz, int(highspy.MatrixFormat.kColwise), int(highspy.ObjSense.kMaximize), 0.0,
             cat[3], cat[4], cat[5], cat[6], cat[7], cat[0].astype(np.int32), cat[1].astype(np.int32), cat[2],
             integrality)
    return model, groups


def _read_group(g: _Group, col_value: np.ndarray, col_dual, row_dual, out: list) -> None:
    """(x (T, N), objective, duals by block or None) of each program of ``g``, into ``out``."""
    m = len(g.members)
    T, N = g.problems[0].shape
    pat = g.pattern
    cols = np.asarray(col_value[g.col:g.col + m * pat.ncols], dtype=np.float64).reshape(m, pat.ncols)
    x = cols[:, :T * N]
    objective = np.einsum("bk,bk->b", g.scores, x)
    duals: dict[str, np.ndarray] = {}
    if row_dual is not None:
        rows = np.asarray(row_dual[g.row:g.row + m * pat.nrows]).reshape(m, pat.nrows)
        for block in g.problems[0].blocks:
            if block == pat.lifted:
                # the side's multiplier is the reduced cost of its count column (module notes)
                y = np.asarray(col_dual[g.col:g.col + m * pat.ncols]).reshape(m, pat.ncols)[:, T * N:]
            else:
                off = pat.offsets[block]
                y = rows[:, off:off + {"token": T, "expert": N}.get(block, g.problems[0].num_groups)]
            duals[block] = y / g.scales[:, None]
    for r, i in enumerate(g.members):
        d = None if row_dual is None else {block: y[r].copy() for block, y in duals.items()}
        out[i] = (x[r].reshape(T, N).copy(), float(objective[r]), d)


def solve_highs_joint(problems: Sequence[RoutingProblem], *, solver: str, presolve: str,
                      lifted: Sequence[bool], integer: bool = False,
                      time_limit: float | None = None) -> tuple[str, str, list[tuple]]:
    """Solve ``problems`` as the diagonal blocks of ONE highspy model (blocks are independent, so
    the joint optimum is optimal block by block).

    Returns (status, HiGHS's message, [(x (T, N), objective, duals or None)] per problem); the
    per-problem entries are empty unless status is ``optimal``. ``integer`` makes every variable
    integer (HiGHS MIP, gaps 0: the 0/1 optimum of every block).
    """
    try:
        import highspy
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise SolverError("backend 'highs' needs highspy>=1.15: pip install highspy") from exc
    h = _highs(highspy)
    h.setOptionValue("solver", solver)
    h.setOptionValue("presolve", presolve)
    h.setOptionValue("run_crossover", "on")
    if "token" in lifted:
        h.setOptionValue("simplex_dual_edge_weight_strategy", 1)  # devex: faster on token-lifted models
    if integer:
        h.setOptionValue("mip_rel_gap", 0.0)
        h.setOptionValue("mip_abs_gap", 0.0)
        # The relaxation of a routing program is integral (a network matrix), so the root LP is the
        # 0/1 optimum: primal heuristics and symmetry detection only cost time (~35% at 8x4). The
        # optimum is still proven by HiGHS's bounds, gaps 0.
        h.setOptionValue("mip_heuristic_effort", 0.0)
        h.setOptionValue("mip_heuristic_run_feasibility_jump", False)
        h.setOptionValue("mip_detect_symmetry", False)
    if time_limit is not None:
        h.setOptionValue("time_limit", float(time_limit))
    model, groups = _build_model(highspy, problems, lifted, integer)
    try:
        if h.passModel(*model) != highspy.HighsStatus.kOk:  # pragma: no cover - a malformed model is a bug
            raise SolverError(f"HiGHS refused the model of {len(problems)} routing program(s)")
        h.run()
        model_status = h.getModelStatus()
        text = h.modelStatusToString(model_status)
        status = _status(text)
        if model_status != highspy.HighsModelStatus.kOptimal:
            return status, text, []
        sol = h.getSolution()
        col_value = np.asarray(sol.col_value)
        dual_ok = not integer and sol.dual_valid
        col_dual = np.asarray(sol.col_dual) if dual_ok else None
        row_dual = np.asarray(sol.row_dual) if dual_ok else None
    finally:
        h.clearModel()  # the re-used instance keeps no large model alive between solves
    out: list = [None] * len(problems)
    for g in groups:
        _read_group(g, col_value, col_dual, row_dual, out)
    return "optimal", text, out


def solve_highs(problem: RoutingProblem, time_limit: float | None = None,
                solver: str = "auto", presolve: str = "auto") -> RawResult:
    """LP relaxation through highspy; a basic (vertex) solution with row duals.

    ``solver``: HiGHS ``solver`` option (``choose``, ``simplex``, ``ipm``) or ``auto``
    (:func:`highs_strategy`); ``presolve``: ``on``, ``off``, ``choose`` or ``auto``. IPM runs
    crossover, so the result is a vertex whichever is used. The model is the one-block case of
    :func:`solve_highs_joint` (formulation: :func:`highs_formulation`); ``objective`` is
    sum S_ij x_ij of the returned x in float64.
    """
    t0 = time.perf_counter()
    solver, presolve = resolve_highs_options(problem, solver, presolve)
    lifted = highs_formulation(problem, solver, presolve)
    status, text, blocks = solve_highs_joint([problem], solver=solver, presolve=presolve, lifted=[lifted],
                                             time_limit=time_limit)
    T, N = problem.shape
    if status == "optimal":
        x, obj, duals = blocks[0]
    else:
        x, obj, duals = np.zeros((T, N)), math.nan, None
    return RawResult(x, obj, status, highs_message(problem, status, text), duals, time.perf_counter() - t0)


def resolve_highs_options(problem: RoutingProblem, solver: str, presolve: str) -> tuple[str, str]:
    """``auto`` replaced by :func:`highs_strategy`'s choice for ``problem``."""
    auto_solver, auto_presolve = highs_strategy(problem)
    return (auto_solver if solver == "auto" else solver), (auto_presolve if presolve == "auto" else presolve)


def highs_message(problem: RoutingProblem, status: str, text: str) -> str:
    """``HiGHS: <status>``, with advice when HiGHS failed."""
    message = f"HiGHS: {text}"
    if status == "error":
        message += (f" (HiGHS could not solve the LP relaxation of {problem.describe()}; scores span "
                    f"[{problem.scores.min():.3g}, {problem.scores.max():.3g}]; try backend='closed_form' "
                    "for single-block programs, 'flow' for the capped form, or 'cbc')")
    return message


def _power_of_two_scales(peaks: np.ndarray) -> np.ndarray:
    """(m,) 2**-e with 2**e the binade of each peak (max |scores| of a program); 1 for a zero peak,
    at most 2**1000 (a subnormal peak stays below 0.5 rather than overflow the scale)."""
    peaks = np.asarray(peaks, dtype=np.float64)
    ok = (peaks != 0.0) & np.isfinite(peaks)
    exponent = np.maximum(np.frexp(np.where(ok, peaks, 1.0))[1], -1000)
    return np.where(ok, np.ldexp(1.0, -exponent), 1.0)


def _power_of_two_scale(scores: np.ndarray) -> float:
    """2**-e with 2**e the binade of max |scores|: brings the largest score into [0.5, 1), where
    HiGHS's absolute tolerances (1e-7) are relative ones; multiplying by a power of two is exact
    (barring underflow of entries ~1e-300 smaller than the largest)."""
    peak = float(np.max(np.abs(scores))) if scores.size else 0.0
    return float(_power_of_two_scales(np.array([peak]))[0])


_LOCAL = threading.local()


def _highs(highspy):
    """This thread's ``Highs`` instance, emptied and with default options (quiet): re-using one
    saves ~0.2 ms per solve over a new instance (measured on 8x4 programs, where a whole solve
    takes ~0.4 ms); every option a solve needs is set after the reset, so results do not depend on
    earlier solves."""
    h = getattr(_LOCAL, "highs", None)
    if h is None:
        h = _LOCAL.highs = _quiet_highs(highspy)
    else:
        h.clearModel()
        h.clearSolver()
        h.resetOptions()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("log_to_console", False)
    return h


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
