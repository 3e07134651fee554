"""Domain specialisation: how differently the experts are used on text of different domains.

Source: OLMoE (Muennighoff et al. 2024, arXiv 2409.02060, §5 "Domain specialization" and its analysis
notebooks), which plots, per domain (arXiv, GitHub, Wikipedia, ...), the share of the domain's tokens routed to
each expert against the uniform share k/N. Here every expert of a token's selection counts (not the top-1
only). The per-domain scalar is the total-variation distance to the all-domain expert distribution.
Definitions: ``docs/definitions.md``, "Routing patterns".
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from usmoe_lp._json import json_ready
from usmoe_lp._validate import check_int
from usmoe_lp.diagnostics.routed import Routed, pair_counts
from usmoe_lp.errors import InvalidParameter, InvalidScores, ShapeMismatch

__all__ = ["DomainPartial", "DomainStats"]


@dataclass(frozen=True, eq=False)
class DomainStats:
    """Expert use per domain (D domains, N experts); tokens with domain -1 are left out.

    - ``domain_names``: the D names, index d = the domain index of the tokens; ``num_experts``: N.
    - ``tokens``: labelled tokens; ``unlabelled_tokens``: tokens with domain -1; ``domain_tokens``: (D,) int64 T_d.
    - ``counts``: (D, N) int64, c_e^(d) = tokens of domain d that selected e (every expert of the selection).
    - ``experts_per_token``: (D,) float64 k_d = sum_e c_e^(d) / T_d, the domain's mean experts per token.
    - ``share``: (D, N) float64 share_d(e) = k_d c_e^(d) / sum_e c_e^(d) = c_e^(d) / T_d, the share of the
      domain's tokens routed to e; ``uniform_share``: (D,) k_d / N, its value if every expert were used alike.
    - ``max_share_ratio``: (D,) max_e share_d(e) / (k_d / N), how much the domain's favourite expert is
      over-used (1 = uniform).
    - ``tv_distance``: (D,) total-variation distance between the domain's expert distribution q_d(e) =
      c_e^(d) / sum_e c_e^(d) and the all-domain one q(e) = sum_d c_e^(d) / sum_{d,e} c_e^(d):
      (1/2) sum_e |q_d(e) - q(e)|, in [0, 1]: 0 when the domain uses the experts as all domains together do.
      ``mean_tv_distance``: its mean over the domains with a selection.
    NaN where a domain has no token (or no selection).
    """

    domain_names: tuple[str, ...]
    num_experts: int
    tokens: int
    unlabelled_tokens: int
    domain_tokens: np.ndarray
    counts: np.ndarray
    experts_per_token: np.ndarray
    share: np.ndarray
    uniform_share: np.ndarray
    max_share_ratio: np.ndarray
    tv_distance: np.ndarray
    mean_tv_distance: float

    def to_dict(self) -> dict:
        """Plain JSON values keyed by field name (arrays as lists in ``domain_names`` order, NaN -> None)."""
        return json_ready({f.name: getattr(self, f.name) for f in fields(self)})


class DomainPartial:
    """Mergeable accumulator of :class:`DomainStats` (protocol: :mod:`usmoe_lp.diagnostics.partial`).

    State: ``counts`` (D, N) int64, ``domain_tokens`` (D,) int64 and the unlabelled count; merging adds them.

    >>> import numpy as np
    >>> from usmoe_lp.diagnostics.routed import Routed
    >>> p = DomainPartial.empty(2, ("code", "web"))
    >>> p.update(Routed(np.array([[0], [0], [1], [0]]), 2, token_ids=[0] * 4, sequence_ids=[0] * 4,
    ...                 positions=range(4), domains=[0, 0, 1, 1]))
    >>> s = p.result()
    >>> s.share.tolist(), s.tv_distance.tolist()
    ([[1.0, 0.0], [0.5, 0.5]], [0.25, 0.25])
    """

    def __init__(self, num_experts: int, domain_names: tuple[str, ...]) -> None:
        self.num_experts = check_int(num_experts, "num_experts", low=1)
        names = tuple(domain_names)
        if not names or not all(isinstance(d, str) and d for d in names) or len(set(names)) != len(names):
            raise InvalidParameter("domain_names must be distinct non-empty strings, one per domain index; "
                                   f"got {names!r}")
        self.domain_names = names
        self.counts = np.zeros((len(names), self.num_experts), dtype=np.int64)
        self.domain_tokens = np.zeros(len(names), dtype=np.int64)
        self.unlabelled = 0

    @classmethod
    def empty(cls, num_experts: int, domain_names: tuple[str, ...]) -> DomainPartial:
        """A partial with no token, for N experts and the named domains (index d = ``domain_names[d]``)."""
        return cls(num_experts, domain_names)

    def update(self, r: Routed, mask: np.ndarray | None = None) -> None:
        """Add one chunk (in place); ``r.domains`` is required. mask: optionally ``r.mask()``."""
        if r.num_experts != self.num_experts:
            raise ShapeMismatch(f"chunk has N = {r.num_experts} experts, this partial was made for {self.num_experts}")
        if r.domains is None:
            raise InvalidParameter("domain specialisation needs each token's domain: pass Routed(..., domains=)")
        d = r.domains
        n_dom = len(self.domain_names)
        if d.size and int(d.max()) >= n_dom:
            raise InvalidScores(f"domains has index {int(d.max())} but only {n_dom} domain names were given "
                                f"({', '.join(self.domain_names)}); indices must be in [-1, {n_dom})")
        lab = d >= 0
        self.unlabelled += int((~lab).sum())
        self.domain_tokens += np.bincount(d[lab], minlength=n_dom)
        m = (r.mask() if mask is None else mask)[lab]
        if m.size:
            # one-hot domains times the selection: exact integer counts (D x n) @ (n x N)
            onehot = np.zeros((m.shape[0], n_dom), dtype=bool)
            onehot[np.arange(m.shape[0]), d[lab]] = True
            self.counts += pair_counts(onehot, m)

    def merge(self, other: DomainPartial) -> DomainPartial:
        """A new partial holding both (neither is modified)."""
        if (other.num_experts, other.domain_names) != (self.num_experts, self.domain_names):
            raise ShapeMismatch("cannot merge domain partials of different experts or domain names")
        out = DomainPartial(self.num_experts, self.domain_names)
        out.counts = self.counts + other.counts
        out.domain_tokens = self.domain_tokens + other.domain_tokens
        out.unlabelled = self.unlabelled + other.unlabelled
        return out

    def result(self) -> DomainStats:
        """The :class:`DomainStats` of every token seen."""
        n = self.num_experts
        c = self.counts.astype(np.float64)
        t_d = self.domain_tokens.astype(np.float64)
        per_domain = c.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            k_d = per_domain / t_d
            share = c / t_d[:, None]
            q_d = c / per_domain[:, None]
            total = c.sum()
            q = c.sum(axis=0) / total if total else np.full(n, np.nan)
            tv = np.where(per_domain > 0, 0.5 * np.abs(q_d - q[None, :]).sum(axis=1), np.nan)
            ratio = np.where(per_domain > 0, n * q_d.max(axis=1, initial=0.0), np.nan)
        has = per_domain > 0
        return DomainStats(
            domain_names=self.domain_names, num_experts=n, tokens=int(self.domain_tokens.sum()),
            unlabelled_tokens=self.unlabelled, domain_tokens=self.domain_tokens.copy(), counts=self.counts.copy(),
            experts_per_token=k_d, share=share, uniform_share=k_d / n, max_share_ratio=ratio, tv_distance=tv,
            mean_tv_distance=float(tv[has].mean()) if has.any() else float("nan"))
