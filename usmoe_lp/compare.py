"""Two or more router logs side by side, per layer, and token by token where they route the same tokens.

:func:`compare` runs :func:`usmoe_lp.diagnostics.analyze` on each log (load, entropies, collapse, margins,
counterfactual re-routing and leakage, as its ``config`` asks) and sets the numbers beside each other per
layer; where the logs hold the same tokens in the same order (equal sequence ids and positions, and equal
token ids wherever both logs know them), it also measures how the logs' routings agree, token by token,
in each layer (:class:`AgreementStats`): exact-set agreement, mean Jaccard similarity of the expert sets,
top-1 agreement, mean |S_a ∩ S_b| / k (OLMoE's "router saturation" between checkpoints, Muennighoff et al.
2024, arXiv 2409.02060 §4.1), the share of tokens whose top-1 expert changed (StableMoE's "routing
fluctuation", Dai et al. 2022, arXiv 2204.08396 §2.2), the top-1 agreement chance gives, and the top-1
agreement after the best one-to-one relabelling of the experts (a permuted-expert twin agrees fully).

Uses: two checkpoints of one model, a model and its random twin, one prompt set routed by two routers
(``usmoe-lp route`` / ``evaluate`` capture logs).

Layers are matched by name (the ``layers`` asked for, default the first log's, must be in every log);
where that fails but every log has as many layers, by order (:func:`match_layers`).

The model's selection of each chunk is what ``analyze`` uses: the captured one, else the registry's
``native`` router replayed on the logits, else the top-k of the probabilities
(:func:`usmoe_lp.diagnostics.stream.model_mask` over :func:`~usmoe_lp.diagnostics.stream.selection_scores`);
a selection-only log (no logits) gives its recorded ``selected`` ids. The top-1 expert of a token is the
selected expert with the largest selection score (ties to the lowest index), and in a selection-only log
its first non-empty slot (the serving stack's rank order).

A selection log (the experts each token was routed to, no logits) is analysed as ``analyze`` analyses it (the
load of its recorded selection; the rest in its ``unavailable``) and compared token by token like any log.

The agreement pass is cut into token ranges by the first log's shards
(:func:`usmoe_lp.diagnostics.analyze.plan_ranges`) and runs in this process or on a Dask cluster
(:mod:`usmoe_lp.cluster`); its partials hold integer counts only, so any cut gives the same numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from usmoe_lp._threads import one_torch_thread
from usmoe_lp.cluster import check_cluster, map_reduce
from usmoe_lp.diagnostics.analyze import (
    AnalyzeConfig,
    AnalyzeResult,
    LogRef,
    TokenRange,
    analyze,
    log_path,
    plan_ranges,
    resolve_top_k,
)
from usmoe_lp.diagnostics.stream import captured_mask, model_mask, selection_scores
from usmoe_lp.errors import InvalidParameter
from usmoe_lp.logs.format import LayerInfo
from usmoe_lp.logs.reader import Chunk, RouterLog

__all__ = ["AgreementPartial", "AgreementStats", "Alignment", "CompareResult", "chunk_selection", "compare",
           "default_labels", "match_layers", "write_compare"]

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: stage ``"analyze <label>: stream"`` / ``"analyze <label>: sample"`` (analyze's
stages on that log: tokens x layers, then layers) or ``"agreement"`` (tokens x layers compared)."""


# ============================================================================ per-token selections
def chunk_selection(chunk: Chunk, info: LayerInfo, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The model's selection of one chunk of one layer, as ``analyze`` takes it: ``(mask, top1)``.

    mask: (n, N) bool, the selected experts (:func:`usmoe_lp.diagnostics.stream.model_mask` of the chunk's
    :func:`~usmoe_lp.diagnostics.stream.selection_scores`; a selection-only chunk: its ``selected`` ids).
    top1: (n,) int64, the selected expert with the largest selection score, ties to the lowest index (a
    selection-only chunk: the first slot that is not -1); -1 where a token has no expert.
    info: the layer (its ``top_k`` may be unset); k: the model's experts per token.
    """
    n, N = chunk.num_tokens, info.num_experts
    if chunk.logits is None:
        sel = torch.as_tensor(chunk.selected)
        if sel.dtype == torch.bool:
            raise InvalidParameter(f"layer {info.name!r}: a selection-only log must record expert ids, not a mask")
        sel = sel.long().reshape(n, -1)
        mask = captured_mask(sel, n, N).numpy()
        real = sel >= 0
        first = real.int().argmax(dim=1, keepdim=True)  # first non-empty slot (0 when all are empty)
        top1 = torch.where(real.any(dim=1), sel.gather(1, first).squeeze(1), -1)
        return mask, top1.numpy().astype(np.int64)
    if info.top_k is None:
        info = replace(info, top_k=k)
    scores = selection_scores(chunk.logits, info)
    mask, _ = model_mask(chunk, scores, k, None, info)
    mask = torch.as_tensor(mask, dtype=torch.bool)
    ranked = torch.where(mask, scores, torch.tensor(float("-inf"), dtype=scores.dtype))
    top1 = torch.where(mask.any(dim=1), ranked.argmax(dim=1), -1)  # argmax: the first maximum
    return mask.numpy(), top1.numpy().astype(np.int64)


# ============================================================================ agreement statistics
@dataclass(frozen=True)
class AgreementStats:
    """How two logs route the same tokens in one layer (a pair of logs, one matched layer).

    layer: the layer's name in the first log (``layers`` of :class:`CompareResult` gives every log's);
    a, b: the two logs' labels; num_experts_a/b, k_a/b: N and k of the layer in each. tokens: T, the tokens
    compared. exact_tokens: tokens whose two expert sets are equal; top1_tokens: tokens whose top-1 expert is
    the same (both without an expert counts as the same); overlap_pairs: sum over tokens of |S_a ∩ S_b|;
    jaccard_counts: ((|S_a ∩ S_b|, |S_a ∪ S_b|), tokens) for every pair of sizes seen; top1_counts:
    (N_a + 1, N_b + 1) int64, tokens by (top-1 in a, top-1 in b), the last row / column = no expert.
    Every field is an integer count, so the statistics of a log cut into ranges merge exactly.
    """

    layer: str
    a: str
    b: str
    num_experts_a: int
    num_experts_b: int
    k_a: int
    k_b: int
    tokens: int
    exact_tokens: int
    top1_tokens: int
    overlap_pairs: int
    jaccard_counts: tuple[tuple[tuple[int, int], int], ...]
    top1_counts: np.ndarray = field(repr=False)

    @property
    def k(self) -> int:
        """The k that divides the overlap: the layer's k, the larger of the two where they differ."""
        return max(self.k_a, self.k_b)

    @property
    def exact_agreement(self) -> float:
        """Share of tokens whose expert sets are equal."""
        return self.exact_tokens / self.tokens if self.tokens else float("nan")

    @property
    def jaccard(self) -> float:
        """Mean over tokens of |S_a ∩ S_b| / |S_a ∪ S_b| (1 where both sets are empty)."""
        if not self.tokens:
            return float("nan")
        return sum(c * (i / u if u else 1.0) for (i, u), c in self.jaccard_counts) / self.tokens

    @property
    def top1_agreement(self) -> float:
        """Share of tokens with the same top-1 expert."""
        return self.top1_tokens / self.tokens if self.tokens else float("nan")

    @property
    def fluctuation(self) -> float:
        """StableMoE's routing fluctuation: share of tokens whose top-1 expert changed (1 - top-1 agreement)."""
        return 1.0 - self.top1_agreement

    @property
    def overlap(self) -> float:
        """Mean over tokens of |S_a ∩ S_b| / k (OLMoE's router saturation when b is the final checkpoint)."""
        return self.overlap_pairs / (self.tokens * self.k) if self.tokens and self.k else float("nan")

    @property
    def top1_chance(self) -> float:
        """The top-1 agreement of two independent routings with the same top-1 frequencies:
        sum_e P_a(e) P_b(e) over the expert ids both layers have (and 'no expert')."""
        if not self.tokens:
            return float("nan")
        c = np.asarray(self.top1_counts, dtype=np.float64)
        pa, pb = c.sum(axis=1) / self.tokens, c.sum(axis=0) / self.tokens
        m = min(self.num_experts_a, self.num_experts_b)
        return float(pa[:m] @ pb[:m] + pa[-1] * pb[-1])

    @property
    def matched_top1_agreement(self) -> float:
        """Top-1 agreement after the best one-to-one relabelling of b's experts to a's (an assignment on the
        top-1 contingency table, scipy's ``linear_sum_assignment``): 1 for a permuted-expert twin."""
        if not self.tokens:
            return float("nan")
        from scipy.optimize import linear_sum_assignment

        c = np.asarray(self.top1_counts)
        rows, cols = linear_sum_assignment(c[:-1, :-1], maximize=True)
        return float((c[rows, cols].sum() + c[-1, -1]) / self.tokens)

    def row(self) -> dict[str, Any]:
        """The frame row: identifiers, sizes and every rate above."""
        return {"layer": self.layer, "a": self.a, "b": self.b, "tokens": self.tokens, "k": self.k,
                "exact_agreement": self.exact_agreement, "jaccard": self.jaccard,
                "top1_agreement": self.top1_agreement, "overlap": self.overlap, "fluctuation": self.fluctuation,
                "top1_chance": self.top1_chance, "matched_top1_agreement": self.matched_top1_agreement}

    def to_dict(self) -> dict[str, Any]:
        return {**self.row(), "num_experts_a": self.num_experts_a, "num_experts_b": self.num_experts_b,
                "k_a": self.k_a, "k_b": self.k_b, "exact_tokens": self.exact_tokens,
                "top1_tokens": self.top1_tokens, "overlap_pairs": self.overlap_pairs}


@dataclass
class AgreementPartial:
    """The mergeable counts behind :class:`AgreementStats` (:mod:`usmoe_lp.diagnostics.partial`'s protocol)."""

    layer: str
    a: str
    b: str
    num_experts_a: int
    num_experts_b: int
    k_a: int
    k_b: int
    tokens: int = 0
    exact_tokens: int = 0
    top1_tokens: int = 0
    overlap_pairs: int = 0
    jaccard_counts: dict[tuple[int, int], int] = field(default_factory=dict)
    top1_counts: np.ndarray | None = None

    @classmethod
    def empty(cls, layer: str, a: str, b: str, num_experts_a: int, num_experts_b: int, k_a: int,
              k_b: int) -> AgreementPartial:
        """Nothing seen yet, for the layer ``layer`` of logs ``a`` and ``b`` (N and k of each)."""
        return cls(layer, a, b, num_experts_a, num_experts_b, k_a, k_b,
                   top1_counts=np.zeros((num_experts_a + 1, num_experts_b + 1), dtype=np.int64))

    def update(self, mask_a: np.ndarray, top1_a: np.ndarray, mask_b: np.ndarray, top1_b: np.ndarray) -> None:
        """Add n tokens: masks (n, N_a) and (n, N_b) bool, top-1 experts (n,) int64 (-1: none), the same tokens
        in the same order in both."""
        n = mask_a.shape[0]
        if mask_b.shape[0] != n or top1_a.shape != (n,) or top1_b.shape != (n,):
            raise InvalidParameter(f"agreement update: {n} and {mask_b.shape[0]} tokens; the logs must give the "
                                   "same tokens")
        m = min(mask_a.shape[1], mask_b.shape[1])
        inter = np.count_nonzero(mask_a[:, :m] & mask_b[:, :m], axis=1)
        union = np.count_nonzero(mask_a, axis=1) + np.count_nonzero(mask_b, axis=1) - inter
        self.tokens += n
        self.exact_tokens += int(np.count_nonzero(inter == union))
        self.top1_tokens += int(np.count_nonzero(top1_a == top1_b))
        self.overlap_pairs += int(inter.sum())
        width = mask_a.shape[1] + mask_b.shape[1] + 1
        codes, counts = np.unique(inter.astype(np.int64) * width + union, return_counts=True)
        for code, c in zip(codes.tolist(), counts.tolist(), strict=True):
            key = divmod(code, width)
            self.jaccard_counts[key] = self.jaccard_counts.get(key, 0) + c
        na, nb = self.num_experts_a, self.num_experts_b
        ia = np.where(top1_a < 0, na, top1_a)
        ib = np.where(top1_b < 0, nb, top1_b)
        self.top1_counts += np.bincount(ia * (nb + 1) + ib, minlength=(na + 1) * (nb + 1)).reshape(na + 1, nb + 1)

    def merge(self, other: AgreementPartial) -> AgreementPartial:
        """A new partial holding both (``self``'s tokens first; the counts simply add)."""
        ident = ("layer", "a", "b", "num_experts_a", "num_experts_b", "k_a", "k_b")
        if any(getattr(self, f) != getattr(other, f) for f in ident):
            raise InvalidParameter(f"cannot merge the agreement of {self.layer!r} ({self.a} vs {self.b}) with that "
                                   f"of {other.layer!r} ({other.a} vs {other.b})")
        counts = dict(self.jaccard_counts)
        for key, c in other.jaccard_counts.items():
            counts[key] = counts.get(key, 0) + c
        return AgreementPartial(*(getattr(self, f) for f in ident), tokens=self.tokens + other.tokens,
                                exact_tokens=self.exact_tokens + other.exact_tokens,
                                top1_tokens=self.top1_tokens + other.top1_tokens,
                                overlap_pairs=self.overlap_pairs + other.overlap_pairs, jaccard_counts=counts,
                                top1_counts=self.top1_counts + other.top1_counts)

    def result(self) -> AgreementStats:
        return AgreementStats(self.layer, self.a, self.b, self.num_experts_a, self.num_experts_b, self.k_a,
                              self.k_b, self.tokens, self.exact_tokens, self.top1_tokens, self.overlap_pairs,
                              tuple(sorted(self.jaccard_counts.items())), self.top1_counts.copy())


# ============================================================================ token alignment
@dataclass(frozen=True)
class Alignment:
    """Whether the logs route the same tokens in the same order.

    shared: True when every log has the same number of tokens with equal sequence ids and positions, and
    equal token ids wherever both logs know them (-1: unknown). tokens: the tokens compared token by token
    (0 when not shared). token_ids_checked: of those, the tokens whose id every log knows (the rest matched
    on sequence and position alone). reason: why the agreement is absent (the first mismatching token), or
    None.
    """

    shared: bool
    tokens: int
    token_ids_checked: int
    reason: str | None = None


def _describe(label: str, chunk: Chunk, i: int) -> str:
    tid = int(chunk.token_ids[i])
    return (f"{label} has sequence {int(chunk.sequence_ids[i])}, position {int(chunk.positions[i])}, "
            f"token id {tid if tid >= 0 else 'unknown'}")


def _first_mismatch(chunks: Sequence[Chunk], labels: Sequence[str]) -> tuple[str | None, int]:
    """The first token of these chunks (one per log, the same token range) where a log differs from the
    first, described; and the number of tokens whose id every log knows."""
    ref = chunks[0]
    known = ref.token_ids >= 0
    for label, c in zip(labels[1:], chunks[1:], strict=True):
        both = (ref.token_ids >= 0) & (c.token_ids >= 0)
        bad = (ref.sequence_ids != c.sequence_ids) | (ref.positions != c.positions) | (both & (ref.token_ids !=
                                                                                              c.token_ids))
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            return (f"token {ref.token_start + i} differs: {_describe(labels[0], ref, i)}; "
                    f"{_describe(label, c, i)}"), 0
        known &= c.token_ids >= 0
    return None, int(known.sum())


# ============================================================================ layer matching
def match_layers(logs: Sequence[RouterLog], labels: Sequence[str], layers: Sequence[str] | None = None,
                 *, name: str = "layers") -> tuple[tuple[tuple[str, ...], ...], str]:
    """The matched layers: one tuple per row with the layer's name in each log, and ``"name"`` or ``"order"``.

    By name when every log has each of ``layers`` (default: the first log's layers); else, when every log has
    as many layers as the first, by order (``layers`` then name the first log's layers); else an
    :class:`InvalidParameter` saying what differs. ``name``: how the caller spells the parameter.
    """
    first = logs[0].layers
    if layers is not None:
        layers = tuple(layers)
        if not layers:
            raise InvalidParameter(f"{name} is empty; name at least one layer of {labels[0]} ({', '.join(first)})")
    wanted = layers if layers is not None else first
    missing = {lb: [n for n in wanted if n not in log.layers] for lb, log in zip(labels, logs, strict=True)}
    if not any(missing.values()):
        return tuple((n,) * len(logs) for n in wanted), "name"
    counts = {lb: len(log.layers) for lb, log in zip(labels, logs, strict=True)}
    if len(set(counts.values())) == 1:
        unknown = [n for n in wanted if n not in first]
        if unknown:
            raise InvalidParameter(f"{name} {', '.join(unknown)}: not a layer of {labels[0]}; where the logs' layer "
                                   f"names differ, {name} names the first log's layers ({', '.join(first)})")
        return tuple(tuple(log.layers[first.index(n)] for log in logs) for n in wanted), "order"
    lacks = "; ".join(f"{lb} lacks {', '.join(v)}" for lb, v in missing.items() if v)
    raise InvalidParameter(f"the logs' layers cannot be matched: by name, {lacks}; by order, their numbers of layers "
                           f"differ ({', '.join(f'{lb}: {c}' for lb, c in counts.items())}); name layers every log "
                           f"has with {name}")


def default_labels(paths: Sequence[str | Path]) -> tuple[str, ...]:
    """Labels of the logs: their directory names, or the paths as given where names repeat, numbered where
    those repeat too."""
    names = [Path(p).name or str(p) for p in paths]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    if len(set(names)) < len(names):
        names = [f"{n} ({i + 1})" for i, n in enumerate(names)]
    return tuple(names)


# ============================================================================ the result
@dataclass(frozen=True)
class CompareResult:
    """The result of :func:`compare`.

    labels, sources: each log's label and path. layers: one tuple per matched layer with its name in each log
    (row names: the first log's). matched_by: ``"name"`` or ``"order"``. contents: each log's ``content``
    (``"logits"``, or ``"selection"`` for a log of selected experts only). analyses: each log's
    :class:`~usmoe_lp.diagnostics.AnalyzeResult` (of a selection log: the load of its recorded selection, the
    rest in its ``unavailable``). alignment: whether the logs share their tokens. agreement: per matched
    layer (in order), per pair of logs (i < j, in order), an :class:`AgreementStats`; empty when the tokens are
    not shared. config: the analyze settings each log ran with. seconds: wall time (not in the report files).
    """

    labels: tuple[str, ...]
    sources: tuple[str, ...]
    layers: tuple[tuple[str, ...], ...]
    matched_by: str
    contents: tuple[str, ...]
    analyses: tuple[AnalyzeResult, ...]
    alignment: Alignment
    agreement: tuple[AgreementStats, ...]
    config: AnalyzeConfig
    seconds: float = 0.0

    @property
    def layer_names(self) -> tuple[str, ...]:
        """The matched layers by the first log's names."""
        return tuple(row[0] for row in self.layers)

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        """The compared pairs of labels, in order."""
        return tuple((a, b) for i, a in enumerate(self.labels) for b in self.labels[i + 1:])

    def side_by_side_frame(self):
        """Tidy per-layer metrics of every log: one row per matched layer x log (columns ``layer`` (the first
        log's name), ``log`` (label), ``log_layer`` (the name in that log), then the columns of
        :meth:`AnalyzeResult.load_frame` and :meth:`AnalyzeResult.collapse_frame`, equal to ``analyze``'s on
        that log; NaN where a log lacks a column, e.g. a selection log's logit-based ones)."""
        import pandas as pd

        rows = []
        for j, (label, analysis) in enumerate(zip(self.labels, self.analyses, strict=True)):
            per = analysis.load_frame()
            collapse = analysis.collapse_frame()
            if not collapse.empty:
                per = per.merge(collapse, on="layer", how="left")
            per = per.set_index("layer")
            for row in self.layers:
                rows.append({"layer": row[0], "log": label, "log_layer": row[j], **per.loc[row[j]].to_dict()})
        return pd.DataFrame(rows)

    def counterfactual_frame(self):
        """Every log's :meth:`AnalyzeResult.counterfactual_frame` (layer x router setting, and ``pooled``), with a
        first column ``log`` (its label); ``layer`` is the first log's name of the matched layer."""
        import pandas as pd

        frames = []
        for j, (label, analysis) in enumerate(zip(self.labels, self.analyses, strict=True)):
            f = analysis.counterfactual_frame()
            if f.empty:
                continue
            rename = {row[j]: row[0] for row in self.layers}
            f["layer"] = f["layer"].map(lambda n, rename=rename: rename.get(n, n))
            f.insert(0, "log", label)
            frames.append(f)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def agreement_frame(self):
        """Tidy routing agreement: one row per matched layer x pair of logs (columns ``layer``, ``a``, ``b``,
        ``tokens``, ``k``, ``exact_agreement``, ``jaccard``, ``top1_agreement``, ``overlap``, ``fluctuation``,
        ``top1_chance``, ``matched_top1_agreement``), plus a ``pooled`` row per pair over every layer's tokens
        (the counts add; ``top1_chance`` and ``matched_top1_agreement``, per layer by nature, are averaged with
        the layers' tokens as weights). Empty when the logs do not share their tokens."""
        import pandas as pd

        if not self.agreement:
            return pd.DataFrame(columns=["layer", "a", "b", "tokens", "k", "exact_agreement", "jaccard",
                                         "top1_agreement", "overlap", "fluctuation", "top1_chance",
                                         "matched_top1_agreement"])
        rows = [s.row() for s in self.agreement]
        for a, b in self.pairs:
            stats = [s for s in self.agreement if (s.a, s.b) == (a, b)]
            tokens = sum(s.tokens for s in stats)
            jac = sum(s.jaccard * s.tokens for s in stats)
            top1 = sum(s.top1_tokens for s in stats) / tokens if tokens else float("nan")
            rows.append({"layer": "pooled", "a": a, "b": b, "tokens": tokens, "k": max(s.k for s in stats),
                         "exact_agreement": sum(s.exact_tokens for s in stats) / tokens if tokens else float("nan"),
                         "jaccard": jac / tokens if tokens else float("nan"), "top1_agreement": top1,
                         "overlap": (sum(s.overlap_pairs for s in stats) / sum(s.tokens * s.k for s in stats)
                                     if tokens else float("nan")),
                         "fluctuation": 1.0 - top1,
                         "top1_chance": _weighted([s.top1_chance for s in stats], [s.tokens for s in stats]),
                         "matched_top1_agreement": _weighted([s.matched_top1_agreement for s in stats],
                                                             [s.tokens for s in stats])})
        return pd.DataFrame(rows)


def _weighted(values: Sequence[float], weights: Sequence[int]) -> float:
    total = sum(weights)
    return float(sum(v * w for v, w in zip(values, weights, strict=True)) / total) if total else float("nan")


# ============================================================================ tasks over token ranges
@dataclass(frozen=True)
class _AgreeTask:
    """Tokens ``range`` of every log (``logs``: by path) for the matched layers ``rows`` (per row, per log:
    the layer's info and k); ``check_only``: compare the token metadata of the first row only."""

    logs: tuple[LogRef, ...]
    labels: tuple[str, ...]
    range: TokenRange
    rows: tuple[tuple[tuple[LayerInfo, int], ...], ...]
    chunk_tokens: int
    check_only: bool = False


@dataclass(frozen=True)
class _AgreeOut:
    range: TokenRange
    parts: tuple[tuple[AgreementPartial, ...], ...]  # per row, per pair
    mismatch: str | None
    known: int


def _pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def _agree_task(task: _AgreeTask) -> _AgreeOut:
    """Stream one token range of every log (module-level: Dask workers import it); torch on one thread."""
    r, labels = task.range, task.labels
    pairs = _pairs(len(task.logs))
    parts = tuple(tuple(AgreementPartial.empty(row[0][0].name, labels[i], labels[j], row[i][0].num_experts,
                                               row[j][0].num_experts, row[i][1], row[j][1]) for i, j in pairs)
                  for row in task.rows)
    known = 0
    with one_torch_thread():
        readers = [ref.open() for ref in task.logs]
        for row_index, (row, row_parts) in enumerate(zip(task.rows, parts, strict=True)):
            streams = [reader.chunks(info.name, r.start, r.stop, task.chunk_tokens, False)
                       for reader, (info, _) in zip(readers, row, strict=True)]
            for chunks in zip(*streams, strict=True):
                if row_index == 0:
                    mismatch, n_known = _first_mismatch(chunks, labels)
                    if mismatch is not None:
                        return _AgreeOut(r, parts, mismatch, known)
                    known += n_known
                if task.check_only:
                    continue
                sels = [chunk_selection(c, info, k) for c, (info, k) in zip(chunks, row, strict=True)]
                for (i, j), part in zip(pairs, row_parts, strict=True):
                    part.update(*sels[i], *sels[j])
            if task.check_only:
                break
    return _AgreeOut(r, parts, None, known)


def _merge_agree(a: _AgreeOut, b: _AgreeOut) -> _AgreeOut:
    """Two consecutive ranges as one; the first mismatch (in token order) wins."""
    return _AgreeOut(TokenRange(a.range.index, a.range.start, b.range.stop),
                     tuple(tuple(x.merge(y) for x, y in zip(ra, rb, strict=True))
                           for ra, rb in zip(a.parts, b.parts, strict=True)),
                     a.mismatch if a.mismatch is not None else b.mismatch, a.known + b.known)


# ============================================================================ the driver
def compare(logs: Sequence[Any], *, labels: Sequence[str] | None = None, layers: Sequence[str] | None = None,
            config: AnalyzeConfig | None = None, client=None, progress: Progress | None = None,
            top_k: int | None = None) -> CompareResult:
    """Compare two or more router logs: each analysed (side by side per layer) and, where they share their
    tokens, their routing agreement token by token per layer.

    logs: paths (or ``file://`` URLs) of router logs, or opened :class:`~usmoe_lp.logs.RouterLog`\\ s. labels:
    one unique name per log (default :func:`default_labels`). layers: the layers to compare, by the first log's
    names (default all; matching: :func:`match_layers`). config: the :class:`AnalyzeConfig` every log is
    analysed with (default ``AnalyzeConfig()``: the whole suite; ``counterfactual=False, leakage=False`` keeps
    the streaming metrics only). top_k: the model's k where a log does not record it. client: a
    ``dask.distributed.Client`` to run on (None: this process); every worker must see the logs at their absolute
    paths. progress: ``progress(stage, done, total)`` (:data:`Progress`).

    The agreement (:class:`AgreementStats`) is measured where the logs hold the same tokens in the same order;
    otherwise :attr:`CompareResult.alignment` says why not, naming the first token that differs.
    Returns a :class:`CompareResult`; :func:`write_compare` writes its report.
    """
    t0 = time.perf_counter()
    if isinstance(logs, str | Path | RouterLog):
        logs = (logs,)
    logs = list(logs)
    if len(logs) < 2:
        raise InvalidParameter(f"compare needs at least two router logs, got {len(logs)}")
    opened = [log if isinstance(log, RouterLog) else RouterLog.open(log_path(log)) for log in logs]
    paths = [str(log.path) for log in opened]
    if labels is None:
        labels = default_labels([log if not isinstance(log, RouterLog) else log.path for log in logs])
    else:
        labels = tuple(str(lb) for lb in labels)
        if len(labels) != len(opened):
            raise InvalidParameter(f"labels: {len(labels)} given for {len(opened)} logs; give one label per log")
        if len(set(labels)) < len(labels) or not all(labels):
            raise InvalidParameter(f"labels must be unique and non-empty, got {list(labels)}")
    check_cluster(client=client)
    cfg = config or AnalyzeConfig()
    rows, matched_by = match_layers(opened, labels, layers)
    ks = []
    for j, log in enumerate(opened):
        names = [row[j] for row in rows]
        ks.append(resolve_top_k([log.layer_info(n) for n in names], top_k))

    def staged(prefix: str) -> Progress | None:
        return None if progress is None else (lambda s, done, total: progress(f"{prefix}{s}", done, total))

    analyses = tuple(analyze(log, config=cfg, layers=[row[j] for row in rows], top_k=top_k, client=client,
                             progress=staged(f"analyze {label}: "))
                     for j, (label, log) in enumerate(zip(labels, opened, strict=True)))
    alignment, agreement = _agreement(opened, labels, rows, ks, cfg.chunk_tokens, client, staged(""))
    return CompareResult(labels=tuple(labels), sources=tuple(paths), layers=rows, matched_by=matched_by,
                         contents=tuple(log.content for log in opened), analyses=analyses, alignment=alignment,
                         agreement=agreement, config=cfg, seconds=time.perf_counter() - t0)


def _ref(log: RouterLog) -> LogRef:
    return LogRef(str(Path(log.path).absolute()), "lazy" if log.verify == "lazy" else "none")


def _agreement(logs: Sequence[RouterLog], labels, rows, ks, chunk_tokens: int, client,
               progress: Progress | None) -> tuple[Alignment, tuple[AgreementStats, ...]]:
    """The token alignment of the logs and, when they share their tokens, the agreement of every pair per row."""
    counts = [log.num_tokens for log in logs]
    common = min(counts)
    spec = tuple(tuple((log.layer_info(row[j]), ks[j][row[j]]) for j, log in enumerate(logs)) for row in rows)
    length_reason = None
    if len(set(counts)) > 1:
        shortest = labels[int(np.argmin(counts))]
        sizes = ", ".join(f"{lb}: {c}" for lb, c in zip(labels, counts, strict=True))
        length_reason = (f"the logs hold different numbers of tokens ({sizes}); token {common} is past the end of "
                         f"{shortest}")
    if common == 0:
        reason = length_reason or "the logs hold no tokens"
        return Alignment(False, 0, 0, reason), ()
    shards = [(a, min(b, common)) for a, b in ((s.token_start, s.token_stop) for s in logs[0].shards) if a < common]
    ranges = plan_ranges(shards, chunk_tokens)
    refs = tuple(_ref(log) for log in logs)
    check_only = length_reason is not None
    tasks = [_AgreeTask(refs, tuple(labels), r, spec, chunk_tokens, check_only) for r in ranges]
    total, done = common * (1 if check_only else len(rows)), 0

    def finished(_i: int, out: _AgreeOut) -> None:
        nonlocal done
        done += out.range.num_tokens * (1 if check_only else len(rows))
        if progress is not None:
            progress("agreement", done, total)

    merged = map_reduce(_agree_task, tasks, _merge_agree, client=client, progress=finished,
                        key="usmoe-lp-compare-agreement")
    if merged.mismatch is not None:
        return Alignment(False, 0, 0, merged.mismatch), ()
    if length_reason is not None:
        return Alignment(False, 0, 0, f"{length_reason} (the first {common} tokens match)"), ()
    stats = tuple(p.result() for row_parts in merged.parts for p in row_parts)
    return Alignment(True, common, merged.known, None), stats


def write_compare(result: CompareResult, out, *, overwrite: bool = False,
                  overwrite_flag: str = "overwrite=True") -> dict[str, Path]:
    """Write the report of ``result`` into the directory ``out`` (compare.json, report.md, report.html, PNGs):
    :func:`usmoe_lp.report.compare_report.write_compare_report`. Returns name -> path of every file."""
    from usmoe_lp.report.compare_report import write_compare_report

    return write_compare_report(result, out, overwrite=overwrite, overwrite_flag=overwrite_flag)
