"""The streaming pass over one layer: the model's selection of each chunk and the partials it feeds.

:class:`LayerStream` is the per-layer state of :func:`usmoe_lp.diagnostics.analyze`'s streaming suite —

* load (:class:`~usmoe_lp.diagnostics.load.LoadPartial`) on the model's own selection;
* collapse (:class:`~usmoe_lp.diagnostics.collapse.CollapsePartial`) on logits, probabilities and,
  when captured, hidden states;
* margins (:class:`~usmoe_lp.diagnostics.margins.MarginPartial`) of the model's top-k decisions;
* agreement of the registry's ``native`` replay with a captured selection
  (:class:`~usmoe_lp.diagnostics.native.NativeAgreementPartial`)

— and is itself a mergeable partial (:mod:`usmoe_lp.diagnostics.partial`): a token range of a layer is
streamed into one ``LayerStream``, and the streams of consecutive ranges merge into the layer's. That is
what lets the analysis cut a log into tasks (one process or a Dask cluster, :mod:`usmoe_lp.cluster`).

Scores. The routing probabilities are :func:`usmoe_lp.routing.probabilities` with the layer's score
function. When the log records no selection, the model's selection is replayed by the registry's
``native`` router where the layer's routing semantics are recorded (:func:`model_mask`), else
re-computed as the top-k of the probabilities, ties to the lowest expert index
(:func:`recompute_model_selection`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch

from usmoe_lp.diagnostics.collapse import CollapsePartial
from usmoe_lp.diagnostics.load import LoadPartial
from usmoe_lp.diagnostics.margins import MarginPartial
from usmoe_lp.diagnostics.native import NativeAgreementPartial
from usmoe_lp.errors import ShapeMismatch
from usmoe_lp.logs.format import LayerInfo
from usmoe_lp.logs.reader import Chunk
from usmoe_lp.routers import reroute
from usmoe_lp.routing import probabilities
from usmoe_lp.routing.routers import select_top

__all__ = ["LayerStream", "model_mask", "native_semantics", "recompute_model_selection", "selection_scores",
           "stream_chunks"]


def native_semantics(info: LayerInfo | None) -> bool:
    """Whether the registry's ``native`` router can replay the layer's selection (its score function and
    selection are recorded)."""
    return info is not None and info.score_function != "unknown" and getattr(info, "selection", None) is not None


def selection_scores(logits: torch.Tensor, info: LayerInfo) -> torch.Tensor:
    """(n, N) float32 scores the model's top-k is taken over: the ``native`` router's selection scores
    (:func:`usmoe_lp.routers.entries.native.selection_scores`: softmax, sigmoid or the logits, in the
    layer's score dtype, plus its selection bias) where the layer's semantics are recorded, else the
    routing probabilities (:func:`usmoe_lp.routing.probabilities`; the softmax for ``unknown``)."""
    if native_semantics(info):
        from usmoe_lp.routers.entries.native import selection_scores as native_scores

        return native_scores(logits, info).float()
    return probabilities(logits.float(), info.score_function)


def recompute_model_selection(scores: torch.Tensor, k: int, sorted_rows: np.ndarray | None = None) -> torch.Tensor:
    """(n, N) bool: the model's selection where the log records none — the top-k of its selection
    scores (:func:`selection_scores`), ties to the lowest expert index (the rule of
    :func:`usmoe_lp.routing.token_choice` and of ``select_top``).

    sorted_rows: optionally (n, N) numpy, the rows of ``scores`` sorted ascending. Then the top-k of
    a row whose k-th largest score beats its (k+1)-th is ``scores >= k-th largest`` (one comparison);
    only rows with a tie at the boundary go through ``select_top`` (same selection as without).

    Used where the layer's routing semantics are unknown, or where they include an expert capacity
    (a chunk of the log does not hold the rows of the model's forward that the capacity counts);
    elsewhere :func:`model_mask` replays the registry's ``native`` router.
    >>> import torch
    >>> recompute_model_selection(torch.tensor([[0.1, 0.3, 0.3, 0.3]]), 2).int().tolist()
    [[0, 1, 1, 0]]
    """
    n, N = scores.shape
    if sorted_rows is not None and k < N:
        kth = sorted_rows[:, N - k]
        mask = torch.from_numpy(scores.detach().cpu().numpy() >= kth[:, None])
        tied = np.flatnonzero(~(kth > sorted_rows[:, N - k - 1]))  # ties at the boundary (or NaN)
        if tied.size:
            rows = torch.from_numpy(tied)
            mask[rows] = select_top(scores[rows], torch.full((tied.size,), k, dtype=torch.long))
        return mask
    return select_top(scores, torch.full((n,), k, dtype=torch.long))


def model_mask(chunk: Chunk, scores: torch.Tensor, k: int, sorted_rows: np.ndarray | None = None,
               info: LayerInfo | None = None) -> tuple[torch.Tensor, str]:
    """(n, N) bool selection of the model and its source: the captured one (``"captured"``) when the
    log has it; else the registry's ``native`` router replayed on the chunk's logits (``"recomputed
    native"``: selection scores, bias, group limits and top-k of the layer, ``reroute(logits,
    "native", layer=info)``) where ``info`` records the semantics and no expert capacity; else
    :func:`recompute_model_selection` of ``scores`` (``"recomputed top-k"``)."""
    n, N = scores.shape
    sel = chunk.selected
    if sel is not None:
        if sel.dtype == torch.bool:
            if tuple(sel.shape) != (n, N):
                raise ShapeMismatch(f"captured selection mask has shape {tuple(sel.shape)}, expected {(n, N)}")
            return sel, "captured"
        idx = sel.long()
        mask = torch.zeros(n, N + 1, dtype=torch.bool)
        mask.scatter_(1, torch.where(idx < 0, N, idx), True)  # -1 (no expert) lands in the spare column
        return mask[:, :N], "captured"
    if native_semantics(info) and getattr(info, "expert_capacity", None) is None:
        return reroute(chunk.logits, "native", k=k, layer=info).mask.cpu(), "recomputed native"
    return recompute_model_selection(scores, k, sorted_rows), "recomputed top-k"


# ============================================================================ the per-layer partial
@dataclass
class LayerStream:
    """The streaming statistics of one layer over the chunks seen so far (a mergeable partial).

    Attributes:
        info: the layer (its ``top_k`` filled in with ``k``).
        k: the model's experts per token.
        load, collapse, margins: the partials of :mod:`~usmoe_lp.diagnostics.load`,
            :mod:`~usmoe_lp.diagnostics.collapse` and :mod:`~usmoe_lp.diagnostics.margins`.
        native: agreement of the ``native`` replay with the captured selection (None where the layer's
            semantics are not recorded).
        source: where the model's selection came from (``captured``, ``recomputed native``,
            ``recomputed top-k``; see :func:`model_mask`).
        tokens: tokens seen.
    """

    info: LayerInfo
    k: int
    load: LoadPartial
    collapse: CollapsePartial | None
    margins: MarginPartial
    native: NativeAgreementPartial | None
    source: str
    tokens: int = 0

    @classmethod
    def empty(cls, info: LayerInfo, k: int, eps) -> LayerStream:
        """A stream of ``info``'s layer with nothing seen; ``eps``: the margin tolerances
        (:class:`~usmoe_lp.diagnostics.margins.MarginPartial`)."""
        N = info.num_experts
        if info.top_k is None:
            info = replace(info, top_k=k)
        return cls(info=info, k=k, load=LoadPartial.empty(N, top_k=k), collapse=None,
                   margins=MarginPartial.empty(k, eps=eps),
                   native=NativeAgreementPartial.empty(N) if native_semantics(info) else None,
                   source="recomputed top-k")

    def update(self, chunk: Chunk, *, hidden: bool = False,
               collapse_update: Callable[[Callable[[], None]], None] | None = None) -> torch.Tensor:
        """Add one chunk; return its (n, N) bool model selection (for the sequence sample).

        hidden: feed the chunk's hidden states (when present) to the collapse partial.
        collapse_update: how to run the collapse partial's update (a callable taking a thunk), e.g. on
        a worker thread; default: now, on this thread.
        """
        info, k, N = self.info, self.k, self.info.num_experts
        logits = chunk.logits.float()
        probs = probabilities(logits, info.score_function)
        scores = selection_scores(logits, info) if native_semantics(info) else probs
        srt = None
        if k < N and scores.dtype == torch.float32 and scores.device.type == "cpu":
            srt = np.sort(scores.detach().numpy(), axis=1)  # one row sort: the model's top-k and the margins
        mask, self.source = model_mask(chunk, scores, k, srt, info)
        if self.native is not None and chunk.selected is not None:
            self.native.update(chunk.logits, chunk.selected, info, sequence_ids=chunk.sequence_ids)
        h = chunk.hidden.float() if (hidden and chunk.hidden is not None) else None
        if self.collapse is None:
            self.collapse = CollapsePartial.empty(N, hidden_dim=None if h is None else int(h.shape[1]))
        collapse = self.collapse
        if collapse_update is None:
            collapse.update(logits, probs, h)
        else:
            collapse_update(lambda: collapse.update(logits, probs, h))
        self.load.update(mask, probs, logits)
        self.margins.update(scores, k, sorted_rows=srt)
        self.tokens += chunk.num_tokens
        return mask

    def merge(self, other: LayerStream) -> LayerStream:
        """A new stream holding both (``self``'s tokens first)."""
        if (self.info.name, self.k) != (other.info.name, other.k):
            raise ShapeMismatch(f"cannot merge the streams of layer {self.info.name!r} (k={self.k}) and "
                                f"{other.info.name!r} (k={other.k})")
        if self.collapse is None or other.collapse is None:
            collapse = self.collapse if other.collapse is None else other.collapse
        else:
            collapse = self.collapse.merge(other.collapse)
        native = None if self.native is None else self.native.merge(other.native)
        return LayerStream(info=self.info, k=self.k, load=self.load.merge(other.load), collapse=collapse,
                           margins=self.margins.merge(other.margins), native=native,
                           source=self.source if self.tokens else other.source, tokens=self.tokens + other.tokens)

    def result(self, router_weights: torch.Tensor | None = None) -> dict:
        """The layer's streaming statistics: ``load``, ``collapse``, ``margins``, ``native`` (None unless a
        captured selection was compared), ``source``, ``tokens``. router_weights: (N, d) for the collapse
        statistics of the router's weight rows."""
        collapse = self.collapse if self.collapse is not None else CollapsePartial.empty(self.info.num_experts)
        return {"load": self.load.result(), "collapse": collapse.result(router_weights=router_weights),
                "margins": self.margins.result(),
                "native": self.native.result() if (self.native is not None and self.native.tokens) else None,
                "source": self.source, "tokens": self.tokens}


def stream_chunks(stream: LayerStream, chunks: Iterable[Chunk], *, hidden: bool = False, threads: bool = True,
                  on_chunk: Callable[[Chunk, torch.Tensor], None] | None = None) -> LayerStream:
    """Feed ``chunks`` to ``stream`` in order (in place; returned for chaining).

    threads: run the collapse Grams (torch matmuls, which release the GIL) on a worker thread while this
    thread does the sort, the mask, the load and the margins of the same chunk. on_chunk: called with each
    chunk and its model selection (the sequence sample, progress).
    """
    pool = ThreadPoolExecutor(max_workers=1) if threads else None
    pending = []

    def submit(thunk):
        if pending:
            pending.pop().result()
        pending.append(pool.submit(thunk))

    try:
        for chunk in chunks:
            mask = stream.update(chunk, hidden=hidden, collapse_update=submit if pool is not None else None)
            if on_chunk is not None:
                on_chunk(chunk, mask)
        if pending:
            pending.pop().result()
    finally:
        if pool is not None:
            pool.shutdown()
    return stream
