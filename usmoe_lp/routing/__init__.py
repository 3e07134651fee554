"""The fast path: score functions and routers on torch tensors (CPU or CUDA), no I/O."""

from usmoe_lp.routing.routers import capacity_token_choice, expert_choice, global_topc, token_choice
from usmoe_lp.routing.routing import Routing
from usmoe_lp.routing.scores import probabilities, sigmoid_score, softmax_score, unified_score

__all__ = ["Routing", "capacity_token_choice", "expert_choice", "global_topc", "probabilities", "sigmoid_score",
           "softmax_score", "token_choice", "unified_score"]
