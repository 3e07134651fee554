"""usmoe-lp: routing analysis and theory verification for sparse Mixture-of-Experts.

The fast path (torch): :func:`unified_score`, :func:`token_choice`, :func:`expert_choice`,
:func:`global_topc`, :func:`capacity_token_choice` return a :class:`Routing`.
The exact path (numpy/scipy): :class:`RoutingProblem`, :func:`solve`, :func:`certify`.
Router logs: :func:`capture` from a live model, :class:`RouterLog` to read one.
The router registry: :func:`list_routers`, :func:`get_router`, :class:`RouterConfig`, :func:`reroute`
(captured logits re-routed by any registered router).
Live routing: :func:`route` puts any registered router into a transformers MoE model
(``with route(model, "usmoe", kbar=1.5) as r: model(**batch)``).
"""

from usmoe_lp.errors import (
    InfeasibleProblem,
    InvalidParameter,
    InvalidScores,
    ShapeMismatch,
    SolverError,
    UnsupportedProblem,
    UsmoeLpError,
)
from usmoe_lp.live import route
from usmoe_lp.logs import RouterLog, capture
from usmoe_lp.lp import Certificate, RoutingProblem, Solution, certify, solve
from usmoe_lp.routers import RouterConfig, get_router, list_routers, reroute
from usmoe_lp.routing import (
    Routing,
    capacity_token_choice,
    expert_choice,
    global_topc,
    sigmoid_score,
    softmax_score,
    token_choice,
    unified_score,
)

__version__ = "0.1.0"

__all__ = [
    "Certificate", "RouterLog", "capture", "InfeasibleProblem", "InvalidParameter", "InvalidScores", "Routing",
    "RouterConfig", "RoutingProblem", "ShapeMismatch", "Solution", "SolverError", "UnsupportedProblem",
    "UsmoeLpError", "capacity_token_choice", "certify", "expert_choice", "get_router", "global_topc", "list_routers",
    "reroute", "route", "sigmoid_score", "softmax_score", "solve", "token_choice", "unified_score",
]
