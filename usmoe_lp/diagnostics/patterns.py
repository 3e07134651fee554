"""The routing patterns of one layer's selection, streamed: co-activation, vocabulary and domain
specialisation, and locality along sequences, as one mergeable partial.

:class:`PatternStream` holds the per-layer partials of :mod:`~usmoe_lp.diagnostics.coactivation`,
:mod:`~usmoe_lp.diagnostics.vocab`, :mod:`~usmoe_lp.diagnostics.domain` (when the tokens have domains) and
:mod:`~usmoe_lp.diagnostics.locality`, fed with the same :class:`~usmoe_lp.diagnostics.routed.Routed` chunks
(the layer-to-layer :class:`~usmoe_lp.diagnostics.transitions.TransitionPartial` takes two layers, so the
driver keeps it beside the streams). Definitions: ``docs/definitions.md``, "Routing patterns".
"""

from __future__ import annotations

from dataclasses import dataclass

from usmoe_lp._json import json_ready
from usmoe_lp._validate import check_int
from usmoe_lp.diagnostics.coactivation import CoactivationPartial, CoactivationStats
from usmoe_lp.diagnostics.domain import DomainPartial, DomainStats
from usmoe_lp.diagnostics.locality import LocalityPartial, LocalityStats
from usmoe_lp.diagnostics.routed import Routed
from usmoe_lp.diagnostics.vocab import VocabPartial, VocabStats
from usmoe_lp.errors import ShapeMismatch

__all__ = ["PATTERN_KEYS", "PatternStats", "PatternStream"]

PATTERN_KEYS = ("coactivation_lift", "vocab_specialisation", "domain_specialisation", "locality")
"""The keys of :meth:`PatternStats.to_json` besides ``num_experts`` and ``top_k``, in order."""


@dataclass(frozen=True, eq=False)
class PatternStats:
    """The routing patterns of one layer (every field's definitions: its class).

    - ``num_experts``: N; ``top_k``: the model's k (informative).
    - ``coactivation``: :class:`~usmoe_lp.diagnostics.coactivation.CoactivationStats`.
    - ``vocab``: :class:`~usmoe_lp.diagnostics.vocab.VocabStats`.
    - ``domain``: :class:`~usmoe_lp.diagnostics.domain.DomainStats`, None without domain names.
    - ``locality``: :class:`~usmoe_lp.diagnostics.locality.LocalityStats` (``expert_reuse_rate``, ``lru_hit_rate``).
    """

    num_experts: int
    top_k: int
    coactivation: CoactivationStats
    vocab: VocabStats
    domain: DomainStats | None
    locality: LocalityStats

    def to_json(self, matrices: bool = False) -> dict:
        """Plain JSON for metrics.json (lists, floats, NaN -> None): ``num_experts``, ``top_k``,
        ``coactivation_lift`` (:meth:`CoactivationStats.to_dict`, the (N, N) matrices only with ``matrices=True``),
        ``vocab_specialisation``, ``domain_specialisation`` (None without domains) and ``locality`` (which holds
        ``expert_reuse_rate`` and ``lru_hit_rate``)."""
        return json_ready({
            "num_experts": self.num_experts, "top_k": self.top_k,
            "coactivation_lift": self.coactivation.to_dict(matrices=matrices),
            "vocab_specialisation": self.vocab.to_dict(),
            "domain_specialisation": None if self.domain is None else self.domain.to_dict(),
            "locality": self.locality.to_dict()})


class PatternStream:
    """The routing-pattern partials of one layer (a mergeable partial: :mod:`usmoe_lp.diagnostics.partial`).

    >>> import numpy as np
    >>> s = PatternStream.empty(4, 2)
    >>> s.update(Routed(np.array([[0, 1], [1, 0], [2, 3]]), 4, token_ids=[3, 3, 4], sequence_ids=[0, 0, 1],
    ...                 positions=[0, 1, 0]))
    >>> out = s.result()
    >>> out.locality.expert_reuse_rate, int(out.coactivation.counts[0, 1]), out.domain is None
    (1.0, 2, True)
    """

    def __init__(self, num_experts: int, top_k: int, domain_names: tuple[str, ...] | None = None,
                 min_count: int = 10) -> None:
        self.num_experts = check_int(num_experts, "num_experts", low=1)
        self.top_k = check_int(top_k, "top_k", low=1, high=self.num_experts)
        self.coactivation = CoactivationPartial.empty(self.num_experts)
        self.vocab = VocabPartial.empty(self.num_experts, min_count)
        self.domain = None if domain_names is None else DomainPartial.empty(self.num_experts, domain_names)
        self.locality = LocalityPartial.empty(self.num_experts)

    @classmethod
    def empty(cls, num_experts: int, top_k: int, domain_names: tuple[str, ...] | None = None,
              min_count: int = 10) -> PatternStream:
        """A stream with no token: N experts, the model's k, the domains' names (index d = ``domain_names[d]``;
        None: no domain statistics) and the vocabulary partial's ``min_count``."""
        return cls(num_experts, top_k, domain_names, min_count)

    def update(self, r: Routed) -> None:
        """Add one chunk of the layer, after everything seen (in place). ``r.domains`` is required when the
        stream was made with domain names."""
        if r.num_experts != self.num_experts:
            raise ShapeMismatch(f"chunk has N = {r.num_experts} experts, this stream was made for {self.num_experts}")
        mask = r.mask()
        if self.domain is not None:
            self.domain.update(r, mask)  # first: it is the one that can refuse the chunk (no domains)
        self.coactivation.update(r, mask)
        self.vocab.update(r)
        self.locality.update(r, mask)

    def merge(self, other: PatternStream) -> PatternStream:
        """A new stream holding both, ``self``'s tokens first (neither is modified)."""
        if (other.num_experts, other.top_k) != (self.num_experts, self.top_k) or (
                (self.domain is None) != (other.domain is None)):
            raise ShapeMismatch(f"cannot merge pattern streams of (N, k) = {(self.num_experts, self.top_k)} and "
                                f"{(other.num_experts, other.top_k)} (or with and without domains)")
        out = PatternStream.__new__(PatternStream)
        out.num_experts, out.top_k = self.num_experts, self.top_k
        out.coactivation = self.coactivation.merge(other.coactivation)
        out.vocab = self.vocab.merge(other.vocab)
        out.domain = None if self.domain is None else self.domain.merge(other.domain)
        out.locality = self.locality.merge(other.locality)
        return out

    def result(self) -> PatternStats:
        """The :class:`PatternStats` of every token seen."""
        return PatternStats(num_experts=self.num_experts, top_k=self.top_k, coactivation=self.coactivation.result(),
                            vocab=self.vocab.result(), domain=None if self.domain is None else self.domain.result(),
                            locality=self.locality.result())
