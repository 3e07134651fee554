"""The capped optimum: the exact optimum of the capacity-aware global program, per sequence.

The **capped program** of a sequence of T real tokens, N experts and a model with k experts per token
(``RoutingProblem.capped``; papers/routing-as-lp.md §1, the budget program of USMoE, arXiv 2503.22996
§3, with the per-expert capacity of GShard/Switch, arXiv 2006.16668 / 2101.03961):

    maximise   sum_ij S_ij x_ij
    subject to sum_ij x_ij  <= c = round_half_up(kbar * T)       (a budget of pairs)
               sum_j  x_ij  <= kmax                              (experts per token)
               sum_i  x_ij  <= C = ceil(cf * T * k / N)          (tokens per expert)
               x_ij in {0, 1}

S are the model's probabilities (:func:`usmoe_lp.routing.probabilities`), so with ``<=`` every pair
the caps allow is worth taking: the routing takes min(c, what the caps allow) pairs. Capacity-TC
(``capacity_tc``) is the greedy heuristic for this program at kbar = kmax = k; ``seqtopk`` is the
program without the expert cap. Here it is solved exactly by min-cost flow
(:mod:`usmoe_lp.lp.flow`: numpy on the CPU, whatever the device of the scores) and certified
by the flow's own node potentials; a routing the float64 multipliers cannot prove is solved again
with HiGHS, so the output is always the program's optimum.

Defaults: ``kbar = k`` (the matched budget), ``token_max = k + 1`` (a token may take one expert
more than Token Choice where the budget and the capacities leave room, so the budget moves to the
tokens that score highest, USMoE-style, under Switch's capacity), ``capacity_factor = 1.25``
(Switch's default). ``token_max = k`` with ``kbar = k`` is the exact counterpart of capacity-TC.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from usmoe_lp._validate import check_int, check_real, round_half_up
from usmoe_lp.errors import InvalidParameter, SolverError
from usmoe_lp.lp import RoutingProblem, solve
from usmoe_lp.routers.entries._common import KBAR, model_probabilities, per_group
from usmoe_lp.routers.spec import Param, Router, RouterContext
from usmoe_lp.routing.routers import expert_capacity, finish_routing, prepare_scores
from usmoe_lp.routing.routing import Routing


@dataclass(frozen=True)
class _ModelKPlusOne(Param):
    """A parameter whose default is the model's k + 1 (the registry's MODEL_K is k itself)."""

    def resolve_default(self, k: int) -> Any:
        return k + 1


TOKEN_MAX = _ModelKPlusOne("token_max", int, "model k + 1", "most experts one token may take (default k + 1; "
                           "clipped to N)", low=1)
CAPACITY_FACTOR = Param("capacity_factor", float, 1.25, "expert capacity C = ceil(cf * T * k / N) tokens per "
                        "sequence (Switch default 1.25)", low=0.0, low_open=True)


def capped_optimal(scores, k: int, kbar: float | None = None, token_max: int | None = None,
                   capacity_factor: float = 1.25, padding_mask=None) -> Routing:
    """The exact optimum of the capped program of each sequence (module docstring).

    Args:
        scores: (T, N) or (B, T, N) float (torch, any device; solved in float64 on the CPU).
        k: the model's experts per token (the capacity's unit), 1 <= k <= N.
        kbar: experts per token on average, 0 < kbar <= N: c = round_half_up(kbar * T_b) pairs
            for a sequence of T_b real tokens (default k).
        token_max: most experts per token, >= 1 (default k + 1), clipped to N.
        capacity_factor: C_b = ceil(cf * T_b * k / N) tokens per expert (default 1.25).
        padding_mask: (T,) or (B, T) bool, True = padding: never selected, not counted in T_b.

    Returns:
        A :class:`~usmoe_lp.routing.Routing` (router ``capped_optimal``) whose mask is an optimum of
        ``RoutingProblem.capped(S_b, c_b, token_max, C_b, sense="<=")`` on each sequence's real rows.
        ``params``: ``k``, ``kbar``, ``token_max`` (as used), ``capacity_factor``, ``budget`` (c_b)
        and ``capacity`` (C_b) per sequence (numbers for 2-D input), ``tokens`` (T_b).

    Raises:
        InvalidParameter: k, kbar, token_max or capacity_factor out of range.
        SolverError: neither the flow solver nor HiGHS returned an optimum (not expected).

    >>> import torch
    >>> s = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.7, 0.2, 0.1]])
    >>> r = capped_optimal(s, k=1, token_max=2, capacity_factor=1.0)   # c = 3, C = 1
    >>> r.mask.int().tolist(), r.params["budget"], r.params["capacity"]   # 0.1 + 0.4 + 0.7
    ([[0, 0, 1], [0, 1, 0], [1, 0, 0]], 3, 1)
    """
    s3, valid, squeeze = prepare_scores(scores, padding_mask)
    B, T, N = s3.shape
    k = check_int(k, "k", low=1)
    if k > N:
        raise InvalidParameter(f"k = {k} exceeds the number of experts N = {N}")
    kb = float(k) if kbar is None else check_real(kbar, "kbar", low=0.0, low_open=True)
    if kb > N:
        raise InvalidParameter(f"kbar = {kb:g} exceeds the number of experts N = {N}")
    kmax = min(k + 1 if token_max is None else check_int(token_max, "token_max", low=1), N)
    cf = check_real(capacity_factor, "capacity_factor", low=0.0, low_open=True)
    s_np = s3.detach().to(torch.float64).cpu().numpy()
    valid_np = np.ones((B, T), dtype=bool) if valid is None else valid.cpu().numpy()
    mask = np.zeros((B, T, N), dtype=bool)
    budgets, caps, tokens = [], [], []
    for b in range(B):
        rows = np.flatnonzero(valid_np[b])
        t_b = int(rows.size)
        c_b = round_half_up(kb * t_b)
        cap_b = expert_capacity(cf, t_b, k, N) if t_b else 0
        budgets.append(c_b)
        caps.append(cap_b)
        tokens.append(t_b)
        if t_b == 0 or c_b == 0:
            continue
        mask[b, rows] = _solve_group(s_np[b, rows], c_b, kmax, cap_b)
    one = (lambda v: v[0]) if squeeze else (lambda v: v)
    params = {"k": k, "kbar": kb, "token_max": kmax, "capacity_factor": cf, "budget": one(budgets),
              "capacity": one(caps), "tokens": one(tokens)}
    return finish_routing(s3, torch.from_numpy(mask).to(s3.device), "capped_optimal", params, valid, squeeze)


def _solve_group(S: np.ndarray, c: int, token_max: int, capacity: int) -> np.ndarray:
    """The optimal (T_b, N) mask of one sequence's capped program (flow, certified; HiGHS if needed)."""
    sol = solve(RoutingProblem.capped(S, c, token_max, capacity, sense="<="), backend="flow")
    if not (sol.success and sol.certificate is not None and sol.certificate.optimal):
        raise SolverError(f"capped_optimal: no certified optimum on {S.shape[0]}x{S.shape[1]} scores "
                          f"({sol.status}): {sol.message}")
    return sol.mask


def group_program(S: np.ndarray, params: Mapping[str, Any], routing_params: Mapping[str, Any], key: int,
                  ctx: RouterContext) -> RoutingProblem:
    """The capped program of group ``key`` with the budget and capacity the router used."""
    return RoutingProblem.capped(S, per_group(routing_params["budget"], key), routing_params["token_max"],
                                 per_group(routing_params["capacity"], key), sense="<=")


def _label(p: Mapping[str, Any], k: int) -> str:
    return f"capped kbar={p['kbar']:g} kmax={p['token_max']} cf={p['capacity_factor']:g}"


ROUTER = Router(
    name="capped_optimal",
    summary=("the exact optimum of the capped program per sequence: at most c = round_half_up(kbar * T) pairs, "
             "token_max experts per token, C = ceil(cf * T * k / N) tokens per expert (min-cost flow)"),
    reference=("Nguyen et al. 2025, USMoE (arXiv 2503.22996) §3 (the budget program); Fedus et al. 2021 "
               "(arXiv 2101.03961) (the expert capacity); papers/routing-as-lp.md §1"),
    params=(KBAR, TOKEN_MAX, CAPACITY_FACTOR),
    scores=model_probabilities,
    route=lambda s, p, ctx, pad, state: capped_optimal(
        s, ctx.k, kbar=p["kbar"], token_max=p["token_max"], capacity_factor=p["capacity_factor"], padding_mask=pad),
    label=_label,
    exact=True,
    problem=group_program,
    group=lambda p: "sequence",
    prefix="recompute",
    decode=("a decode step is a sequence of one token: c = round_half_up(kbar) pairs and capacity "
            "ceil(cf * k / N) >= 1, so the token takes its min(c, token_max) best experts (Token Choice with "
            "that many experts)"),
    order=45,
    in_default_sweep=False,  # one exact solve per sequence and layer: run it with --routers capped_optimal
)
