"""The model's own router (``native``): its selection reproduced from the logits and the layer's routing semantics.

A router log records, per layer, how the model's router selects (:class:`usmoe_lp.logs.LayerInfo`, filled by
``capture`` from the model's config and modules). ``native`` replays it on the logits z of each token:

1. **selection scores** s (:func:`selection_scores`): softmax or sigmoid of z, or z itself
   (``LayerInfo.selection``), computed in float32 (float64 for a float64 layer) and rounded to the layer's
   ``score_dtype``, plus the ``selection_bias`` added in that dtype: the values the model ranks, bit for bit,
   when the logits were captured on the same kind of device;
2. **group limit** (:func:`limit_groups`, DeepSeek-V2/V3 style): the experts form ``n_group`` groups of
   consecutive experts, each scored by ``group_score`` (``top2_sum``: the sum of its two best scores; ``max``:
   its best); the ``topk_group`` best groups stay and the others are masked (-inf, or 0.0 for ``max`` as
   DeepSeek-V2's ``group_limited_greedy`` does);
3. **top-k** of the masked scores with ``torch.topk``, the model's own call, so ties fall as the model's fall
   where the same kernel runs on the same values; a token whose selection crosses a tie (the k-th and the
   (k+1)-th masked scores equal, or the ``topk_group``-th and next group scores) is counted in
   ``Routing.params["tied_tokens"]``;
4. **expert capacity** (Switch Transformers, ``LayerInfo.expert_capacity``): within each row b of the
   (B, T, N) batch, an expert keeps the first ``expert_capacity`` real tokens that selected it in position
   order; a later token is dropped (no expert). The model counts the tokens of one forward's row, padding
   included: rows here are the batch rows given (a log's sequences), padding excluded, so a log captured with
   left padding in a capacity-limited layer can differ where padding took capacity.

**Scores, program and certificate.** ``scores`` are the selection scores s (step 1, as float64, exact). The
program of a group is ``RoutingProblem.token_choice`` on s with the experts of the groups step 2 drops set
below every kept score (:func:`program_scores`; 0.0 for ``max``): native's selection is its top-k per token,
so ``exact`` is True. With an expert capacity the program is Token Choice with that capacity per expert,
``RoutingProblem(S, token_max=k, expert_max=C)``: where the capacity drops a token, the model's position order
is a heuristic for it and its certificate fails (``Routing.params["dropped_assignments"]`` says where).

**Prefix rule** ``causal``: a token's experts depend on its own logits (token-local), and with a capacity on
the tokens before it in its row only, so the routing of a prefix is the prefix of the routing.

**Weights** (``Routing.weights``): the combine weights the model applies to the selected experts
(:func:`combine_weights`): per ``LayerInfo.weights`` the softmax probability or the sigmoid of each selected
expert (without the bias), a softmax over the selected logits (``softmax_topk``) or PhiMoE's sparsemixer; then,
with ``norm_topk_prob``, divided by their ``norm_topk_p``-norm, and multiplied by ``routed_scaling_factor``.
They match the model's up to the rounding of the last operations (and the tiny constants some families add to
the norm's denominator); with a selection bias, :meth:`Router.route` recovers the unbiased score as
``(s + b) - b`` in the score dtype, within one rounding.

Sources: the routers of transformers 5.x (``DeepseekV3TopkRouter``, ``DeepseekV2TopkRouter``,
``SwitchTransformersTop1Router``, ``sparsemixer`` of PhiMoE, ...); DeepSeek-V3 (arXiv 2412.19437, §2.1.2),
DeepSeek-V2 (arXiv 2405.04434, §2.2.3), Switch Transformers (arXiv 2101.03961, §2.1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from usmoe_lp.errors import InvalidParameter, ShapeMismatch
from usmoe_lp.lp import RoutingProblem
from usmoe_lp.routers.spec import Router, RouterContext
from usmoe_lp.routing import Routing
from usmoe_lp.routing.routers import finish_routing, prepare_scores

_NEEDS_LAYER = ("native needs the layer's routing semantics, which a router log records: pass "
                "layer=log.layer_info(name) (a LayerInfo)")


def layer_semantics(ctx: RouterContext) -> Any:
    """The layer's :class:`usmoe_lp.logs.LayerInfo` from ``ctx``, checked: :class:`InvalidParameter` when it is
    missing, its score function or selection is unknown, it is group-limited without a ``group_score``, its weight
    function does not go with its selection, or it disagrees with ``ctx`` (N, the model's k)."""
    layer = ctx.layer
    if layer is None or not hasattr(layer, "selection"):
        raise InvalidParameter(_NEEDS_LAYER)
    if layer.score_function == "unknown" or layer.selection is None:
        raise InvalidParameter(f"layer {layer.name!r}: its score function is unknown; {_NEEDS_LAYER} with a known "
                               "score_function (softmax, sigmoid or softmax_topk)")
    if layer.group_limited and layer.group_score is None:
        raise InvalidParameter(f"layer {layer.name!r}: limited to {layer.topk_group} of {layer.n_group} groups but "
                               "its group_score is unknown (top2_sum or max)")
    if layer.selection != "logits" and layer.weights not in (None, layer.selection):
        raise InvalidParameter(f"layer {layer.name!r}: weights by {layer.weights} with a selection on the "
                               f"{layer.selection} is not a router native reproduces")
    if ctx.num_experts != layer.num_experts:
        raise ShapeMismatch(f"layer {layer.name!r} has N = {layer.num_experts} experts but the logits have "
                            f"{ctx.num_experts}")
    if layer.top_k is not None and ctx.k != layer.top_k:
        raise InvalidParameter(f"native routes with the model's k = {layer.top_k} of layer {layer.name!r}, got "
                               f"k = {ctx.k}")
    return layer


def score_dtype(layer: Any) -> torch.dtype:
    """The dtype the model ranks its selection scores in (``LayerInfo.score_dtype``; float64 where unknown)."""
    return getattr(torch, layer.score_dtype) if layer.score_dtype else torch.float64


def _bias(layer: Any, like: torch.Tensor) -> torch.Tensor | None:
    if layer.selection_bias is None:
        return None
    return torch.tensor(layer.selection_bias, dtype=torch.float64, device=like.device).to(like.dtype)


def selection_scores(logits: torch.Tensor, layer: Any) -> torch.Tensor:
    """The scores the model ranks (step 1): ``(..., N)`` logits (any real dtype) -> ``(..., N)`` in the layer's
    :func:`score_dtype`: softmax or sigmoid of the logits computed in float32 (float64 for a float64 layer) and
    rounded to the score dtype, or the logits themselves; plus the selection bias, added in that dtype."""
    sd = score_dtype(layer)
    cd = torch.float64 if sd == torch.float64 else torch.float32
    how = layer.selection
    if how == "logits":
        s = logits.to(sd)
    elif how == "softmax":
        s = torch.softmax(logits.to(cd), dim=-1).to(sd)
    elif how == "sigmoid":
        s = torch.sigmoid(logits.to(cd)).to(sd)
    else:
        raise InvalidParameter(f"layer {layer.name!r}: its selection is unknown; {_NEEDS_LAYER}")
    bias = _bias(layer, s)
    return s if bias is None else s + bias


GROUP_FILL = {"top2_sum": float("-inf"), "max": 0.0}
"""What the model writes over the experts of the groups it drops, per ``group_score``: -inf (DeepSeek-V3 and its
followers), 0.0 (DeepSeek-V2's ``group_limited_greedy``)."""


def group_scores(scores: torch.Tensor, layer: Any) -> torch.Tensor:
    """``(n, N)`` selection scores -> ``(n, n_group)`` scores of the groups of consecutive experts, by the layer's
    ``group_score``: ``top2_sum`` (the sum of the group's two best) or ``max`` (its best)."""
    n, N = scores.shape
    grouped = scores.view(n, layer.n_group, N // layer.n_group)
    if layer.group_score == "top2_sum":
        return grouped.topk(2, dim=-1)[0].sum(dim=-1)
    return grouped.max(dim=-1).values


def limit_groups(scores: torch.Tensor, layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2 on ``(n, N)`` selection scores: ``(masked (n, N), group_tied (n,) bool)``: the experts of the groups
    the model drops set to :data:`GROUP_FILL`, and whether the ``topk_group``-th best group score ties with the
    next. A layer without a group limit returns the scores."""
    n, N = scores.shape
    if not layer.group_limited:
        return scores, torch.zeros(n, dtype=torch.bool, device=scores.device)
    keep_g = layer.topk_group
    group = group_scores(scores, layer)
    chosen = torch.topk(group, k=keep_g, dim=-1, sorted=False)[1]
    keep = torch.zeros_like(group, dtype=torch.bool).scatter_(1, chosen, True)
    ordered = torch.sort(group, dim=-1, descending=True).values
    tied = ordered[:, keep_g - 1] == ordered[:, keep_g]
    allowed = keep.repeat_interleave(N // layer.n_group, dim=1)
    return scores.masked_fill(~allowed, GROUP_FILL[layer.group_score]), tied


def top_k_selection(scores: torch.Tensor, layer: Any, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-3 on ``(n, N)`` selection scores: ``(mask (n, N) bool, tied (n,) bool)``: the k experts the model
    takes (``torch.topk`` of the group-masked scores, the model's call) and whether the token's selection crosses a
    tie (between groups, or between its k-th and (k+1)-th masked score)."""
    masked, tied = limit_groups(scores, layer)
    n, N = masked.shape
    idx = torch.topk(masked, k, dim=-1)[1]
    mask = torch.zeros(n, N, dtype=torch.bool, device=scores.device).scatter_(1, idx, True)
    if k < N:
        top = torch.topk(masked, k + 1, dim=-1)[0]
        tied = tied | (top[:, k - 1] == top[:, k])
    return mask, tied


def apply_capacity(mask: torch.Tensor, capacity: int) -> tuple[torch.Tensor, int]:
    """Step 4 on a ``(B, T, N)`` bool selection (padding rows already empty): each expert keeps the first
    ``capacity`` tokens of each row b that selected it, in position order (Switch's cumsum over the sequence);
    returns the kept mask and the number of dropped token-expert pairs."""
    kept = mask & (torch.cumsum(mask.to(torch.int64), dim=1) <= capacity)
    return kept, int(mask.sum() - kept.sum())


def program_scores(scores, layer: Any):
    """The scores of native's program on one group (``(T, N)`` float64 numpy or torch, native's ``scores``): the
    experts of the dropped groups set below every kept score of their row (finite, for the LP), so native's
    selection is the top-k per token of the result."""
    s = torch.as_tensor(scores)
    if not layer.group_limited:
        return s.numpy() if not isinstance(scores, torch.Tensor) else s
    sd = score_dtype(layer)
    masked, _ = limit_groups(s.to(sd), layer)
    low = s.min(dim=-1, keepdim=True).values
    out = torch.where(torch.isneginf(masked), low - (1.0 + low.abs()), masked.to(s.dtype))
    return out.numpy() if not isinstance(scores, torch.Tensor) else out


def _sparsemixer(z: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    """PhiMoE's sparsemixer weights in eval mode (transformers' ``sparsemixer``), for a selection of 2 experts:
    the first (the larger logit) gets the softmax of its logit over the logits within ``2 eps`` (relative) of it,
    the second the same over the others. (n, N) logits and mask -> (n, N) weights."""
    neg = torch.tensor(float("-inf"), dtype=z.dtype, device=z.device)
    out = torch.zeros_like(z)
    rest = z
    for _ in range(2):
        idx = torch.where(mask, rest, neg).argmax(dim=-1, keepdim=True)
        top = rest.gather(-1, idx)
        drop = ((top - z) / z.abs().clamp(min=top)) > 2 * eps
        w = torch.softmax(rest.masked_fill(drop, float("-inf")), dim=-1).gather(-1, idx)
        has = mask.gather(-1, idx)
        out = out.scatter(-1, idx, torch.where(has, w, out.gather(-1, idx)))
        rest = rest.scatter(-1, idx, float("-inf"))
    return out


def _finish(values: torch.Tensor, mask: torch.Tensor, layer: Any) -> torch.Tensor:
    w = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if layer.norm_topk_prob:
        norm = w.abs().pow(layer.norm_topk_p).sum(dim=-1, keepdim=True).pow(1.0 / layer.norm_topk_p)
        w = w / torch.where(norm > 0, norm, torch.ones_like(norm))
    return w * layer.routed_scaling_factor


def _gate_values(z: torch.Tensor, mask: torch.Tensor, layer: Any, how: str | None) -> torch.Tensor:
    if how == "softmax":
        return torch.softmax(z, dim=-1)
    if how == "sigmoid":
        return torch.sigmoid(z)
    if how == "softmax_topk":
        out = torch.softmax(z.masked_fill(~mask, float("-inf")), dim=-1)
        return torch.nan_to_num(out, nan=0.0)  # a token with no expert (dropped)
    if how == "sparsemixer":
        return _sparsemixer(z, mask, layer.sparsemixer_eps or 0.0)
    raise InvalidParameter(f"layer {layer.name!r}: its weight function is unknown")


def combine_weights(logits: torch.Tensor, mask: torch.Tensor, layer: Any) -> torch.Tensor:
    """The combine weights the model applies: ``(..., N)`` logits and bool selection -> ``(..., N)`` float (0
    where not selected), computed in float32 (float64 for float64 logits) from the logits: the gate value of each
    selected expert (``LayerInfo.weights``), normalised (``norm_topk_prob``, ``norm_topk_p``) and scaled
    (``routed_scaling_factor``). See the module docstring for how close they are to the model's."""
    z = logits if logits.dtype == torch.float64 else logits.float()
    return _finish(_gate_values(z, mask, layer, layer.weights), mask, layer)


# ----------------------------------------------------------------------------- the registry entry
def _scores(logits: torch.Tensor, params: Mapping[str, Any], ctx: RouterContext) -> torch.Tensor:
    return selection_scores(logits, layer_semantics(ctx)).to(torch.float64)


def _route(scores, params: Mapping[str, Any], ctx: RouterContext, padding_mask=None, state: Any = None) -> Routing:
    layer = layer_semantics(ctx)
    s3, valid, squeeze = prepare_scores(scores, padding_mask)
    B, T, N = s3.shape
    s = s3.reshape(B * T, N).to(score_dtype(layer))
    mask, tied = top_k_selection(s, layer, ctx.k)
    mask, tied = mask.reshape(B, T, N), tied.reshape(B, T)
    if valid is not None:
        mask &= valid.unsqueeze(-1)
        tied &= valid
    dropped = 0
    if layer.expert_capacity is not None:
        mask, dropped = apply_capacity(mask, layer.expert_capacity)
    flat = mask.reshape(B * T, N)
    if layer.selection == "logits":
        gate = _gate_values(s if s.dtype == torch.float64 else s.float(), flat, layer, layer.weights)
    else:
        bias = _bias(layer, s)
        gate = s if bias is None else s - bias
    weights = _finish(gate.to(torch.float64), flat, layer)
    params_out = {"k": ctx.k, "tied_tokens": int(tied.sum()), "capacity": layer.expert_capacity,
                  "dropped_assignments": dropped, "layer": layer.name}
    return finish_routing(weights.reshape(B, T, N), mask, "native", params_out, valid, squeeze)


def _problem(S, params: Mapping[str, Any], routing_params: Mapping[str, Any], key: int, ctx: RouterContext):
    layer = layer_semantics(ctx)
    if layer.expert_capacity is not None:
        return RoutingProblem(S, token_max=ctx.k, expert_max=layer.expert_capacity)
    return RoutingProblem.token_choice(program_scores(S, layer), ctx.k)


ROUTER = Router(
    name="native",
    summary="the model's own router: its selection scores, selection bias, group limits, top-k and capacity, "
            "from the layer's routing semantics in the router log",
    reference="transformers' routers (DeepSeek-V2/V3 group-limited top-k: arXiv 2405.04434, 2412.19437; Switch "
              "capacity: arXiv 2101.03961); usmoe_lp.logs.LayerInfo",
    params=(),
    scores=_scores,
    route=_route,
    label=lambda p, k: "native",
    exact=True,
    problem=_problem,
    group=lambda p: "sequence",
    prefix="causal",
    decode=("the model's selection of the token, from its own logits: each decode step is a row of one token, so an "
            "expert capacity (>= 1) never drops it"),
    order=0,
    in_default_sweep=False,
)
