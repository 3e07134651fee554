"""Many routing programs at once: HiGHS on one block-diagonal model, stacked closed forms and
certificates, exhaustive enumeration.

Checking a claim on 10^5 small instances cannot pay a solver call (~0.6 ms of HiGHS set-up, run
and Python per 8x4 program) or a per-program Python path each time, so every function here takes
a sequence of :class:`~usmoe_lp.lp.problem.RoutingProblem` and returns one result per program, in
order, equal to what the per-program function gives:

============================== =============================================== ========================
function                       per program equivalent                          how
============================== =============================================== ========================
:func:`solve_highs_batch`      ``backends.solve_highs(p, solver=...)`` (LP) or diagonal blocks of one
                               the 0/1 optimum (``integer=True``, HiGHS MIP)   highspy model
:func:`closed_form_batch`      ``solve(p, "closed_form")``                     stacked (B, T, N) arrays
:func:`certify_batch`          ``certify(p, mask)``                            stacked (B, T, N) arrays
:func:`solve_exhaustive_batch` ``solve(p, "exhaustive")``                      enumeration, T*N <= 20
============================== =============================================== ========================

The diagonal-block model: programs share no variable and no row, so the joint optimum is
optimal in every block, and each block's solution is read from its slice of x. Every block's
objective is scaled by its own power of two, exactly as :func:`~usmoe_lp.lp.backends.solve_highs`
scales one program, so HiGHS's absolute tolerances mean the same thing in a block as alone. A
joint model that is not optimal (a block infeasible) is split in halves until the failing
programs stand alone, and those report their own status.

Measured (highspy 1.15.1, 2 shared cores, CPU time, best of 3, 256 Gaussian 8x4 programs of
``usmoe-lp verify``, per program): LP 640-800 us alone, 45-100 us batched (7-17x); IPM 0.8-1.4 ms,
110-280 us (5-10x); the 0/1 program 3.5-17 ms by ``scipy.optimize.milp``, 115-230 us by the
batched HiGHS MIP (22-110x); closed form 200-260 us, 25-32 us (6-10x); certificates 240-260 us,
29-38 us (7-8x).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from usmoe_lp.errors import InvalidParameter
from usmoe_lp.lp import backends
from usmoe_lp.lp.backends import RawResult
from usmoe_lp.lp.certificate import Certificate, as_mask
from usmoe_lp.lp.closed_form import certify_closed_form_stacked, single_block, solve_blocks_stacked, stack_key
from usmoe_lp.lp.exhaustive import EXHAUSTIVE_MAX_ENTRIES, solve_exhaustive_batch
from usmoe_lp.lp.problem import RoutingProblem

__all__ = ["EXHAUSTIVE_MAX_ENTRIES", "HIGHS_BATCH_COLUMNS", "HIGHS_BATCH_PRESOLVE", "certify_batch",
           "closed_form_batch", "solve_exhaustive_batch", "solve_highs_batch"]

HIGHS_BATCH_COLUMNS = 8192
"""Variables per joint HiGHS model (a program with more is solved alone, exactly as
``solve_highs``). The gain of a joint model is the fixed cost of a call; the simplex's work per
iteration grows with the model's columns, so beyond ~8k-16k columns joint models stop gaining
(8x4, 1024 programs: 2048 to 32768 columns per model within 10% of each other; 16x8: 5-8x over
single calls, 64x8: 2-3.5x)."""

HIGHS_BATCH_PRESOLVE = "off"
"""HiGHS presolve for a joint model of several programs: off is 1.2-1.7x faster than ``choose`` on
256 programs of 8x4 (presolve costs more than it removes from many small blocks)."""

_SOLVERS = ("auto", "simplex", "ipm", "choose")


def _check_problems(problems) -> list[RoutingProblem]:
    problems = list(problems)
    for i, p in enumerate(problems):
        if not isinstance(p, RoutingProblem):
            raise InvalidParameter(f"problems[{i}] is a {type(p).__name__}, not a RoutingProblem")
    return problems


def _chunks(problems: list[RoutingProblem], columns: int) -> list[list[int]]:
    """Consecutive runs of programs with at most ``columns`` variables in all (a larger program
    alone); decided by the programs alone, so the same input always gives the same models."""
    out: list[list[int]] = []
    run: list[int] = []
    used = 0
    for i, p in enumerate(problems):
        n = p.shape[0] * p.shape[1]
        if run and used + n > columns:
            out.append(run)
            run, used = [], 0
        run.append(i)
        used += n
    if run:
        out.append(run)
    return out


def solve_highs_batch(problems: Sequence[RoutingProblem], *, solver: str = "simplex",
                      integer: bool = False) -> list[RawResult]:
    """Solve many routing programs with HiGHS, as diagonal blocks of few highspy models.

    Args:
        problems: any programs (shapes and kinds may differ).
        solver: HiGHS ``solver`` (``simplex``, ``ipm``, ``choose``) or ``auto``; a program alone
            in its model (more than :data:`HIGHS_BATCH_COLUMNS` variables) is solved exactly as
            ``backends.solve_highs(p, solver=solver)`` does, presolve and formulation included.
            Ignored with ``integer``.
        integer: the 0/1 program (every variable integer; HiGHS MIP in-process with zero gaps)
            instead of the LP relaxation.

    Returns:
        One :class:`~usmoe_lp.lp.backends.RawResult` per program, in order: x (T, N) float64 (that
        block of the joint solution; a vertex of the block's polytope for the LP), objective =
        sum S_ij x_ij in float64, status (``optimal``, ``infeasible``, ``time_limit``, ``error``)
        and message as the single solve, duals by block (``token``, ``expert``, ``budget``) for
        the LP (None for the MIP), seconds = the model's time split evenly over its programs.
        Objectives agree with the single solves to HiGHS's tolerance (1e-7 on costs scaled into
        [0.5, 1), far below 1e-9 relative on the programs tested).

    Raises:
        InvalidParameter: an unknown ``solver`` or an element that is not a RoutingProblem.
    """
    if solver not in _SOLVERS:
        raise InvalidParameter(f"solver must be one of {', '.join(_SOLVERS)}, got {solver!r}")
    problems = _check_problems(problems)
    out: list[RawResult | None] = [None] * len(problems)
    for run in _chunks(problems, HIGHS_BATCH_COLUMNS):
        _solve_run(problems, run, solver, integer, out)
    return out


def _solve_run(problems, run: list[int], solver: str, integer: bool, out: list) -> None:
    t0 = time.perf_counter()
    ps = [problems[i] for i in run]
    if len(ps) == 1:
        s, pre = backends.resolve_highs_options(ps[0], solver, "auto")
    else:
        s, pre = ("simplex" if solver == "auto" else solver), HIGHS_BATCH_PRESOLVE
    if integer:
        s = "choose"
    lifted = [backends.highs_formulation(p, s, pre) for p in ps]
    status, text, blocks = backends.solve_highs_joint(ps, solver=s, presolve=pre, lifted=lifted, integer=integer)
    if status != "optimal" and len(ps) > 1:  # some block failed: find it by halves
        half = len(run) // 2
        _solve_run(problems, run[:half], solver, integer, out)
        _solve_run(problems, run[half:], solver, integer, out)
        return
    seconds = (time.perf_counter() - t0) / len(ps)
    label = "HiGHS MIP" if integer else "HiGHS"
    for i, p, block in zip(run, ps, blocks or [None] * len(ps), strict=True):
        if block is None:
            T, N = p.shape
            x, obj, duals = np.zeros((T, N)), float("nan"), None
        else:
            x, obj, duals = block
        message = backends.highs_message(p, status, text).replace("HiGHS", label, 1)
        out[i] = RawResult(x, obj, status, message, duals, seconds)


def closed_form_batch(problems: Sequence[RoutingProblem]) -> list[RawResult]:
    """Closed-form optima of single-block programs, computed on stacked arrays.

    Programs of one shape, binding block and groups are stacked into (B, T, N) arrays and solved
    together (``closed_form.solve_blocks_stacked``, the same code as the single program's
    ``solve(p, "closed_form")``: equal masks, duals and objectives).

    Returns:
        One RawResult per program, in order: x (T, N) float64 0/1 mask, objective
        ``problem.objective(mask)``, status ``optimal``, duals {block: (R,) thresholds u*},
        seconds = the stack's time split evenly.

    Raises:
        UnsupportedProblem: a program with two or more binding blocks.
    """
    problems = _check_problems(problems)
    out: list[RawResult | None] = [None] * len(problems)
    for members in _stacks(problems).values():
        t0 = time.perf_counter()
        ps = [problems[i] for i in members]
        block = single_block(ps[0])
        S = np.stack([p.scores for p in ps])
        lo = np.stack([p.block_bounds(block)[0] for p in ps])
        hi = np.stack([p.block_bounds(block)[1] for p in ps])
        masks, u = solve_blocks_stacked(S, block, ps[0].group_ids, ps[0].num_groups, lo, hi)
        seconds = (time.perf_counter() - t0) / len(ps)
        for b, (i, p) in enumerate(zip(members, ps, strict=True)):
            out[i] = RawResult(masks[b].astype(np.float64), p.objective(masks[b]), "optimal",
                               "closed form (threshold rule)", {block: u[b].copy()}, seconds)
    return out


def _stacks(problems: list[RoutingProblem]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(problems):
        groups.setdefault(stack_key(p), []).append(i)
    return groups


def certify_batch(problems: Sequence[RoutingProblem], masks) -> list[Certificate]:
    """Certificates of many (program, mask) pairs: ``[certify(p, m) for p, m in zip(...)]``.

    Single-block programs of one shape, binding block and groups are certified together on
    stacked (B, T, N) arrays by the closed-form kernel that ``certify`` itself runs (one program
    is the stack of one), so every field but ``seconds`` is the same as the single call's.
    Programs with two or more binding blocks go through ``certify`` one by one.

    Args:
        problems: B programs.
        masks: B masks (T, N), bool or 0/1 (numpy, torch), or one (B, T, N) array when the
            programs share a shape.

    Returns:
        One :class:`Certificate` per program, in order.

    Raises:
        ShapeMismatch: a mask of the wrong shape or with entries other than 0 and 1; a number
            of masks other than B.
    """
    from usmoe_lp.errors import ShapeMismatch
    from usmoe_lp.lp.solve import certify

    problems = _check_problems(problems)
    if len(masks) != len(problems):
        raise ShapeMismatch(f"{len(masks)} masks for {len(problems)} programs; give one mask per program")
    out: list[Certificate | None] = [None] * len(problems)
    singles = [i for i, p in enumerate(problems) if p.is_single_block]
    for i in sorted(set(range(len(problems))) - set(singles)):
        out[i] = certify(problems[i], masks[i])
    for members in _stacks([problems[i] for i in singles]).values():
        idx = [singles[m] for m in members]
        ps = [problems[i] for i in idx]
        X = np.stack([as_mask(p, masks[i]) for p, i in zip(ps, idx, strict=True)])
        for i, cert in zip(idx, certify_closed_form_stacked(ps, X), strict=True):
            out[i] = cert
    return out
