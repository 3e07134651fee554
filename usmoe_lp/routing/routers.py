"""Routers as pure torch functions: scores in, a :class:`Routing` out (CPU or CUDA).

Each router is the greedy solution of one routing program (papers/routing-as-lp.md §1; the exact path in
``usmoe_lp.lp`` certifies it):

* :func:`token_choice` — row-wise top-k (Shazeer et al. 2017; Fedus et al. 2021).
* :func:`expert_choice` — column-wise top-e within each sequence (Zhou et al. 2022).
* :func:`global_topc` — the USMoE global top-c over a scope (arXiv 2503.22996, Alg. 1).
* :func:`capacity_token_choice` — top-k with per-expert capacity and dropping, GShard/Switch
  style (Lepikhin et al. 2020; Fedus et al. 2021; flaxformer ``TokensChooseMaskedRouter``).

Shapes: ``scores`` is (T, N) or (B, T, N); ``padding_mask`` is (T,) or (B, T) **bool, True
where the token is padding** (the complement of a Hugging Face ``attention_mask``: pass
``attention_mask == 0``). Any other mask dtype raises ``InvalidParameter``; a mask that marks
every token as padding routes nothing, with a ``UserWarning`` and ``params['all_padding']``.

Tie-breaking is deterministic and documented: among entries tied at a selection threshold the
lowest flat index of the (B, T, N) tensor (row-major) is taken first. ``torch.topk`` leaves
this implementation-defined, so selection here is "all entries above the threshold, then ties
in index order".
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import torch

from usmoe_lp._validate import (
    PADDING_CONVENTION,
    as_score_tensor,
    ceil_decimal,
    check_finite_torch,
    check_int,
    check_padding_mask,
    check_real,
    round_half_up,
)
from usmoe_lp.errors import AllPaddingWarning, InvalidParameter, InvalidScores, ShapeMismatch
from usmoe_lp.routing.routing import Routing

Scope = Literal["sequence", "batch", "position"]


# ----------------------------------------------------------------------------- helpers
def prepare_scores(scores, padding_mask):
    """Validate and lift to (B, T, N); returns (scores3, valid (B, T) bool or None, squeeze).

    Scores: any real floating tensor is used as it is; integers become float64 exactly
    (refused beyond 2**53); complex, bool, string and object input is refused
    (:func:`usmoe_lp._validate.as_score_tensor`, the rule ``RoutingProblem`` applies too).
    """
    scores = as_score_tensor(scores)
    if scores.ndim not in (2, 3):
        raise InvalidScores(f"scores must be (T, N) or (B, T, N), got shape {tuple(scores.shape)}")
    if scores.numel() == 0:
        raise InvalidScores(f"scores are empty (shape {tuple(scores.shape)})")
    check_finite_torch(scores)
    squeeze = scores.ndim == 2
    s3 = scores.unsqueeze(0) if squeeze else scores
    valid = None
    if padding_mask is not None:
        pm = check_padding_mask(padding_mask).to(scores.device)
        pm = pm.unsqueeze(0) if pm.ndim == 1 else pm
        if tuple(pm.shape) != tuple(s3.shape[:2]):
            raise ShapeMismatch(
                f"padding_mask has shape {tuple(torch.as_tensor(padding_mask).shape)}; "
                f"expected {tuple(scores.shape[:-1])} (True marks padding)"
            )
        if bool(pm.all()):  # legitimate in a stream of batches, but never silent
            warnings.warn("padding_mask marks every token as padding: nothing is routed "
                          "(params['all_padding'] is True); " + PADDING_CONVENTION, AllPaddingWarning, stacklevel=3)
        valid = ~pm
    return s3, valid, squeeze


def select_top(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(G, L) bool: the ``counts[g]`` largest entries of each row, ties lowest index first.

    values: (G, L) float (-inf marks excluded entries); counts: (G,) long within [0, #finite].
    """
    G, L = values.shape
    counts = counts.clamp(0, L)
    if G == 0 or L == 0:
        return torch.zeros_like(values, dtype=torch.bool)
    if bool((counts == counts[0]).all()):
        c = int(counts[0])
        if c == 0:
            return torch.zeros_like(values, dtype=torch.bool)
        # The c+1 largest give the threshold, how many entries beat it, and whether the
        # first unselected entry ties with it - without a reduction over whole rows.
        top = torch.topk(values, min(c + 1, L), dim=-1, sorted=True).values
        thr = top[:, c - 1 : c]
        need = counts - (top[:, :c] > thr).sum(-1)
        tied_beyond = (top[:, c] == thr[:, 0]) if c < L else torch.zeros_like(counts, dtype=torch.bool)
    else:
        ordered = torch.sort(values, dim=-1, descending=True).values
        pos = (counts - 1).clamp(min=0).unsqueeze(-1)
        thr = ordered.gather(-1, pos)
        need = counts - (values > thr).sum(-1)
        nxt = ordered.gather(-1, (pos + 1).clamp(max=L - 1))[:, 0]
        tied_beyond = (nxt == thr[:, 0]) & (counts < L)
    gt = values > thr
    eq = values == thr
    # Rows with more tied entries than they need take the lowest indices; the cumulative count
    # runs on those rows only (rare without ties; over all rows it costs ~3x the topk).
    excess = torch.nonzero(tied_beyond).flatten()
    if excess.numel():
        sub = eq[excess]
        eq[excess] = sub & (torch.cumsum(sub.to(torch.int32), dim=-1) <= need[excess].unsqueeze(-1))
    out = gt | eq
    out[counts == 0] = False
    return out


def finish_routing(s3, mask3, router, params, valid, squeeze) -> Routing:
    if valid is not None and not bool(valid.any()):
        params = {**params, "all_padding": True}
    weights = torch.where(mask3, s3, torch.zeros((), dtype=s3.dtype, device=s3.device))
    if squeeze:
        mask3, weights = mask3[0], weights[0]
        valid = None if valid is None else valid[0]
    return Routing(mask=mask3, weights=weights, router=router, params=params, token_mask=valid)


def mask_out(s3, valid):
    """(B, T, N) scores with padding rows (``valid`` False) set to -inf, so no selection takes them."""
    if valid is None:
        return s3
    return s3.masked_fill(~valid.unsqueeze(-1), float("-inf"))


def check_k(k, n: int) -> int:
    """k experts per token, 1 <= k <= N: the one rule of every router that takes a ``k``."""
    k = check_int(k, "k", low=1)
    if k > n:
        raise InvalidParameter(f"k = {k} exceeds the number of experts N = {n}")
    return k


def _check_capacity_factor(capacity_factor) -> float:
    return check_real(capacity_factor, "capacity_factor", low=0.0, low_open=True)


def expert_capacity(capacity_factor: float, tokens: int, k: int, n: int) -> int:
    """ceil(cf * T * k / N), float error in the decimal cf absorbed (1.1 * 10 = 11.000000000000002)."""
    return ceil_decimal(float(capacity_factor) * tokens * k / n)


def max_violation(counts) -> float:
    """MaxVio of a load vector: max_j c_j / mean_j c_j - 1 (Wang et al. 2024, arXiv 2408.15664).

    counts: (N,) non-negative integers (tokens per expert). 0 at perfect balance (exactly), NaN when
    nothing was routed. The one definition: ``usmoe_lp.diagnostics.load.balance_metrics`` reports it as
    ``maxvio``, and the bias-balancing router uses it to measure its progress.

    >>> max_violation([2, 2, 4, 0])
    1.0
    """
    c = np.asarray(counts, dtype=np.int64).reshape(-1)
    total = int(c.sum())
    if total == 0:
        return float("nan")
    if int(c.max()) == int(c.min()):
        return 0.0
    return float(c.max()) * c.size / total - 1.0


# ----------------------------------------------------------------------------- routers
def token_choice(scores, k: int, padding_mask=None) -> Routing:
    """Token Choice: each token takes its ``k`` highest-scoring experts.

    scores: (T, N) or (B, T, N) float; padding rows get no expert. The optimum of
    ``RoutingProblem.token_choice`` (rows sum to k).

    >>> import torch
    >>> r = token_choice(torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.5, 0.0]]), k=1)
    >>> r.mask.int().tolist()   # the tie in row 1 goes to the lower index
    [[0, 1, 0], [1, 0, 0]]
    """
    s3, valid, squeeze = prepare_scores(scores, padding_mask)
    B, T, N = s3.shape
    k = check_k(k, N)
    counts = torch.full((B * T,), k, dtype=torch.long, device=s3.device)
    if valid is not None:
        counts = counts * valid.reshape(-1)
    mask = select_top(s3.reshape(B * T, N), counts).reshape(B, T, N)
    return finish_routing(s3, mask, "token_choice", {"k": k}, valid, squeeze)


def expert_choice(scores, capacity: int | None = None, capacity_factor: float = 1.0, k: int = 1,
                  padding_mask=None) -> Routing:
    """Expert Choice: each expert takes its ``capacity`` highest-scoring tokens in each sequence.

    scores: (T, N) or (B, T, N) float. Without ``capacity``, e = ceil(capacity_factor * T * k / N)
    with T the real tokens of the sequence (Zhou et al. 2022). ``params['budget_mismatch']``
    reports N * e - T * k: EC matches a TC budget exactly only when T * k / N is an integer
    (papers/routing-as-lp.md §4.4). Capacity is clipped to the sequence's real tokens.
    """
    s3, valid, squeeze = prepare_scores(scores, padding_mask)
    B, T, N = s3.shape
    k = check_k(k, N)
    tokens = valid.sum(-1) if valid is not None else torch.full((B,), T, device=s3.device)
    if capacity is None:
        capacity_factor = _check_capacity_factor(capacity_factor)
        caps = [expert_capacity(capacity_factor, int(t), k, N) for t in tokens.tolist()]
    else:
        e = check_int(capacity, "capacity", low=1)
        if e > T:
            raise InvalidParameter(f"capacity = {e} exceeds the number of tokens T = {T}")
        caps = [e] * B
    caps_t = torch.minimum(torch.tensor(caps, device=s3.device), tokens.long())
    values = mask_out(s3, valid).transpose(1, 2).reshape(B * N, T)
    mask = select_top(values, caps_t.repeat_interleave(N)).reshape(B, N, T).transpose(1, 2)
    budget = [int(c) * N for c in caps_t.tolist()]
    mismatch = [b - int(t) * k for b, t in zip(budget, tokens.tolist(), strict=True)]
    params = {"capacity": caps_t.tolist() if not squeeze else int(caps_t[0]),
              "capacity_factor": capacity_factor if capacity is None else None, "k": k,
              "budget": budget if not squeeze else budget[0],
              "budget_mismatch": mismatch if not squeeze else mismatch[0]}
    return finish_routing(s3, mask.contiguous(), "expert_choice", params, valid, squeeze)


def global_topc(scores, budget: int | None = None, kbar: float | None = None,
                scope: Scope = "sequence", padding_mask=None, include_padding: bool = False) -> Routing:
    """USMoE global top-c: the c highest-scoring token-expert pairs of each group.

    scores: (T, N) or (B, T, N) float (the unified score in USMoE). The group (``scope``) is
    ``sequence`` (each sequence alone; the training-free HF code), ``batch`` (all tokens
    together) or ``position`` (one position across the batch; the from-scratch Transformer-XL
    code). Give exactly one of ``budget`` (c per group) or ``kbar``: c = round_half_up(kbar *
    tokens in the group), reported in ``params['budget']`` with the realised k-bar.

    Padding is excluded by default. ``include_padding=True`` reproduces the reference code, in
    which left-padded tokens compete for c = T_padded * k (papers/routing-as-lp.md §5.3, padding).

    Selects exactly c pairs: the optimum of the ``== c`` program (and of ``<= c`` for positive
    scores). For signed scores the ``<= c`` optimum differs; solve it with ``usmoe_lp.lp``.

    >>> import torch
    >>> r = global_topc(torch.tensor([[0.9, 0.8], [0.1, 0.2]]), kbar=1)
    >>> r.mask.int().tolist(), r.dropped_tokens
    ([[1, 1], [0, 0]], 1)
    """
    s3, valid, squeeze = prepare_scores(scores, padding_mask)
    B, T, N = s3.shape
    if (budget is None) == (kbar is None):
        raise InvalidParameter("give exactly one of budget= (pairs per group) or kbar= (experts per token)")
    if scope not in ("sequence", "batch", "position"):
        raise InvalidParameter(f"scope must be 'sequence', 'batch' or 'position', got {scope!r}")
    use = valid if (valid is not None and not include_padding) else None
    values = mask_out(s3, use)
    real = use if use is not None else torch.ones(B, T, dtype=torch.bool, device=s3.device)
    if scope == "sequence":
        flat, tokens = values.reshape(B, T * N), real.sum(-1)
    elif scope == "batch":
        flat, tokens = values.reshape(1, B * T * N), real.sum().reshape(1)
    else:
        flat, tokens = values.transpose(0, 1).reshape(T, B * N), real.sum(0)
    if kbar is not None:
        kb = check_real(kbar, "kbar", low=0.0)
        if kb > N:
            raise InvalidParameter(f"kbar = {kb} exceeds the number of experts N = {N}")
        cs = [round_half_up(kb * t) for t in tokens.tolist()]
    else:
        c = check_int(budget, "budget", low=0)
        cs = [c] * len(tokens)
        for t, cg in zip(tokens.tolist(), cs, strict=True):
            if cg > t * N:
                raise InvalidParameter(f"budget {cg} exceeds the group's T*N = {t * N} token-expert pairs")
    counts = torch.tensor(cs, dtype=torch.long, device=s3.device)
    sel = select_top(flat, counts)
    if scope == "sequence":
        mask = sel.reshape(B, T, N)
    elif scope == "batch":
        mask = sel.reshape(B, T, N)
    else:
        mask = sel.reshape(T, B, N).transpose(0, 1).contiguous()
    params = {"scope": scope, "kbar": None if kbar is None else kb,
              "budget": cs if len(cs) > 1 else cs[0],
              "rounding": None if kbar is None else "c = round_half_up(kbar * tokens in group)",
              "include_padding": include_padding}
    return finish_routing(s3, mask, "global_topc", params, valid, squeeze)


def capacity_token_choice(scores, k: int, capacity_factor: float = 1.0,
                          policy: Literal["position", "priority"] = "position",
                          padding_mask=None, capacity: int | None = None) -> Routing:
    """Token Choice with a per-expert capacity; overflowing assignments are dropped.

    scores: (T, N) or (B, T, N) float. Capacity per sequence C = ceil(capacity_factor * T * k / N)
    (or ``capacity``). Assignments are served choice by choice — every token's first choice
    before any second choice, as in GShard and flaxformer — and, within a choice, in position
    order (``policy="position"``) or by descending top-1 score (``"priority"``: batch-prioritised
    routing, Riquelme et al. 2021). An assignment beyond an expert's capacity is dropped.
    """
    s3, valid, squeeze = prepare_scores(scores, padding_mask)
    B, T, N = s3.shape
    k = check_k(k, N)
    if policy not in ("position", "priority"):
        raise InvalidParameter(f"policy must be 'position' or 'priority', got {policy!r}")
    tokens = valid.sum(-1) if valid is not None else torch.full((B,), T, device=s3.device)
    if capacity is None:
        capacity_factor = _check_capacity_factor(capacity_factor)
        caps = [expert_capacity(capacity_factor, int(t), k, N) for t in tokens.tolist()]
    else:
        caps = [check_int(capacity, "capacity", low=0)] * B
    # choices[b, t, r]: the r-th best expert of token t, ties to the lower index.
    order = torch.sort(s3, dim=-1, descending=True, stable=True)
    choices = order.indices[..., :k]
    if policy == "priority":
        tok_order = torch.sort(order.values[..., 0], dim=-1, descending=True, stable=True).indices
    else:
        tok_order = torch.arange(T, device=s3.device).expand(B, T)
    seq_choices = torch.gather(choices, 1, tok_order.unsqueeze(-1).expand(B, T, k))  # (B, T, k)
    seq = seq_choices.transpose(1, 2).reshape(B, k * T)  # rank-major: all 1st choices first
    tok = tok_order.repeat(1, k)  # (B, k*T)
    live = torch.ones(B, k * T, dtype=torch.bool, device=s3.device)
    if valid is not None:
        live = torch.gather(valid, 1, tok)
    onehot = torch.nn.functional.one_hot(seq, N) * live.unsqueeze(-1)
    slot = (torch.cumsum(onehot, dim=1) * onehot).sum(-1)  # 1-based position in the expert's queue
    cap_t = torch.tensor(caps, device=s3.device).unsqueeze(-1)
    keep = live & (slot <= cap_t)
    mask = torch.zeros(B, T, N, dtype=torch.bool, device=s3.device)
    b_idx = torch.arange(B, device=s3.device).unsqueeze(-1).expand(B, k * T)
    mask[b_idx[keep], tok[keep], seq[keep]] = True
    dropped_assign = int((live & ~keep).sum())
    params = {"k": k, "capacity": caps if not squeeze else caps[0], "capacity_factor": capacity_factor,
              "policy": policy, "dropped_assignments": dropped_assign}
    return finish_routing(s3, mask, "capacity_token_choice", params, valid, squeeze)
