"""Live routing: put any router into a transformers MoE model (:func:`route`) and measure quality against cost
end to end (:func:`usmoe_lp.live.evaluate.evaluate`, the module of that name: ``from usmoe_lp.live.evaluate import
evaluate``)."""

from usmoe_lp.live.adapters import UnsupportedModel
from usmoe_lp.live.route import Route, RouteFailed, route
from usmoe_lp.live.selectors import LiveContext, Selection
from usmoe_lp.live.stats import LayerStats, RouteStats
from usmoe_lp.live.weights import WEIGHT_RULES

__all__ = ["WEIGHT_RULES", "LayerStats", "LiveContext", "Route", "RouteFailed", "RouteStats", "Selection",
           "UnsupportedModel", "route"]
