"""usmoe-lp: routing analysis and theory verification for sparse Mixture-of-Experts.

The fast path (torch): :func:`unified_score`, :func:`token_choice`, :func:`expert_choice`,
:func:`global_topc`, :func:`capacity_token_choice` return a :class:`Routing`.
The exact path (numpy/scipy): :class:`RoutingProblem`, :func:`solve`, :func:`certify`.
Router logs: :func:`capture` from a live model, :class:`RouterLog` to read one.
The router registry: :func:`list_routers`, :func:`get_router`, :class:`RouterConfig`, :func:`reroute`
(captured logits re-routed by any registered router).
Live routing: :func:`route` puts any registered router into a transformers MoE model
(``with route(model, "usmoe", kbar=1.5) as r: model(**batch)``).
Analysis: :func:`analyze` a router log; :func:`analyze_model` captures a model's routing on texts and
analyses it in one call (both imported on first use: they pull in the analysis stack);
:func:`usmoe_lp.compare.compare` puts several logs side by side.
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

_LAZY = {"analyze": "usmoe_lp.diagnostics", "analyze_model": "usmoe_lp.model_analysis"}


def __getattr__(name: str):
    """The analysis entry points of :data:`_LAZY`, imported when first asked for."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'usmoe_lp' has no attribute {name!r}")


__all__ = [
    "Certificate", "RouterLog", "analyze", "analyze_model", "capture",
    "InfeasibleProblem", "InvalidParameter", "InvalidScores", "Routing",
    "RouterConfig", "RoutingProblem", "ShapeMismatch", "Solution", "SolverError", "UnsupportedProblem",
    "UsmoeLpError", "capacity_token_choice", "certify", "expert_choice", "get_router", "global_topc", "list_routers",
    "reroute", "route", "sigmoid_score", "softmax_score", "solve", "token_choice", "unified_score",
]
