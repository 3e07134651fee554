"""Top-p routing: each token takes the fewest experts whose probability mass reaches p.

Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models" (arXiv
2403.07652; code github.com/ZhenweiAn/Dynamic_MoE): a token sorts its routing probabilities
P_i1 >= P_i2 >= ... and takes the first

    k_i = min{ m : P_i1 + ... + P_im >= p }          (k_i = N if the sum never reaches p)

experts, capped at ``max_k`` when a cap is given (0, the default: no cap, as in the paper). The
rule is token-local: a token's experts depend on its own logits only, so its prefix leakage is 0
and a KV-cache decoder computes the same routing. The paper's threshold is p = 0.4 (the default
``top_p_threshold`` of its released configuration). Its released code keeps the first expert
whose cumulative sum *exceeds* p (``> p``); the rule here is the paper's "reaches" (``>= p``). The
two differ only when a cumulative sum equals p exactly.

Scores: the model's probabilities (:func:`usmoe_lp.routing.probabilities`); the cumulative mass
is meaningful only for a distribution, so the rule always reads them, whatever the layer's
``score_function`` (for ``sigmoid`` layers that is the normalised sigmoid).

Determinism: the counts k_i are a function of a row's values alone, computed in float64 by one
sequential cumulative sum on the CPU (the same bits on every device and batch layout); the
selection is the top-k_i of the row with ties to the lowest expert index, as
:func:`usmoe_lp.routing.routers.select_top`.

Program: per token, the top-k_i program ``RoutingProblem(S, token_min=k_i, token_max=k_i)`` with
k_i the realised counts, so ``exact=True``. The certificate proves that the selection is optimal
*given the counts*; it says nothing about the choice of the counts, which is the rule above.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from usmoe_lp._validate import check_int, check_real
from usmoe_lp.errors import InvalidParameter
from usmoe_lp.lp import RoutingProblem
from usmoe_lp.routers.entries._common import model_probabilities
from usmoe_lp.routers.spec import Param, Router, RouterContext
from usmoe_lp.routing.routers import finish_routing, prepare_scores, select_top
from usmoe_lp.routing.routing import Routing

DEFAULT_P = 0.4
"""Huang et al.'s threshold (``top_p_threshold`` of the released configuration)."""


def _cap(max_k: int, n: int) -> int:
    """The per-token cap: ``max_k``, or N for 0 (no cap)."""
    max_k = check_int(max_k, "max_k", low=0)
    if max_k > n:
        raise InvalidParameter(f"max_k = {max_k} exceeds the number of experts N = {n}")
    return n if max_k == 0 else max_k


def topp_counts(probs, p: float, max_k: int = 0) -> torch.Tensor:
    """k_i per row: the fewest experts, in descending probability, whose mass reaches ``p``.

    probs: (..., N) float, the model's probabilities (rows sum to 1; any real float dtype).
    p: in (0, 1]. max_k: cap on k_i (0: none, i.e. N). Returns (...) long on ``probs``'
    device, each in [1, cap]: k_i = min(cap, 1 + #{m : P_i1 + ... + P_im < p}) with the P_i
    sorted descending (N when the mass never reaches p). The sums are float64 and sequential,
    on the CPU, so that the counts are a function of a row's values alone.

    >>> import torch
    >>> topp_counts(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]), 0.7).tolist()
    [2, 1]
    """
    p = check_real(p, "p", low=0.0, high=1.0, low_open=True)
    probs = torch.as_tensor(probs)
    n = int(probs.shape[-1])
    cap = _cap(max_k, n)
    ordered = torch.sort(probs.detach().to(device="cpu", dtype=torch.float64), dim=-1, descending=True).values
    mass = torch.cumsum(ordered, dim=-1)
    counts = 1 + (mass < p).sum(-1)
    return counts.clamp(max=cap).to(probs.device)


def top_p(probs, p: float = DEFAULT_P, max_k: int = 0, padding_mask=None) -> Routing:
    """Top-p routing (module docstring): each token takes its top-k_i experts, k_i = :func:`topp_counts`.

    probs: (T, N) or (B, T, N) float probabilities; padding_mask: (T,) or (B, T) bool, True =
    padding (gets no expert). Returns a :class:`~usmoe_lp.routing.Routing` whose ``params``
    hold ``p`` and ``max_k`` (the cap used, N for none); the counts k_i are
    ``experts_per_token`` (0 for padding).

    >>> import torch
    >>> r = top_p(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]), p=0.7)
    >>> r.mask.int().tolist(), r.experts_per_token.tolist()
    ([[1, 1, 0], [0, 0, 1]], [2, 1])
    """
    s3, valid, squeeze = prepare_scores(probs, padding_mask)
    B, T, N = s3.shape
    cap = _cap(max_k, N)
    counts = topp_counts(s3, p, cap)
    if valid is not None:
        counts = counts * valid
    mask = select_top(s3.reshape(B * T, N), counts.reshape(-1)).reshape(B, T, N)
    params = {"p": float(p), "max_k": cap}
    return finish_routing(s3, mask, "top_p", params, valid, squeeze)


def topp_problem(S: np.ndarray, params: Mapping[str, Any], routing_params: Mapping[str, Any], key: int,
                 ctx: RouterContext) -> RoutingProblem:
    """The per-token top-k_i program on a group's real rows S (T_g, N) float64, k_i recomputed
    from S by :func:`topp_counts` (the same bits as the route's, whatever the grouping)."""
    k = topp_counts(torch.from_numpy(np.ascontiguousarray(S, dtype=np.float64)), params["p"], params["max_k"])
    return RoutingProblem(S, token_min=k.numpy(), token_max=k.numpy(), name="top_p")


def _label(p: Mapping[str, Any], k: int) -> str:
    return f"topp p={p['p']:g}" + (f" max_k={p['max_k']}" if p["max_k"] else "")


ROUTER = Router(
    name="topp",
    summary="top-p: each token takes the fewest experts, by descending probability, whose mass reaches p",
    reference="Huang et al. 2024, Harder Tasks Need More Experts (arXiv 2403.07652), Sec. 3",
    params=(Param("p", float, DEFAULT_P, "probability mass each token's experts must reach, in (0, 1] "
                  "(the paper's 0.4)", low=0.0, high=1.0, low_open=True),
            Param("max_k", int, 0, "cap on experts per token (0: no cap, i.e. N)", low=0, at_most_experts=True)),
    scores=model_probabilities,
    route=lambda s, p, ctx, pad, state: top_p(s, p=p["p"], max_k=p["max_k"], padding_mask=pad),
    label=_label,
    exact=True,
    problem=topp_problem,
    group=lambda p: "token",
    prefix="token_local",
    decode=("the same experts as in a full forward: a token's count and choice depend on its own "
            "probabilities only"),
    order=50,
)
