"""The exact path: routing programs, solver backends and optimality certificates (numpy/scipy)."""

from usmoe_lp.lp.certificate import Certificate, dual_bound
from usmoe_lp.lp.feasibility import check_feasible, is_feasible
from usmoe_lp.lp.flow import FlowResult, flow_optimum
from usmoe_lp.lp.problem import RoutingProblem
from usmoe_lp.lp.solve import BACKENDS, Solution, certify, certify_with_duals, solve

__all__ = ["BACKENDS", "Certificate", "FlowResult", "RoutingProblem", "Solution", "certify", "certify_with_duals",
           "check_feasible", "dual_bound", "flow_optimum", "is_feasible", "solve"]
