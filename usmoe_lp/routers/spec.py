"""What a router is: the typed record every consumer reads (:class:`Router`, :class:`Param`).

A router of the registry is defined once, by one :class:`Router` value in one module of
``usmoe_lp/routers/entries/``. The record holds everything the consumers need, so none of them
switches on a router's name:

* its **parameters** (:class:`Param`: type, bounds, default, help), validated up front;
* the **scores** it routes on (``scores(logits, params, ctx)``: the model's probabilities for most
  routers, the unified score for USMoE, the model's selection scores for ``native``);
* the **fast torch function** (``route(scores, params, ctx, padding_mask, state)`` on (B, T, N)
  scores, padding never selected) returning a :class:`usmoe_lp.routing.Routing`;
* its **linear program** on one group of tokens (``problem``), and whether its output is exactly
  that program's optimum (``exact``: a certificate is expected, a failed one is a bug) or a
  heuristic for it (the gap to the program's optimum is reported, not hidden);
* its **prefix rule** (``prefix``), which the leakage analysis reads: what the router does on a
  prefix of length t of a sequence, i.e. what an autoregressive decoder could compute;
* its **decode-time rule** (``decode``): what it does when a KV cache feeds one token per step;
* its **label** in reports (``label(params, k)``), stable and unique per parameter setting.

Shapes: ``scores`` and ``logits`` are (B, T, N) float64 tensors (B sequences, T positions, N
experts); ``padding_mask`` is (B, T) bool, **True where the token is padding**, the one padding
convention of the package; group problems take a group's real rows S_g, (T_g, N) float64 numpy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from usmoe_lp._validate import check_int, check_real
from usmoe_lp.errors import InvalidParameter

MODEL_K = "model k"
"""A :attr:`Param.default` meaning "the model's experts per token" (the matched budget)."""

PREFIX_RULES = ("token_local", "causal", "global_topc", "expert_capacity", "recompute")
"""How a router decides on a prefix 1..t of a sequence (read by ``usmoe_lp.diagnostics.leakage``):

* ``token_local``: a token's experts depend on its own row only (Token Choice, top-p): prefix
  leakage is 0 by construction;
* ``causal``: a token's experts depend on its own row and the rows before it only (the causal
  top-c): the routing of a prefix is the prefix of the routing, leakage 0 by construction;
* ``global_topc``: the top ``prefix_budget(t)`` pairs of the prefix (USMoE, sequence scope);
* ``expert_capacity``: each expert takes its top ``prefix_budget(t)`` tokens of the prefix (EC);
* ``recompute``: none of the above; the router is run again on each prefix (exact, O(T) runs).
"""

GROUPS = ("token", "sequence", "batch", "position")
"""The group a router's program couples (its certificate and LP cross-check run per group):
``token`` (rows are independent), ``sequence``, ``batch`` (all sequences of one call) or
``position`` (one position across the sequences of a call)."""


@dataclass(frozen=True)
class Param:
    """One typed parameter of a router.

    kind: ``int``, ``float``, ``str`` or ``bool``. default: a value, ``MODEL_K`` (the model's k),
    or ``None`` (the parameter must be given). low/high: inclusive bounds (``low_open``: strict).
    choices: the allowed values of a ``str`` parameter. at_most_experts: the value may not exceed
    the layer's number of experts N (checked when N is known). help: one line, with units.
    """

    name: str
    kind: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] | None = None
    at_most_experts: bool = False

    def check(self, value: Any, router: str) -> Any:
        """The validated value, or :class:`InvalidParameter` naming the router and the parameter."""
        where = f"{router}: {self.name}"
        if self.kind is bool:
            if not isinstance(value, bool | np.bool_):
                raise InvalidParameter(f"{where} must be True or False, got {value!r}")
            return bool(value)
        if self.kind is str:
            if not isinstance(value, str) or (self.choices is not None and value not in self.choices):
                options = ", ".join(self.choices or ())
                raise InvalidParameter(f"{where} must be one of {options}, got {value!r}")
            return value
        if self.kind is int:
            return check_int(value, where, low=None if self.low is None else int(self.low),
                             high=None if self.high is None else int(self.high))
        return check_real(value, where, low=self.low, high=self.high, low_open=self.low_open)  # finite, in bounds

    def resolve_default(self, k: int) -> Any:
        return float(k) if (self.default == MODEL_K and self.kind is float) else (
            k if self.default == MODEL_K else self.default)


@dataclass(frozen=True)
class RouterContext:
    """What a router may know about the layer it routes.

    k: the model's experts per token (the budget unit; the matched budget is k per token).
    num_experts: N. score_function: how the model turns logits into probabilities (``softmax``,
    ``sigmoid``, ``softmax_topk`` or ``unknown``; see :func:`usmoe_lp.routing.probabilities`).
    layer: the layer's :class:`usmoe_lp.logs.LayerInfo` (the model's own routing semantics, read by
    ``native``), or None where unknown.
    """

    k: int
    num_experts: int
    score_function: str = "softmax"
    layer: Any = None


ScoresFn = Callable[[torch.Tensor, Mapping[str, Any], RouterContext], torch.Tensor]
RouteFn = Callable[..., Any]
ProblemFn = Callable[[np.ndarray, Mapping[str, Any], Mapping[str, Any], int, RouterContext], Any]


@dataclass(frozen=True)
class Router:
    """A registry router (module docstring for what each field means and who reads it).

    Attributes:
        name: the registry name (``usmoe_lp.list_routers()``), as typed on the command line.
        summary: one line for listings and help. reference: the paper or code it follows.
        params: its typed parameters, in the order of its label.
        route: ``route(scores, params, ctx, padding_mask, state) -> Routing`` on (B, T, N) scores
            (its own, from ``scores``), (B, T) bool padding (True = padding) or None, and the
            state of a stateful router (None otherwise). The Routing's ``weights`` are its own
            scores of the selected pairs.
        scores: ``scores(logits, params, ctx) -> (B, T, N)`` float64, the scores it routes on.
        label: ``label(params, k) -> str``, the name of one setting in reports.
        exact: True if ``route`` returns an optimum of ``problem`` (certified; a failure is a bug),
            False for a heuristic (its gap to the optimum of ``problem`` is reported).
        problem: ``problem(S_g, params, routing_params, key, ctx) -> RoutingProblem``: the program
            on one group's real rows S_g (T_g, N) float64; ``routing_params`` are the Routing's
            ``params`` (per-group budgets, capacities) and ``key`` the group's index in them.
            None: the router has no linear program (its output is reported without a certificate).
        group: ``group(params) -> str`` in :data:`GROUPS`, the group its program couples.
        prefix: one of :data:`PREFIX_RULES`. prefix_budget: ``prefix_budget(t, n, params, k)``,
            the budget on a prefix of t tokens for ``global_topc`` (pairs) and ``expert_capacity``
            (tokens per expert) rules.
        decode: how it routes at decode time, one token per step through a KV cache (a sentence).
        decode_route: ``decode_route(scores, params, ctx) -> (B, T, N) bool`` the routing a decoder
            computes when the tokens arrive one at a time; None: each step is a sequence of one
            token routed by ``route`` (the rule of every non-causal router).
        stateful: True if the routing of one call depends on the calls before it (bias balancing);
            ``route`` then returns the next state in ``Routing.params["state"]``.
        order: position in :func:`usmoe_lp.list_routers` (registry order, then name).
        in_default_sweep: whether ``analyze`` runs it when no ``--routers`` are named.
    """

    name: str
    summary: str
    reference: str
    params: tuple[Param, ...]
    route: RouteFn
    scores: ScoresFn
    label: Callable[[Mapping[str, Any], int], str]
    exact: bool
    problem: ProblemFn | None
    prefix: str
    decode: str
    group: Callable[[Mapping[str, Any]], str] = field(default=lambda params: "sequence")
    prefix_budget: Callable[[int, int, Mapping[str, Any], int], int] | None = None
    decode_route: Callable[[torch.Tensor, Mapping[str, Any], RouterContext], torch.Tensor] | None = None
    stateful: bool = False
    order: float = 100.0
    in_default_sweep: bool = True

    def __post_init__(self) -> None:
        if self.prefix not in PREFIX_RULES:
            raise ValueError(f"router {self.name!r}: prefix must be one of {PREFIX_RULES}, got {self.prefix!r}")
        if self.prefix in ("global_topc", "expert_capacity") and self.prefix_budget is None:
            raise ValueError(f"router {self.name!r}: prefix rule {self.prefix!r} needs prefix_budget")
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"router {self.name!r}: duplicate parameter names {names}")

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)
