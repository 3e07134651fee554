"""Exact feasibility of a routing program: :func:`check_feasible`, the step after construction.

Constructing a :class:`~usmoe_lp.lp.problem.RoutingProblem` checks the bounds' totals in
O(T + N); that decides feasibility when at most one constraint block binds or every binding
block has uniform bounds (``RoutingProblem.totals_decide_feasibility``). Otherwise a routing
may fail to exist although every total balances (token 0 needing both experts while expert 0
takes nobody), and only a flow computation decides: this module runs one, on zero scores, with
the flow solver (:mod:`usmoe_lp.lp.flow`). The constraint matrix is that of a network, so the
0/1 program is feasible iff its LP relaxation is.

It lives apart from ``problem.py`` so that building a program never runs a solver and the
program module imports no solver (``flow`` imports ``problem``, not the other way round).
"""

from __future__ import annotations

import numpy as np

from usmoe_lp.errors import InfeasibleProblem
from usmoe_lp.lp.flow import flow_optimum
from usmoe_lp.lp.problem import RoutingProblem


def is_feasible(problem: RoutingProblem) -> bool:
    """True iff some 0/1 routing meets every bound of ``problem`` (exact).

    >>> import numpy as np
    >>> is_feasible(RoutingProblem(np.ones((2, 2)), token_min=[2, 0], expert_max=[0, 2]))
    False
    """
    if problem.totals_decide_feasibility:
        return True  # construction already refused every inconsistent total
    zero = RoutingProblem(
        np.zeros(problem.shape), token_min=problem.token_min, token_max=problem.token_max,
        expert_min=problem.expert_min, expert_max=problem.expert_max, budget=problem.budget,
        budget_sense=problem.budget_sense, groups=problem.groups, name=problem.name,
    )
    return flow_optimum(zero).status == "optimal"


def check_feasible(problem: RoutingProblem) -> RoutingProblem:
    """Raise :class:`~usmoe_lp.errors.InfeasibleProblem` unless a 0/1 routing meets the bounds.

    Returns ``problem`` unchanged, so construction and check chain:
    ``check_feasible(RoutingProblem(S, token_min=..., expert_max=...))``. Solvers report an
    infeasible program as ``status == "infeasible"`` without this step; call it where an
    exception naming the cause is wanted.
    """
    if not is_feasible(problem):
        raise InfeasibleProblem(
            f"no 0/1 routing meets the {' and '.join(problem.blocks)} bounds of the {problem.name} program "
            "together, although every total is consistent (a flow condition: some token or group needs "
            "experts whose bounds leave no room for it)"
        )
    return problem
