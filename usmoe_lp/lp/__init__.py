"""The exact path: routing programs, solver backends and optimality certificates (numpy/scipy)."""

from usmoe_lp.lp.certificate import Certificate, dual_bound
from usmoe_lp.lp.problem import RoutingProblem
from usmoe_lp.lp.solve import BACKENDS, Solution, certify, certify_with_duals, solve

__all__ = ["BACKENDS", "Certificate", "RoutingProblem", "Solution", "certify", "certify_with_duals",
           "dual_bound", "solve"]
