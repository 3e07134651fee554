"""A causal global top-c: an online threshold that routes each token from its own row and the past.

USMoE's global top-c (arXiv 2503.22996, Alg. 1) picks the c = round_half_up(kbar * T) best pairs
of a whole sequence, so a token's experts depend on the tokens after it (its prefix leakage; see
``usmoe_lp.diagnostics.leakage``). This router keeps the budget k-bar and the unified score but
decides token t from rows 1..t only, so that the routing of a prefix is the prefix of the routing:
prefix leakage 0 by construction, and a KV-cache decoder that keeps the sequence's past router
scores computes exactly this routing, one token per step (``decode_route`` is the routing itself).

The rule, on the real tokens of one sequence (padding is skipped: it is never selected, takes no
budget and does not advance t), with targets c_t = round_half_up(kbar * t):

1. **Quantile.** theta_t = the c_t-th largest score among all pairs of rows 1..t (the threshold
   at which the past, row t included, would have realised k-bar pairs per token; +inf when
   c_t = 0). q_t = #{j : S_tj >= theta_t}: what the global top-c of the prefix 1..t gives row t.
2. **Budget band.** With P_{t-1} the pairs taken by rows before t and D = round_half_up(slack *
   kbar), row t takes a_t = q_t clipped to [lo_t, hi_t]:
   lo_t = min(N, max(min_k, c_t - D - P_{t-1})), hi_t = max(lo_t, min(N, c_t + D - P_{t-1})),
   so |P_t - c_t| <= D on every prefix (unless ``min_k`` > k-bar forces more): the realised k-bar
   of a sequence of T tokens is within D / T of the target.
3. **Selection.** Row t takes its a_t best experts (ties to the lowest index, as
   :func:`usmoe_lp.routing.routers.select_top`); when the band does not bind that is exactly
   {j : S_tj >= theta_t}.

Why the band: on stationary scores the quantile alone realises k-bar within a few percent, but
when the score distribution drifts along the sequence (rows growing sharper or flatter, a logit
offset that moves the sigmoid part) the past's quantile lags and the realised k-bar drifts with
it; the band bounds that error, falling back towards Token Choice at k-bar while the quantile is
off. ``slack=0`` is that Token Choice (a_t = c_t - c_{t-1}); a very large slack is the quantile
rule alone.

Measured (unified score, alpha 0.5, N in {16, 64}, T in {256, 1024, 4096}, k-bar in {1, 2, 4},
4 sequences of Gaussian logits each; "share" = score of the routing / score of the non-causal
global top-c with the same number of pairs):

* i.i.d. logits: realised k-bar within 2 % of the target at T = 256 and 0.5 % at T >= 1024
  (the quantile alone: within 3 %); share 99.6-99.98 %, against 94.6-98.1 % for Token Choice at
  k-bar (``slack=0``) and 99.95-100 % for the quantile alone;
* drifting logits (scale 0.5 -> 3 or 3 -> 0.5 along the sequence, an offset -2 -> +2, a
  sinusoidal scale, alternating regimes of scale 0.5 and 3): realised k-bar within the band,
  3.1 % at T = 256, 0.8 % at T = 1024, 0.2 % at T = 4096, where the quantile alone realises
  0.54x to 2.0x the target; share 80-99 %, about Token Choice's or above it.

``min_k`` (default 0): a floor on experts per token. At k-bar = 1 a fifth to a quarter of the
tokens take no expert (as with USMoE); ``min_k=1`` routes every token, but its pairs displace
better ones: on i.i.d. logits the share falls from 99.6-99.7 % to 94.6-96.8 % at k-bar = 1
(little changed at k-bar >= 2, where few tokens are dropped), so it is off by default.

Program: none certifies this routing (the threshold depends on the past, the band on the realised
counts). ``problem`` is the non-causal reference: the global top-c of the sequence's unified
score with c = the pairs this router realised (``RoutingProblem.budget(S, c, "==")``), and
``exact=False``: the reported gap is what causality costs at the same number of pairs.

Cost: one sort of each sequence's T*N scores, then the running thresholds by a sqrt decomposition
of the sorted order (O(T sqrt(T N)) integer work in a loop over sqrt(T N) buckets, none over
positions), and one pass over T for the band from the first position where it binds: about 4-5
times a ``torch.sort`` of the same T*N scores on one CPU thread (measured at T = 2048-16384, N = 64).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from usmoe_lp._validate import check_int, check_real, round_half_up
from usmoe_lp.errors import InvalidParameter
from usmoe_lp.lp import RoutingProblem
from usmoe_lp.routers.entries._common import ALPHA, KBAR, per_group, unified
from usmoe_lp.routers.spec import Param, Router, RouterContext
from usmoe_lp.routing.routers import finish_routing, prepare_scores, select_top
from usmoe_lp.routing.routing import Routing

DEFAULT_SLACK = 8.0
"""Default band half-width, in tokens' worth of budget: D = round_half_up(8 * kbar) pairs."""

CHUNK_ENTRIES = 1 << 22
"""Largest intermediate (sequences x positions x bucket) integer tensor built at once (32 MiB)."""


@functools.lru_cache(maxsize=64)
def prefix_targets(kbar: float, tokens: int) -> np.ndarray:
    """(tokens + 1,) int64, read-only: c_t = round_half_up(kbar * t) for t = 0..tokens, the pairs a
    prefix of t tokens may take (USMoE's budget rule, :func:`usmoe_lp._validate.round_half_up`).

    >>> prefix_targets(0.5, 4).tolist()
    [0, 1, 1, 2, 2]
    """
    out = np.array([round_half_up(kbar * t) for t in range(tokens + 1)], dtype=np.int64)
    out.setflags(write=False)
    return out


def running_thresholds(values: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """theta[b, t] = the ``ranks[t]``-th largest entry of ``values[b, :t+1, :]`` (+inf where ranks[t] == 0).

    values: (B, T, N) float, finite; ranks: (T,) long with 0 <= ranks[t] <= (t + 1) N. Returns
    (B, T), values' dtype. Exact (no interpolation): one sort of each sequence's T*N entries,
    then a sqrt decomposition of the sorted order in S ~ sqrt(T N) buckets: the count of pairs of
    rows <= t in every bucket prefix (a (T, K) table) finds the bucket of the ranks[t]-th pair of
    rows <= t, and a cumulative count inside that bucket finds the pair.

    >>> import torch
    >>> v = torch.tensor([[[0.5, 0.1], [0.9, 0.2], [0.3, 0.4]]])
    >>> running_thresholds(v, torch.tensor([1, 2, 3])).tolist()
    [[0.5, 0.5, 0.4]]
    """
    B, T, N = values.shape
    ranks = torch.as_tensor(ranks, dtype=torch.long, device=values.device)
    M = T * N
    S = max(1, math.isqrt(M - 1) + 1)
    K = -(-M // S)
    step = max(1, CHUNK_ENTRIES // max(1, T * max(K, S)))
    out = []
    for b0 in range(0, B, step):
        out.append(_thresholds_chunk(values[b0:b0 + step], ranks, S, K))
    theta = torch.cat(out, 0)
    return theta.masked_fill(ranks.unsqueeze(0) == 0, float("inf"))


def _thresholds_chunk(values: torch.Tensor, ranks: torch.Tensor, S: int, K: int) -> torch.Tensor:
    B, T, N = values.shape
    M = T * N
    dev = values.device
    sv, order = torch.sort(values.reshape(B, M), dim=-1, descending=True)
    rows = order // N
    if K * S > M:  # slots past the end belong to no row (row index T: never <= t)
        rows = torch.cat([rows, torch.full((B, K * S - M), T, dtype=rows.dtype, device=dev)], -1)
    # One pass over the K buckets of the sorted order, each a slice of S pairs: acc[b, t] counts
    # the pairs of rows <= t in the buckets so far; j[b, t] counts the buckets that end before the
    # ranks[t]-th such pair, before[b, t] the pairs of rows <= t in those buckets. O(B T) memory.
    offsets = (torch.arange(B, device=dev) * (T + 1)).unsqueeze(-1)
    want = ranks.clamp(min=1).to(torch.int32).view(1, T)  # ranks <= T N < 2**31 (a sort of >2**31 pairs aside)
    acc = torch.zeros(B, T, dtype=torch.int32, device=dev)
    before = torch.zeros_like(acc)
    j = torch.zeros_like(acc)
    small = _narrow(S)  # a bucket's counts fit it: its cumulative sums run several times faster
    for jj in range(K):
        block = (rows[:, jj * S:(jj + 1) * S] + offsets).reshape(-1)
        acc += torch.bincount(block, minlength=B * (T + 1)).view(B, T + 1)[:, :T].cumsum(-1, dtype=small)
        short = acc < want
        j += short
        torch.where(short, acc, before, out=before)
    j = j.clamp(max=K - 1).unsqueeze(-1)  # (B, T, 1): the bucket holding the ranks[t]-th pair
    need = (want - before).unsqueeze(-1)  # its position among that bucket's pairs of rows <= t
    in_bucket = rows.reshape(B, K, S).to(_narrow(T))
    pos = torch.empty(B, T, 1, dtype=torch.long, device=dev)
    tstep = max(1, CHUNK_ENTRIES // max(1, B * S))
    for t0 in range(0, T, tstep):
        t1 = min(T, t0 + tstep)
        R = in_bucket.gather(1, j[:, t0:t1].expand(-1, -1, S))
        t_idx = torch.arange(t0, t1, dtype=R.dtype, device=dev).view(1, -1, 1)
        pos[:, t0:t1] = torch.searchsorted((R <= t_idx).cumsum(-1, dtype=small), need[:, t0:t1].to(small))
    flat_pos = (j.long() * S + pos).squeeze(-1).clamp(max=M - 1)
    return sv.gather(1, flat_pos)


def _narrow(largest: int) -> torch.dtype:
    """The narrowest signed integer dtype holding 0..largest (int16 where it can: cumulative sums
    in int16 run ~5x faster than in int32 on the CPU)."""
    return torch.int16 if largest <= torch.iinfo(torch.int16).max else torch.int32


def band_counts(q: np.ndarray, targets: np.ndarray, slack_pairs: int, n: int, min_k: int = 0) -> np.ndarray:
    """a_t = q_t clipped to the budget band (module docstring, step 2).

    q: (B, T) int, the quantile counts; targets: (T + 1,) int, c_0..c_T; slack_pairs: D >= 0;
    n: N; min_k: floor per token. Returns (B, T) int64 with |sum_{s<=t} a_s - c_t| <= D for
    every t whenever min_k <= c_t - c_{t-1} allows it. Where the band never binds a_t =
    max(q_t, min_k) at once; otherwise one pass over t from the first position where it binds.

    >>> import numpy as np
    >>> band_counts(np.array([[3, 0, 0, 3]]), np.array([0, 1, 2, 3, 4]), 1, 4).tolist()
    [[2, 0, 0, 3]]
    """
    q = np.asarray(q, dtype=np.int64)
    B, T = q.shape
    targets = np.asarray(targets, dtype=np.int64)
    a = np.clip(q, min_k, n)
    P0 = np.cumsum(a, axis=1)
    off = (P0 < targets[1:] - slack_pairs) | (P0 > targets[1:] + slack_pairs)
    bound = np.flatnonzero(off.any(axis=1))
    if bound.size == 0:
        return a
    first = off[bound].argmax(axis=1)
    if bound.size <= 8:  # a few sequences: plain integers are faster than numpy on (B,) vectors
        tg = targets.tolist()
        for b, t_first in zip(bound.tolist(), first.tolist(), strict=True):
            qb, ab = q[b].tolist(), a[b].tolist()
            P = int(P0[b, t_first - 1]) if t_first else 0
            for t in range(t_first, T):  # the rule of the numpy branch below, in plain comparisons
                lo = tg[t + 1] - slack_pairs - P
                lo = n if lo > n else (min_k if lo < min_k else lo)
                hi = tg[t + 1] + slack_pairs - P
                hi = lo if hi < lo else (n if hi > n else hi)
                x = qb[t]
                x = lo if x < lo else (hi if x > hi else x)
                ab[t] = x
                P += x
            a[b] = ab
        return a
    start = int(first.min())
    P = P0[bound, start - 1].copy() if start else np.zeros(bound.size, dtype=np.int64)
    for t in range(start, T):
        c = int(targets[t + 1])
        lo = np.minimum(n, np.maximum(min_k, c - slack_pairs - P))
        hi = np.maximum(lo, np.minimum(n, c + slack_pairs - P))
        col = np.minimum(np.maximum(q[bound, t], lo), hi)
        a[bound, t] = col
        P += col
    return a


def causal_topc(scores, kbar: float, slack: float = DEFAULT_SLACK, min_k: int = 0, padding_mask=None) -> Routing:
    """The causal global top-c (module docstring) of (T, N) or (B, T, N) scores.

    kbar: target experts per token, 0 < kbar <= N; slack: band half-width in tokens (D =
    round_half_up(slack * kbar) pairs), >= 0; min_k: experts per token at least, 0 <= min_k <= N;
    padding_mask: (T,) or (B, T) bool, True = padding (skipped). ``params``: ``kbar``, ``slack``,
    ``min_k``, ``band`` (D), ``target`` (c_T per sequence) and ``budget`` (the pairs realised per
    sequence: the c of the non-causal reference program); one number each for one sequence.

    >>> import torch
    >>> s = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.2, 0.1]])
    >>> r = causal_topc(s, kbar=1)   # thresholds 0.9, 0.8, 0.7 (the 1st, 2nd, 3rd largest so far)
    >>> r.mask.int().tolist(), r.params["budget"], r.params["target"]
    ([[1, 0], [1, 0], [0, 0]], 2, 3)
    """
    s3, valid, squeeze = prepare_scores(scores, padding_mask)
    B, T, N = s3.shape
    kbar = check_real(kbar, "kbar", low=0.0, low_open=True)
    if kbar > N:
        raise InvalidParameter(f"kbar = {kbar:g} exceeds the number of experts N = {N}")
    slack = check_real(slack, "slack", low=0.0)
    min_k = check_int(min_k, "min_k", low=0, high=N)
    D = round_half_up(slack * kbar)
    real = valid.sum(-1).tolist() if valid is not None else [T] * B
    mask = torch.zeros(B, T, N, dtype=torch.bool, device=s3.device)
    realised = [0] * B
    for length in sorted(set(real) - {0}):
        seqs = [b for b, n_real in enumerate(real) if n_real == length]
        sub = s3[seqs]
        if length < T:  # real rows of each sequence, in order
            rows = torch.stack([torch.nonzero(valid[b]).flatten() for b in seqs])
            sub = sub.gather(1, rows.unsqueeze(-1).expand(-1, -1, N))
        targets = prefix_targets(kbar, length)
        theta = running_thresholds(sub, torch.tensor(targets[1:]))
        sel = sub >= theta.unsqueeze(-1)
        q = sel.sum(-1)
        a = torch.from_numpy(band_counts(q.cpu().numpy(), targets, D, N, min_k)).to(s3.device)
        moved = a != q  # rows where the band or the floor changed the count: their top a_t
        if bool(moved.any()):
            sel[moved] = select_top(sub[moved], a[moved])
        if length < T:
            sel = torch.zeros(len(seqs), T, N, dtype=torch.bool, device=s3.device).scatter(
                1, rows.unsqueeze(-1).expand(-1, -1, N), sel)
        mask[seqs] = sel
        for b, n in zip(seqs, a.sum(-1).tolist(), strict=True):
            realised[b] = n
    target = [round_half_up(kbar * n_real) for n_real in real]
    params = {"kbar": kbar, "slack": slack, "min_k": min_k, "band": D,
              "target": target if B > 1 else target[0], "budget": realised if B > 1 else realised[0]}
    return finish_routing(s3, mask, "causal_topc", params, valid, squeeze)


def _route(s: torch.Tensor, p: Mapping[str, Any], ctx: RouterContext, pad, state) -> Routing:
    return causal_topc(s, kbar=p["kbar"], slack=p["slack"], min_k=p["min_k"], padding_mask=pad)


def _label(p: Mapping[str, Any], k: int) -> str:
    out = f"causal_topc a={p['alpha']:g} kbar={p['kbar']:g}"
    if p["slack"] != DEFAULT_SLACK:
        out += f" slack={p['slack']:g}"
    return out + (f" min_k={p['min_k']}" if p["min_k"] else "")


ROUTER = Router(
    name="causal_topc",
    summary=("causal global top-c: each token's experts from its own row and the past (running threshold "
             "at k-bar, budget band); prefix leakage 0"),
    reference=("a causal variant (this package) of USMoE's global top-c, Nguyen et al. 2025 (arXiv 2503.22996), "
               "Def. 3.2 and Alg. 1"),
    params=(KBAR, ALPHA,
            Param("slack", float, DEFAULT_SLACK, "budget band half-width in tokens: every prefix of t tokens takes "
                  "round_half_up(kbar*t) pairs +/- round_half_up(slack*kbar) (0: Token Choice at k-bar)", low=0.0),
            Param("min_k", int, 0, "experts per token at least (0: a token may take none, as in USMoE)", low=0,
                  at_most_experts=True)),
    scores=unified,
    route=_route,
    label=_label,
    exact=False,
    problem=lambda S, p, rp, key, ctx: RoutingProblem.budget(S, per_group(rp["budget"], key), sense="=="),
    group=lambda p: "sequence",
    prefix="causal",
    decode=("the same routing as a full forward (it is causal): a KV-cache decoder that keeps the sequence's "
            "past router scores and pair count computes exactly these experts, one token per step"),
    decode_route=lambda s, p, ctx: _route(s, p, ctx, None, None).mask,
    order=35,
    in_default_sweep=False,  # a k-bar x alpha grid like USMoE's, one sort per sequence: --routers causal_topc
)
