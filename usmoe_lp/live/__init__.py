"""Live routing: put any router into a transformers MoE model and measure what it does (:func:`route`)."""

from usmoe_lp.live.adapters import UnsupportedModel
from usmoe_lp.live.route import Route, RouteFailed, route
from usmoe_lp.live.selectors import LiveContext, Selection
from usmoe_lp.live.stats import LayerStats, RouteStats
from usmoe_lp.live.weights import WEIGHT_RULES

__all__ = ["WEIGHT_RULES", "LayerStats", "LiveContext", "Route", "RouteFailed", "RouteStats", "Selection",
           "UnsupportedModel", "route"]
