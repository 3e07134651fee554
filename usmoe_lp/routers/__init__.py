"""The router registry: every router defined once, read by every consumer.

:func:`list_routers` names the routers; :func:`get_router` returns one's :class:`Router` record
(parameters, fast function, linear program, prefix and decode rules, label);
:class:`RouterConfig` is one setting of a router, and :func:`reroute` routes captured logits
with it. Definitions of the routers: ``docs/routers.md``.
"""

from usmoe_lp.routers.config import (
    RouterConfig,
    default_configs,
    default_kbars,
    prepare_logits,
    reroute,
    route_scores,
    router_grid,
)
from usmoe_lp.routers.registry import ROUTERS, get_router, list_routers
from usmoe_lp.routers.spec import GROUPS, MODEL_K, PREFIX_RULES, Param, Router, RouterContext

__all__ = ["GROUPS", "MODEL_K", "PREFIX_RULES", "ROUTERS", "Param", "Router", "RouterConfig", "RouterContext",
           "default_configs", "default_kbars", "get_router", "list_routers", "prepare_logits", "reroute",
           "route_scores", "router_grid"]
