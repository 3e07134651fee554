"""Expert co-activation: how often two experts are selected for the same token, against independence.

Source: OLMoE (Muennighoff et al. 2024, arXiv 2409.02060, §5 "Co-activation"), which counts, for each pair of
experts, the tokens routed to both. OLMoE's analysis script counts only the pairs of experts adjacent in each
token's ranked top-8 list; here every unordered pair of a token's selection counts (k(k-1)/2 pairs for a top-k
token), so the counts do not depend on the rank order. Definitions: ``docs/definitions.md``, "Routing patterns".
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from usmoe_lp._json import json_ready
from usmoe_lp._validate import check_int
from usmoe_lp.diagnostics.routed import Routed, pair_counts
from usmoe_lp.errors import ShapeMismatch

__all__ = ["CoactivationPartial", "CoactivationStats"]


@dataclass(frozen=True, eq=False)
class CoactivationStats:
    """Co-activation of the experts of one layer over T tokens (all tokens seen, those with no expert included).

    - ``num_experts``: N; ``tokens``: T.
    - ``counts``: (N, N) int64, C[i, j] = tokens whose selection holds both i and j (symmetric); the diagonal
      C[i, i] = c_i, the tokens that selected i.
    - ``lift``: (N, N) float64, P(i, j) / (P(i) P(j)) = C[i, j] T / (c_i c_j) with P(i) = c_i / T and
      P(i, j) = C[i, j] / T: 1 when i and j are chosen independently, above 1 when together more often. NaN
      where c_i or c_j is 0, and on the diagonal.
    - ``conditional``: (N, N) float64, P(j | i) = C[i, j] / c_i (row i: the tokens of expert i); NaN where
      c_i = 0 and on the diagonal.
    - ``pairs``: int, sum_{i<j} C[i, j], the co-activated pairs counted.
    - ``mean_lift``: the lift of a co-activated pair drawn at random, sum_{i<j} C[i, j] lift[i, j] / pairs
      (about 1 under independence; NaN without a pair).
    - ``max_lift``: the largest off-diagonal lift (NaN when none is defined); ``max_lift_pair``: its (i, j),
      i < j, ties to the first in row-major order (None when undefined).
    - ``top_partner``: (N,) int64, for each expert i the j != i maximising P(j | i) (ties to the lowest j;
      -1 when c_i = 0 or N = 1); ``top_partner_conditional``: (N,) float64 that P(j | i) (NaN when undefined).
    - ``mean_top_conditional``: mean over the experts with c_i > 0 of ``top_partner_conditional`` (OLMoE's
      reading: how strongly an expert's tokens go to one preferred partner; k-1 over N-1 for uniform random
      top-k selections).
    """

    num_experts: int
    tokens: int
    counts: np.ndarray
    lift: np.ndarray
    conditional: np.ndarray
    pairs: int
    mean_lift: float
    max_lift: float
    max_lift_pair: tuple[int, int] | None
    top_partner: np.ndarray
    top_partner_conditional: np.ndarray
    mean_top_conditional: float

    def to_dict(self, matrices: bool = False) -> dict:
        """Plain JSON values keyed by field name (NaN -> None); the (N, N) ``counts``, ``lift`` and
        ``conditional`` only with ``matrices=True`` (N**2 numbers each)."""
        skip = () if matrices else ("counts", "lift", "conditional")
        return json_ready({f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip})


class CoactivationPartial:
    """Mergeable accumulator of :class:`CoactivationStats` (protocol: :mod:`usmoe_lp.diagnostics.partial`).

    State: ``counts`` (N, N) int64 (the C of :class:`CoactivationStats`) and ``tokens``; merging adds them, so
    any cut of the tokens into ranges gives the same result exactly.

    >>> import numpy as np
    >>> from usmoe_lp.diagnostics.routed import Routed
    >>> p = CoactivationPartial.empty(3)
    >>> p.update(Routed(np.array([[0, 1], [0, 1], [2, -1]]), 3, token_ids=[0, 0, 0], sequence_ids=[0, 0, 0],
    ...                 positions=[0, 1, 2]))
    >>> s = p.result()
    >>> s.counts.tolist(), float(s.lift[0, 1])      # 0 and 1 always together: lift T / c = 3 / 2
    ([[2, 2, 0], [2, 2, 0], [0, 0, 1]], 1.5)
    """

    def __init__(self, num_experts: int) -> None:
        self.num_experts = check_int(num_experts, "num_experts", low=1)
        self.counts = np.zeros((self.num_experts, self.num_experts), dtype=np.int64)
        self.tokens = 0

    @classmethod
    def empty(cls, num_experts: int) -> CoactivationPartial:
        """A partial with no token, for N = ``num_experts`` experts."""
        return cls(num_experts)

    def update(self, r: Routed, mask: np.ndarray | None = None) -> None:
        """Add one chunk (in place). mask: optionally ``r.mask()`` when the caller has it."""
        if r.num_experts != self.num_experts:
            raise ShapeMismatch(f"chunk has N = {r.num_experts} experts, this partial was made for {self.num_experts}")
        m = r.mask() if mask is None else mask
        self.counts += pair_counts(m, m)
        self.tokens += r.num_tokens

    def merge(self, other: CoactivationPartial) -> CoactivationPartial:
        """A new partial holding both (neither is modified)."""
        if other.num_experts != self.num_experts:
            raise ShapeMismatch(f"cannot merge co-activation partials of N = {self.num_experts} and "
                                f"{other.num_experts} experts")
        out = CoactivationPartial(self.num_experts)
        out.counts = self.counts + other.counts
        out.tokens = self.tokens + other.tokens
        return out

    def result(self) -> CoactivationStats:
        """The :class:`CoactivationStats` of every token seen."""
        n, t = self.num_experts, self.tokens
        c = np.diag(self.counts).astype(np.float64)
        off = ~np.eye(n, dtype=bool)
        cc = np.outer(c, c)
        with np.errstate(divide="ignore", invalid="ignore"):
            lift = np.where((cc > 0) & off, self.counts * float(t) / cc, np.nan)
            cond = np.where((c[:, None] > 0) & off, self.counts / c[:, None], np.nan)
        upper = np.triu(off)
        pairs = int(self.counts[upper].sum())
        defined = upper & ~np.isnan(lift)
        mean_lift = float((self.counts[defined] * lift[defined]).sum() / pairs) if pairs else float("nan")
        if defined.any():
            vals = np.where(defined, lift, -np.inf)
            i, j = np.unravel_index(int(np.argmax(vals)), vals.shape)
            max_lift, max_pair = float(vals[i, j]), (int(i), int(j))
        else:
            max_lift, max_pair = float("nan"), None
        active = (c > 0) & (n > 1)
        best = np.where(np.isnan(cond), -np.inf, cond)
        partner = np.where(active, np.argmax(best, axis=1), -1).astype(np.int64)
        top_cond = np.where(active, np.max(best, axis=1), np.nan) if n > 1 else np.full(n, np.nan)
        return CoactivationStats(
            num_experts=n, tokens=t, counts=self.counts.copy(), lift=lift, conditional=cond, pairs=pairs,
            mean_lift=mean_lift, max_lift=max_lift, max_lift_pair=max_pair, top_partner=partner,
            top_partner_conditional=top_cond,
            mean_top_conditional=float(top_cond[active].mean()) if active.any() else float("nan"))
