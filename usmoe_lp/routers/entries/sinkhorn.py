"""Sinkhorn routing: balance exp(logits) by Sinkhorn scaling, then each token's top-k on the result.

The router of Megatron-Core's ``sinkhorn`` load balancing (``sinkhorn`` in
megatron/core/transformer/moe/moe_utils.py, used by ``TopKRouter.sinkhorn_load_balancing`` in
training) and of S-BASE (Clark et al. 2022, arXiv 2202.01169), which replaces BASE's exact
assignment by Sinkhorn's approximation of it.

**Balancing.** For one sequence of T real tokens with logits Z (T, N), the kernel K = exp(Z) is
scaled to R = diag(e^u) K diag(e^v) with **row sums 1 and column sums T / N** (Megatron's
normalisation, rows 1/T and columns 1/N, times T): alternately

    u_i = -log sum_j exp(Z_ij + v_j)                 (rows to 1)
    v_j = log(T / N) - log sum_i exp(Z_ij + u_i)     (columns to T / N)

from v = 0, in log space and float64 (Megatron: the same iteration on d0 = e^u / T, d1 = e^v in
float32, with 1e-8 added to each sum). It stops when Megatron's error ``mean_j |d1_new - d1_old|``
is <= ``tol`` (Megatron's default 1e-4) or after ``max_iter`` iterations (Megatron has no cap);
each sequence stops on its own. R is the entropic-regularised optimal transport plan:
argmax <R, Z> + H(R) over the matrices with those marginals.

**Routing.** Each real token takes the k largest entries of its row of R (ties: lowest expert
index first, :func:`usmoe_lp.routing.routers.select_top`), which is the top-k of Z_ij + v_j: the
column scalings act as per-expert prices. The routing's scores (``Routing.weights``, the
program's objective) are the logits.

**Program.** Sinkhorn is a heuristic for the balanced program of :mod:`.base` on the logits
(each token exactly k experts, each expert at most C = ceil(T k / N) tokens; the LP whose entropic
regularisation R solves): ``exact=False``, and the counterfactual reports the gap to its exact
optimum (BASE's objective). Top-k rounding of R does **not** enforce the capacity:
``params['overflow']`` counts the assignments beyond C in each sequence. Where it is 0 the routing
is feasible and the gap (optimum - objective) >= 0 is the price of the rounding; where it is > 0
the routing is infeasible for the program (its certificate says so) and a gap is not defined.

Groups: each sequence alone (Megatron balances all tokens of a micro-batch together; per sequence
the result does not depend on batching, like Expert Choice's capacity). Padding rows are not part
of K: never selected, no row target, not counted in T.

Outside training Megatron routes by the plain top-k of the scores (the ``decode_route`` here); on a
single token Sinkhorn would make the row uniform (column targets 1/N) and erase its preferences.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from usmoe_lp._validate import check_int, check_real
from usmoe_lp.errors import InvalidScores
from usmoe_lp.routers.entries.base import CAPACITY_RULE, balanced_capacity, group_program
from usmoe_lp.routers.spec import Param, Router, RouterContext
from usmoe_lp.routing.routers import check_k, finish_routing, prepare_scores, select_top, token_choice
from usmoe_lp.routing.routing import Routing

DEFAULT_TOL = 1e-4
"""Megatron-Core's default tolerance of ``sinkhorn(cost, tol=0.0001)``."""

DEFAULT_MAX_ITER = 1000
"""The iteration cap (Megatron has none)."""


@dataclass(frozen=True)
class SinkhornBalance:
    """The Sinkhorn-balanced matrix of each sequence (module docstring).

    Attributes:
        log_balanced: (B, T, N) float64, log R (-inf on padding rows), or (T, N) for 2-D input.
            Each sequence's R has row sums 1 and column sums T_b / N (up to ``tol``).
        column_scale: (B, N) float64, v (log of Megatron's d1), or (N,) for 2-D input.
        iterations: (B,) int, the iterations each sequence ran (0 for a padding-only sequence).
        converged: (B,) bool, whether its error reached ``tol`` within ``max_iter``.
        error: (B,) float, its last error ``mean_j |d1_new - d1_old|`` (nan if it never ran).
    """

    log_balanced: torch.Tensor
    column_scale: torch.Tensor
    iterations: tuple[int, ...]
    converged: tuple[bool, ...]
    error: tuple[float, ...]

    @property
    def balanced(self) -> torch.Tensor:
        """R itself (0 on padding rows)."""
        return self.log_balanced.exp()


def _balance(z: torch.Tensor, valid: torch.Tensor, tol: float, max_iter: int):
    """Sinkhorn on (B, T, N) float64 logits with (B, T) bool ``valid``: (log R, v, iterations, error).

    Megatron's iteration in float64 on the row-shifted kernel K = exp(Z - max_j Z_ij) (the shift
    is a row scaling, absorbed by d0, so d1 and R are unchanged): two batched mat-vecs an
    iteration. A sequence whose scalings leave the float64 range (an expert ~745 logits below
    every token's best) is redone in log space.
    """
    B, T, N = z.shape
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    shifted = torch.where(valid.unsqueeze(-1), z - z.amax(-1, keepdim=True), zero)
    kernel = torch.where(valid.unsqueeze(-1), shifted.exp(), zero)
    tokens = valid.sum(-1)
    a = torch.zeros(B, T, dtype=z.dtype, device=z.device)  # d0 * T of the shifted kernel
    d1 = torch.ones(B, N, dtype=z.dtype, device=z.device)
    iterations = torch.zeros(B, dtype=torch.long, device=z.device)
    error = torch.full((B,), float("nan"), dtype=z.dtype, device=z.device)
    active = tokens > 0
    broken = torch.zeros(B, dtype=torch.bool, device=z.device)
    idx = None
    for _ in range(max_iter):
        if idx is None or not bool(active[idx].all()):  # gather the kernels only when the set shrinks
            idx = torch.nonzero(active).flatten()
            if idx.numel() == 0:
                break
            k_g, ok = (kernel, valid) if idx.numel() == B else (kernel[idx], valid[idx])
            target = (tokens[idx].to(z.dtype) / N).unsqueeze(-1)
        a_new = torch.where(ok, 1.0 / torch.bmm(k_g, d1[idx].unsqueeze(-1)).squeeze(-1), zero)
        d1_new = target / torch.bmm(a_new.unsqueeze(1), k_g).squeeze(1)
        err = (d1_new - d1[idx]).abs().mean(-1)
        fine = torch.isfinite(d1_new).all(-1) & (d1_new > 0).all(-1) & torch.isfinite(a_new).all(-1)
        a[idx], d1[idx], error[idx] = a_new, d1_new, err
        iterations[idx] += 1
        broken[idx] |= ~fine
        active[idx] = fine & ~(err <= tol)
    neg_inf = torch.tensor(float("-inf"), dtype=z.dtype, device=z.device)
    log_r = torch.where(valid.unsqueeze(-1), shifted + a.log().unsqueeze(-1) + d1.log().unsqueeze(1), neg_inf)
    v = d1.log()
    if bool(broken.any()):
        idx = torch.nonzero(broken).flatten()
        lr, vv, it, er = _balance_log(z[idx], valid[idx], tol, max_iter)
        log_r[idx], v[idx], iterations[idx], error[idx] = lr, vv, it, er
    bad = valid.unsqueeze(-1) & ~torch.isfinite(log_r)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise InvalidScores(f"Sinkhorn scaling of sequence {b} is not finite in float64 (logits span "
                            f"[{float(z[b][valid[b]].min()):.3g}, {float(z[b][valid[b]].max()):.3g}])")
    return log_r, v, iterations, error


def _balance_log(z: torch.Tensor, valid: torch.Tensor, tol: float, max_iter: int):
    """The same iteration in log space (u = log d0 + log T, v = log d1): slower (two logsumexps an
    iteration), but no scaling over- or underflows. Where d1 itself leaves the float64 range,
    Megatron's error is undefined and the change of log d1, mean_j |v_new - v_old|, is used."""
    B, T, N = z.shape
    neg_inf = torch.tensor(float("-inf"), dtype=z.dtype, device=z.device)
    log_k = torch.where(valid.unsqueeze(-1), z, neg_inf)
    tokens = valid.sum(-1)
    u = torch.where(valid, torch.zeros((), dtype=z.dtype, device=z.device), neg_inf)
    v = torch.zeros(B, N, dtype=z.dtype, device=z.device)
    iterations = torch.zeros(B, dtype=torch.long, device=z.device)
    error = torch.full((B,), float("nan"), dtype=z.dtype, device=z.device)
    active = tokens > 0
    for _ in range(max_iter):
        idx = torch.nonzero(active).flatten()
        if idx.numel() == 0:
            break
        lk, ok = log_k[idx], valid[idx]
        target = torch.log(tokens[idx].to(z.dtype) / N).unsqueeze(-1)
        u_new = torch.where(ok, -torch.logsumexp(lk + v[idx].unsqueeze(1), dim=-1), neg_inf)
        v_new = target - torch.logsumexp(lk + u_new.unsqueeze(-1), dim=1)
        err = (v_new.exp() - v[idx].exp()).abs().mean(-1)
        err = torch.where(torch.isfinite(err), err, (v_new - v[idx]).abs().mean(-1))
        u[idx], v[idx], error[idx] = u_new, v_new, err
        iterations[idx] += 1
        active[idx] = ~(err <= tol)
    return log_k + u.unsqueeze(-1) + v.unsqueeze(1), v, iterations, error


def sinkhorn_balance(logits, padding_mask=None, *, tol: float = DEFAULT_TOL,
                     max_iter: int = DEFAULT_MAX_ITER) -> SinkhornBalance:
    """Sinkhorn-balance exp(logits) of each sequence (module docstring).

    logits: (T, N) or (B, T, N) real; padding_mask: (T,) or (B, T) bool, True = padding.
    tol: >= 0, Megatron's stopping error. max_iter: >= 1.

    >>> import torch
    >>> bal = sinkhorn_balance(torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]), tol=1e-12)
    >>> [round(float(x), 6) for x in bal.balanced.sum(0)], bal.converged
    ([2.0, 2.0], (True,))
    """
    tol = check_real(tol, "tol", low=0.0)
    max_iter = check_int(max_iter, "max_iter", low=1)
    s3, valid, squeeze = prepare_scores(logits, padding_mask)
    valid = torch.ones(s3.shape[:2], dtype=torch.bool, device=s3.device) if valid is None else valid
    log_r, v, iterations, error = _balance(s3.to(torch.float64), valid, tol, max_iter)
    return SinkhornBalance(
        log_balanced=log_r[0] if squeeze else log_r, column_scale=v[0] if squeeze else v,
        iterations=tuple(int(i) for i in iterations.tolist()),
        converged=tuple(bool(e <= tol) for e in error.tolist()),
        error=tuple(float(e) for e in error.tolist()))


def sinkhorn_routing(scores, k: int = 1, padding_mask=None, *, tol: float = DEFAULT_TOL,
                     max_iter: int = DEFAULT_MAX_ITER) -> Routing:
    """Sinkhorn routing: each real token's top-k of its sequence's balanced matrix R.

    Args:
        scores: (T, N) or (B, T, N) float, the router **logits** (K = exp(scores)).
        k: experts per token, 1 <= k <= N.
        padding_mask: (T,) or (B, T) bool, True = padding (never selected, counts nowhere).
        tol, max_iter: the stopping rule of :func:`sinkhorn_balance`.

    Returns:
        A :class:`~usmoe_lp.routing.Routing` (router ``sinkhorn``; weights: the logits of the
        selected pairs). ``params`` (per sequence; scalars for 2-D input): ``capacity`` C_b =
        ceil(T_b k / N) of the balanced program, ``overflow`` (assignments beyond C_b),
        ``max_load``, ``iterations``, ``converged``; and ``k``, ``tol``, ``max_iter``,
        ``capacity_rule``.

    >>> import torch
    >>> z = torch.tensor([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    >>> sinkhorn_routing(z, k=1).mask.int().tolist()   # TC would send all four to expert 0
    [[1, 0], [1, 0], [0, 1], [0, 1]]
    """
    tol = check_real(tol, "tol", low=0.0)
    max_iter = check_int(max_iter, "max_iter", low=1)
    s3, valid, squeeze = prepare_scores(scores, padding_mask)
    B, T, N = s3.shape
    k = check_k(k, N)
    real = torch.ones(B, T, dtype=torch.bool, device=s3.device) if valid is None else valid
    log_r, _, iterations, error = _balance(s3.to(torch.float64), real, tol, max_iter)
    counts = (real.reshape(-1) * k).long()
    mask = select_top(log_r.reshape(B * T, N), counts).reshape(B, T, N)
    tokens = real.sum(-1).tolist()
    caps = [balanced_capacity(t, k, N) if t else 0 for t in tokens]
    load = mask.sum(1)
    cap_t = torch.tensor(caps, device=s3.device).unsqueeze(-1)
    overflow = (load - cap_t).clamp(min=0).sum(-1).tolist()

    def one(values):
        return values[0] if squeeze else values

    params = {"k": k, "capacity": one(caps), "tokens": one(tokens), "overflow": one(overflow),
              "max_load": one(load.max(-1).values.tolist()), "iterations": one(iterations.tolist()),
              "converged": one([bool(e <= tol) for e in error.tolist()]), "tol": tol, "max_iter": max_iter,
              "capacity_rule": CAPACITY_RULE}
    return finish_routing(s3, mask, "sinkhorn", params, valid, squeeze)


def _logits(logits: torch.Tensor, params: Mapping[str, Any], ctx: RouterContext) -> torch.Tensor:
    """Sinkhorn's scores are the router logits themselves (K = exp(logits), as in Megatron)."""
    return logits


def _decode(scores: torch.Tensor, params: Mapping[str, Any], ctx: RouterContext) -> torch.Tensor:
    """Megatron outside training: the plain top-k of the scores (of the logits, as the softmax and
    the sigmoid are increasing within a row)."""
    return token_choice(scores, ctx.k).mask


ROUTER = Router(
    name="sinkhorn",
    summary="Sinkhorn: balance exp(logits) to row sums 1 and column sums T/N per sequence, then each token's "
            "top-k (a heuristic for the balanced assignment)",
    reference="Megatron-Core sinkhorn (megatron/core/transformer/moe/moe_utils.py); Clark et al. 2022, S-BASE "
              "(arXiv 2202.01169)",
    params=(Param("tol", float, DEFAULT_TOL, "stop when Megatron's error mean_j |d1_new - d1_old| <= tol "
                  "(Megatron's default 1e-4)", low=0.0),
            Param("max_iter", int, DEFAULT_MAX_ITER, "the most Sinkhorn iterations per sequence", low=1)),
    scores=_logits,
    route=lambda s, p, ctx, pad, state: sinkhorn_routing(s, ctx.k, padding_mask=pad, tol=p["tol"],
                                                         max_iter=p["max_iter"]),
    label=lambda p, k: f"sinkhorn tol={p['tol']:g} it={p['max_iter']}",
    exact=False,
    problem=group_program,
    group=lambda p: "sequence",
    prefix="recompute",
    decode=("Megatron balances with Sinkhorn in training only; at inference (and so at decode time) a token "
            "takes the top-k of its own scores, as Token Choice (on one token Sinkhorn would make the row "
            "uniform and erase its preferences)"),
    decode_route=_decode,
    order=55,
    in_default_sweep=False,  # its leakage re-balances every prefix: --routers sinkhorn
)
