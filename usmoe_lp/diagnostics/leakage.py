"""Information leakage of non-causal routers: prefix consistency, cross-sequence dependence and the
decode-time mismatch, for every router of the registry (:func:`usmoe_lp.routers.list_routers`).

Definitions (issue 4; defined in this project, since no MoE tool we know of measures leakage; motivated
by the non-causal selection of Expert Choice, Zhou et al. 2022, and Mixture-of-Depths, Raposo et al.
2024; results in papers/routing-as-lp.md §5.3). For one sequence with router scores S, (T, N) float
(the caller passes the router's **own scores**, ``entry.scores`` of the logits, e.g. the unified
score for USMoE; every registry entry's scores are row-wise functions of the logits, so the scores
of a prefix are the prefix of the scores):

* D_full — the routing of the whole sequence;
* D_{<=t} — the routing of the prefix 1..t as the router would route a sequence of length t;
* the *causal decision* of token t is D_{<=t}(t, :) — what an autoregressive decoder computes for
  token t, which cannot see the future.

How D_{<=t} is computed is read from the entry's prefix rule (:data:`usmoe_lp.routers.PREFIX_RULES`):

* ``token_local`` (Token Choice, top-p): a token's experts depend on its own row only, so every
  statistic is 0 by construction (nothing is routed);
* ``causal``: the causal decisions are computed by the entry's ``decode_route`` (tokens arriving
  one at a time) and compared with the full routing: 0 for a correct causal router, measured, not
  assumed. Without a ``decode_route`` the ``recompute`` engine is used. (The brute-force check
  over every prefix is in the tests.) Displacement is not measured by ``decode_route`` (NaN);
* ``global_topc`` (USMoE): the top ``prefix_budget(t)`` pairs of the prefix, incrementally (below);
* ``expert_capacity`` (Expert Choice): each expert takes its top ``prefix_budget(t)`` tokens of
  the prefix, incrementally, per expert column. For both, the full routing the rule gives is
  checked against the router's own (one call per sequence); where they differ (a setting the rule
  does not describe, e.g. USMoE's ``position`` scope, under which a sequence alone is routed token
  by token) the sequence goes to the ``recompute`` engine and ``rule_mismatches`` counts it;
* ``recompute`` (capacity-TC and any router without a faster rule): ``route_scores`` runs on each
  prefix (exact, O(T) runs of the router). Its cost is bounded: on a sequence longer than
  ``max_recompute_tokens`` the causal decision is evaluated at that many evenly spaced positions
  (the last one always included); the statistics then average over the evaluated tokens,
  ``positions_sampled`` counts them, and such a sequence contributes no displacement.

Ties are broken exactly as the routers of :mod:`usmoe_lp.routing` break them (lowest flat index
first within the group: for the global top-c the row-major index t * N + e of the sequence, for
Expert Choice the lower position t within the expert's column), so a brute-force oracle that
calls the routers on every prefix agrees exactly, tied inputs included.

Statistics (pooled over the evaluated tokens of all analysed sequences, token-weighted):

* ``flip_rate`` — share of (token, expert) decisions that differ, mean_{t,e} 1[D_{<=t}(t,e) !=
  D_full(t,e)]. Unit: share in [0, 1].
* ``token_flip_rate`` — share of tokens whose expert *set* differs.
* ``jaccard_distance`` — mean over tokens of the Jaccard **distance** 1 - |A ∩ B| / |A ∪ B|
  between the causal set A and the full-sequence set B; two empty sets (possible under the global
  top-c and fractional k-bar) count as distance 0. (The counterfactual ``agreement`` is the
  Jaccard *similarity* with the model's selection.)
* ``per_offset`` — the flip rate as a function of the offset T - t, the number of future tokens
  (offset 0 is the last token, identical by definition). Kept as integer sums and token counts
  per offset, so sequences of different lengths merge exactly.
* ``displacement`` — for t = 2..T, the number of EARLIER tokens s < t whose expert set in
  D_{<=t} differs from that in D_{<=t-1}: how many past decisions one appended token changes
  (a "budget-displacement count", defined here). Mean, max and histogram over all steps.

Choice where definitions could differ: a flip rate could also be averaged over all pairs s <= t of
every prefix; issue 4 (followed here) compares the causal decision of each token with the full
routing, which is what decoding actually changes.

Incremental engines (never re-route a prefix from scratch): the entries are ranked once in the
routers' total order (score descending, flat index ascending); the selected set of the growing
prefix is kept as two heaps (selected: worst on top; unselected: best on top). Appending a row
pushes its entries and moves only the entries that cross the threshold, so each step costs
O((N + moves) log(T N)); the entries that cross are exactly the earlier decisions that change
(displacement). Expert Choice runs the same per expert column. One sequence of 4096 tokens x 64
experts takes well under a second on one core (``benchmarks/bench_leakage.py``).

Cross-sequence dependence (:func:`cross_sequence_dependence`): how a sequence's routing changes
with the other sequences of its batch, for routers whose program couples sequences
(``entry.group(params)`` is ``batch`` or ``position``: USMoE's batch and position scopes).

Decode-time mismatch (:func:`decode_mismatch`): the full-sequence routing against the routing a
KV-cache decoder computes, one token per step: ``entry.decode_route`` where the entry has one, else
each token routed as a sequence of one token (a (T, 1, N) batch for routers grouped per token or
sequence; one call per token for ``batch``/``position`` groups, which would couple the batch).

Router arguments: a registry name with ``k`` (the model's experts per token; default the layer's
``top_k``) and the router's parameters as keywords, or a :class:`~usmoe_lp.routers.RouterConfig`.
"""

from __future__ import annotations

import heapq
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from usmoe_lp._json import json_ready
from usmoe_lp._validate import as_score_tensor, check_int, check_padding_mask
from usmoe_lp.errors import AllPaddingWarning, InvalidParameter, InvalidScores, ShapeMismatch
from usmoe_lp.routers import RouterConfig, RouterContext, get_router, route_scores

__all__ = ["DEFAULT_MAX_RECOMPUTE_TOKENS", "CrossSequenceStats", "DecodeStats", "LeakagePartial", "LeakageStats",
           "cross_sequence_dependence", "decode_mismatch", "prefix_consistency", "resolve_config"]

DEFAULT_MAX_RECOMPUTE_TOKENS = 64
"""Sequences up to this length are recomputed at every prefix (``recompute`` rule); longer ones at
this many evenly spaced positions. The same bound caps the one-call-per-token decode routing of
``batch``/``position``-grouped routers (:func:`decode_mismatch`)."""


# ============================================================================ input handling
def resolve_config(router, k: int | None = None, layer: Any = None, params: dict | None = None) -> RouterConfig:
    """A :class:`RouterConfig` from a registry name (with ``k``, default ``layer.top_k``, and the
    router's parameters) or a RouterConfig (then no ``k`` or parameters may be given)."""
    params = dict(params or {})
    if isinstance(router, RouterConfig):
        if params or (k is not None and k != router.k):
            raise InvalidParameter("pass parameters either in the RouterConfig or as keywords, not both")
        return router
    entry = get_router(router)
    if k is None:
        k = getattr(layer, "top_k", None)
    if k is None:
        raise InvalidParameter(f"router {entry.name!r} needs k= (the model's experts per token: the budget unit)")
    return RouterConfig(entry.name, k, **params)


def _context(config: RouterConfig, n: int, layer: Any) -> RouterContext:
    return RouterContext(k=config.k, num_experts=n, score_function=getattr(layer, "score_function", None) or "softmax",
                         layer=layer)


def _to_numpy(scores, name: str = "scores") -> np.ndarray:
    """Scores as a float numpy array (float32, or float64 for float64 and integer input); exact for
    bf16/f16, and for integers up to 2**53 (the routers' dtype rule, :func:`as_score_tensor`)."""
    x = as_score_tensor(scores, name).detach().cpu()
    arr = (x if x.dtype == torch.float64 else x.float()).numpy()
    if arr.ndim not in (2, 3):
        raise InvalidScores(f"{name} must be (T, N) or (B, T, N), got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise InvalidScores(f"{name} is empty (shape {tuple(arr.shape)}); need T >= 1 and N >= 1")
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))
        raise InvalidScores(
            f"{name} has {bad.shape[0]} NaN/Inf entries (first at {tuple(int(v) for v in bad[0])}); "
            "pass finite scores and mark padding with padding_mask instead of -inf")
    return arr


def _padding(padding_mask, shape3: tuple[int, int, int], two_d: bool) -> np.ndarray | None:
    """padding_mask as (B, T) bool numpy (True = padding) or None (:func:`check_padding_mask`)."""
    if padding_mask is None:
        return None
    pm = check_padding_mask(padding_mask).detach().cpu().numpy()
    if two_d and pm.ndim == 1:
        pm = pm[None, :]
    if tuple(pm.shape) != tuple(shape3[:2]):
        want = (shape3[1],) if two_d else shape3[:2]
        raise ShapeMismatch(f"padding_mask has shape {tuple(np.shape(padding_mask))}; expected "
                            f"{tuple(want)} (True marks padding)")
    return pm


def _sequences(scores, padding_mask):
    """Each sequence's real rows as a (T_b, N) float array (padding removed), and N."""
    arr = _to_numpy(scores)
    two_d = arr.ndim == 2
    a3 = arr[None] if two_d else arr
    pm = _padding(padding_mask, a3.shape, two_d)
    seqs = []
    for b in range(a3.shape[0]):
        s = a3[b] if pm is None else a3[b][~pm[b]]
        if s.shape[0]:
            seqs.append(np.ascontiguousarray(s))
    return seqs, int(a3.shape[2])


def _route_mask(config: RouterConfig, s3: np.ndarray | torch.Tensor, ctx: RouterContext, pad=None) -> np.ndarray:
    """``config``'s routing mask of (B, T, N) scores as numpy bool (state None)."""
    t = torch.from_numpy(s3) if isinstance(s3, np.ndarray) else s3
    return route_scores(config, t, ctx, pad).mask.cpu().numpy()


def _sample_positions(T: int, m: int) -> np.ndarray | None:
    """None when T <= m (every position), else m evenly spaced positions of 0..T-1 (the last included)."""
    if T <= m:
        return None
    return np.unique(np.linspace(0, T - 1, m).round().astype(np.int64))


def _decode_mask(config: RouterConfig, s: np.ndarray, ctx: RouterContext, positions: np.ndarray | None = None
                 ) -> np.ndarray:
    """(T, N) bool (rows ``positions`` only when given): the routing a KV-cache decoder computes for
    one sequence's (T, N) scores."""
    entry = config.entry
    if entry.decode_route is not None:
        out = entry.decode_route(torch.from_numpy(s[None]), config.param_dict, ctx).detach().cpu().numpy()[0]
        return out.astype(bool) if positions is None else out[positions].astype(bool)
    rows = s if positions is None else s[positions]
    if entry.group(config.param_dict) in ("token", "sequence"):  # a (T, 1, N) batch: T one-token sequences
        return _route_mask(config, rows[:, None, :], ctx)[:, 0, :]
    # batch / position groups would couple the one-token sequences of one call: one call per token
    return np.concatenate([_route_mask(config, rows[t:t + 1, None, :], ctx)[0] for t in range(rows.shape[0])])


# ============================================================================ the incremental routers
def _topc_prefixes(s: np.ndarray, budgets: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Global top-c of every prefix of one sequence, incrementally.

    s: (T, N) float; budgets[t]: pairs selected in the prefix of length t + 1 (nondecreasing,
    increments <= N). Returns (causal (T, N) bool, full (T, N) bool, displacement (T - 1,) int64).
    """
    T, N = s.shape
    order = np.argsort(-s.reshape(-1), kind="stable")  # routers' order: score desc, flat index asc
    rank = np.empty(T * N, dtype=np.int64)
    rank[order] = np.arange(T * N, dtype=np.int64)
    R = rank.reshape(T, N)
    row_of = (order // N).tolist()
    rows = R.tolist()
    theta = np.empty(T, dtype=np.int64)  # largest selected rank of each prefix (-1: none)
    disp = np.zeros(max(T - 1, 0), dtype=np.int64)
    sel: list[int] = []  # -rank of selected entries (worst selected on top)
    uns: list[int] = []  # rank of unselected entries (best unselected on top)
    push, pop = heapq.heappush, heapq.heappop
    for t in range(T):
        row = rows[t]
        if sel:
            w = -sel[0]
            for r in row:
                if r < w:
                    push(sel, -r)
                else:
                    push(uns, r)
        else:
            for r in row:
                push(uns, r)
        c = budgets[t]
        changed: set[int] = set()
        while len(sel) > c:
            r = -pop(sel)
            push(uns, r)
            if row_of[r] < t:
                changed.add(row_of[r])
        while len(sel) < c:
            r = pop(uns)
            push(sel, -r)
            if row_of[r] < t:
                changed.add(row_of[r])
        theta[t] = -sel[0] if sel else -1
        if t:
            disp[t - 1] = len(changed)
    return R <= theta[:, None], R <= theta[-1], disp


def _ec_prefixes(s: np.ndarray, caps: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expert Choice of every prefix of one sequence, incrementally (per expert column).

    s: (T, N) float; caps[t]: tokens per expert in the prefix of length t + 1 (nondecreasing,
    <= t + 1). Returns (causal (T, N) bool, full (T, N) bool, displacement (T - 1,) int64).
    """
    T, N = s.shape
    order = np.argsort(-s, axis=0, kind="stable")  # per column: score desc, position asc
    R = np.empty((T, N), dtype=np.int64)
    np.put_along_axis(R, order, np.broadcast_to(np.arange(T, dtype=np.int64)[:, None], (T, N)), axis=0)
    row_of = order.T.tolist()  # row_of[e][rank]
    rows = R.tolist()
    theta = np.empty((T, N), dtype=np.int64)
    disp = np.zeros(max(T - 1, 0), dtype=np.int64)
    sels: list[list[int]] = [[] for _ in range(N)]
    unss: list[list[int]] = [[] for _ in range(N)]
    push, pop = heapq.heappush, heapq.heappop
    replace, pushpop = heapq.heapreplace, heapq.heappushpop
    prev_c = 0
    for t in range(T):
        c = caps[t]
        grow = c - prev_c
        prev_c = c
        changed: set[int] = set()
        th = [-1] * N
        for e, r in enumerate(rows[t]):
            sel, uns = sels[e], unss[e]
            if sel and r < -sel[0]:
                if grow == 0:  # the new entry displaces the worst selected one
                    x = -replace(sel, -r)
                    push(uns, x)
                    changed.add(row_of[e][x])
                else:
                    push(sel, -r)
                    for _ in range(grow - 1):
                        x = pop(uns)
                        push(sel, -x)
                        changed.add(row_of[e][x])
            elif grow == 0:
                push(uns, r)
            else:
                x = pushpop(uns, r)  # the best of the unselected and the new entry
                push(sel, -x)
                if x != r:
                    changed.add(row_of[e][x])
                for _ in range(grow - 1):
                    x = pop(uns)
                    push(sel, -x)
                    if x != r:
                        changed.add(row_of[e][x])
            th[e] = -sel[0]
        theta[t] = th
        if t:
            disp[t - 1] = len(changed)
    return R <= theta, R <= theta[-1], disp


def _recompute(config: RouterConfig, s: np.ndarray, ctx: RouterContext, positions: np.ndarray | None):
    """The ``recompute`` engine: route each prefix. positions None: every prefix (exact, with
    displacement); else only the prefixes ending at ``positions`` (0-based), no displacement.
    Returns (causal rows, full rows, displacement or None), rows at ``positions`` (all when None)."""
    T, N = s.shape
    st = torch.from_numpy(s)[None]
    if positions is None:
        causal = np.empty((T, N), dtype=bool)
        disp = np.zeros(max(T - 1, 0), dtype=np.int64)
        prev = None
        for t in range(1, T + 1):
            m = _route_mask(config, st[:, :t], ctx)[0]
            causal[t - 1] = m[t - 1]
            if prev is not None:
                disp[t - 2] = int((m[: t - 1] != prev).any(-1).sum())
            prev = m
        return causal, prev, disp
    full = _route_mask(config, st, ctx)[0]
    causal = np.stack([_route_mask(config, st[:, : t + 1], ctx)[0][t] for t in positions.tolist()])
    return causal, full[positions], None


def _set_stats(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row (flips int64, token flip bool, Jaccard distance float64) between masks a and b."""
    flips = (a != b).sum(-1, dtype=np.int64)
    inter = (a & b).sum(-1, dtype=np.int64)
    union = (a | b).sum(-1, dtype=np.int64)
    jac = np.zeros(flips.shape, dtype=np.float64)
    nz = union > 0
    jac[nz] = 1.0 - inter[nz] / union[nz]
    return flips, flips > 0, jac


# ============================================================================ results
@dataclass(frozen=True)
class LeakageStats:
    """Prefix-consistency (information leakage) statistics of one router; see the module docstring.

    Attributes:
        router: the registry name; label: the setting's label; k: the model's experts per token;
            params: the router's own parameters (``RouterConfig.param_dict``).
        prefix_rule: the entry's prefix rule (how the prefixes were routed).
        num_experts: N; num_sequences: sequences analysed (those with >= 1 real token);
            num_tokens: tokens whose causal decision was evaluated (all real tokens unless sampled).
        flip_rate: share of (token, expert) causal decisions that differ from the full routing.
        token_flip_rate: share of tokens whose causal expert set differs.
        jaccard_distance: mean Jaccard distance (0 for two empty sets) between causal and full sets.
        per_offset: flip rate per offset T - t (index = offset), NaN where no token has it;
            per_offset_count: tokens per offset.
        displacement_mean / displacement_max / displacement_histogram: earlier tokens whose
            expert set changes when one token is appended (histogram[d] = steps with d changes),
            over the T - 1 steps of every fully evaluated sequence; mean NaN and max 0 when there
            is no step (also for the ``causal`` rule through ``decode_route``, which has none).
        positions_sampled: evaluated tokens that come from sequences longer than
            ``max_recompute_tokens`` (``recompute`` rule), 0 when every position was evaluated;
            sampled_sequences: such sequences.
        rule_mismatches: sequences whose full routing under the entry's incremental rule
            (``global_topc`` / ``expert_capacity``) differed from the router's own, so that every
            prefix was re-routed instead (e.g. USMoE's ``position`` scope, which routes the tokens of
            one sequence alone; 0 when the rule describes the router).
    """

    router: str
    label: str
    k: int
    params: dict
    prefix_rule: str
    num_experts: int | None
    num_sequences: int
    num_tokens: int
    flip_rate: float
    token_flip_rate: float
    jaccard_distance: float
    per_offset: list[float]
    per_offset_count: list[int]
    displacement_mean: float
    displacement_max: int
    displacement_histogram: list[int]
    displacement_steps: int = 0
    per_offset_token_flip_rate: list[float] = field(default_factory=list)
    positions_sampled: int = 0
    sampled_sequences: int = 0
    rule_mismatches: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (JSON-serialisable; NaN becomes None)."""
        return json_ready({
            "router": self.router, "label": self.label, "k": self.k, "params": dict(self.params),
            "prefix_rule": self.prefix_rule, "num_experts": self.num_experts,
            "num_sequences": self.num_sequences, "num_tokens": self.num_tokens,
            "flip_rate": self.flip_rate, "token_flip_rate": self.token_flip_rate,
            "jaccard_distance": self.jaccard_distance, "per_offset": self.per_offset,
            "per_offset_count": self.per_offset_count, "per_offset_token_flip_rate": self.per_offset_token_flip_rate,
            "displacement_mean": self.displacement_mean, "displacement_max": self.displacement_max,
            "displacement_histogram": self.displacement_histogram, "displacement_steps": self.displacement_steps,
            "positions_sampled": self.positions_sampled, "sampled_sequences": self.sampled_sequences,
            "rule_mismatches": self.rule_mismatches,
        })

    def per_offset_frame(self):
        """Tidy pandas DataFrame of the per-offset curve: columns ``offset`` (future tokens T - t),
        ``flip_rate`` (share, NaN without data) and ``tokens`` (tokens at that offset)."""
        import pandas as pd

        return pd.DataFrame({"offset": np.arange(len(self.per_offset), dtype=np.int64),
                             "flip_rate": np.asarray(self.per_offset, dtype=np.float64),
                             "tokens": np.asarray(self.per_offset_count, dtype=np.int64)})


def _add_padded(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros(max(a.size, b.size), dtype=np.int64)
    out[: a.size] += a
    out[: b.size] += b
    return out


def _at(index: np.ndarray, values: np.ndarray) -> np.ndarray:
    """int64 array a with a[index[i]] += values[i]."""
    return np.bincount(index, weights=values, minlength=int(index.max()) + 1 if index.size else 0).astype(np.int64)


class LeakagePartial:
    """Mergeable accumulator of prefix-consistency statistics (the diagnostics' partial protocol).

    A chunk is a set of whole sequences: the analysis of a sequence needs all its tokens, so
    ``update`` takes (T, N) (one sequence) or (B, T, N) with an optional (B, T) ``padding_mask``
    (True = padding; padded tokens are removed and each sequence is analysed alone). Every
    accumulator is an integer count except the sum of Jaccard distances (float64), so merging is
    exact (the Jaccard sum to float round-off).

    >>> import numpy as np
    >>> p = LeakagePartial.empty("usmoe", k=1, kbar=1.0)
    >>> p.update(np.array([[1.0, 0.0], [3.0, 2.0]]))
    >>> p.result().flip_rate, p.result().displacement_histogram
    (0.25, [0, 1])
    """

    def __init__(self, config: RouterConfig, num_experts: int | None = None, layer: Any = None,
                 max_recompute_tokens: int = DEFAULT_MAX_RECOMPUTE_TOKENS):
        self.config = config
        self.router = config.router
        self.params = config.param_dict
        self.num_experts = num_experts
        self.layer = layer
        self.max_recompute_tokens = max_recompute_tokens
        self.num_sequences = 0
        self.num_tokens = 0
        self.flips = 0
        self.token_flips = 0
        self.jaccard_sum = 0.0
        self.offset_flips = np.zeros(0, dtype=np.int64)
        self.offset_token_flips = np.zeros(0, dtype=np.int64)
        self.offset_count = np.zeros(0, dtype=np.int64)
        self.disp_sum = 0
        self.disp_steps = 0
        self.disp_max = 0
        self.disp_hist = np.zeros(0, dtype=np.int64)
        self.positions_sampled = 0
        self.sampled_sequences = 0
        self.rule_mismatches = 0

    @classmethod
    def empty(cls, router, *, k: int | None = None, num_experts: int | None = None, layer: Any = None,
              max_recompute_tokens: int = DEFAULT_MAX_RECOMPUTE_TOKENS, **params: Any) -> LeakagePartial:
        """An empty accumulator for any registry router: a name with ``k`` (the model's experts per
        token; default ``layer.top_k``) and the router's parameters (``LeakagePartial.empty("ec",
        k=2, capacity_factor=1.25)``), or a :class:`RouterConfig`. ``num_experts`` is fixed by the
        first update if not given. ``layer``: the layer's :class:`usmoe_lp.logs.LayerInfo` (read by
        routers with layer semantics). ``max_recompute_tokens``: the ``recompute`` rule's bound."""
        config = resolve_config(router, k, layer, params)
        mrt = check_int(max_recompute_tokens, "max_recompute_tokens", low=1)
        if num_experts is not None:
            num_experts = check_int(num_experts, "num_experts", low=1)
            config.check_experts(num_experts)
        return cls(config, num_experts, layer, mrt)

    def update(self, scores, padding_mask=None) -> None:
        """Add whole sequences: scores (T, N) or (B, T, N) float, the router's own scores (torch
        incl. bf16, or numpy); padding_mask (T,) / (B, T) bool, True = padding."""
        seqs, n = _sequences(scores, padding_mask)
        if self.num_experts is None:
            self.config.check_experts(n)
            self.num_experts = n
        elif n != self.num_experts:
            raise ShapeMismatch(f"scores have N = {n} experts but this accumulator has {self.num_experts}")
        for s in seqs:
            self._add_sequence(s)

    def _decisions(self, s: np.ndarray):
        """(causal rows, full rows, displacement or None, positions or None) of one sequence."""
        T, N = s.shape
        config, entry = self.config, self.config.entry
        ctx = _context(config, N, self.layer)
        rule = entry.prefix
        if rule == "token_local":  # the decision of token t depends on row t only
            mask = np.zeros((T, N), dtype=bool)
            return mask, mask, np.zeros(max(T - 1, 0), dtype=np.int64), None
        if rule == "causal" and entry.decode_route is not None:
            return _decode_mask(config, s, ctx), _route_mask(config, s[None], ctx)[0], None, None
        p, k = config.param_dict, config.k
        if rule in ("global_topc", "expert_capacity"):
            engine = _topc_prefixes if rule == "global_topc" else _ec_prefixes
            causal, full, disp = engine(s, [entry.prefix_budget(t, N, p, k) for t in range(1, T + 1)])
            # The rule must describe the router: its full routing is checked against the router's own
            # (one call). Where they differ (a setting the rule does not cover) every prefix is re-routed.
            if np.array_equal(full, _route_mask(config, s[None], ctx)[0]):
                return causal, full, disp, None
            self.rule_mismatches += 1
        if T <= self.max_recompute_tokens:
            return (*_recompute(config, s, ctx, None), None)
        positions = _sample_positions(T, self.max_recompute_tokens)
        return (*_recompute(config, s, ctx, positions), positions)

    def _add_sequence(self, s: np.ndarray) -> None:
        T = s.shape[0]
        causal, full, disp, positions = self._decisions(s)
        flips, tok, jac = _set_stats(causal, full)
        offsets = (T - 1 - (np.arange(T) if positions is None else positions)).astype(np.int64)
        self.num_sequences += 1
        self.num_tokens += int(offsets.size)
        if positions is not None:
            self.positions_sampled += int(offsets.size)
            self.sampled_sequences += 1
        self.flips += int(flips.sum())
        self.token_flips += int(tok.sum())
        self.jaccard_sum += float(jac.sum())
        self.offset_flips = _add_padded(self.offset_flips, _at(offsets, flips))
        self.offset_token_flips = _add_padded(self.offset_token_flips, _at(offsets, tok.astype(np.int64)))
        self.offset_count = _add_padded(self.offset_count, _at(offsets, np.ones(offsets.size, dtype=np.int64)))
        if disp is not None and disp.size:
            self.disp_sum += int(disp.sum())
            self.disp_steps += int(disp.size)
            self.disp_max = max(self.disp_max, int(disp.max()))
            self.disp_hist = _add_padded(self.disp_hist, np.bincount(disp).astype(np.int64))

    def merge(self, other: LeakagePartial) -> LeakagePartial:
        """A NEW accumulator holding both inputs' sequences (neither input is changed)."""
        if not isinstance(other, LeakagePartial):
            raise InvalidParameter(f"can only merge a LeakagePartial, got {type(other).__name__}")
        if other.config != self.config or other.max_recompute_tokens != self.max_recompute_tokens:
            raise InvalidParameter(f"cannot merge leakage partials of different routers/params: "
                                   f"{self.config} vs {other.config}")
        if None not in (self.num_experts, other.num_experts) and self.num_experts != other.num_experts:
            raise InvalidParameter(f"cannot merge leakage partials with N = {self.num_experts} and "
                                   f"N = {other.num_experts} experts")
        out = LeakagePartial(self.config, self.num_experts if self.num_experts is not None else other.num_experts,
                             self.layer, self.max_recompute_tokens)
        for name in ("num_sequences", "num_tokens", "flips", "token_flips", "jaccard_sum", "disp_sum",
                     "disp_steps", "positions_sampled", "sampled_sequences", "rule_mismatches"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        out.disp_max = max(self.disp_max, other.disp_max)
        for name in ("offset_flips", "offset_token_flips", "offset_count", "disp_hist"):
            setattr(out, name, _add_padded(getattr(self, name), getattr(other, name)))
        return out

    def result(self) -> LeakageStats:
        """The statistics so far (NaN rates when no token was seen)."""
        n = self.num_experts or 0
        nan = float("nan")
        tokens = self.num_tokens
        cnt = self.offset_count
        with np.errstate(invalid="ignore", divide="ignore"):
            per_off = np.where(cnt > 0, self.offset_flips / (np.maximum(cnt, 1) * max(n, 1)), np.nan)
            per_off_tok = np.where(cnt > 0, self.offset_token_flips / np.maximum(cnt, 1), np.nan)
        return LeakageStats(
            router=self.router, label=self.config.label, k=self.config.k, params=dict(self.params),
            prefix_rule=self.config.entry.prefix, num_experts=self.num_experts,
            num_sequences=self.num_sequences, num_tokens=tokens,
            flip_rate=self.flips / (tokens * n) if tokens else nan,
            token_flip_rate=self.token_flips / tokens if tokens else nan,
            jaccard_distance=self.jaccard_sum / tokens if tokens else nan,
            per_offset=[float(v) for v in per_off], per_offset_count=[int(v) for v in cnt],
            displacement_mean=self.disp_sum / self.disp_steps if self.disp_steps else nan,
            displacement_max=int(self.disp_max), displacement_histogram=[int(v) for v in self.disp_hist],
            displacement_steps=int(self.disp_steps),
            per_offset_token_flip_rate=[float(v) for v in per_off_tok],
            positions_sampled=self.positions_sampled, sampled_sequences=self.sampled_sequences,
            rule_mismatches=self.rule_mismatches,
        )


def prefix_consistency(scores, router, *, k: int | None = None, padding_mask=None, layer: Any = None,
                       max_recompute_tokens: int = DEFAULT_MAX_RECOMPUTE_TOKENS, **params: Any) -> LeakageStats:
    """Information leakage of a router: causal (prefix) decisions versus full-sequence decisions.

    Args:
        scores: (T, N) one sequence or (B, T, N) float — the router's own scores
            (``RouterConfig.entry.scores`` of the logits: the probabilities for TC/EC, the unified
            score for USMoE); torch (any float dtype incl. bfloat16) or numpy. Must be finite.
        router: a registry name (:func:`usmoe_lp.routers.list_routers`) or a RouterConfig.
        k: the model's experts per token (default ``layer.top_k``). ``**params``: the router's
            parameters (``kbar=1.5`` for USMoE, ``capacity_factor=1.25`` for EC).
        padding_mask: (B, T) (or (T,) for 2-D scores) bool, True = padding. Padded tokens are
            removed and each sequence is analysed alone.
        layer: the layer's :class:`usmoe_lp.logs.LayerInfo`, for routers with layer semantics.
        max_recompute_tokens: the ``recompute`` rule's bound (module docstring).

    Returns :class:`LeakageStats`: ``flip_rate``, ``token_flip_rate`` (shares),
    ``jaccard_distance``, ``per_offset`` (flip rate per number of future tokens), and the
    displacement count per appended token. Definitions: module docstring (issue 4; defined here).

    >>> import numpy as np
    >>> s = np.array([[1.0, 0.0], [3.0, 2.0]])   # token 2 outbids token 1 for the budget
    >>> st = prefix_consistency(s, "usmoe", k=1, kbar=1.0)
    >>> st.flip_rate, st.token_flip_rate, st.jaccard_distance, st.per_offset
    (0.25, 0.5, 0.5, [0.0, 0.5])
    >>> st.displacement_mean, st.displacement_histogram
    (1.0, [0, 1])
    >>> prefix_consistency(s, "tc", k=1).flip_rate
    0.0
    """
    p = LeakagePartial.empty(router, k=k, layer=layer, max_recompute_tokens=max_recompute_tokens, **params)
    p.update(scores, padding_mask)
    return p.result()


# ============================================================================ decode-time mismatch
@dataclass(frozen=True)
class DecodeStats:
    """Full-sequence routing versus the routing of a KV-cache decoder (one token per step).

    Attributes:
        label: the router setting; num_experts: N; num_sequences: sequences compared;
            num_tokens: tokens compared (all real tokens, except where sampled).
        token_flips: tokens whose expert set differs; pair_flips: (token, expert) decisions that
            differ. token_flip_rate = token_flips / num_tokens, flip_rate = pair_flips /
            (num_tokens * N) (NaN without tokens).
        positions_sampled: compared tokens that come from sampled sequences (one router call per
            token, ``batch``/``position`` groups, sequences longer than ``max_recompute_tokens``).
    """

    label: str
    num_experts: int
    num_sequences: int
    num_tokens: int
    token_flips: int
    pair_flips: int
    positions_sampled: int = 0

    @property
    def token_flip_rate(self) -> float:
        return self.token_flips / self.num_tokens if self.num_tokens else float("nan")

    @property
    def flip_rate(self) -> float:
        return self.pair_flips / (self.num_tokens * self.num_experts) if self.num_tokens else float("nan")

    def merge(self, other: DecodeStats) -> DecodeStats:
        """Both inputs' counts (same label and N)."""
        if (other.label, other.num_experts) != (self.label, self.num_experts):
            raise InvalidParameter(f"cannot merge decode statistics of {self.label!r} (N = {self.num_experts}) "
                                   f"and {other.label!r} (N = {other.num_experts})")
        return DecodeStats(self.label, self.num_experts, self.num_sequences + other.num_sequences,
                           self.num_tokens + other.num_tokens, self.token_flips + other.token_flips,
                           self.pair_flips + other.pair_flips, self.positions_sampled + other.positions_sampled)

    def to_dict(self) -> dict[str, Any]:
        return json_ready({"label": self.label, "num_experts": self.num_experts, "num_sequences": self.num_sequences,
                           "num_tokens": self.num_tokens, "token_flips": self.token_flips,
                           "pair_flips": self.pair_flips, "token_flip_rate": self.token_flip_rate,
                           "flip_rate": self.flip_rate, "positions_sampled": self.positions_sampled})


def decode_mismatch(scores, router, *, k: int | None = None, padding_mask=None, layer: Any = None,
                    max_recompute_tokens: int = DEFAULT_MAX_RECOMPUTE_TOKENS, **params: Any) -> DecodeStats:
    """How a router's decode-time routing differs from its full-sequence routing.

    Each sequence (real rows of (T, N) or (B, T, N) own scores, ``padding_mask`` True = padding)
    is routed whole (the routing a model trained with the router sees in a full forward) and as a
    KV-cache decoder routes it: ``entry.decode_route`` where the entry has one, else each token as
    a sequence of one token (a (T, 1, N) batch through the router; for routers grouped per
    ``batch`` or ``position``, which would couple that batch, one call per token, at most
    ``max_recompute_tokens`` evenly spaced tokens per sequence). Router arguments as in
    :func:`prefix_consistency`.

    >>> import numpy as np
    >>> s = np.array([[0.9, 0.8], [0.1, 0.2]])   # kbar = 1: the top-2 pairs of the sequence are row 0's
    >>> d = decode_mismatch(s, "usmoe", k=1, kbar=1.0)   # decoding: each token takes its best expert
    >>> d.token_flips, d.pair_flips, d.token_flip_rate
    (2, 2, 1.0)
    """
    config = resolve_config(router, k, layer, params)
    mrt = check_int(max_recompute_tokens, "max_recompute_tokens", low=1)
    seqs, n = _sequences(scores, padding_mask)
    config.check_experts(n)
    ctx = _context(config, n, layer)
    per_call = config.entry.decode_route is None and config.entry.group(config.param_dict) in ("batch", "position")
    tokens = token_flips = pair_flips = sampled = 0
    for s in seqs:
        positions = _sample_positions(s.shape[0], mrt) if per_call else None
        full = _route_mask(config, s[None], ctx)[0]
        if positions is not None:
            full = full[positions]
            sampled += int(positions.size)
        diff = full != _decode_mask(config, s, ctx, positions)
        tokens += diff.shape[0]
        token_flips += int(diff.any(-1).sum())
        pair_flips += int(diff.sum())
    return DecodeStats(config.label, n, len(seqs), tokens, token_flips, pair_flips, sampled)


# ============================================================================ cross-sequence dependence
@dataclass(frozen=True)
class CrossSequenceStats:
    """Dependence of each sequence's routing on the other sequences of its batch.

    Attributes:
        router, label, k, params: the router setting; group: its program's group (``batch`` or
            ``position``).
        num_sequences / num_tokens: sequences with >= 1 real token, real tokens.
        flip_rate, token_flip_rate, jaccard_distance: as in :class:`LeakageStats`, between the
            routing of each real token with its batch and alone, pooled over real tokens.
        per_sequence_flip_rate: flip rate of each sequence (NaN for an all-padding one).
        pairs_batch / pairs_alone: selected token-expert pairs of real tokens in the two routings
            (they can differ through rounding of the budget).
    """

    router: str
    label: str
    k: int
    params: dict
    group: str
    num_sequences: int
    num_tokens: int
    flip_rate: float
    token_flip_rate: float
    jaccard_distance: float
    per_sequence_flip_rate: list[float]
    pairs_batch: int
    pairs_alone: int

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (JSON-serialisable; NaN becomes None)."""
        return json_ready({"router": self.router, "label": self.label, "k": self.k, "params": dict(self.params),
                           "group": self.group, "num_sequences": self.num_sequences, "num_tokens": self.num_tokens,
                           "flip_rate": self.flip_rate, "token_flip_rate": self.token_flip_rate,
                           "jaccard_distance": self.jaccard_distance,
                           "per_sequence_flip_rate": self.per_sequence_flip_rate,
                           "pairs_batch": self.pairs_batch, "pairs_alone": self.pairs_alone})


def cross_sequence_dependence(scores, router="usmoe", *, k: int | None = None, padding_mask=None,
                              layer: Any = None, **params: Any) -> CrossSequenceStats:
    """How much a sequence's routing depends on the other sequences routed with it.

    Args:
        scores: (B, T, N) float (torch incl. bf16, or numpy), finite: the router's own scores.
        router: a registry router whose program couples sequences (``entry.group(params)`` is
            ``batch`` or ``position``: ``"usmoe"`` with ``scope="batch"`` or ``"position"``), with
            ``k`` and its parameters as in :func:`prefix_consistency`, or a RouterConfig.
        padding_mask: (B, T) bool, True = padding (excluded from every group and every statistic).

    With the batch = the router on the (B, T, N) batch; alone = the router on each sequence as a
    batch of one (USMoE ``batch``: c = round_half_up(kbar * real tokens of the sequence);
    ``position``: each position group holds one token, which takes its round_half_up(kbar) best
    experts, ties to the lower expert index).

    Returns :class:`CrossSequenceStats`: flip rate (share of real (token, expert) decisions that
    change), token flip rate and mean Jaccard distance between the two routings. A batch of one
    sequence gives 0. Ties: the routers' rule, lowest flat index of the (B, T, N) tensor first,
    which orders tokens of a sequence the same way in both routings.

    >>> import numpy as np
    >>> s = np.array([[[5.0, 4.0]], [[1.0, 0.0]]])   # two one-token sequences, kbar = 1
    >>> cs = cross_sequence_dependence(s, "usmoe", k=1, kbar=1.0, scope="batch")  # seq 0 takes both pairs
    >>> cs.flip_rate, cs.token_flip_rate, cs.per_sequence_flip_rate
    (0.5, 1.0, [0.5, 0.5])
    """
    config = resolve_config(router, k, layer, params)
    group = config.entry.group(config.param_dict)
    if group not in ("batch", "position"):
        raise InvalidParameter(f"cross-sequence dependence needs a router whose program couples the sequences of a "
                               f"batch (group batch or position); {config.label!r} routes each {group} alone")
    arr = _to_numpy(scores)
    if arr.ndim != 3:
        raise InvalidScores(f"scores must be (B, T, N) for cross-sequence dependence, got shape {tuple(arr.shape)}")
    B, T, N = arr.shape
    config.check_experts(N)
    pm = _padding(padding_mask, arr.shape, False)
    ctx = _context(config, N, layer)
    s = torch.from_numpy(arr)
    pmt = None if pm is None else torch.from_numpy(pm)
    real = np.ones((B, T), dtype=bool) if pm is None else ~pm
    with warnings.catch_warnings():  # a group of padding only routes nothing: expected here
        warnings.simplefilter("ignore", AllPaddingWarning)
        with_batch = _route_mask(config, s, ctx, pmt)
        alone = np.concatenate([_route_mask(config, s[b:b + 1], ctx, None if pmt is None else pmt[b:b + 1])
                                for b in range(B)])
    flips, tok, jac = _set_stats(with_batch, alone)
    ntok = int(real.sum())
    per_seq = []
    for b in range(B):
        nb = int(real[b].sum())
        per_seq.append(float(flips[b][real[b]].sum()) / (nb * N) if nb else float("nan"))
    nan = float("nan")
    return CrossSequenceStats(
        router=config.router, label=config.label, k=config.k, params=config.param_dict, group=group,
        num_sequences=int(real.any(-1).sum()), num_tokens=ntok,
        flip_rate=int(flips[real].sum()) / (ntok * N) if ntok else nan,
        token_flip_rate=int(tok[real].sum()) / ntok if ntok else nan,
        jaccard_distance=float(jac[real].sum()) / ntok if ntok else nan,
        per_sequence_flip_rate=per_seq,
        pairs_batch=int(with_batch[real].sum()), pairs_alone=int(alone[real].sum()))
