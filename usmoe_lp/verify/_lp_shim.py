"""Temporary stand-ins for ``usmoe_lp.lp.batch`` (being written): the same names and signatures, one
per-instance call each. Deleted when the batched LP functions land; nothing else imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from usmoe_lp.lp import RoutingProblem, certify
from usmoe_lp.lp.backends import RawResult, solve_highs, solve_milp
from usmoe_lp.lp.certificate import Certificate
from usmoe_lp.lp.closed_form import solve_blocks

EXHAUSTIVE_MAX_ENTRIES = 20


def solve_highs_batch(problems: Sequence[RoutingProblem], *, solver: str = "simplex",
                      integer: bool = False) -> list[RawResult]:
    if integer:
        return [solve_milp(p) for p in problems]
    return [solve_highs(p, solver=solver) for p in problems]


def solve_exhaustive_batch(problems: Sequence[RoutingProblem]) -> list[RawResult]:
    from usmoe_lp.lp import solve

    out = []
    for p in problems:
        sol = solve(p, "exhaustive", certify_solution=False)
        out.append(RawResult(sol.x, sol.objective, sol.status, sol.message, sol.duals, sol.seconds))
    return out


def certify_batch(problems: Sequence[RoutingProblem], masks) -> list[Certificate]:
    return [certify(p, m) for p, m in zip(problems, masks, strict=True)]


def closed_form_batch(problems: Sequence[RoutingProblem]) -> list[RawResult]:
    out = []
    for p in problems:
        mask, duals = solve_blocks(p)
        out.append(RawResult(mask.astype(np.float64), p.objective(mask), "optimal", "closed form", duals, 0.0))
    return out
