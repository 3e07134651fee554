"""Layer transitions: how much a token's experts at layer l tell about its experts at layer l+1 (mutual
information between the expert choices of consecutive layers).

Source: OLMoE (Muennighoff et al. 2024, arXiv 2409.02060, §5) studies how routing at one layer relates to the
next; here the relation is one number per layer pair, the mutual information of the joint distribution below.
Definitions: ``docs/definitions.md``, "Routing patterns".
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from usmoe_lp._json import json_ready
from usmoe_lp._validate import check_int
from usmoe_lp.diagnostics.routed import Routed, pair_counts
from usmoe_lp.errors import ShapeMismatch

__all__ = ["TransitionPartial", "TransitionStats", "mutual_information"]


def _entropy(p: np.ndarray) -> float:
    pos = p[p > 0]
    return float(-(pos * np.log(pos)).sum()) + 0.0


def mutual_information(joint: np.ndarray) -> tuple[float, float, float]:
    """(I, H_a, H_b) in nats of a (N_a, N_b) joint distribution (float64, summing to 1): I = sum P log(P /
    (P_a P_b)) over P > 0, with the marginals P_a (rows) and P_b (columns) and their entropies."""
    pa, pb = joint.sum(axis=1), joint.sum(axis=0)
    nz = joint > 0
    indep = np.outer(pa, pb)
    mi = float((joint[nz] * np.log(joint[nz] / indep[nz])).sum())
    return max(mi, 0.0) + 0.0, _entropy(pa), _entropy(pb)


def _normalised(mi: float, ha: float, hb: float) -> float:
    low = min(ha, hb)
    return mi / low if low > 0 else float("nan")


@dataclass(frozen=True, eq=False)
class TransitionStats:
    """Expert transitions from layer a (l) to layer b (l+1) over the same tokens.

    - ``num_experts_a``, ``num_experts_b``: N_a, N_b; ``tokens``: the tokens counted (T); ``skipped_tokens``:
      tokens with no expert in either layer, left out.
    - ``joint``: (N_a, N_b) float64, P(e, e') = (1/T) sum_t m_a(t, e) m_b(t, e') / (|S_t^a| |S_t^b|): e drawn
      uniformly from the token's experts at layer a, e' from its experts at layer b, tokens pooled.
    - ``mutual_information``: I(e; e') = sum P log(P / (P_a P_b)) in nats (0 when the layers' choices are
      independent); ``entropy_a``, ``entropy_b``: H(P_a), H(P_b) in nats; ``mi_normalised``: I / min(H_a, H_b),
      in [0, 1] (1 when layer b's expert is a function of layer a's, for single-expert tokens; NaN when a
      marginal entropy is 0).
    - ``top1_tokens``: tokens with a top-1 expert in both layers; ``top1_joint``: (N_a, N_b) int64 counts of
      (ranked_a[t, 0], ranked_b[t, 0]); ``top1_mutual_information`` (nats) and ``top1_mi_normalised``: the same
      of their distribution (NaN without a token).

    Plug-in estimates: with T tokens, independent layers give I of about (N_a - 1)(N_b - 1) / (2T) > 0 (bias).
    """

    num_experts_a: int
    num_experts_b: int
    tokens: int
    skipped_tokens: int
    joint: np.ndarray
    mutual_information: float
    entropy_a: float
    entropy_b: float
    mi_normalised: float
    top1_tokens: int
    top1_joint: np.ndarray
    top1_mutual_information: float
    top1_mi_normalised: float

    def to_dict(self, matrices: bool = False) -> dict:
        """Plain JSON values keyed by field name (NaN -> None); ``joint`` and ``top1_joint`` only with
        ``matrices=True``."""
        skip = () if matrices else ("joint", "top1_joint")
        return json_ready({f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip})


class TransitionPartial:
    """Mergeable accumulator of :class:`TransitionStats` (protocol: :mod:`usmoe_lp.diagnostics.partial`).

    State, all integers: ``classes``, a dict (|S^a|, |S^b|) -> (N_a, N_b) int64 sum of m_a(t)^T m_b(t) over the
    tokens of that class (so P = sum over classes, in sorted order, of the class's matrix / (|S^a| |S^b| T)),
    ``top1`` (N_a, N_b) int64, the token counts. Merging adds them: any cut of the tokens gives the same result
    bit for bit.

    >>> import math
    >>> import numpy as np
    >>> from usmoe_lp.diagnostics.routed import Routed
    >>> kw = dict(token_ids=[0] * 4, sequence_ids=[0] * 4, positions=[0, 1, 2, 3])
    >>> p = TransitionPartial.empty(2, 2)
    >>> p.update(Routed(np.array([[0], [1], [0], [1]]), 2, **kw), Routed(np.array([[1], [0], [1], [0]]), 2, **kw))
    >>> s = p.result()                       # layer b's expert is a function of layer a's: I = H = log 2
    >>> round(s.mutual_information, 6), round(math.log(2), 6), s.mi_normalised
    (0.693147, 0.693147, 1.0)
    """

    def __init__(self, num_experts_a: int, num_experts_b: int) -> None:
        self.num_experts_a = check_int(num_experts_a, "num_experts_a", low=1)
        self.num_experts_b = check_int(num_experts_b, "num_experts_b", low=1)
        self.classes: dict[tuple[int, int], np.ndarray] = {}
        self.top1 = np.zeros((self.num_experts_a, self.num_experts_b), dtype=np.int64)
        self.tokens = 0
        self.skipped = 0

    @classmethod
    def empty(cls, num_experts_a: int, num_experts_b: int) -> TransitionPartial:
        """A partial with no token, for layers of N_a and N_b experts."""
        return cls(num_experts_a, num_experts_b)

    def update(self, a: Routed, b: Routed) -> None:
        """Add one chunk: ``a`` and ``b`` are the same tokens (same order, sequence ids and positions) at layers l
        and l+1."""
        if (a.num_experts, b.num_experts) != (self.num_experts_a, self.num_experts_b):
            raise ShapeMismatch(f"chunks have N = {a.num_experts} and {b.num_experts} experts, this partial was made "
                                f"for {self.num_experts_a} and {self.num_experts_b}")
        if (a.num_tokens != b.num_tokens or not np.array_equal(a.sequence_ids, b.sequence_ids)
                or not np.array_equal(a.positions, b.positions)):
            raise ShapeMismatch(f"the two layers' chunks are not the same tokens ({a.num_tokens} and {b.num_tokens} "
                                "tokens, or different sequence ids / positions); pass one chunk of the log to both")
        ma, mb = a.mask(), b.mask()
        ka, kb = np.count_nonzero(a.ranked >= 0, axis=1), np.count_nonzero(b.ranked >= 0, axis=1)
        ok = (ka > 0) & (kb > 0)
        self.skipped += int((~ok).sum())
        self.tokens += int(ok.sum())
        key = ka * (self.num_experts_b + 1) + kb
        classes = np.unique(key[ok])
        for c in classes:
            cls = (int(c) // (self.num_experts_b + 1), int(c) % (self.num_experts_b + 1))
            if classes.size == 1 and ok.all():  # a top-k in both layers: one class, every token
                add = pair_counts(ma, mb)
            else:
                rows = key == c
                add = pair_counts(ma[rows], mb[rows])
            self.classes[cls] = self.classes[cls] + add if cls in self.classes else add
        ta, tb = a.ranked[:, :1], b.ranked[:, :1]
        if ta.shape[1] and tb.shape[1]:
            both = (ta[:, 0] >= 0) & (tb[:, 0] >= 0)
            flat = ta[both, 0] * self.num_experts_b + tb[both, 0]
            self.top1 += np.bincount(flat, minlength=self.top1.size).reshape(self.top1.shape)

    def merge(self, other: TransitionPartial) -> TransitionPartial:
        """A new partial holding both (neither is modified)."""
        if (other.num_experts_a, other.num_experts_b) != (self.num_experts_a, self.num_experts_b):
            raise ShapeMismatch("cannot merge transition partials of different numbers of experts")
        out = TransitionPartial(self.num_experts_a, self.num_experts_b)
        out.classes = {c: m.copy() for c, m in self.classes.items()}
        for c, m in other.classes.items():
            out.classes[c] = out.classes[c] + m if c in out.classes else m.copy()
        out.top1 = self.top1 + other.top1
        out.tokens, out.skipped = self.tokens + other.tokens, self.skipped + other.skipped
        return out

    def result(self) -> TransitionStats:
        """The :class:`TransitionStats` of every token seen."""
        nan = float("nan")
        shape = (self.num_experts_a, self.num_experts_b)
        joint = np.zeros(shape)
        for (ka, kb) in sorted(self.classes):
            joint += self.classes[(ka, kb)] / (ka * kb)
        mi = ha = hb = norm = nan
        if self.tokens:
            joint /= self.tokens
            mi, ha, hb = mutual_information(joint)
            norm = _normalised(mi, ha, hb)
        t1 = int(self.top1.sum())
        mi1 = norm1 = nan
        if t1:
            mi1, ha1, hb1 = mutual_information(self.top1 / t1)
            norm1 = _normalised(mi1, ha1, hb1)
        return TransitionStats(
            num_experts_a=shape[0], num_experts_b=shape[1], tokens=self.tokens, skipped_tokens=self.skipped,
            joint=joint, mutual_information=mi, entropy_a=ha, entropy_b=hb, mi_normalised=norm, top1_tokens=t1,
            top1_joint=self.top1.copy(), top1_mutual_information=mi1, top1_mi_normalised=norm1)

