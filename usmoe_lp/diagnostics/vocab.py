"""Vocabulary specialisation: whether a token id goes to one expert every time it occurs.

Source: OLMoE (Muennighoff et al. 2024, arXiv 2409.02060, §5 "Token specialization" / vocabulary
specialisation): for each token id, the share of its occurrences routed (top-1) to the expert that receives it
most often, averaged over the ids seen often enough. Definitions: ``docs/definitions.md``, "Routing patterns".
The state is sparse (one count per (token id, expert) pair seen), never a dense (vocabulary, N) array.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from usmoe_lp._json import json_ready
from usmoe_lp._validate import check_int
from usmoe_lp.diagnostics.routed import Routed
from usmoe_lp.errors import InvalidScores, ShapeMismatch

__all__ = ["VocabPartial", "VocabStats", "merge_sparse_counts"]


def merge_sparse_counts(keys_a: np.ndarray, counts_a: np.ndarray, keys_b: np.ndarray,
                        counts_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sparse counts added: sorted unique int64 keys and their int64 counts, from two such pairs (or unsorted
    keys with repeats: they are sorted and summed too)."""
    keys = np.concatenate([keys_a, keys_b])
    counts = np.concatenate([counts_a, counts_b])
    if keys.size == 0:
        return keys.astype(np.int64), counts.astype(np.int64)
    order = np.argsort(keys, kind="stable")
    keys, counts = keys[order], counts[order]
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    return keys[starts], np.add.reduceat(counts, starts).astype(np.int64)


@dataclass(frozen=True, eq=False)
class VocabStats:
    """Vocabulary specialisation of one layer, from each token's top-1 expert (``ranked[t, 0]``).

    Usable tokens: token id v >= 0 and a top-1 expert. n_v: usable occurrences of v; n(v, e): those whose top-1
    is e. An id is eligible when n_v >= ``min_count``.

    - ``num_experts``: N; ``min_count``; ``tokens``: all tokens seen; ``usable_tokens``; ``unknown_tokens``:
      tokens with id -1; ``no_expert_tokens``: tokens of a known id with no expert.
    - ``vocab_size``: distinct ids among the usable tokens; ``eligible_ids``; ``eligible_tokens``: sum of their n_v.
    - ``specialisation``: OLMoE's, the mean over eligible ids of spec(v) = max_e n(v, e) / n_v (unweighted, as
      OLMoE; 1/N or more; 1 when every id always goes to one expert); ``specialisation_weighted``: the
      occurrence-weighted mean, sum_v max_e n(v, e) / sum_v n_v over eligible ids. NaN without an eligible id.
    - ``expert_ids``: (N,) int64, per expert e the eligible ids whose favourite expert (argmax_e n(v, e), ties
      to the lowest e) is e; ``expert_specialisation``: (N,) float64, the mean spec(v) over them (NaN where none).
    - ``expert_token_entropy``: (N,) float64, H of the token ids expert e receives as top-1, p(v | e) =
      n(v, e) / sum_v n(v, e), in nats (NaN for an expert with no top-1 token);
      ``expert_token_entropy_normalised``: divided by log ``vocab_size`` (in [0, 1]; NaN when vocab_size < 2):
      low = an expert concentrated on few ids. ``token_entropy``: H of the ids of all usable tokens (nats),
      the value an expert receiving a random sample of tokens would approach.
    """

    num_experts: int
    min_count: int
    tokens: int
    usable_tokens: int
    unknown_tokens: int
    no_expert_tokens: int
    vocab_size: int
    eligible_ids: int
    eligible_tokens: int
    specialisation: float
    specialisation_weighted: float
    expert_ids: np.ndarray
    expert_specialisation: np.ndarray
    expert_token_entropy: np.ndarray
    expert_token_entropy_normalised: np.ndarray
    token_entropy: float

    def to_dict(self) -> dict:
        """Plain JSON values keyed by field name (arrays as lists, NaN -> None)."""
        return json_ready({f.name: getattr(self, f.name) for f in fields(self)})


class VocabPartial:
    """Mergeable accumulator of :class:`VocabStats` (protocol: :mod:`usmoe_lp.diagnostics.partial`).

    State: ``keys`` (P,) sorted unique int64 v * N + e and ``counts`` (P,) int64 n(v, e), one entry per pair
    seen (never a dense vocabulary x N array), and token counts. Merging adds the sparse counts exactly.
    :meth:`update` buffers each chunk's sparse counts and adds them to ``keys`` / ``counts`` only when the buffer
    outgrows them (and before :meth:`merge` / :meth:`result`), so the state is not re-sorted on every chunk.

    >>> import numpy as np
    >>> from usmoe_lp.diagnostics.routed import Routed
    >>> p = VocabPartial.empty(2, min_count=2)
    >>> p.update(Routed(np.array([[0], [0], [1], [0], [1]]), 2, token_ids=[5, 5, 5, 9, 9], sequence_ids=[0] * 5,
    ...                 positions=range(5)))
    >>> s = p.result()
    >>> s.specialisation, s.specialisation_weighted     # id 5: 2 of 3 to expert 0; id 9: 1 of 2
    (0.5833333333333333, 0.6)
    """

    def __init__(self, num_experts: int, min_count: int = 10) -> None:
        self.num_experts = check_int(num_experts, "num_experts", low=1)
        self.min_count = check_int(min_count, "min_count", low=1)
        self._keys = np.zeros(0, dtype=np.int64)
        self._counts = np.zeros(0, dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # chunks' sparse counts not yet in keys/counts
        self._pending_size = 0
        self.tokens = 0
        self.unknown = 0
        self.no_expert = 0

    @classmethod
    def empty(cls, num_experts: int, min_count: int = 10) -> VocabPartial:
        """A partial with no token, for N = ``num_experts`` experts; ids need ``min_count`` usable occurrences."""
        return cls(num_experts, min_count)

    def update(self, r: Routed) -> None:
        """Add one chunk (in place)."""
        n = self.num_experts
        if r.num_experts != n:
            raise ShapeMismatch(f"chunk has N = {r.num_experts} experts, this partial was made for {n}")
        v = r.token_ids
        top = r.ranked[:, 0] if r.ranked.shape[1] else np.full(r.num_tokens, -1, dtype=np.int64)
        known = v >= 0
        if known.any() and int(v.max()) > (2**63 - 1) // n - 1:
            raise InvalidScores(f"token_ids reach {int(v.max())}; ids times N = {n} must fit in int64")
        ok = known & (top >= 0)
        self.tokens += r.num_tokens
        self.unknown += int((~known).sum())
        self.no_expert += int((known & (top < 0)).sum())
        keys, counts = np.unique(v[ok] * n + top[ok], return_counts=True)
        self._pending.append((keys, counts.astype(np.int64)))
        self._pending_size += keys.size
        if self._pending_size > max(self._keys.size, 1 << 16):
            self._compact()

    @property
    def keys(self) -> np.ndarray:
        """(P,) sorted unique int64 keys v * N + e of every chunk added."""
        self._compact()
        return self._keys

    @property
    def counts(self) -> np.ndarray:
        """(P,) int64 n(v, e), aligned with :attr:`keys`."""
        self._compact()
        return self._counts

    def _compact(self) -> None:
        """Add the buffered chunks' counts to ``keys`` / ``counts`` (exact integer sums)."""
        if self._pending:
            pk, pc = zip(*self._pending, strict=True)
            self._keys, self._counts = merge_sparse_counts(self._keys, self._counts, np.concatenate(pk),
                                                           np.concatenate(pc))
            self._pending, self._pending_size = [], 0

    def merge(self, other: VocabPartial) -> VocabPartial:
        """A new partial holding both (neither is modified)."""
        if (other.num_experts, other.min_count) != (self.num_experts, self.min_count):
            raise ShapeMismatch("cannot merge vocabulary partials of (N, min_count) = "
                                f"{(self.num_experts, self.min_count)} and {(other.num_experts, other.min_count)}")
        out = VocabPartial(self.num_experts, self.min_count)
        out._keys, out._counts = merge_sparse_counts(self.keys, self.counts, other.keys, other.counts)
        out.tokens, out.unknown = self.tokens + other.tokens, self.unknown + other.unknown
        out.no_expert = self.no_expert + other.no_expert
        return out

    def result(self) -> VocabStats:
        """The :class:`VocabStats` of every token seen."""
        n, nan = self.num_experts, float("nan")
        keys, c = self.keys, self.counts
        ids, experts = keys // n, keys % n
        usable = int(c.sum())
        starts = np.flatnonzero(np.concatenate([[True], ids[1:] != ids[:-1]])) if keys.size else np.zeros(0, int)
        n_v = np.add.reduceat(c, starts) if keys.size else np.zeros(0, np.int64)
        # the favourite: the largest count, ties to the lowest expert (c N + (N-1-e) orders both at once)
        best = np.maximum.reduceat(c * n + (n - 1 - experts), starts) if keys.size else np.zeros(0, np.int64)
        top_count, fav = best // n, n - 1 - best % n
        elig = n_v >= self.min_count
        spec = top_count[elig] / n_v[elig]
        favs = fav[elig]
        expert_ids = np.bincount(favs, minlength=n).astype(np.int64)
        with np.errstate(invalid="ignore", divide="ignore"):
            expert_spec = np.bincount(favs, weights=spec, minlength=n) / expert_ids
            n_e = np.bincount(experts, weights=c, minlength=n)
            clogc = np.bincount(experts, weights=c * np.log(np.maximum(c, 1)), minlength=n)
            h_e = np.where(n_e > 0, np.log(np.maximum(n_e, 1)) - clogc / np.maximum(n_e, 1), nan)
        vocab = int(starts.size)
        h_e = np.maximum(h_e, 0.0)  # round-off below 0 for an expert with one id
        h_norm = h_e / math.log(vocab) if vocab > 1 else np.full(n, nan)
        token_h = float(math.log(usable) - (n_v * np.log(np.maximum(n_v, 1))).sum() / usable) if usable else nan
        return VocabStats(
            num_experts=n, min_count=self.min_count, tokens=self.tokens, usable_tokens=usable,
            unknown_tokens=self.unknown, no_expert_tokens=self.no_expert, vocab_size=vocab,
            eligible_ids=int(elig.sum()), eligible_tokens=int(n_v[elig].sum()),
            specialisation=float(spec.mean()) if spec.size else nan,
            specialisation_weighted=float(top_count[elig].sum() / n_v[elig].sum()) if spec.size else nan,
            expert_ids=expert_ids, expert_specialisation=expert_spec, expert_token_entropy=h_e,
            expert_token_entropy_normalised=h_norm, token_entropy=max(token_h, 0.0) if usable else nan)
