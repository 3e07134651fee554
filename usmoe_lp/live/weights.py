"""Combine weights: how the outputs of a token's selected experts are mixed, once a router has chosen them.

A router decides *which* experts process a token; the combine weights decide how their outputs are summed. Live
routing (:func:`usmoe_lp.live.route`) makes the rule explicit, one entry of :data:`WEIGHT_RULES` per rule:

* ``model``: the model's own rule applied to the new selection (:func:`usmoe_lp.routers.entries.native.combine_weights`
  with the layer's :class:`usmoe_lp.logs.LayerInfo`): the gate value of each selected expert (softmax probability,
  sigmoid, softmax over the selected logits, PhiMoE's sparsemixer), normalised over the selected experts when the
  model normalises (``norm_topk_prob``), times the model's ``routed_scaling_factor``. A token given more or fewer
  experts than the model's k is normalised over the experts it got. Shared experts are untouched (the model's block
  adds them to every token).
* ``reference``: as the official USMoE code: the router's own score of each selected expert (the unified score for
  ``usmoe``), divided by the sum of the token's scores over all N experts when the model normalises
  (``norm_topk_prob``), times ``routed_scaling_factor``.
* ``score``: the router's own score of each selected expert, as it is (:attr:`usmoe_lp.routing.Routing.weights`).

Every rule takes (B, T, N) logits, the (B, T, N) bool selection and the router's (B, T, N) float scores over all
experts and returns (B, T, N) float weights, 0 off the selection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from usmoe_lp.errors import InvalidParameter
from usmoe_lp.routers.entries.native import combine_weights

__all__ = ["WEIGHT_RULES", "WeightRule", "get_weight_rule"]


@dataclass(frozen=True)
class WeightRule:
    """One combine-weight rule: ``name``, a one-line ``summary``, and ``weights(logits, mask, scores, layer)``:
    (B, T, N) logits (model dtype), (B, T, N) bool selection, (B, T, N) router scores (float64, over all experts),
    the layer's :class:`usmoe_lp.logs.LayerInfo` -> (B, T, N) float weights, 0 where not selected."""

    name: str
    summary: str
    weights: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], torch.Tensor]


def _model(logits, mask, scores, layer):
    return combine_weights(logits, mask, layer)


def _reference(logits, mask, scores, layer):
    w = torch.where(mask, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
    if layer.norm_topk_prob:
        total = scores.sum(dim=-1, keepdim=True)
        w = w / torch.where(total != 0, total, torch.ones_like(total))
    return w * layer.routed_scaling_factor


def _score(logits, mask, scores, layer):
    return torch.where(mask, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))


WEIGHT_RULES: dict[str, WeightRule] = {r.name: r for r in (
    WeightRule("model", "the model's own gate values on the new selection (normalised over the selected experts "
               "when the model normalises, times its scaling factor)", _model),
    WeightRule("reference", "the router's score of each selected expert, over the sum of its scores on all N "
               "experts when the model normalises (the official USMoE code)", _reference),
    WeightRule("score", "the router's score of each selected expert, as it is", _score),
)}
"""The combine-weight rules by name (module docstring)."""


def get_weight_rule(name: str) -> WeightRule:
    """The :class:`WeightRule` called ``name``; :class:`InvalidParameter` listing the rules otherwise."""
    if name not in WEIGHT_RULES:
        raise InvalidParameter(f"weights must be one of {', '.join(WEIGHT_RULES)}, got {name!r}")
    return WEIGHT_RULES[name]
