"""SeqTopK: the T*k best token-expert pairs of each sequence, at most ``max_k`` per token.

Wen et al. 2025, "Route Experts by Sequence, not by Token" (arXiv 2511.06494), as implemented in
Megatron-LM's open SeqTopK router (``megatron/core/transformer/moe/seq_topk.py``,
NVIDIA/Megatron-LM pull request 6208): the expert budget moves from the token to the sequence.
A sequence of T real tokens gets c = T * k pairs; they are the c highest-scoring pairs of the
sequence subject to a per-token cap U (``upper_bound`` there): in descending score order, a pair
is taken unless its token already holds U experts, until c pairs are taken. Hard tokens get up to
U experts, easy ones fewer, possibly none. Padding is never selected and is not counted in T (the
Megatron router sizes the budget from the valid tokens too).

The cap: Megatron requires it (``upper_bound >= topk``, no default); its tests use U = 2k, and so
does this router by default (``max_k = 0``: U = min(2k, N)). ``max_k = N`` removes the cap, which
makes SeqTopK the USMoE global top-c of the probabilities (alpha = 0) at k-bar = k.

Scores: the model's probabilities (:func:`usmoe_lp.routing.probabilities`), the scores every
re-routing router of the package ranks. Megatron ranks the raw logits when the softmax follows
the selection (its default) and the probabilities with ``moe_router_pre_softmax``; across tokens
the two orders differ, and the probabilities are the comparable ones.

Program: ``RoutingProblem.capped(S, c=T*k, token_max=U, expert_max=T, sense="==")`` on each
sequence (the expert cap T is no constraint). Its feasible sets are the bases of a truncated
partition matroid (at most U per token, c in all), so the greedy above is exactly optimal for any
scores, signed included: ``exact=True``. Ties: pairs in descending score, equal scores lowest flat
index first (as :func:`usmoe_lp.routing.routers.select_top`); the token-cap skip then keeps each
token's top-U, so SeqTopK is ``select_top`` of the pairs within their token's top-U.

Decode: one token per step is a sequence of one token, budget k, cap U >= k: Token Choice with k.
"""

from __future__ import annotations

import numpy as np
import torch

from usmoe_lp._validate import check_int
from usmoe_lp.errors import InvalidParameter
from usmoe_lp.lp import RoutingProblem
from usmoe_lp.routers.entries._common import model_probabilities
from usmoe_lp.routers.spec import Param, Router
from usmoe_lp.routing.routers import check_k, finish_routing, mask_out, prepare_scores, select_top
from usmoe_lp.routing.routing import Routing


def seqtopk_cap(k: int, max_k: int, n: int) -> int:
    """The per-token cap U: ``max_k``, or min(2k, N) for 0 (Megatron's tests' choice); k <= U <= N.

    >>> seqtopk_cap(2, 0, 64), seqtopk_cap(2, 0, 3), seqtopk_cap(2, 5, 64)
    (4, 3, 5)
    """
    k = check_k(k, n)
    max_k = check_int(max_k, "max_k", low=0)
    cap = min(2 * k, n) if max_k == 0 else max_k
    if cap > n:
        raise InvalidParameter(f"max_k = {max_k} exceeds the number of experts N = {n}")
    if cap < k:
        raise InvalidParameter(f"max_k = {max_k} is below k = {k}: a sequence of T tokens could not take its "
                               f"T * k pairs (SeqTopK needs max_k >= k)")
    return cap


def seq_topk(scores, k: int, max_k: int = 0, padding_mask=None) -> Routing:
    """SeqTopK (module docstring): per sequence, the T*k best pairs with at most U per token.

    scores: (T, N) or (B, T, N) float; k: the model's experts per token (1 <= k <= N); max_k:
    the cap U (0: min(2k, N)); padding_mask: (T,) or (B, T) bool, True = padding (never selected,
    not counted in T). ``params``: ``k``, ``max_k`` (U used) and ``budget`` (c = T_real * k per
    sequence; one number for a single sequence).

    >>> import torch
    >>> s = torch.tensor([[0.9, 0.8, 0.7], [0.2, 0.1, 0.0]])
    >>> seq_topk(s, k=1).mask.int().tolist()   # c = 2, U = 2: token 0 takes both
    [[1, 1, 0], [0, 0, 0]]
    """
    s3, valid, squeeze = prepare_scores(scores, padding_mask)
    B, T, N = s3.shape
    cap = seqtopk_cap(k, max_k, N)
    tokens = valid.sum(-1) if valid is not None else torch.full((B,), T, device=s3.device)
    row_counts = torch.full((B * T,), cap, dtype=torch.long, device=s3.device)
    if valid is not None:
        row_counts = row_counts * valid.reshape(-1)
    eligible = select_top(s3.reshape(B * T, N), row_counts).reshape(B, T, N)
    values = mask_out(s3, valid).masked_fill(~eligible, float("-inf"))
    budget = tokens.long() * k
    mask = select_top(values.reshape(B, T * N), budget).reshape(B, T, N)
    cs = budget.tolist()
    params = {"k": k, "max_k": cap, "budget": cs if len(cs) > 1 else cs[0]}
    return finish_routing(s3, mask, "seq_topk", params, valid, squeeze)


def seqtopk_problem(S: np.ndarray, params, routing_params, key: int, ctx) -> RoutingProblem:
    """The capped program of one sequence's real rows S (T_g, N): c = T_g * k, U per token, "=="."""
    T_g, N = S.shape
    cap = seqtopk_cap(ctx.k, params["max_k"], N)
    return RoutingProblem.capped(S, c=T_g * ctx.k, token_max=cap, expert_max=T_g, sense="==")


def _label(p, k: int) -> str:
    return "seqtopk" + (f" max_k={p['max_k']}" if p["max_k"] else "")


ROUTER = Router(
    name="seqtopk",
    summary="SeqTopK: the T*k best token-expert pairs of each sequence, at most max_k (default 2k) per token",
    reference=("Wen et al. 2025, Route Experts by Sequence, not by Token (arXiv 2511.06494); "
               "Megatron-LM megatron/core/transformer/moe/seq_topk.py"),
    params=(Param("max_k", int, 0, "cap U on experts per token (0: min(2k, N), Megatron's tests' choice); "
                  "must be >= k", low=0, at_most_experts=True),),
    scores=model_probabilities,
    route=lambda s, p, ctx, pad, state: seq_topk(s, ctx.k, max_k=p["max_k"], padding_mask=pad),
    label=_label,
    exact=True,
    problem=seqtopk_problem,
    group=lambda p: "sequence",
    prefix="recompute",
    decode=("a decode step is a sequence of one token: budget k, cap max_k >= k, so the token takes its "
            "top-k experts (Token Choice); the paper's online variant with an expert cache is not this rule"),
    order=55,
)
