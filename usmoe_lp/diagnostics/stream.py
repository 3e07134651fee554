"""The streaming pass over one layer: the model's selection of each chunk and the partials it feeds.

:class:`LayerStream` is the per-layer state of :func:`usmoe_lp.diagnostics.analyze`'s streaming suite —

* load (:class:`~usmoe_lp.diagnostics.load.LoadPartial`) on the model's own selection;
* collapse (:class:`~usmoe_lp.diagnostics.collapse.CollapsePartial`) on logits, probabilities and,
  when captured, hidden states;
* margins (:class:`~usmoe_lp.diagnostics.margins.MarginPartial`) of the model's top-k decisions;
* agreement of the registry's ``native`` replay with a captured selection
  (:class:`~usmoe_lp.diagnostics.native.NativeAgreementPartial`);
* the routing patterns (:class:`~usmoe_lp.diagnostics.patterns.PatternStream`: co-activation, vocabulary and
  domain specialisation, locality) of the model's selection, ranked best first (:func:`ranked_selection`)

— and is itself a mergeable partial (:mod:`usmoe_lp.diagnostics.partial`): a token range of a layer is
streamed into one ``LayerStream``, and the streams of consecutive ranges merge into the layer's. That is
what lets the analysis cut a log into tasks (one process or a Dask cluster, :mod:`usmoe_lp.cluster`).

Scores. The routing probabilities are :func:`usmoe_lp.routing.probabilities` with the layer's score
function. When the log records no selection, the model's selection is replayed by the registry's
``native`` router where the layer's routing semantics are recorded (:func:`model_mask`,
:func:`native_selection`), else re-computed as the top-k of the probabilities, ties to the lowest expert
index (:func:`recompute_model_selection`). The margins are those of the scores the model ranks
(:func:`stream_scores`).

Speed. A chunk is processed in blocks of 8192 tokens, each while it is in cache: one bf16 -> float32
conversion, one softmax (its exp serves the entropies and the logsumexp too:
:func:`usmoe_lp.diagnostics.load.softmax_token_stats`), one row sort (the model's top-k, its ties and every
margin statistic: :meth:`~usmoe_lp.diagnostics.margins.MarginPartial.update_sorted`), the two float32 Grams
(:meth:`~usmoe_lp.diagnostics.collapse.CollapsePartial.update`), with no validation pass (the log reader
checked the logits; the probabilities are computed here).

Memory. An update allocates its blocks' work buffers once and reuses them from block to block (the float32
logits, twice for the collapse thread, the sorted rows, the entropy's scratch, the comparisons of the fragile
counts, the collapse partial's shifted blocks): a fresh 2 MB temporary per block costs a page fault per 4 KB
page where glibc hands large frees back to the operating system at once, as in Dask's workers
(``MALLOC_TRIM_THRESHOLD_``; measured +40% CPU). The buffers are freed with the update, so a stream's state
stays its sums (a few Gram matrices) however many streams a task keeps; peak memory is a few chunks.
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
from usmoe_lp.diagnostics.patterns import PatternStream
from usmoe_lp.diagnostics.routed import Routed
from usmoe_lp.errors import ShapeMismatch
from usmoe_lp.logs.format import LayerInfo
from usmoe_lp.logs.reader import Chunk
from usmoe_lp.routing import probabilities
from usmoe_lp.routing.routers import select_top

__all__ = ["LayerStream", "captured_mask", "model_mask", "native_selection", "native_semantics", "ranked_selection",
           "recompute_model_selection", "selection_scores", "stream_chunks", "stream_scores"]

BLOCK_TOKENS = 8192
"""Tokens of a chunk processed together (all their statistics while they are in cache); also the float32
block of the collapse Grams."""

PROBS_TOLERANCE = 1e-4
"""Relative gap between a token's k-th and (k+1)-th float32 probability above which the top-k of the
probabilities is the top-k of the exact (float64) softmax: the float32 softmax is within ~6e-6 of it, relative,
per entry (exp of a float32 difference of logits within 88 of the row's maximum, one rounding each for the exp
and the normalisation), so a gap of 1e-4 cannot close. Rows with a smaller gap, or a k-th probability below
2**-100 (where float32 loses relative precision), are replayed exactly."""

_PROBS_FLOOR = 2.0**-100


def native_semantics(info: LayerInfo | None) -> bool:
    """Whether the registry's ``native`` router can replay the layer's selection (its score function and
    selection are recorded)."""
    return info is not None and info.score_function != "unknown" and getattr(info, "selection", None) is not None


def selection_scores(logits: torch.Tensor, info: LayerInfo) -> torch.Tensor:
    """(n, N) float32 scores the model's top-k is taken over: the ``native`` router's selection scores
    (:func:`usmoe_lp.routers.entries.native.selection_scores`: softmax, sigmoid or the logits, in the
    layer's score dtype, plus its selection bias) rounded to float32 where the layer's semantics are
    recorded, else the routing probabilities (:func:`usmoe_lp.routing.probabilities`; the softmax for
    ``unknown``)."""
    if native_semantics(info):
        from usmoe_lp.routers.entries.native import selection_scores as native_scores

        return native_scores(logits, info).float()
    return probabilities(logits.float(), info.score_function)


def _plain(info: LayerInfo) -> bool:
    """No selection bias, no group limit, scores ranked in float32 / float64 (or an unknown dtype: float64)."""
    return (info.selection_bias is None and not info.group_limited
            and (info.score_dtype is None or info.score_dtype in ("float32", "float64")))


def stream_scores(logits: torch.Tensor, z: torch.Tensor, probs: torch.Tensor,
                  info: LayerInfo) -> tuple[torch.Tensor, float]:
    """The (n, N) float32 scores the streaming analysis takes the model's margins over, and the relative
    tolerance to which they rank like the model's (0.0: exactly; for :func:`native_selection`).

    logits: the chunk's logits as logged; z: the same as float32; probs: their routing probabilities. Where
    the layer's semantics are not recorded: the probabilities, exactly. Where they are: the selection scores
    of :func:`selection_scores` (the values native ranks, rounded to float32: rounding keeps their order, so
    the tolerance is 0), except that the logits themselves serve for a ``logits`` selection and the float32
    probabilities for a ``softmax`` selection without bias or group limit in float32, float64 or an unknown
    dtype, where the model's float64 softmax would cost five times the float32 one: they are within a few
    float32 rounding steps of it (:data:`PROBS_TOLERANCE`) and the selection stays exactly native's.
    """
    if not native_semantics(info):
        return probs, 0.0
    if _plain(info) and info.score_function != "sigmoid":
        if info.selection == "softmax":
            return probs, PROBS_TOLERANCE
        if info.selection == "logits":
            return z, 0.0
    return selection_scores(logits, info), 0.0


def recompute_model_selection(scores: torch.Tensor, k: int, sorted_rows: np.ndarray | None = None,
                              out: np.ndarray | None = None) -> torch.Tensor:
    """(n, N) bool: the model's selection where the log records none — the top-k of its selection
    scores (:func:`selection_scores`), ties to the lowest expert index (the rule of
    :func:`usmoe_lp.routing.token_choice` and of ``select_top``).

    sorted_rows: optionally (n, N) numpy, the rows of ``scores`` sorted ascending. Then the top-k of
    a row whose k-th largest score beats its (k+1)-th is ``scores >= k-th largest`` (one comparison);
    only rows with a tie at the boundary go through ``select_top`` (same selection as without).
    out: optionally an (n, N) bool numpy array to write the selection into (the result is a view of it).

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
        mask = torch.from_numpy(np.greater_equal(scores.detach().cpu().numpy(), kth[:, None], out=out))
        tied = np.flatnonzero(~(kth > sorted_rows[:, N - k - 1]))  # ties at the boundary (or NaN)
        if tied.size:
            rows = torch.from_numpy(tied)
            mask[rows] = select_top(scores[rows], torch.full((tied.size,), k, dtype=torch.long))
        return mask
    mask = select_top(scores, torch.full((n,), k, dtype=torch.long))
    if out is None:
        return mask
    out[...] = mask.numpy()
    return torch.from_numpy(out)


def native_selection(logits: torch.Tensor, info: LayerInfo, k: int, scores: torch.Tensor | None = None,
                     sorted_rows: np.ndarray | None = None, tolerance: float = 0.0,
                     out: np.ndarray | None = None) -> torch.Tensor:
    """(n, N) bool: the registry's ``native`` router's selection of (n, N) logits (the mask of
    ``reroute(logits, "native", k=k, layer=info)`` for a layer without an expert capacity): top-k of the
    selection scores, group limits, ties broken by ``torch.topk`` as the model breaks them
    (:func:`usmoe_lp.routers.entries.native.top_k_selection`).

    With ``scores`` ((n, N) float32 ranked like native's selection scores to a relative ``tolerance``:
    :func:`stream_scores`) and their rows sorted ascending, a token whose k-th largest score beats its (k+1)-th
    by more than the tolerance (for a tolerance of 0: at all) has one top-k, ``scores >= k-th largest``; only
    the other tokens (ties and near-ties at the boundary) and group-limited layers go through native's own
    top-k. Same selection as native's on every token (tested against ``reroute``). out: optionally an (n, N)
    bool numpy array to write the selection into (the result is a view of it).
    """
    from usmoe_lp.routers.entries.native import selection_scores as native_scores
    from usmoe_lp.routers.entries.native import top_k_selection

    n, N = logits.shape
    if scores is None or sorted_rows is None or info.group_limited or k >= N:
        mask = top_k_selection(native_scores(logits, info), info, k)[0].cpu()
        if out is None:
            return mask
        out[...] = mask.numpy()
        return torch.from_numpy(out)
    kth = sorted_rows[:, N - k]
    nxt = sorted_rows[:, N - k - 1]
    if tolerance:
        gap = kth.astype(np.float64) - nxt
        clear = gap > tolerance * np.abs(kth) + _PROBS_FLOOR
    else:
        clear = kth > nxt
    mask = np.greater_equal(scores.detach().cpu().numpy(), kth[:, None], out=out)
    unclear = np.flatnonzero(~clear)
    if unclear.size:
        rows = torch.from_numpy(unclear)
        mask[unclear] = top_k_selection(native_scores(logits[rows], info), info, k)[0].cpu().numpy()
    return torch.from_numpy(mask)


def ranked_selection(mask: np.ndarray, scores: np.ndarray | None = None) -> np.ndarray:
    """(n, w) int64 expert ids of each row's selection, best first: by descending ``scores`` ((n, N) float, the
    selection scores the model ranks), ties (and every row without scores) to the lowest expert index; w is the
    largest row count, -1 after the experts of a shorter row (the rule of
    :meth:`usmoe_lp.diagnostics.routed.Routed.from_mask`, tested against it).

    mask: (n, N) bool numpy. Where every row holds w experts (a top-k: always), only the (n, w) selected scores
    are sorted (stably, the ids ascending), not the rows.

    >>> ranked_selection(np.array([[1, 0, 1, 1]], dtype=bool), np.array([[.2, .9, .5, .5]])).tolist()
    [[2, 3, 0]]
    """
    n = mask.shape[0]
    per_row = np.add.reduce(np.ascontiguousarray(mask).view(np.uint8), axis=1, dtype=np.int32)
    w = int(per_row.max()) if n else 0
    if not n or (per_row == w).all():
        # each row's experts, ascending (flat indices less the row offsets: 4x cheaper than np.nonzero's columns)
        ids = np.flatnonzero(mask).reshape(n, w) - (np.arange(n, dtype=np.int64) * mask.shape[1])[:, None]
        if scores is None or w < 2:
            return ids.astype(np.int64, copy=False)
        order = np.argsort(-np.take_along_axis(scores, ids, axis=1), axis=1, kind="stable")
        return np.take_along_axis(ids, order, axis=1)
    key = (~mask).view(np.uint8) if scores is None else np.where(mask, -scores, np.inf)
    order = np.argsort(key, axis=1, kind="stable")[:, :w]
    return np.where(np.take_along_axis(mask, order, axis=1), order, -1)


def _captured_ranked(sel: torch.Tensor, scores: np.ndarray | None) -> np.ndarray:
    """A captured selection as ranked ids: (n, k) ids in their given order; a bool mask ranked by ``scores``."""
    if sel.dtype == torch.bool:
        return ranked_selection(sel.numpy(), scores)
    return sel.numpy().astype(np.int64, copy=False)


def _concat_ranked(parts: list[np.ndarray]) -> np.ndarray:
    """The blocks' ranked ids as one (n, w) array, shorter blocks padded with -1 (empty slots)."""
    if len(parts) == 1:
        return parts[0]
    w = max(p.shape[1] for p in parts)
    return np.concatenate([np.pad(p, ((0, 0), (0, w - p.shape[1])), constant_values=-1) for p in parts])


class _Work:
    """The block buffers of one :meth:`LayerStream.update` (module docstring: Memory), by name."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """A (rows, cols) contiguous tensor of ``dtype`` to overwrite, the same memory on each call."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.dtype != dtype:
            buf = self._buffers[name] = torch.empty((rows, cols), dtype=dtype)  # the first block is the largest
        return buf[:rows]


def captured_mask(sel: torch.Tensor, n: int, N: int) -> torch.Tensor:
    """A captured selection as an (n, N) bool mask: from an (n, N) bool mask, or from (n, k) integer expert ids
    (-1: an empty slot), as a log records them (captured selections, selection logs). Used by the streaming
    analysis and by :mod:`usmoe_lp.compare`.

    >>> import torch
    >>> captured_mask(torch.tensor([[2, -1], [0, 1]]), 2, 3).int().tolist()
    [[0, 0, 1], [1, 1, 0]]
    """
    if sel.dtype == torch.bool:
        if tuple(sel.shape) != (n, N):
            raise ShapeMismatch(f"captured selection mask has shape {tuple(sel.shape)}, expected {(n, N)}")
        return sel
    idx = sel.long()
    mask = torch.zeros(n, N + 1, dtype=torch.bool)
    mask.scatter_(1, torch.where(idx < 0, N, idx), True)  # -1 (no expert) lands in the spare column
    return mask[:, :N]


def _replays_native(info: LayerInfo | None) -> bool:
    return native_semantics(info) and getattr(info, "expert_capacity", None) is None


def model_mask(chunk: Chunk, scores: torch.Tensor, k: int, sorted_rows: np.ndarray | None = None,
               info: LayerInfo | None = None) -> tuple[torch.Tensor, str]:
    """(n, N) bool selection of the model and its source: the captured one (``"captured"``) when the
    log has it; else the registry's ``native`` router replayed on the chunk's logits (``"recomputed
    native"``: :func:`native_selection`, the mask of ``reroute(logits, "native", layer=info)``) where
    ``info`` records the semantics and no expert capacity (``scores``: :func:`selection_scores`, with
    ``sorted_rows`` their sorted rows); else :func:`recompute_model_selection` of ``scores``
    (``"recomputed top-k"``)."""
    n, N = scores.shape
    if chunk.selected is not None:
        return captured_mask(chunk.selected, n, N), "captured"
    if _replays_native(info):
        return native_selection(chunk.logits, info, k, scores, sorted_rows), "recomputed native"
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
        selection_only: chunks without logits were seen (a selection log): only the load of the recorded
            selection is measured; collapse and margins need logits (:meth:`result` gives None for them).
        patterns: the routing patterns of the model's selection (None: not measured).
    """

    info: LayerInfo
    k: int
    load: LoadPartial
    collapse: CollapsePartial | None
    margins: MarginPartial
    native: NativeAgreementPartial | None
    source: str
    tokens: int = 0
    selection_only: bool = False
    patterns: PatternStream | None = None

    @classmethod
    def empty(cls, info: LayerInfo, k: int, eps, *, patterns: bool = False,
              domain_names: tuple[str, ...] | None = None) -> LayerStream:
        """A stream of ``info``'s layer with nothing seen; ``eps``: the margin tolerances
        (:class:`~usmoe_lp.diagnostics.margins.MarginPartial`); patterns: also measure the routing patterns
        (:class:`~usmoe_lp.diagnostics.patterns.PatternStream`), with ``domain_names`` the domain labels of
        :meth:`update`'s ``domains`` indices (None: no domains)."""
        N = info.num_experts
        if info.top_k is None:
            info = replace(info, top_k=k)
        return cls(info=info, k=k, load=LoadPartial.empty(N, top_k=k), collapse=None,
                   margins=MarginPartial.empty(k, eps=eps),
                   native=NativeAgreementPartial.empty(N) if native_semantics(info) else None,
                   source="recomputed top-k",
                   patterns=PatternStream.empty(N, k, domain_names=domain_names) if patterns else None)

    def update(self, chunk: Chunk, *, hidden: bool = False,
               collapse_update: Callable[[Callable[[], None]], None] | None = None, domains: np.ndarray | None = None,
               on_routed: Callable[[Routed], None] | None = None) -> torch.Tensor:
        """Add one chunk; return its (n, N) bool model selection (for the sequence sample).

        The chunk is processed in blocks of :data:`BLOCK_TOKENS` tokens (module docstring).
        hidden: feed the chunk's hidden states (when present) to the collapse partial.
        collapse_update: how to run the collapse partial's update of a block (a callable taking a thunk),
        e.g. on a worker thread; default: now, on this thread.
        domains: (n,) int64 domain index of each token (-1: unlabelled), for the patterns' domain shares.
        on_routed: called with the chunk's :class:`~usmoe_lp.diagnostics.routed.Routed` (the model's selection,
        ranked best first: captured ids in their given order, else by the selection scores, ties to the lowest
        index) when the stream measures patterns (the driver's layer-to-layer transitions).
        """
        info, k, N = self.info, self.k, self.info.num_experts
        n = chunk.num_tokens
        if chunk.logits is None:
            mask = self._update_selection(chunk)
            self._patterns(chunk, _captured_ranked(chunk.selected, None), domains, on_routed)
            return mask
        ranks: list[np.ndarray] | None = [] if self.patterns is not None else None
        captured = None if chunk.selected is None else captured_mask(chunk.selected, n, N)
        replay = _replays_native(info)
        self.source = "captured" if captured is not None else "recomputed native" if replay else "recomputed top-k"
        if captured is not None and self.native is not None and not replay:  # a capacity counts whole sequences
            self.native.update(chunk.logits, captured, info, sequence_ids=chunk.sequence_ids)
        h = chunk.hidden if (hidden and chunk.hidden is not None) else None
        if self.collapse is None:
            self.collapse = CollapsePartial.empty(N, hidden_dim=None if h is None else int(h.shape[1]))
        collapse = self.collapse
        softmax = info.score_function != "sigmoid"  # probabilities() is the softmax of the logits
        out = captured.numpy() if captured is not None else np.empty((n, N), dtype=bool)
        work, main = _Work(), _Work()  # the collapse update's (maybe on a thread) and this thread's
        flags = np.empty(min(n, BLOCK_TOKENS) * N, dtype=bool)
        for i, a in enumerate(range(0, n, BLOCK_TOKENS)):
            b = min(n, a + BLOCK_TOKENS)
            logits = chunk.logits[a:b]
            # two buffers in turn: the collapse thread may still read the previous block's logits (it is waited
            # for before the next block's collapse update is submitted; this call's buffers stay alive as long
            # as a pending update refers to them)
            z = main.get(f"z{i % 2}", b - a, N, torch.float32).copy_(logits)
            probs = probabilities(z, info.score_function)
            scores, tolerance = stream_scores(logits, z, probs, info)
            srt = None
            if k < N:
                srt = main.get("sorted", b - a, N, scores.dtype).numpy()
                np.copyto(srt, scores.numpy())
                srt.sort(axis=1)
            if captured is None:
                if replay:
                    native_selection(logits, info, k, scores, srt, tolerance, out=out[a:b])
                else:
                    recompute_model_selection(scores, k, srt, out=out[a:b])
            elif self.native is not None and replay:
                self.native.update(logits, captured[a:b], info,
                                   replay=native_selection(logits, info, k, scores, srt, tolerance))
            if ranks is not None and (captured is None or chunk.selected.dtype == torch.bool):
                ranks.append(ranked_selection(out[a:b], scores.numpy()))
            hb = None if h is None else h[a:b].float()  # by block: a chunk of hidden states in float32 is large
            if collapse_update is None:
                collapse.update(z, probs, hb, checked=True, scratch=work)
            else:
                collapse_update(lambda z=z, probs=probs, hb=hb: collapse.update(z, probs, hb, checked=True,
                                                                                 scratch=work))
            mask = out[a:b]
            if softmax:
                top = srt[:, -1] if (srt is not None and scores is probs) else None
                self.load.update_softmax(mask, z, probs, p_max=None if top is None else torch.from_numpy(top),
                                         experts_each=k if captured is None else None,  # a top-k: k each
                                         scratch=main.get("x", b - a, N, torch.float32))
            else:
                self.load.update(mask, probs, z)
            self.margins.update_sorted(srt if srt is not None else scores.numpy(), flags)
        self.tokens += n
        if ranks is not None:
            if ranks:
                ranked = _concat_ranked(ranks)
            elif chunk.selected is not None:
                ranked = _captured_ranked(chunk.selected, None)
            else:  # no token
                ranked = np.zeros((0, k), dtype=np.int64)
            self._patterns(chunk, ranked, domains, on_routed)
        return captured if captured is not None else torch.from_numpy(out)

    def _patterns(self, chunk: Chunk, ranked: np.ndarray, domains: np.ndarray | None,
                  on_routed: Callable[[Routed], None] | None) -> None:
        """Feed the chunk's ranked selection to the pattern partials (and ``on_routed``)."""
        if self.patterns is None:
            return
        r = Routed(ranked, self.info.num_experts, token_ids=chunk.token_ids.numpy(),
                   sequence_ids=chunk.sequence_ids.numpy(), positions=chunk.positions.numpy(), domains=domains)
        self.patterns.update(r)
        if on_routed is not None:
            on_routed(r)

    def _update_selection(self, chunk: Chunk) -> torch.Tensor:
        """A chunk of a selection log (no logits; ``selected`` (n, k) expert ids, -1 = empty slot): the load of
        the recorded selection only (its probability- and logit-based fields stay None: :class:`LoadPartial`)."""
        if chunk.selected is None:
            raise ShapeMismatch(f"layer {self.info.name!r}: a chunk with neither logits nor a selection")
        mask = captured_mask(chunk.selected, chunk.num_tokens, self.info.num_experts)
        self.load.update(mask.numpy())
        self.source = "captured"
        self.selection_only = True
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
        patterns = None if self.patterns is None else self.patterns.merge(other.patterns)
        return LayerStream(info=self.info, k=self.k, load=self.load.merge(other.load), collapse=collapse,
                           margins=self.margins.merge(other.margins), native=native,
                           source=self.source if self.tokens else other.source, tokens=self.tokens + other.tokens,
                           selection_only=self.selection_only or other.selection_only, patterns=patterns)

    def result(self, router_weights: torch.Tensor | None = None) -> dict:
        """The layer's streaming statistics: ``load``, ``collapse``, ``margins``, ``native`` (None unless a
        captured selection was compared), ``source``, ``tokens``. router_weights: (N, d) for the collapse
        statistics of the router's weight rows. ``collapse`` and ``margins`` are None for a selection log
        (:attr:`selection_only`: they need the logits)."""
        if self.selection_only:
            return {"load": self.load.result(), "collapse": None, "margins": None, "native": None,
                    "source": self.source, "tokens": self.tokens}
        collapse = self.collapse if self.collapse is not None else CollapsePartial.empty(self.info.num_experts)
        return {"load": self.load.result(), "collapse": collapse.result(router_weights=router_weights),
                "margins": self.margins.result(),
                "native": self.native.result() if (self.native is not None and self.native.tokens) else None,
                "source": self.source, "tokens": self.tokens}


def stream_chunks(stream: LayerStream, chunks: Iterable[Chunk], *, hidden: bool = False, threads: bool = True,
                  on_chunk: Callable[[Chunk, torch.Tensor], None] | None = None,
                  domains_of: Callable[[Chunk], np.ndarray] | None = None,
                  on_routed: Callable[[Routed], None] | None = None) -> LayerStream:
    """Feed ``chunks`` to ``stream`` in order (in place; returned for chaining).

    threads: run the collapse Grams (torch matmuls, which release the GIL) on a worker thread while this
    thread does the sort, the mask, the load and the margins of the same chunk. on_chunk: called with each
    chunk and its model selection (the sequence sample, progress). domains_of: a chunk -> its (n,) domain
    indices (:meth:`LayerStream.update`'s ``domains``); on_routed: as in :meth:`LayerStream.update`.
    """
    pool = ThreadPoolExecutor(max_workers=1) if threads else None
    pending = []

    def submit(thunk):
        if pending:
            pending.pop().result()
        pending.append(pool.submit(thunk))

    try:
        for chunk in chunks:
            mask = stream.update(chunk, hidden=hidden, collapse_update=submit if pool is not None else None,
                                 domains=None if domains_of is None else domains_of(chunk), on_routed=on_routed)
            if on_chunk is not None:
                on_chunk(chunk, mask)
        if pending:
            pending.pop().result()
    finally:
        if pool is not None:
            pool.shutdown()
    return stream
