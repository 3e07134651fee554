"""Decision margins of a routing: how far each top-k / global top-c decision is from flipping.

Margins are in score units (the units of whatever scores the router ranked: probabilities,
logits, unified scores). The top-k boundary margin follows Megatron-LM's ``router_diagnostics``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from usmoe_lp._json import json_ready
from usmoe_lp._validate import check_int
from usmoe_lp.diagnostics.load import _as_numpy
from usmoe_lp.errors import InvalidParameter, InvalidScores, ShapeMismatch

DEFAULT_EPS = (1e-3, 1e-2, 5e-2)
BINS_PER_DECADE = 20
HIST_LOW, HIST_HIGH = 1e-8, 1e3


def default_margin_edges() -> np.ndarray:
    """Edges of the margin histogram: 20 log-spaced bins per decade from 1e-8 to 1e3 (221 edges).

    Two more bins are implied: [0, 1e-8) (ties and near-ties) and [1e3, inf).
    """
    decades = int(round(math.log10(HIST_HIGH / HIST_LOW)))
    return np.logspace(math.log10(HIST_LOW), math.log10(HIST_HIGH), decades * BINS_PER_DECADE + 1)


def _scores(scores, name: str = "scores", *, keep_float32: bool = False) -> np.ndarray:
    """(T, N) float64 from (T, N) or (B, T, N) numpy/torch, finite, T >= 0, N >= 1.

    keep_float32: float32 input stays float32 (its values are exactly representable in float64, so
    sorting them first and converting the selected entries later gives the same numbers).
    """
    a = _as_numpy(scores, name)
    if a.ndim == 3:
        a = a.reshape(-1, a.shape[-1])
    if a.ndim != 2:
        raise InvalidScores(f"{name} must be (T, N) or (B, T, N), got {a.ndim}-D shape {tuple(a.shape)}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise InvalidScores(f"{name} must be numeric, got dtype {a.dtype}")
    if a.shape[1] == 0:
        raise InvalidScores(f"{name} has N = 0 experts; need N >= 1")
    if not (keep_float32 and a.dtype == np.float32):
        a = a.astype(np.float64, copy=False)
    if not np.isfinite(a.sum()) and not np.isfinite(a).all():  # the sum is a fast path
        n_nan = int(np.isnan(a).sum())
        raise InvalidScores(
            f"{name} has {n_nan} NaN and {int((~np.isfinite(a)).sum()) - n_nan} Inf entries; "
            "margins need finite scores — drop padding rows instead of filling them with -inf"
        )
    return a


def _check_eps(eps) -> tuple[float, ...]:
    try:
        out = tuple(float(e) for e in eps)
    except TypeError:
        out = (float(eps),)
    if not out or any(not math.isfinite(e) or e < 0 for e in out):
        raise InvalidParameter(f"eps must be a non-empty sequence of finite values >= 0, got {eps!r}")
    return out


def _kth_and_next(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(T,) k-th largest and (k+1)-th largest score of each row (needs k < N)."""
    n = s.shape[1]
    srt = np.sort(s, axis=1)  # for N <= a few hundred a row sort beats a two-point partition
    return srt[:, n - k], srt[:, n - k - 1]


def _round_down(x: np.ndarray, dtype) -> np.ndarray:
    """The largest value of ``dtype`` <= each float64 of ``x`` (x itself for float64)."""
    if dtype == np.float64:
        return x
    r = x.astype(dtype)
    _step(r, r > x, up=False)
    return r


def _round_up(x: np.ndarray, dtype) -> np.ndarray:
    """The smallest value of ``dtype`` >= each float64 of ``x`` (x itself for float64)."""
    if dtype == np.float64:
        return x
    r = x.astype(dtype)
    _step(r, r < x, up=True)
    return r


def _step(r: np.ndarray, where: np.ndarray, up: bool) -> None:
    """Move the float32 entries of ``r`` marked by ``where`` one representable value up or down, in place
    (``np.nextafter`` on the integer view: the same values, several times faster)."""
    if r.dtype != np.float32:
        r[where] = np.nextafter(r[where], r.dtype.type(np.inf if up else -np.inf))
        return
    bits = r.view(np.int32)
    pos, neg = bits > 0, bits < 0  # -0.0 is the most negative int32; +0.0 is 0
    zero = (bits == 0) if not up else (bits == np.int32(-(2**31)))
    bits += (where & (neg if up else pos)) * np.int32(-1)  # toward 0: smaller magnitude
    bits += (where & ((pos | (bits == 0)) if up else neg) & ~zero).astype(np.int32)  # away from 0
    bits[where & zero] = np.int32(1) if up else np.int32(-(2**31) + 1)  # across 0: the smallest subnormal


def fragile_sorted(sorted_rows: np.ndarray, k: int, eps: tuple[float, ...],
                   buffer: np.ndarray | None = None) -> dict[float, int]:
    """{eps: #{(t, e) : |s_{t,e} - b_t| <= eps}} (:func:`fragile_counts`) from the (T, N) rows sorted ascending
    (float32 or float64 numpy, k < N), b_t = (s_(k) + s_(k+1)) / 2 in float64 (exact for float32 scores).

    The k scores above the boundary (s >= s_(k) >= b) are fragile when s <= b + eps, the N - k below when
    s >= b - eps: N comparisons per row and eps, against the bound b +- eps rounded once to float64 (then, for
    float32 rows, to the float32 on its side, which decides every float32 score exactly as the float64 bound
    does); counted over the whole chunk without a per-row sum. buffer: optionally a bool array of at least
    T * N entries to compare into (the caller's reused memory).
    """
    srt = sorted_rows
    t, n = srt.shape
    kth = srt[:, n - k].astype(np.float64)
    nxt = srt[:, n - k - 1].astype(np.float64)
    b = (kth + nxt) / 2
    top, low = srt[:, n - k:], srt[:, :n - k]
    if buffer is None or buffer.size < t * n:
        buffer = np.empty(t * n, dtype=bool)
    buf_top = buffer[: t * k].reshape(t, k)
    buf_low = buffer[t * k : t * n].reshape(t, n - k)
    e = np.asarray(eps, dtype=np.float64)
    his = _round_down(b[:, None] + e, srt.dtype)
    los = _round_up(b[:, None] - e, srt.dtype)
    out = {}
    for i, key in enumerate(eps):
        out[key] = (int(np.count_nonzero(np.less_equal(top, his[:, i : i + 1], out=buf_top)))
                    + int(np.count_nonzero(np.greater_equal(low, los[:, i : i + 1], out=buf_low))))
    return out


def topk_margins(scores, k: int, *, relative: bool = False) -> np.ndarray:
    """Per-token top-k boundary margin (as in Megatron-LM's ``router_diagnostics``).

    Args:
        scores: (T, N) or (B, T, N) float (flattened to (B*T, N)), finite; the scores the router ranks.
        k: experts per token, 1 <= k <= N.
        relative: False (default): raw margin m_t = min_{e in S_t} s_{t,e} - max_{e not in S_t} s_{t,e}
            = s_(k) - s_(k+1) (k-th minus (k+1)-th largest), in score units, >= 0 (0 on a tie).
            True: Megatron ``router_diagnostics`` form m_t / min_{e in S_t} s_{t,e} (unitless; meant
            for positive scores such as probabilities): NaN where the k-th largest score is <= 0.

    Returns (T,) float64. With k == N no expert is left out, there is no boundary and every entry is
    NaN (average with ``np.nanmean`` to get Megatron's "mean over tokens that have a boundary").

    >>> import numpy as np
    >>> topk_margins(np.array([[0.5, 0.3, 0.2], [0.4, 0.4, 0.2]]), k=1)
    array([0.2, 0. ])
    >>> topk_margins(np.array([[0.5, 0.3, 0.2]]), k=1, relative=True)
    array([0.4])
    """
    s = _scores(scores)
    k = check_int(k, "k", low=1, high=s.shape[1])
    if k == s.shape[1]:
        return np.full(s.shape[0], np.nan)
    kth, nxt = _kth_and_next(s, k)
    m = kth - nxt
    if not relative:
        return m
    out = np.full(m.shape, np.nan)
    pos = kth > 0
    out[pos] = m[pos] / kth[pos]
    return out


def fragile_counts(scores, k: int, eps=DEFAULT_EPS) -> dict[float, int]:
    """Number of fragile top-k decisions for each eps.

    A decision is a (token, expert) pair (T*N of them: selected or not). Token t's boundary is
    b_t = (s_(k) + s_(k+1)) / 2, the midpoint of its k-th and (k+1)-th largest scores. The pair
    (t, e) is fragile at eps when |s_{t,e} - b_t| <= eps (inclusive, score units): holding the
    boundary fixed, a perturbation of size eps of s_{t,e} alone could move it across b_t. (Under
    L-inf noise of size eps on all scores, the exact flip condition is that s_{t,e} is within 2*eps
    of the nearest score on the other side of the boundary; the midpoint rule is the fixed-boundary
    version.) With k == N there is no boundary and nothing is fragile.

    Args: scores (T, N) or (B, T, N) float; k with 1 <= k <= N; eps a sequence of floats >= 0.
    Returns {eps: count} (ints).

    >>> import numpy as np
    >>> fragile_counts(np.array([[0.5, 0.3, 0.2]]), k=1, eps=(0.05, 0.15))   # b = 0.4
    {0.05: 0, 0.15: 2}
    """
    s = _scores(scores)
    k = check_int(k, "k", low=1, high=s.shape[1])
    eps = _check_eps(eps)
    if k == s.shape[1] or s.shape[0] == 0:
        return dict.fromkeys(eps, 0)
    return fragile_sorted(np.sort(s, axis=1), k, eps)


# ---------------------------------------------------------------------------------------------
# Global top-c
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GlobalMargin:
    """Margin of a global top-c selection (USMoE): c entries of the whole (T, N) matrix are kept.

    Fields (score units unless said): ``c``; ``num_entries`` (T*N); ``threshold`` (c-th largest
    entry); ``next_value`` ((c+1)-th largest; NaN if c == T*N); ``margin`` = threshold - next_value
    (>= 0, 0 on a tie at the cut; NaN if c == T*N); ``boundary`` = their midpoint; ``ties_at_threshold``
    (entries equal to the threshold: more than one means the cut is decided by the tie-break);
    ``eps`` (the grid); ``within_eps`` {eps: #entries with |s - threshold| <= eps}; ``fragile_share``
    {eps: share of the T*N entries with |s - boundary| <= eps} (same rule as :func:`fragile_counts`).
    """

    c: int
    num_entries: int
    threshold: float
    next_value: float
    margin: float
    boundary: float
    ties_at_threshold: int
    eps: tuple[float, ...]
    within_eps: dict[float, int]
    fragile_share: dict[float, float]

    def to_dict(self) -> dict:
        """JSON-serialisable plain Python; eps keys become strings (``repr`` of the float), NaN None."""
        return json_ready({
            "c": self.c,
            "num_entries": self.num_entries,
            "threshold": self.threshold,
            "next_value": self.next_value,
            "margin": self.margin,
            "boundary": self.boundary,
            "ties_at_threshold": self.ties_at_threshold,
            "eps": list(self.eps),
            "within_eps": {repr(k): v for k, v in self.within_eps.items()},
            "fragile_share": {repr(k): v for k, v in self.fragile_share.items()},
        })


def topc_margin(scores, c: int, eps=DEFAULT_EPS) -> GlobalMargin:
    """Margin of the global top-c cut over the flattened score matrix (USMoE's routing).

    Args:
        scores: (T, N) float, finite (a (B, T, N) array is treated as ONE group of B*T tokens; call
            this per sequence / per batch to match the router's scope).
        c: entries kept, 1 <= c <= T*N.
        eps: grid of tolerances in score units.

    Returns :class:`GlobalMargin`.

    >>> import numpy as np
    >>> g = topc_margin(np.array([[0.9, 0.1], [0.6, 0.5]]), c=2, eps=(0.06,))
    >>> g.threshold, g.next_value, round(g.margin, 6), g.within_eps, g.fragile_share
    (0.6, 0.5, 0.1, {0.06: 1}, {0.06: 0.5})
    """
    s = _scores(scores)
    flat = s.reshape(-1)
    total = int(flat.size)
    if total == 0:
        raise InvalidScores("scores is empty; need T >= 1")
    c = check_int(c, "c", low=1, high=total)
    eps = _check_eps(eps)
    if c < total:
        part = -np.partition(-flat, (c - 1, c))
        thr, nxt = float(part[c - 1]), float(part[c])
        boundary = (thr + nxt) / 2
        d = np.abs(flat - boundary)
        fragile = {e: int((d <= e).sum()) / total for e in eps}
    else:
        thr, nxt = float(flat.min()), float("nan")
        boundary = float("nan")
        fragile = dict.fromkeys(eps, 0.0)
    dt = np.abs(flat - thr)
    return GlobalMargin(
        c=c,
        num_entries=total,
        threshold=thr,
        next_value=nxt,
        margin=thr - nxt,
        boundary=boundary,
        ties_at_threshold=int((flat == thr).sum()),
        eps=eps,
        within_eps={e: int((dt <= e).sum()) for e in eps},
        fragile_share=fragile,
    )


# ---------------------------------------------------------------------------------------------
# Streaming top-k margin statistics
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MarginStats:
    """Top-k margin statistics over many tokens (score units unless said).

    - ``k``, ``num_experts`` (None if no token was seen), ``num_tokens`` (all tokens seen).
    - ``boundary_tokens``: tokens with a boundary (all of them if k < N, none if k == N).
    - ``mean_margin``: exact mean of the raw margin over boundary tokens (NaN if none).
    - ``min_margin``, ``max_margin``: exact extremes (NaN if none).
    - ``median_margin``: from the histogram: the geometric midpoint of the log-spaced bin that
      holds the median (the lower median for even counts), so its relative error is at most a factor
      10**(1/40) ~ 1.059 for margins in [1e-8, 1e3) with the default bins; 0.0 if the median falls in
      [0, first edge) (ties), and the last edge (a lower bound) if it falls beyond the last edge.
    - ``mean_relative_margin``: mean of margin / k-th largest score over boundary tokens whose
      k-th largest score is > 0 (Megatron-LM ``router_diagnostics`` form); ``relative_tokens``: their count.
    - ``fragile_pairs`` {eps: count} and ``fragile_share`` {eps: count / (num_tokens * N)}: see
      :func:`fragile_counts`.
    - ``histogram``: (edges, counts) with counts of length len(edges) + 1: bin 0 is
      [0, edges[0]), bin i is [edges[i-1], edges[i]), the last bin is [edges[-1], inf).
    """

    k: int
    num_experts: int | None
    num_tokens: int
    boundary_tokens: int
    mean_margin: float
    median_margin: float
    min_margin: float
    max_margin: float
    mean_relative_margin: float
    relative_tokens: int
    fragile_pairs: dict[float, int]
    fragile_share: dict[float, float]
    histogram: tuple[tuple[float, ...], tuple[int, ...]]

    def to_dict(self) -> dict:
        """JSON-serialisable plain Python; eps keys become strings (``repr`` of the float), NaN None."""
        return json_ready({
            "k": self.k,
            "num_experts": self.num_experts,
            "num_tokens": self.num_tokens,
            "boundary_tokens": self.boundary_tokens,
            "mean_margin": self.mean_margin,
            "median_margin": self.median_margin,
            "min_margin": self.min_margin,
            "max_margin": self.max_margin,
            "mean_relative_margin": self.mean_relative_margin,
            "relative_tokens": self.relative_tokens,
            "fragile_pairs": {repr(e): v for e, v in self.fragile_pairs.items()},
            "fragile_share": {repr(e): v for e, v in self.fragile_share.items()},
            "histogram": {"edges": list(self.histogram[0]), "counts": list(self.histogram[1])},
        })


class MarginPartial:
    """Mergeable accumulator of :class:`MarginStats` (streaming protocol of the analysis driver).

    State: token counts, exact sums (float64) of margins and relative margins, exact min/max,
    fragile-pair counts per eps (int), and a histogram of margins on fixed edges (int64), so that
    merging two partials is exact (histograms add).

    >>> import numpy as np
    >>> a = MarginPartial.empty(1)
    >>> a.update(np.array([[0.5, 0.3, 0.2]]))
    >>> b = MarginPartial.empty(1)
    >>> b.update(np.array([[0.4, 0.4, 0.2]]))
    >>> r = a.merge(b).result()
    >>> r.num_tokens, round(r.mean_margin, 6), r.min_margin
    (2, 0.1, 0.0)
    """

    def __init__(self, k: int, eps=DEFAULT_EPS, bins=None, num_experts: int | None = None) -> None:
        self.k = check_int(k, "k", low=1)
        self.eps = _check_eps(eps)
        edges = default_margin_edges() if bins is None else np.asarray(bins, dtype=np.float64)
        if edges.ndim != 1 or edges.size < 1 or not np.isfinite(edges).all() or (edges <= 0).any():
            raise InvalidParameter("bins must be a 1-D sequence of finite positive histogram edges")
        if (np.diff(edges) <= 0).any():
            raise InvalidParameter("bins (histogram edges) must be strictly increasing")
        self.edges = edges
        self.num_experts = None if num_experts is None else check_int(num_experts, "num_experts", low=self.k)
        self.num_tokens = 0
        self.boundary_tokens = 0
        self.margin_sum = 0.0
        self.min_margin = math.inf
        self.max_margin = -math.inf
        self.relative_sum = 0.0
        self.relative_tokens = 0
        self.fragile = dict.fromkeys(self.eps, 0)
        self.hist = np.zeros(edges.size + 1, dtype=np.int64)

    @classmethod
    def empty(cls, k: int, eps=DEFAULT_EPS, bins=None, *, num_experts: int | None = None) -> MarginPartial:
        """An accumulator with no token yet.

        Args: k experts per token; eps grid (score units); bins histogram edges (default
        :func:`default_margin_edges`); num_experts optional N (otherwise fixed by the first update).
        """
        return cls(k, eps, bins, num_experts)

    def update(self, scores, k: int | None = None, *, sorted_rows=None) -> None:
        """Consume one chunk: scores (T, N) or (B, T, N) float. ``k`` if given must equal the
        accumulator's k (a guard for callers that pass it along). ``sorted_rows``: optionally the
        (T, N) rows of ``scores`` sorted ascending (``np.sort(scores, axis=1)``, numpy or torch), when
        the caller already has them; they are trusted to be the sorted scores (only their shape is
        checked). The statistics are those of :meth:`update_sorted` on the sorted rows."""
        if k is not None and check_int(k, "k", low=1) != self.k:
            raise InvalidParameter(f"this accumulator was made for k = {self.k}, update got k = {k}")
        s = _scores(scores, keep_float32=True)
        n = s.shape[1]
        if self.num_experts is None and self.k > n:
            raise InvalidParameter(f"k = {self.k} > N = {n} experts; need 1 <= k <= N")
        if sorted_rows is None:
            srt = np.sort(s, axis=1) if self.k < n else s  # float32 rows sort with SIMD, in float64's order
        else:
            srt = _as_numpy(sorted_rows, "sorted_rows")
            if srt.ndim == 3:
                srt = srt.reshape(-1, srt.shape[-1])
            if srt.shape != s.shape:
                raise ShapeMismatch(f"sorted_rows has shape {tuple(srt.shape)} but scores have {tuple(s.shape)}")
        self.update_sorted(srt)

    def update_sorted(self, sorted_rows: np.ndarray, buffer: np.ndarray | None = None) -> None:
        """Consume one chunk given by its (T, N) score rows sorted ascending: numpy float32 or float64, finite,
        each row sorted (``np.sort(scores, axis=1)``; trusted, only N is checked). Every statistic of the
        partial is a function of each row's sorted values; :meth:`update` sorts and calls this, the streaming
        analysis (:class:`usmoe_lp.diagnostics.stream.LayerStream`) calls it with the rows it sorted once for
        the model's top-k. Margins m_t = s_(k) - s_(k+1) are formed in float64 (exact for float32 scores).
        buffer: optionally a bool array of at least T * N entries to work in (:func:`fragile_sorted`)."""
        srt = sorted_rows
        t, n = srt.shape
        if self.num_experts is None:
            if self.k > n:
                raise InvalidParameter(f"k = {self.k} > N = {n} experts; need 1 <= k <= N")
            self.num_experts = n
        elif n != self.num_experts:
            raise ShapeMismatch(f"scores have N = {n} experts but this accumulator has N = {self.num_experts}")
        if t == 0:
            return
        self.num_tokens += t
        if self.k == n:
            return
        kth = srt[:, n - self.k].astype(np.float64)
        m = kth - srt[:, n - self.k - 1]
        self.boundary_tokens += t
        self.margin_sum += float(m.sum())
        self.min_margin = min(self.min_margin, float(m.min()))
        self.max_margin = max(self.max_margin, float(m.max()))
        pos = kth > 0
        self.relative_sum += float((m[pos] / kth[pos]).sum())
        self.relative_tokens += int(np.count_nonzero(pos))
        for e, cnt in fragile_sorted(srt, self.k, self.eps, buffer).items():
            self.fragile[e] += cnt
        self.hist += np.bincount(np.searchsorted(self.edges, m, side="right"), minlength=self.hist.size)

    def merge(self, other: MarginPartial) -> MarginPartial:
        """A NEW accumulator with the tokens of both; InvalidParameter if k, eps, bins or N differ."""
        if not isinstance(other, MarginPartial):
            raise InvalidParameter(f"can only merge a MarginPartial with a MarginPartial, got {type(other).__name__}")
        if other.k != self.k:
            raise InvalidParameter(f"cannot merge margin partials with different k ({self.k} vs {other.k})")
        if other.eps != self.eps:
            raise InvalidParameter(f"cannot merge margin partials with different eps grids ({self.eps} vs {other.eps})")
        if other.edges.shape != self.edges.shape or not (other.edges == self.edges).all():
            raise InvalidParameter("cannot merge margin partials with different histogram edges")
        if None not in (self.num_experts, other.num_experts) and self.num_experts != other.num_experts:
            raise InvalidParameter(
                f"cannot merge margin partials with different numbers of experts ({self.num_experts} vs "
                f"{other.num_experts})"
            )
        out = MarginPartial(self.k, self.eps, self.edges, None)
        out.num_experts = self.num_experts if self.num_experts is not None else other.num_experts
        out.num_tokens = self.num_tokens + other.num_tokens
        out.boundary_tokens = self.boundary_tokens + other.boundary_tokens
        out.margin_sum = self.margin_sum + other.margin_sum
        out.min_margin = min(self.min_margin, other.min_margin)
        out.max_margin = max(self.max_margin, other.max_margin)
        out.relative_sum = self.relative_sum + other.relative_sum
        out.relative_tokens = self.relative_tokens + other.relative_tokens
        out.fragile = {e: self.fragile[e] + other.fragile[e] for e in self.eps}
        out.hist = self.hist + other.hist
        return out

    def _median(self) -> float:
        if self.boundary_tokens == 0:
            return float("nan")
        target = (self.boundary_tokens + 1) // 2  # rank of the lower median, 1-based
        b = int(np.searchsorted(np.cumsum(self.hist), target, side="left"))
        if b == 0:
            return 0.0
        if b == self.edges.size:
            return float(self.edges[-1])
        return float(math.sqrt(self.edges[b - 1] * self.edges[b]))

    def result(self) -> MarginStats:
        """The :class:`MarginStats` of every token consumed so far."""
        nb, nan = self.boundary_tokens, float("nan")
        pairs = self.num_tokens * (self.num_experts or 0)
        return MarginStats(
            k=self.k,
            num_experts=self.num_experts,
            num_tokens=self.num_tokens,
            boundary_tokens=nb,
            mean_margin=self.margin_sum / nb if nb else nan,
            median_margin=self._median(),
            min_margin=self.min_margin if nb else nan,
            max_margin=self.max_margin if nb else nan,
            mean_relative_margin=self.relative_sum / self.relative_tokens if self.relative_tokens else nan,
            relative_tokens=self.relative_tokens,
            fragile_pairs=dict(self.fragile),
            fragile_share={e: (v / pairs if pairs else nan) for e, v in self.fragile.items()},
            histogram=(tuple(float(x) for x in self.edges), tuple(int(x) for x in self.hist)),
        )


def margin_stats(scores, k: int, eps=DEFAULT_EPS, bins=None) -> MarginStats:
    """Top-k margin statistics of one (T, N) or (B, T, N) score array in one call.

    Equivalent to ``MarginPartial.empty(k, eps, bins)`` + one ``update`` + ``result()``; see
    :class:`MarginStats` for every definition.

    >>> import numpy as np
    >>> s = margin_stats(np.array([[0.5, 0.3, 0.2], [0.4, 0.4, 0.2]]), k=1, eps=(0.05,))
    >>> round(s.mean_margin, 6), s.fragile_pairs, s.fragile_share
    (0.1, {0.05: 2}, {0.05: 0.333333})
    """
    acc = MarginPartial.empty(k, eps, bins)
    acc.update(scores)
    return acc.result()
