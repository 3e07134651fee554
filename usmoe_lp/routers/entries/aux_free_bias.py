"""Auxiliary-loss-free load balancing: top-k of (score + bias), the bias moved after each batch.

DeepSeek-V3's balancing (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3 report arXiv
2412.19437 §2.1.2; Megatron-Core ``get_updated_expert_bias``): every token takes the k experts
with the largest s_ij + b_j, and after each batch (here: each ``route`` call, all its real tokens)

    b_j <- b_j + gamma * sign(mean load - load_j)      (mean load = T k / N over the N experts)

so an overloaded expert's bias falls and an underloaded one's rises. The bias only selects: the
routing's scores (``Routing.weights``, the program's objective) are s, not s + b. Scores s are the
gate G of Wang et al.: the model's probabilities (:func:`usmoe_lp.routing.probabilities`), except
for sigmoid routers, where DeepSeek-V3 adds the bias to the raw affinity sigmoid(z)
(:func:`usmoe_lp.routing.sigmoid_score`, unscaled). ``gamma`` defaults to 0.001, DeepSeek-V3's bias
update speed; the first call's bias is zeros (``init="zeros"``) or the layer's recorded
``selection_bias`` (``init="model"``: a DeepSeek-V3 checkpoint's ``e_score_correction_bias``).

**State.** The router is stateful: ``Routing.params["state"]`` is the next bias, (N,) float64
numpy, and passing it back as ``state=`` to the next call continues the stream
(:func:`usmoe_lp.routers.reroute`); ``params["bias"]`` is the bias the call was routed with.
Within one call the bias is fixed.

**As dual ascent.** The balanced program of :mod:`.base` (each token exactly k experts, each expert
at most C = ceil(T k / N) tokens) has the Lagrangian relaxation, with a price lambda_j >= 0 on
expert j's capacity,

    L(lambda) = max over x with k experts per token of  sum_ij (s_ij - lambda_j) x_ij + C sum_j lambda_j,

whose inner maximum is each token's top-k of s_ij - lambda_j: this router's selection with
**b = -lambda**. L is convex, and C - load_j(lambda) is a subgradient of it in lambda_j, so the dual
subgradient step lambda_j <- lambda_j - eta (C - load_j) is b_j <- b_j + eta (C - load_j). The
update above is that step with the subgradient replaced by its sign and C by the mean load T k / N
(equal when N divides T k), and without the projection onto b <= 0 — the dual of the program with
expert loads == T k / N, whose prices are free (adding a constant to every b_j changes no top-k).
A constant-step sign-subgradient method does not reach the dual optimum; it hovers within O(gamma)
of it, and each call is routed with the prices of the calls before it. So the router is a
heuristic for the balanced program of each call (``exact=False``; group: the call, ``batch``)
and the counterfactual reports its gap; its per-call MaxVio measures the capacity violation.

:func:`bias_trajectory` runs it over the tokens of a router-log layer, chunk by chunk in order,
and returns the bias after each chunk and each chunk's MaxVio, so its convergence can be seen.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from usmoe_lp._json import json_ready
from usmoe_lp._validate import check_int, check_real
from usmoe_lp.errors import InvalidParameter, ShapeMismatch
from usmoe_lp.routers.entries.base import CAPACITY_RULE, balanced_capacity, group_program
from usmoe_lp.routers.spec import Param, Router, RouterContext
from usmoe_lp.routing.routers import check_k, finish_routing, max_violation, prepare_scores, select_top
from usmoe_lp.routing.routing import Routing
from usmoe_lp.routing.scores import probabilities, sigmoid_score

DEFAULT_GAMMA = 1e-3
"""DeepSeek-V3's bias update speed (arXiv 2412.19437 §4.2: 0.001 for most of training)."""


def gate_scores(logits: torch.Tensor, score_function: str = "softmax") -> torch.Tensor:
    """The scores the bias is added to: sigmoid(z) for ``sigmoid`` routers (DeepSeek-V3), else the
    model's probabilities. logits (..., N) -> (..., N), float64 for float64 input."""
    if score_function == "sigmoid":
        return sigmoid_score(logits, scaled=False)
    return probabilities(logits, score_function)


def as_bias(bias, n: int, name: str = "state") -> np.ndarray:
    """``bias`` (N,) as a new float64 numpy array, or :class:`InvalidParameter` / :class:`ShapeMismatch`."""
    if isinstance(bias, torch.Tensor):
        bias = bias.detach().cpu().double().numpy()
    try:
        arr = np.array(bias, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidParameter(f"{name} must be the bias vector, {n} finite numbers, got {bias!r}") from None
    if arr.shape != (n,):
        raise ShapeMismatch(f"{name} has shape {arr.shape}; expected ({n},), one bias per expert")
    if not np.all(np.isfinite(arr)):
        raise InvalidParameter(f"{name} has non-finite entries; the bias must be {n} finite numbers")
    return arr


def update_bias(bias, load, gamma: float) -> np.ndarray:
    """One bias step: b_j + gamma * sign(mean load - load_j), (N,) float64.

    load: (N,) integer tokens per expert of the batch; the sign is computed exactly in integers
    (sign(sum - N load_j)). A batch with no tokens leaves the bias as it is.

    >>> update_bias([0.0, 0.0, 0.5], [5, 1, 3], 0.1).tolist()   # mean 3
    [-0.1, 0.1, 0.5]
    """
    gamma = check_real(gamma, "gamma", low=0.0)
    load = np.asarray(load, dtype=np.int64)
    b = as_bias(bias, load.size, "bias")
    direction = np.sign(load.sum() - load.size * load)
    return b + gamma * direction.astype(np.float64)


def aux_free_routing(scores, k: int, bias=None, gamma: float = DEFAULT_GAMMA, padding_mask=None) -> Routing:
    """Route one batch by the top-k of scores + bias and compute the next bias.

    Args:
        scores: (T, N) or (B, T, N) float, the gate scores s (:func:`gate_scores`).
        k: experts per token, 1 <= k <= N.
        bias: (N,) the bias for this batch (default zeros).
        gamma: >= 0, the update speed.
        padding_mask: (T,) or (B, T) bool, True = padding (never selected, not in any load).

    Returns:
        A :class:`~usmoe_lp.routing.Routing` (router ``aux_free_bias``; weights: s of the selected
        pairs). ``params``: ``bias`` (used), ``state`` (next bias, (N,) float64), ``load`` (N,),
        ``max_vio``, ``tokens`` (real tokens of the batch), ``capacity`` (C = ceil(T k / N) of the
        batch's balanced program), ``k``, ``gamma``, ``capacity_rule``.

    >>> import torch
    >>> s = torch.tensor([[0.6, 0.4], [0.7, 0.3]])
    >>> r = aux_free_routing(s, 1, bias=[0.0, 0.35])
    >>> r.mask.int().tolist(), r.params["state"].tolist()
    ([[0, 1], [1, 0]], [0.0, 0.35])
    """
    s3, valid, squeeze = prepare_scores(scores, padding_mask)
    B, T, N = s3.shape
    k = check_k(k, N)
    gamma = check_real(gamma, "gamma", low=0.0)
    b = np.zeros(N) if bias is None else as_bias(bias, N, "bias")
    biased = s3.to(torch.float64) + torch.as_tensor(b, dtype=torch.float64, device=s3.device)
    counts = torch.full((B * T,), k, dtype=torch.long, device=s3.device)
    if valid is not None:
        counts = counts * valid.reshape(-1)
    mask = select_top(biased.reshape(B * T, N), counts).reshape(B, T, N)
    load = mask.reshape(-1, N).sum(0).cpu().numpy().astype(np.int64)
    tokens = int(counts.sum()) // k
    params = {"k": k, "gamma": gamma, "bias": b, "state": update_bias(b, load, gamma), "load": load,
              "max_vio": max_violation(load), "tokens": tokens,
              "capacity": balanced_capacity(tokens, k, N) if tokens else 0, "capacity_rule": CAPACITY_RULE}
    return finish_routing(s3, mask, "aux_free_bias", params, valid, squeeze)


def initial_bias(params: Mapping[str, Any], ctx: RouterContext) -> np.ndarray:
    """The first call's bias: zeros, or the layer's ``selection_bias`` for ``init="model"``."""
    if params["init"] == "zeros":
        return np.zeros(ctx.num_experts)
    recorded = getattr(ctx.layer, "selection_bias", None)
    if recorded is None:
        raise InvalidParameter("aux_free_bias: init='model' needs the layer's selection_bias (a DeepSeek-V3 "
                               "style e_score_correction_bias recorded in the log); this layer has none, use "
                               "init='zeros'")
    return as_bias(recorded, ctx.num_experts, "selection_bias")


def _scores(logits: torch.Tensor, params: Mapping[str, Any], ctx: RouterContext) -> torch.Tensor:
    return gate_scores(logits, ctx.score_function)


def _route(scores, params, ctx: RouterContext, padding_mask, state) -> Routing:
    bias = initial_bias(params, ctx) if state is None else as_bias(state, ctx.num_experts)
    return aux_free_routing(scores, ctx.k, bias, params["gamma"], padding_mask)


def _decode(scores: torch.Tensor, params: Mapping[str, Any], ctx: RouterContext) -> torch.Tensor:
    """At inference the bias is frozen (DeepSeek-V3 updates it in training only): the top-k of s + b0."""
    return aux_free_routing(scores, ctx.k, initial_bias(params, ctx), 0.0).mask


# ----------------------------------------------------------------------------- a stream of batches
@dataclass(frozen=True)
class BiasTrajectory:
    """The bias balancing run over a stream of chunks (:func:`bias_trajectory`).

    Attributes:
        layer: the layer's name ("" for bare chunks). k, gamma: as run.
        bias: (C + 1, N) float64: row c is the bias chunk c was routed with, row C the final one.
        load: (C, N) int64 tokens per expert of each chunk.
        tokens: (C,) int64 tokens of each chunk.
        max_vio: (C,) float64 MaxVio of each chunk's routing (:func:`usmoe_lp.routing.routers.max_violation`).
    """

    layer: str
    k: int
    gamma: float
    bias: np.ndarray
    load: np.ndarray
    tokens: np.ndarray
    max_vio: np.ndarray

    @property
    def final_bias(self) -> np.ndarray:
        return self.bias[-1]

    @property
    def global_max_vio(self) -> float:
        """MaxVio of the loads summed over all chunks (Wang et al.'s MaxVio_global)."""
        return max_violation(self.load.sum(0)) if len(self.load) else float("nan")

    def to_dict(self) -> dict:
        return json_ready({"layer": self.layer, "k": self.k, "gamma": self.gamma, "bias": self.bias,
                           "load": self.load, "tokens": self.tokens, "max_vio": self.max_vio,
                           "global_max_vio": self.global_max_vio})


def run_bias_balancing(chunks: Iterable, k: int, *, gamma: float = DEFAULT_GAMMA, init: str = "zeros",
                       score_function: str = "softmax", layer=None) -> BiasTrajectory:
    """Route ``chunks`` in order with the bias carried from one to the next.

    chunks: an iterable of (n, N) router logits (torch or numpy, any real dtype), each one batch;
    k: experts per token; score_function: the model's (:func:`gate_scores`); layer: the
    :class:`usmoe_lp.logs.LayerInfo` (for ``init="model"`` and its score function), or None.
    """
    from usmoe_lp.routers.config import RouterConfig, reroute  # config imports the registry

    config = RouterConfig("aux_free_bias", k, gamma=gamma, init=init)
    biases, loads, tokens, vios = [], [], [], []
    state = None
    for logits in chunks:
        r = reroute(logits, config, score_function=score_function, layer=layer, state=state)
        biases.append(r.params["bias"])
        loads.append(r.params["load"])
        tokens.append(r.params["tokens"])
        vios.append(r.params["max_vio"])
        state = r.params["state"]
    if state is None:
        raise InvalidParameter("no chunks to route: the stream is empty")
    n = state.size
    return BiasTrajectory(layer="" if layer is None else layer.name, k=config.k, gamma=config.gamma,
                          bias=np.stack(biases + [state]), load=np.stack(loads).reshape(-1, n),
                          tokens=np.asarray(tokens, dtype=np.int64), max_vio=np.asarray(vios, dtype=np.float64))


def bias_trajectory(log, layer: str, *, k: int | None = None, gamma: float = DEFAULT_GAMMA, init: str = "zeros",
                    chunk_tokens: int = 4096, start: int = 0, stop: int | None = None) -> BiasTrajectory:
    """Run the auxiliary-loss-free balancing over one layer of a router log, ``chunk_tokens`` tokens
    per batch, in log order, and return the bias after each chunk and each chunk's MaxVio.

    log: a :class:`usmoe_lp.logs.RouterLog` or its path. layer: the layer's name. k: experts per
    token (default: the layer's ``top_k``). ``[start, stop)``: the tokens to run over.

    The balancing is deterministic: the same log and arguments give the same trajectory.
    """
    from usmoe_lp.logs import RouterLog

    if isinstance(log, str | os.PathLike):
        log = RouterLog.open(log)
    info = log.layer_info(layer)
    if k is None:
        if info.top_k is None:
            raise InvalidParameter(f"layer {layer!r} records no top_k; give k= (the model's experts per token)")
        k = info.top_k
    k = check_int(k, "k", low=1)
    chunks = (c.logits for c in log.iter_chunks(layer, chunk_tokens, start=start, stop=stop, check_finite=True))
    return run_bias_balancing(chunks, k, gamma=gamma, init=init, score_function=info.score_function, layer=info)


ROUTER = Router(
    name="aux_free_bias",
    summary="Auxiliary-loss-free balancing (DeepSeek-V3): top-k of score + bias, the bias moved by gamma * "
            "sign(mean load - load) after each call",
    reference="Wang et al. 2024 (arXiv 2408.15664); DeepSeek-V3 (arXiv 2412.19437) §2.1.2",
    params=(Param("gamma", float, DEFAULT_GAMMA, "bias update speed: b_j += gamma * sign(mean load - load_j) "
                  "after each call (DeepSeek-V3: 0.001)", low=0.0),
            Param("init", str, "zeros", "the first call's bias: zeros, or model (the layer's recorded "
                  "selection_bias, DeepSeek-V3's e_score_correction_bias)", choices=("zeros", "model"))),
    scores=_scores,
    route=_route,
    label=lambda p, k: f"auxfree g={p['gamma']:g}" + (" init=model" if p["init"] == "model" else ""),
    exact=False,
    problem=group_program,
    group=lambda p: "batch",
    prefix="token_local",
    decode=("the bias is frozen at inference (DeepSeek-V3 updates it in training only): a token takes the top-k "
            "of its own score + the bias, token by token, as in a full forward with the same bias"),
    decode_route=_decode,
    stateful=True,
    order=65,
)
