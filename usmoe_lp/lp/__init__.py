"""The exact path: routing programs, solver backends and optimality certificates (numpy/scipy)."""

from usmoe_lp.lp.backends import RawResult
from usmoe_lp.lp.batch import (
    EXHAUSTIVE_MAX_ENTRIES,
    certify_batch,
    closed_form_batch,
    solve_exhaustive_batch,
    solve_highs_batch,
)
from usmoe_lp.lp.certificate import Certificate, dual_bound
from usmoe_lp.lp.feasibility import check_feasible, is_feasible
from usmoe_lp.lp.flow import FlowResult, flow_optimum
from usmoe_lp.lp.problem import RoutingProblem
from usmoe_lp.lp.solve import BACKENDS, Solution, certify, certify_with_duals, solve

__all__ = ["BACKENDS", "EXHAUSTIVE_MAX_ENTRIES", "Certificate", "FlowResult", "RawResult", "RoutingProblem",
           "Solution", "certify", "certify_batch", "certify_with_duals", "check_feasible", "closed_form_batch",
           "dual_bound", "flow_optimum", "is_feasible", "solve", "solve_exhaustive_batch", "solve_highs_batch"]
