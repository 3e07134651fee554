"""Pieces several registry entries share: the scores they route on and the group programs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from usmoe_lp.routers.spec import Param, RouterContext
from usmoe_lp.routing.scores import probabilities, unified_score

SCOPE_SHORT = {"sequence": "seq", "batch": "batch", "position": "pos"}

ALPHA = Param("alpha", float, 0.5, "weight of the scaled sigmoid in the unified score, in [0, 1] "
              "(0: softmax, 1: 2 sigmoid / N; the reference code's rate is 0.5)", low=0.0, high=1.0)
KBAR = Param("kbar", float, "model k", "experts per token on average (may be fractional); the budget "
             "of a group is c = round_half_up(kbar * real tokens in it)", low=0.0, low_open=True,
             at_most_experts=True)
SCOPE = Param("scope", str, "sequence", "the group that shares the budget: sequence, batch or position",
              choices=("sequence", "batch", "position"))


def model_probabilities(logits: torch.Tensor, params: Mapping[str, Any], ctx: RouterContext) -> torch.Tensor:
    """The model's probabilities P (:func:`usmoe_lp.routing.probabilities`): the scores of TC, EC
    and the other routers that re-route the model's own distribution."""
    return probabilities(logits, ctx.score_function)


def unified(logits: torch.Tensor, params: Mapping[str, Any], ctx: RouterContext) -> torch.Tensor:
    """USMoE's unified score alpha * 2 sigmoid(z) / N + (1 - alpha) softmax(z) (arXiv 2503.22996, Def. 3.2)."""
    return unified_score(logits, params["alpha"])


def per_group(value, key: int) -> int:
    """A routing parameter that is per group (a list) or one number for all groups."""
    return int(np.atleast_1d(value)[key])
