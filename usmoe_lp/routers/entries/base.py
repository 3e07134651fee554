"""BASE layers: the exact balanced assignment of tokens to experts (Lewis et al. 2021, arXiv 2103.16716).

The **balanced program** of a group of T real tokens, N experts and k experts per token
(papers/routing-as-lp.md §1 for the family of routing programs it belongs to):

    maximise   sum_ij S_ij x_ij
    subject to sum_j x_ij  = k            for every token i     (each token exactly k experts)
               sum_i x_ij <= C            for every expert j    (C = ceil(T k / N))
               x_ij in {0, 1}

C is :func:`balanced_capacity`, Expert Choice's capacity at capacity factor 1 (one rule for
both). When N divides T k the totals force every expert to exactly C = T k / N tokens, BASE's
"equal share"; otherwise N C - T k < N slots stay empty and experts take C or fewer tokens. The
constraint matrix is a bipartite incidence matrix (totally unimodular), so the LP relaxation has
an integral optimum and the LP solves the 0/1 program exactly.

BASE routes with k = 1 (Lewis et al.: each token to one expert, every expert an equal share,
solved by an auction algorithm); :func:`balanced_assignment` takes any k <= N, the matched budget
of a top-k model. Exact paths (``method="auto"`` picks the first that applies):

* the ``flow`` backend of :func:`usmoe_lp.lp.solve` (min-cost flow) where ``usmoe_lp.lp`` has it:
  0.13 s at T = 2048, N = 64, k = 1; 0.28 s at k = 2; 3.1 s at T = 4096, k = 8 (times measured on
  two shared CPU cores, standard normal scores);
* k = 1: ``scipy.optimize.linear_sum_assignment`` on the T x (N C) matrix whose columns are the
  experts' columns repeated C times (one column per slot), while T N C <= :data:`LSA_MAX_ENTRIES`
  (0.65 s at T = 2048, N = 64; 2.5 s at T = 4096);
* otherwise (k > 1, where a token's k copies must take distinct experts, or larger T): the LP
  relaxation with HiGHS, a vertex, integral by total unimodularity (1.8 s at T = 2048, k = 1;
  3.4 s at k = 2; 15 s at T = 4096, k = 1).

Scores: BASE maximises the sum of the router's raw scores h_t . w_e, the **logits**
(``maximise="logits"``, the default); for a softmax router that is the sum of log-probabilities
(the per-token log-partition is a constant when every token takes k experts).
``maximise="probs"`` maximises the model's probabilities instead
(:func:`usmoe_lp.routing.probabilities`, the scores TC and EC route on).

Groups: each sequence alone (its real tokens), so the routing does not depend on how sequences
are batched; BASE balances all tokens of a training batch across workers. Padding is never
selected and counts in no load or capacity.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from usmoe_lp._validate import as_float64_scores
from usmoe_lp.errors import InvalidParameter, InvalidScores, SolverError, UnsupportedProblem
from usmoe_lp.lp import BACKENDS, RoutingProblem, solve
from usmoe_lp.routers.entries._common import model_probabilities, per_group
from usmoe_lp.routers.spec import Param, Router, RouterContext
from usmoe_lp.routing.routers import check_k, expert_capacity, finish_routing, prepare_scores
from usmoe_lp.routing.routing import Routing

LSA_MAX_ENTRIES = 2**25
"""Largest T x (N C) slot matrix :func:`balanced_assignment` hands to ``linear_sum_assignment``
(256 MiB of float64); larger groups, and every k > 1, go to the LP."""

CAPACITY_RULE = "C = ceil(T * k / N) tokens per expert at most (== T * k / N when N divides T * k)"
"""How the balanced program's capacity is set, as reported in ``Routing.params['capacity_rule']``."""


def balanced_capacity(tokens: int, k: int, n: int) -> int:
    """C = ceil(T k / N): the most tokens an expert of the balanced program takes.

    The same rule as Expert Choice's capacity at capacity factor 1
    (:func:`usmoe_lp.routing.routers.expert_capacity`). T real tokens, k experts per token, N experts.

    >>> balanced_capacity(8, 1, 4), balanced_capacity(10, 2, 8)
    (2, 3)
    """
    return expert_capacity(1.0, tokens, k, n)


def balanced_program(scores, k: int, capacity: int | None = None) -> RoutingProblem:
    """The balanced program on one group's scores (module docstring).

    scores: (T, N) float (real tokens only). k: experts per token, 1 <= k <= N. capacity: tokens
    per expert at most; default :func:`balanced_capacity` (T, k, N). Returns the
    :class:`~usmoe_lp.lp.RoutingProblem` with ``token_min = token_max = k``, ``expert_max = C``.

    >>> import numpy as np
    >>> balanced_program(np.zeros((5, 2)), 1).describe()
    'balanced program on 5x2 scores; experts per token == 1; 0 <= tokens per expert <= 3'
    """
    s = as_float64_scores(scores)
    if s.ndim != 2 or s.size == 0:
        raise InvalidScores(f"scores must be a non-empty (T, N) matrix, got shape {s.shape}")
    T, N = s.shape
    k = check_k(k, N)
    cap = balanced_capacity(T, k, N) if capacity is None else capacity
    return RoutingProblem(s, token_min=k, token_max=k, expert_max=cap, name="balanced")


def _solve_lp(S: np.ndarray, k: int, C: int) -> tuple[np.ndarray, str]:
    """The balanced program by the exact LP path: ``flow`` where ``usmoe_lp.lp`` has it and takes
    the program, else HiGHS (a vertex: integral, the matrix being totally unimodular)."""
    problem = balanced_program(S, k, C)
    sol = None
    if "flow" in BACKENDS:
        try:
            sol = solve(problem, backend="flow", certify_solution=False)
        except UnsupportedProblem:  # too many experts for the flow solver's node limit
            sol = None
    if sol is None or not sol.success:
        sol = solve(problem, backend="highs", certify_solution=False)
    if not sol.success or sol.max_fractionality > 1e-6:
        T, N = S.shape
        raise SolverError(f"BASE: the LP of the balanced program on {T}x{N} scores did not return an integral "
                          f"optimum ({sol.status}, fractionality {sol.max_fractionality:.3g}): {sol.message}")
    return sol.mask, f"lp:{sol.backend}"


def _assign_group(S: np.ndarray, k: int, method: str) -> tuple[np.ndarray, str]:
    """The optimal (T, N) bool mask of the balanced program on S, and the method used."""
    T, N = S.shape
    C = balanced_capacity(T, k, N)
    if method == "assignment" and k != 1:
        raise InvalidParameter(f"method='assignment' solves k = 1 only (got k = {k}); use 'lp' or 'auto'")
    use_lsa = method == "assignment" or (method == "auto" and k == 1 and "flow" not in BACKENDS
                                         and T * N * C <= LSA_MAX_ENTRIES)
    if not use_lsa:
        return _solve_lp(S, k, C)
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(np.repeat(S, C, axis=1), maximize=True)
    mask = np.zeros((T, N), dtype=bool)
    mask[rows, cols // C] = True
    return mask, "assignment"


def balanced_assignment(scores, k: int = 1, padding_mask=None, *, method: str = "auto") -> Routing:
    """BASE: an optimal balanced assignment of each sequence's real tokens (module docstring).

    Args:
        scores: (T, N) or (B, T, N) float, the scores to maximise (any sign).
        k: experts per token, 1 <= k <= N (BASE: 1).
        padding_mask: (T,) or (B, T) bool, True = padding (never selected, counts nowhere).
        method: ``auto`` (module docstring), ``assignment`` (``linear_sum_assignment``, k = 1
            only) or ``lp`` (min-cost flow where available, else HiGHS; integral here).

    Returns:
        A :class:`~usmoe_lp.routing.Routing` (router ``balanced_assignment``): every real token
        has exactly k experts, every expert at most C_b = ceil(T_b k / N) tokens of sequence b,
        and the selection's total score is the optimum of :func:`balanced_program`. ``params``:
        ``k``, ``capacity`` (C_b per sequence; an int for 2-D input), ``tokens`` (T_b),
        ``method`` (per sequence), ``capacity_rule``.

    Ties between optimal assignments are broken by the solver (deterministic for a given input).

    >>> import torch
    >>> s = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.6], [0.1, 0.0]])
    >>> balanced_assignment(s, k=1).mask.int().tolist()   # C = 2: tokens 2 and 3 lose least on expert 1
    [[1, 0], [1, 0], [0, 1], [0, 1]]
    """
    if method not in ("auto", "assignment", "lp"):
        raise InvalidParameter(f"method must be 'auto', 'assignment' or 'lp', got {method!r}")
    s3, valid, squeeze = prepare_scores(scores, padding_mask)
    B, T, N = s3.shape
    k = check_k(k, N)
    mask = torch.zeros(B, T, N, dtype=torch.bool, device=s3.device)
    s_np = s3.detach().to(torch.float64).cpu().numpy()
    valid_np = np.ones((B, T), dtype=bool) if valid is None else valid.cpu().numpy()
    caps, tokens, methods = [], [], []
    for b in range(B):
        rows = np.flatnonzero(valid_np[b])
        tokens.append(int(rows.size))
        caps.append(balanced_capacity(rows.size, k, N) if rows.size else 0)
        if rows.size == 0:
            methods.append(None)
            continue
        m, how = _assign_group(s_np[b, rows], k, method)
        mask[b, torch.as_tensor(rows, device=s3.device)] = torch.as_tensor(m, device=s3.device)
        methods.append(how)
    one = (lambda v: v[0]) if squeeze else (lambda v: v)
    params = {"k": k, "capacity": one(caps), "tokens": one(tokens), "method": one(methods),
              "capacity_rule": CAPACITY_RULE}
    return finish_routing(s3, mask, "balanced_assignment", params, valid, squeeze)


def _scores(logits: torch.Tensor, params: Mapping[str, Any], ctx: RouterContext) -> torch.Tensor:
    return logits if params["maximise"] == "logits" else model_probabilities(logits, params, ctx)


def group_program(S: np.ndarray, params: Mapping[str, Any], routing_params: Mapping[str, Any], key: int,
                  ctx: RouterContext) -> RoutingProblem:
    """The balanced program of group ``key`` with the capacity the router used (the registry's
    ``problem`` of ``base``, ``sinkhorn`` and ``aux_free_bias``)."""
    return balanced_program(S, ctx.k, per_group(routing_params["capacity"], key))


ROUTER = Router(
    name="base",
    summary="BASE: the exact balanced assignment, each token k experts and each expert at most ceil(T k / N) "
            "tokens of its sequence, maximising the total score",
    reference="Lewis et al. 2021, BASE Layers (arXiv 2103.16716)",
    params=(Param("maximise", str, "logits", "what the assignment maximises: logits (BASE's h.w scores; "
                  "for softmax routers the sum of log-probabilities) or probs (the model's probabilities)",
                  choices=("logits", "probs")),),
    scores=_scores,
    route=lambda s, p, ctx, pad, state: balanced_assignment(s, ctx.k, padding_mask=pad),
    label=lambda p, k: "base" + (" probs" if p["maximise"] == "probs" else ""),
    exact=True,
    problem=group_program,
    group=lambda p: "sequence",
    prefix="recompute",
    decode=("a decode step is a sequence of one token: capacity ceil(k / N) = 1, so the token takes its top-k "
            "experts, BASE's own test-time rule (fairseq BaseLayer: greedy_assignment outside training)"),
    order=60,
    in_default_sweep=False,  # one exact solve per sequence and layer: run it with --routers base
)
