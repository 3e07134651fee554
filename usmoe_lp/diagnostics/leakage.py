"""Information leakage of non-causal routers: prefix consistency and cross-sequence dependence.

Definitions (issue 4; defined in this project, since no MoE tool we know of measures leakage; motivated
by the non-causal selection of Expert Choice, Zhou et al. 2022, and Mixture-of-Depths, Raposo et al.
2024; results in papers/routing-as-lp.md §5.3). For one sequence with router scores S, (T, N) float
(the caller passes the router's own scores, e.g. the unified score for USMoE):

* D_full — the routing of the whole sequence;
* D_{<=t} — the routing of the prefix 1..t with the budget the router would use for a sequence of
  length t: Token Choice ``"tc"`` k experts per token; Expert Choice ``"ec"`` e_t =
  min(ceil(capacity_factor * t * k / N), t) tokens per expert (as :func:`expert_choice` computes
  it); global top-c ``"usmoe"`` c_t = round_half_up(kbar * t) pairs of the prefix (as
  ``global_topc(kbar=..., scope="sequence")``);
* the *causal decision* of token t is D_{<=t}(t, :) — what an autoregressive decoder computes for
  token t, which cannot see the future.

Ties are broken exactly as the routers of :mod:`usmoe_lp.routing` break them (lowest flat index
first within the group: for the global top-c the row-major index t * N + e of the sequence, for
Expert Choice the lower position t within the expert's column), so a brute-force oracle that
calls the routers on every prefix agrees exactly, tied inputs included.

Statistics (pooled over the tokens of all analysed sequences, token-weighted):

* ``flip_rate`` — share of (token, expert) decisions that differ, mean_{t,e} 1[D_{<=t}(t,e) !=
  D_full(t,e)]. Unit: share in [0, 1].
* ``token_flip_rate`` — share of tokens whose expert *set* differs.
* ``jaccard`` — mean over tokens of the Jaccard **distance** 1 - |A ∩ B| / |A ∪ B| between the
  causal set A and the full-sequence set B; two empty sets (possible under the global top-c and
  fractional k-bar) count as distance 0.
* ``per_offset`` — the flip rate as a function of the offset T - t, the number of future tokens
  (offset 0 is the last token, identical by definition). Kept as integer sums and token counts
  per offset, so sequences of different lengths merge exactly.
* ``displacement`` — for t = 2..T, the number of EARLIER tokens s < t whose expert set in
  D_{<=t} differs from that in D_{<=t-1}: how many past decisions one appended token changes
  (a "budget-displacement count", defined here). Mean, max and histogram over all steps.

Choice where definitions could differ: a flip rate could also be averaged over all pairs s <= t of
every prefix; issue 4 (followed here) compares the causal decision of each token with the full
routing, which is what decoding actually changes. Token Choice is leak-free: every statistic is
exactly 0 (a sanity check).

Algorithm (never re-routes a prefix from scratch): the entries are ranked once in the routers'
total order (score descending, flat index ascending); the selected set of the growing prefix is
kept as two heaps (selected: worst on top; unselected: best on top). Appending a row pushes its
entries and moves only the entries that cross the threshold, so each step costs O((N + moves)
log(T N)); the entries that cross are exactly the earlier decisions that change (displacement).
Expert Choice runs the same per expert column. One sequence of 4096 tokens x 64 experts takes
well under a second on one core (``benchmarks/bench_leakage.py``).

Cross-sequence dependence (:func:`cross_sequence_dependence`): how a sequence's routing changes
with the other sequences of its batch under batch- or position-scoped top-c (and Expert Choice
grouped over the batch, flaxformer style).
"""

from __future__ import annotations

import heapq
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from usmoe_lp._validate import as_score_tensor, check_int, round_half_up
from usmoe_lp.errors import AllPaddingWarning, InvalidParameter, InvalidScores, ShapeMismatch
from usmoe_lp.routing.routers import expert_capacity, expert_choice, global_topc

ROUTERS = ("tc", "ec", "usmoe")

__all__ = ["ROUTERS", "CrossSequenceStats", "LeakagePartial", "LeakageStats", "cross_sequence_dependence",
           "prefix_consistency"]


# ============================================================================ input handling
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
    """padding_mask as (B, T) bool (True = padding) or None."""
    if padding_mask is None:
        return None
    pm = padding_mask.detach().cpu().numpy() if isinstance(padding_mask, torch.Tensor) else np.asarray(padding_mask)
    if two_d and pm.ndim == 1:
        pm = pm[None, :]
    if tuple(pm.shape) != tuple(shape3[:2]):
        want = (shape3[1],) if two_d else shape3[:2]
        raise ShapeMismatch(f"padding_mask has shape {tuple(np.asarray(padding_mask).shape)}; expected "
                            f"{tuple(want)} (True marks padding, as in usmoe_lp.routing)")
    if pm.dtype != bool:
        if not (np.issubdtype(pm.dtype, np.integer) and np.isin(pm, (0, 1)).all()):
            raise ShapeMismatch(f"padding_mask must be bool (True = padding), got dtype {pm.dtype}")
        pm = pm.astype(bool)
    return pm


def _sequences(scores, padding_mask):
    """Yield each sequence's real rows as a (T_b, N) float array (padding removed); also return N."""
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


def _router_params(router, k, kbar, capacity_factor) -> dict[str, Any]:
    """Validate the router name and its parameters (N-independent checks); return the params dict."""
    if router not in ROUTERS:
        raise InvalidParameter(f"router must be one of {ROUTERS} ('tc' Token Choice, 'ec' Expert Choice, "
                               f"'usmoe' global top-c), got {router!r}")
    if router in ("tc", "ec"):
        if k is None:
            raise InvalidParameter(f"router {router!r} needs k= (experts per token)")
        if kbar is not None:
            raise InvalidParameter(f"kbar= is a parameter of router 'usmoe', not {router!r}; pass k=")
        params: dict[str, Any] = {"k": check_int(k, "k", low=1)}
    else:
        if kbar is None:
            raise InvalidParameter("router 'usmoe' needs kbar= (average experts per token; c_t = "
                                   "round_half_up(kbar * t))")
        if k is not None:
            raise InvalidParameter("k= is not a parameter of router 'usmoe'; pass kbar=")
        try:
            kb = float(kbar)
        except (TypeError, ValueError):
            kb = float("nan")
        if not (math.isfinite(kb) and kb >= 0):
            raise InvalidParameter(f"kbar must be a finite number >= 0, got {kbar!r}")
        params = {"kbar": kb}
    try:
        cf = float(capacity_factor)
    except (TypeError, ValueError):
        cf = float("nan")
    if not (math.isfinite(cf) and cf > 0):
        raise InvalidParameter(f"capacity_factor must be a finite number > 0, got {capacity_factor!r}")
    if router == "ec":
        params["capacity_factor"] = cf
    elif cf != 1.0:
        raise InvalidParameter(f"capacity_factor applies to router 'ec' only, got {capacity_factor!r} for {router!r}")
    return params


def _check_n(router: str, params: Mapping[str, Any], n: int) -> None:
    if router in ("tc", "ec") and params["k"] > n:
        raise InvalidParameter(f"k = {params['k']} exceeds the number of experts N = {n}")
    if router == "usmoe" and params["kbar"] > n:
        raise InvalidParameter(f"kbar = {params['kbar']} exceeds the number of experts N = {n}")


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


def _ec_caps(T: int, k: int, cf: float, n: int) -> list[int]:
    return [min(expert_capacity(cf, t, k, n), t) for t in range(1, T + 1)]


def _sequence_decisions(s: np.ndarray, router: str, params: Mapping[str, Any]):
    """(causal (T, N) bool, full (T, N) bool, displacement (T - 1,) int64) of one sequence."""
    T, N = s.shape
    if router == "tc":  # leak-free: the decision of token t depends on row t only
        mask = np.zeros((T, N), dtype=bool)
        return mask, mask, np.zeros(max(T - 1, 0), dtype=np.int64)
    if router == "ec":
        return _ec_prefixes(s, _ec_caps(T, params["k"], params["capacity_factor"], N))
    kb = params["kbar"]
    return _topc_prefixes(s, [round_half_up(kb * t) for t in range(1, T + 1)])


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
def _nan_to_none(x):
    return None if isinstance(x, float) and math.isnan(x) else x


@dataclass(frozen=True)
class LeakageStats:
    """Prefix-consistency (information leakage) statistics of one router; see the module docstring.

    Attributes:
        router: ``"tc"``, ``"ec"`` or ``"usmoe"``; params: its parameters (``k``,
            ``capacity_factor``, ``kbar``).
        num_experts: N; num_sequences: sequences analysed (those with >= 1 real token);
            num_tokens: real tokens analysed.
        flip_rate: share of (token, expert) causal decisions that differ from the full routing.
        token_flip_rate: share of tokens whose causal expert set differs.
        jaccard: mean Jaccard distance (0 for two empty sets) between causal and full sets.
        per_offset: flip rate per offset T - t (index = offset), NaN where no token has it;
            per_offset_count: tokens per offset.
        displacement_mean / displacement_max / displacement_histogram: earlier tokens whose
            expert set changes when one token is appended (histogram[d] = steps with d changes),
            over the T - 1 steps of every sequence; mean NaN and max 0 when there is no step.
    """

    router: str
    params: dict
    num_experts: int | None
    num_sequences: int
    num_tokens: int
    flip_rate: float
    token_flip_rate: float
    jaccard: float
    per_offset: list[float]
    per_offset_count: list[int]
    displacement_mean: float
    displacement_max: int
    displacement_histogram: list[int]
    displacement_steps: int = 0
    per_offset_token_flip_rate: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (JSON-serialisable; NaN becomes None)."""
        return {
            "router": self.router, "params": dict(self.params), "num_experts": self.num_experts,
            "num_sequences": self.num_sequences, "num_tokens": self.num_tokens,
            "flip_rate": _nan_to_none(self.flip_rate), "token_flip_rate": _nan_to_none(self.token_flip_rate),
            "jaccard": _nan_to_none(self.jaccard), "per_offset": [_nan_to_none(v) for v in self.per_offset],
            "per_offset_count": list(self.per_offset_count),
            "per_offset_token_flip_rate": [_nan_to_none(v) for v in self.per_offset_token_flip_rate],
            "displacement_mean": _nan_to_none(self.displacement_mean), "displacement_max": self.displacement_max,
            "displacement_histogram": list(self.displacement_histogram),
            "displacement_steps": self.displacement_steps,
        }

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


class LeakagePartial:
    """Mergeable accumulator of prefix-consistency statistics (streaming protocol of the diagnostics).

    A chunk is a set of whole sequences: the analysis of a sequence needs all its tokens, so
    ``update`` takes (T, N) (one sequence) or (B, T, N) with an optional (B, T) ``padding_mask``
    (True = padding; padded tokens are removed and each sequence is analysed alone). Every
    accumulator is an integer count except the sum of Jaccard distances (float64), so merging is
    exact (the Jaccard sum to float round-off).

    >>> import numpy as np
    >>> p = LeakagePartial.empty("usmoe", kbar=1.0)
    >>> p.update(np.array([[1.0, 0.0], [3.0, 2.0]]))
    >>> p.result().flip_rate, p.result().displacement_histogram
    (0.25, [0, 1])
    """

    def __init__(self, router: str, params: dict, num_experts: int | None = None):
        self.router = router
        self.params = dict(params)
        self.num_experts = num_experts
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

    @classmethod
    def empty(cls, router: str, *, k: int | None = None, kbar: float | None = None, capacity_factor: float = 1.0,
              num_experts: int | None = None) -> LeakagePartial:
        """An empty accumulator for ``router`` in {"tc", "ec", "usmoe"} (tc: k; ec: k and
        capacity_factor; usmoe: kbar). ``num_experts`` is fixed by the first update if not given."""
        params = _router_params(router, k, kbar, capacity_factor)
        if num_experts is not None:
            num_experts = check_int(num_experts, "num_experts", low=1)
            _check_n(router, params, num_experts)
        return cls(router, params, num_experts)

    def update(self, scores, padding_mask=None) -> None:
        """Add whole sequences: scores (T, N) or (B, T, N) float (torch incl. bf16, or numpy);
        padding_mask (T,) / (B, T) bool, True = padding."""
        seqs, n = _sequences(scores, padding_mask)
        if self.num_experts is None:
            _check_n(self.router, self.params, n)
            self.num_experts = n
        elif n != self.num_experts:
            raise ShapeMismatch(f"scores have N = {n} experts but this accumulator has {self.num_experts}")
        for s in seqs:
            self._add_sequence(s)

    def _add_sequence(self, s: np.ndarray) -> None:
        T = s.shape[0]
        causal, full, disp = _sequence_decisions(s, self.router, self.params)
        flips, tok, jac = _set_stats(causal, full)
        self.num_sequences += 1
        self.num_tokens += T
        self.flips += int(flips.sum())
        self.token_flips += int(tok.sum())
        self.jaccard_sum += float(jac.sum())
        # offset of token t (0-based) is T - 1 - t: reverse so that index = offset.
        self.offset_flips = _add_padded(self.offset_flips, flips[::-1])
        self.offset_token_flips = _add_padded(self.offset_token_flips, tok[::-1].astype(np.int64))
        self.offset_count = _add_padded(self.offset_count, np.ones(T, dtype=np.int64))
        if disp.size:
            self.disp_sum += int(disp.sum())
            self.disp_steps += int(disp.size)
            self.disp_max = max(self.disp_max, int(disp.max()))
            self.disp_hist = _add_padded(self.disp_hist, np.bincount(disp).astype(np.int64))

    def merge(self, other: LeakagePartial) -> LeakagePartial:
        """A NEW accumulator holding both inputs' sequences (neither input is changed)."""
        if not isinstance(other, LeakagePartial):
            raise InvalidParameter(f"can only merge a LeakagePartial, got {type(other).__name__}")
        if other.router != self.router or other.params != self.params:
            raise InvalidParameter(f"cannot merge leakage partials of different routers/params: "
                                   f"{self.router} {self.params} vs {other.router} {other.params}")
        if None not in (self.num_experts, other.num_experts) and self.num_experts != other.num_experts:
            raise InvalidParameter(f"cannot merge leakage partials with N = {self.num_experts} and "
                                   f"N = {other.num_experts} experts")
        out = LeakagePartial(self.router, self.params,
                             self.num_experts if self.num_experts is not None else other.num_experts)
        for name in ("num_sequences", "num_tokens", "flips", "token_flips", "jaccard_sum", "disp_sum",
                     "disp_steps"):
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
            router=self.router, params=dict(self.params), num_experts=self.num_experts,
            num_sequences=self.num_sequences, num_tokens=tokens,
            flip_rate=self.flips / (tokens * n) if tokens else nan,
            token_flip_rate=self.token_flips / tokens if tokens else nan,
            jaccard=self.jaccard_sum / tokens if tokens else nan,
            per_offset=[float(v) for v in per_off], per_offset_count=[int(v) for v in cnt],
            displacement_mean=self.disp_sum / self.disp_steps if self.disp_steps else nan,
            displacement_max=int(self.disp_max), displacement_histogram=[int(v) for v in self.disp_hist],
            displacement_steps=int(self.disp_steps),
            per_offset_token_flip_rate=[float(v) for v in per_off_tok],
        )


def prefix_consistency(scores, router: str, *, k: int | None = None, kbar: float | None = None,
                       capacity_factor: float = 1.0, padding_mask=None) -> LeakageStats:
    """Information leakage of a router: causal (prefix) decisions versus full-sequence decisions.

    Args:
        scores: (T, N) one sequence or (B, T, N) float — the router's own scores (unified scores
            for USMoE); torch (any float dtype incl. bfloat16) or numpy. Must be finite.
        router: ``"tc"`` (needs ``k``), ``"ec"`` (``k`` and ``capacity_factor``: e_t =
            min(ceil(capacity_factor * t * k / N), t)) or ``"usmoe"`` (``kbar``: c_t =
            round_half_up(kbar * t), kbar <= N).
        padding_mask: (B, T) (or (T,) for 2-D scores) bool, True = padding. Padded tokens are
            removed and each sequence is analysed alone.

    Returns :class:`LeakageStats`: ``flip_rate``, ``token_flip_rate`` (shares), ``jaccard`` (mean
    Jaccard distance), ``per_offset`` (flip rate per number of future tokens), and the displacement
    count per appended token. Definitions: module docstring (issue 4; defined in this project).

    >>> import numpy as np
    >>> s = np.array([[1.0, 0.0], [3.0, 2.0]])   # token 2 outbids token 1 for the budget
    >>> st = prefix_consistency(s, "usmoe", kbar=1.0)
    >>> st.flip_rate, st.token_flip_rate, st.jaccard, st.per_offset
    (0.25, 0.5, 0.5, [0.0, 0.5])
    >>> st.displacement_mean, st.displacement_histogram
    (1.0, [0, 1])
    >>> prefix_consistency(s, "tc", k=1).flip_rate
    0.0
    """
    p = LeakagePartial.empty(router, k=k, kbar=kbar, capacity_factor=capacity_factor)
    p.update(scores, padding_mask)
    return p.result()


# ============================================================================ cross-sequence dependence
@dataclass(frozen=True)
class CrossSequenceStats:
    """Dependence of each sequence's routing on the other sequences of its batch.

    Attributes:
        router: ``"usmoe"`` (global top-c) or ``"ec"`` (Expert Choice grouped over the batch);
            scope: ``"batch"`` or ``"position"``; params: ``kbar`` or ``k``/``capacity_factor``.
        num_sequences / num_tokens: sequences with >= 1 real token, real tokens.
        flip_rate, token_flip_rate, jaccard: as in :class:`LeakageStats`, between the routing of
            each real token with its batch and alone, pooled over real tokens.
        per_sequence_flip_rate: flip rate of each sequence (NaN for an all-padding one).
        pairs_batch / pairs_alone: selected token-expert pairs of real tokens in the two routings
            (they can differ through rounding of the budget).
    """

    router: str
    scope: str
    params: dict
    num_sequences: int
    num_tokens: int
    flip_rate: float
    token_flip_rate: float
    jaccard: float
    per_sequence_flip_rate: list[float]
    pairs_batch: int
    pairs_alone: int

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (JSON-serialisable; NaN becomes None)."""
        return {"router": self.router, "scope": self.scope, "params": dict(self.params),
                "num_sequences": self.num_sequences, "num_tokens": self.num_tokens,
                "flip_rate": _nan_to_none(self.flip_rate), "token_flip_rate": _nan_to_none(self.token_flip_rate),
                "jaccard": _nan_to_none(self.jaccard),
                "per_sequence_flip_rate": [_nan_to_none(v) for v in self.per_sequence_flip_rate],
                "pairs_batch": self.pairs_batch, "pairs_alone": self.pairs_alone}


def cross_sequence_dependence(scores, *, kbar: float | None = None, scope: str = "batch", padding_mask=None,
                              router: str = "usmoe", k: int | None = None,
                              capacity_factor: float = 1.0) -> CrossSequenceStats:
    """How much a sequence's routing depends on the other sequences routed with it.

    Args:
        scores: (B, T, N) float (torch incl. bf16, or numpy), finite.
        kbar: experts per token of the global top-c (router ``"usmoe"``).
        scope: ``"batch"`` — routed with the batch = ``global_topc(scope="batch")`` (one group of
            all real tokens, c = round_half_up(kbar * real tokens of the batch)); routed alone =
            ``global_topc(scope="sequence")`` (c = round_half_up(kbar * real tokens of the
            sequence)). ``"position"`` — with the batch = ``global_topc(scope="position")`` (one
            group per position across the batch); alone = the same call on a batch of that one
            sequence, i.e. each position group holds one token, which then takes its
            round_half_up(kbar) best experts (ties: lower expert index).
        padding_mask: (B, T) bool, True = padding (excluded from every group and every statistic).
        router: ``"usmoe"`` (default) or ``"ec"`` — Expert Choice grouped over the batch as in
            flaxformer (``scope="batch"`` only; needs ``k``, ``capacity_factor``): with the batch =
            ``expert_choice`` on the (1, B*T, N) concatenation, capacity ceil(cf * real tokens of
            the batch * k / N); alone = ``expert_choice`` per sequence.

    Returns :class:`CrossSequenceStats`: flip rate (share of real (token, expert) decisions that
    change), token flip rate and mean Jaccard distance between the two routings. A batch of one
    sequence gives 0 for every scope. Ties: the routers' rule, lowest flat index of the (B, T, N)
    tensor first, which orders tokens of a sequence the same way in both routings.

    >>> import numpy as np
    >>> s = np.array([[[5.0, 4.0]], [[1.0, 0.0]]])   # two one-token sequences, kbar = 1
    >>> cs = cross_sequence_dependence(s, kbar=1.0, scope="batch")  # sequence 0 takes both pairs
    >>> cs.flip_rate, cs.token_flip_rate, cs.per_sequence_flip_rate
    (0.5, 1.0, [0.5, 0.5])
    """
    if router not in ("usmoe", "ec"):
        raise InvalidParameter(f"cross_sequence_dependence supports router 'usmoe' or 'ec', got {router!r}")
    if scope not in ("batch", "position"):
        raise InvalidParameter(f"scope must be 'batch' or 'position', got {scope!r}")
    params = _router_params(router, k, kbar, capacity_factor)
    if router == "ec" and scope != "batch":
        raise InvalidParameter("Expert Choice cross-sequence dependence is defined for scope='batch' only")
    arr = _to_numpy(scores)
    if arr.ndim != 3:
        raise InvalidScores(f"scores must be (B, T, N) for cross-sequence dependence, got shape {tuple(arr.shape)}")
    B, T, N = arr.shape
    _check_n(router, params, N)
    pm = _padding(padding_mask, arr.shape, False)
    s = torch.from_numpy(arr)
    pmt = None if pm is None else torch.from_numpy(pm)
    real = np.ones((B, T), dtype=bool) if pm is None else ~pm
    with warnings.catch_warnings():  # a group of padding only (a padded position, one padded token) routes nothing
        warnings.simplefilter("ignore", AllPaddingWarning)
        if router == "usmoe":
            kb = params["kbar"]
            with_batch = global_topc(s, kbar=kb, scope=scope, padding_mask=pmt).mask.numpy()
            if scope == "batch":
                alone = global_topc(s, kbar=kb, scope="sequence", padding_mask=pmt).mask.numpy()
            else:
                one = global_topc(s.reshape(B * T, 1, N), kbar=kb, scope="sequence",
                                  padding_mask=None if pmt is None else pmt.reshape(B * T, 1))
                alone = one.mask.numpy().reshape(B, T, N)
        else:
            kk, cf = params["k"], params["capacity_factor"]
            grouped = expert_choice(s.reshape(1, B * T, N), capacity_factor=cf, k=kk,
                                    padding_mask=None if pmt is None else pmt.reshape(1, B * T))
            with_batch = grouped.mask.numpy().reshape(B, T, N)
            alone = expert_choice(s, capacity_factor=cf, k=kk, padding_mask=pmt).mask.numpy()
    flips, tok, jac = _set_stats(with_batch, alone)
    ntok = int(real.sum())
    per_seq = []
    for b in range(B):
        nb = int(real[b].sum())
        per_seq.append(float(flips[b][real[b]].sum()) / (nb * N) if nb else float("nan"))
    nan = float("nan")
    return CrossSequenceStats(
        router=router, scope=scope, params=params, num_sequences=int(real.any(-1).sum()), num_tokens=ntok,
        flip_rate=int(flips[real].sum()) / (ntok * N) if ntok else nan,
        token_flip_rate=int(tok[real].sum()) / ntok if ntok else nan,
        jaccard=float(jac[real].sum()) / ntok if ntok else nan,
        per_sequence_flip_rate=per_seq,
        pairs_batch=int(with_batch[real].sum()), pairs_alone=int(alone[real].sum()))
