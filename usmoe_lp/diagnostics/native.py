"""Agreement of the registry's ``native`` router with the selection the model made (a mergeable partial).

A router log records the model's own selection (``selected.<layer>``) for the families capture supports, and
the routing semantics of each layer (:class:`usmoe_lp.logs.LayerInfo`). Re-routing the logged logits with
``native`` (:mod:`usmoe_lp.routers.entries.native`) must give back that selection on every token: a token
**agrees** when native's set of experts equals the model's. A token that disagrees is **tied** when its
selection crosses a tie of the model's selection scores and the model's set is one a tie-break of that tie
gives (native breaks ties with ``torch.topk`` as the model does, but the same values can fall otherwise on
another device or kernel). Any other disagreement means the recorded semantics do not describe the router.

>>> import torch
>>> from usmoe_lp.logs import LayerInfo
>>> layer = LayerInfo("l0", num_experts=4, top_k=1, score_function="softmax")
>>> part = NativeAgreementPartial.empty(4)
>>> part.update(torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]]), torch.tensor([[0], [2]]), layer)
>>> r = part.result()
>>> r.tokens, r.agreeing_tokens, r.tied_tokens, r.rate
(2, 1, 1, 0.5)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from usmoe_lp._json import json_ready
from usmoe_lp._validate import as_score_tensor, check_int
from usmoe_lp.errors import InvalidParameter, InvalidScores, ShapeMismatch
from usmoe_lp.routers import reroute
from usmoe_lp.routers.entries.native import GROUP_FILL, group_scores, selection_scores


@dataclass(frozen=True)
class NativeAgreement:
    """How often ``native`` reproduces the model's selection on a layer.

    tokens: real tokens compared. agreeing_tokens: tokens whose native selection equals the model's.
    tied_tokens: tokens that disagree only through a tie at the selection boundary (counted apart; see the
    module docstring). rate: agreeing_tokens / tokens (NaN for no token; ties count as disagreements here:
    ``(agreeing_tokens + tied_tokens) / tokens`` is the rate ties aside).
    """

    tokens: int
    agreeing_tokens: int
    tied_tokens: int
    rate: float

    def to_dict(self) -> dict:
        """JSON-ready: the four fields (a NaN rate becomes None)."""
        return json_ready({"tokens": self.tokens, "agreeing_tokens": self.agreeing_tokens,
                           "tied_tokens": self.tied_tokens, "rate": self.rate})


def selection_mask(selected, num_experts: int, rows: int | None = None) -> torch.Tensor:
    """A model's selection as an ``(n, N)`` bool mask: from an (n, N) bool mask, or from (n, k) integer expert
    indices where -1 means no expert (a token dropped by a capacity). Out-of-range indices raise
    :class:`ShapeMismatch`."""
    sel = torch.as_tensor(selected).detach().cpu()
    n = sel.shape[0] if sel.ndim else 0
    if sel.ndim != 2 or (rows is not None and n != rows):
        raise ShapeMismatch(f"selected must be (n, N) bool or (n, k) expert indices for n = {rows} tokens, got shape "
                            f"{tuple(sel.shape)}")
    if sel.dtype == torch.bool:
        if sel.shape[1] != num_experts:
            raise ShapeMismatch(f"selected mask has {sel.shape[1]} columns, expected N = {num_experts}")
        return sel
    if sel.is_floating_point() or sel.is_complex():
        raise InvalidScores(f"selected must be bool or integer expert indices, got {sel.dtype}")
    idx = sel.long()
    if bool(((idx < -1) | (idx >= num_experts)).any()):
        raise ShapeMismatch(f"selected holds expert indices outside -1..{num_experts - 1}")
    out = torch.zeros(n, num_experts + 1, dtype=torch.bool)
    out.scatter_(1, torch.where(idx < 0, num_experts, idx), True)
    return out[:, :num_experts]


def tie_consistent(logits: torch.Tensor, selected: torch.Tensor, layer, k: int) -> torch.Tensor:
    """(n,) bool: whether each token's ``selected`` (n, N) bool set is the model's top-k under another break of a tie
    of its selection scores: there is a tie at the boundary (two groups at the ``topk_group``-th group score, or an
    expert left out at the k-th selected score), and ``selected`` is k experts, in groups the group limit keeps or
    ties with, taking every expert of those groups that scores above its lowest selected score."""
    s = selection_scores(logits, layer)
    n, N = s.shape
    if layer.group_limited:
        per = N // layer.n_group
        group = group_scores(s, layer)
        bound = torch.sort(group, dim=-1, descending=True).values[:, layer.topk_group - 1 : layer.topk_group]
        used = selected.view(n, layer.n_group, per).any(-1)
        allowed_g = (group > bound) | (used & (group == bound))
        ok = ~(used & (group < bound)).any(-1) & (allowed_g.sum(-1) <= layer.topk_group)
        group_tie = (group >= bound).sum(-1) > layer.topk_group
        s = s.masked_fill(~allowed_g.repeat_interleave(per, dim=1), GROUP_FILL[layer.group_score])
    else:
        ok = torch.ones(n, dtype=torch.bool)
        group_tie = torch.zeros(n, dtype=torch.bool)
    lowest = torch.where(selected, s, torch.tensor(float("inf"), dtype=s.dtype)).min(dim=-1, keepdim=True).values
    above_missing = ((s > lowest) & ~selected).any(-1)
    expert_tie = ((s == lowest) & ~selected).any(-1)
    return ok & (selected.sum(-1) == k) & ~above_missing & (group_tie | expert_tie)


def _rows(sequence_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Row and column of each token when tokens are laid out one sequence per row, in log order."""
    seq = sequence_ids.long()
    uniq, row = torch.unique(seq, return_inverse=True)
    order = torch.sort(row, stable=True).indices
    counts = torch.bincount(row, minlength=len(uniq))
    starts = torch.cumsum(counts, 0) - counts
    col = torch.empty_like(row)
    col[order] = torch.arange(len(seq)) - starts[row[order]]
    return row, col, len(uniq), int(counts.max()) if len(seq) else 0


class NativeAgreementPartial:
    """Mergeable accumulator of :class:`NativeAgreement` over chunks of one layer's tokens (streaming protocol).

    State: three token counts. ``update`` re-routes a chunk's logits with ``native`` and compares with the
    model's selection. For a layer with an expert capacity (Switch Transformers), pass ``sequence_ids``: the
    capacity counts the tokens of each sequence in log order, so give each sequence whole in one update.
    """

    def __init__(self, num_experts: int) -> None:
        self.num_experts = check_int(num_experts, "num_experts", low=1)
        self.tokens = 0
        self.agreeing_tokens = 0
        self.tied_tokens = 0

    @classmethod
    def empty(cls, num_experts: int) -> NativeAgreementPartial:
        """An accumulator with no tokens for a layer of N = ``num_experts`` experts."""
        return cls(num_experts)

    def update(self, logits, selected, layer, sequence_ids=None, *, replay=None) -> None:
        """Add one chunk. Mutates self, returns None.

        logits: (n, N) router logits (torch or numpy, any real dtype incl. bfloat16), real tokens only.
        selected: the model's selection of those tokens, (n, N) bool or (n, k) expert indices (-1: none), as
        ``selected.<layer>`` of a router log. layer: the layer's :class:`usmoe_lp.logs.LayerInfo` (its routing
        semantics; :class:`InvalidParameter` when they are unknown). sequence_ids: (n,) int, the tokens' sequences
        (a log's ``sequence_ids``): the rows an expert capacity counts in; None: one row. replay: optionally
        native's (n, N) bool selection of these tokens when the caller has it (the streaming analysis:
        :func:`usmoe_lp.diagnostics.stream.native_selection`; trusted, only its shape is checked), instead of
        re-routing them here. Ties are looked for on the disagreeing tokens only.
        """
        z = as_score_tensor(logits, "logits").detach().cpu()
        if z.ndim != 2 or z.shape[1] != self.num_experts:
            raise ShapeMismatch(f"logits must be (n, N = {self.num_experts}), got shape {tuple(z.shape)}")
        if getattr(layer, "num_experts", self.num_experts) != self.num_experts:
            raise ShapeMismatch(f"layer {layer.name!r} has {layer.num_experts} experts, this partial "
                                f"{self.num_experts}")
        n = z.shape[0]
        sel = selection_mask(selected, self.num_experts, rows=n)
        if n == 0:
            return
        k = getattr(layer, "top_k", None)
        if k is None:
            raise InvalidParameter(f"layer {getattr(layer, 'name', '?')!r}: top_k is unknown; native needs the "
                                   "model's experts per token")
        if replay is not None:
            mask = torch.as_tensor(replay)
            if tuple(mask.shape) != (n, self.num_experts):
                raise ShapeMismatch(f"replay has shape {tuple(mask.shape)}, expected {(n, self.num_experts)}")
        elif getattr(layer, "expert_capacity", None) is not None and sequence_ids is not None:
            ids = torch.as_tensor(np.asarray(sequence_ids)).reshape(-1)
            if ids.numel() != n:
                raise ShapeMismatch(f"sequence_ids has {ids.numel()} entries for {n} tokens")
            row, col, rows, width = _rows(ids)
            z3 = torch.zeros(rows, width, self.num_experts, dtype=torch.float64)
            pad = torch.ones(rows, width, dtype=torch.bool)
            z3[row, col], pad[row, col] = z.to(torch.float64), False
            mask = reroute(z3, "native", layer=layer, padding_mask=pad).mask[row, col]
        else:
            mask = reroute(z.to(torch.float64), "native", layer=layer).mask
        agree = (mask == sel).all(-1)
        bad = torch.nonzero(~agree).reshape(-1)
        tied = 0
        if bad.numel():
            tied = int(tie_consistent(z[bad].to(torch.float64), sel[bad], layer, k).sum())
        self.tokens += n
        self.agreeing_tokens += n - int(bad.numel())
        self.tied_tokens += tied

    def merge(self, other: NativeAgreementPartial) -> NativeAgreementPartial:
        """A new partial holding the tokens of both; neither input changes."""
        if not isinstance(other, NativeAgreementPartial):
            raise InvalidParameter(f"can only merge a NativeAgreementPartial, got {type(other).__name__}")
        if other.num_experts != self.num_experts:
            raise InvalidParameter(f"cannot merge partials with num_experts {self.num_experts} and {other.num_experts}")
        out = NativeAgreementPartial(self.num_experts)
        out.tokens = self.tokens + other.tokens
        out.agreeing_tokens = self.agreeing_tokens + other.agreeing_tokens
        out.tied_tokens = self.tied_tokens + other.tied_tokens
        return out

    def result(self) -> NativeAgreement:
        """The :class:`NativeAgreement` of the tokens added so far."""
        rate = self.agreeing_tokens / self.tokens if self.tokens else float("nan")
        return NativeAgreement(self.tokens, self.agreeing_tokens, self.tied_tokens, rate)
