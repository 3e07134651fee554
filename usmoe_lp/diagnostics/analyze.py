"""The analysis driver: the streaming suite over a router log (or in-memory logits) as tasks over token
ranges, then the per-sequence analyses of a bounded sample, in one process or on a Dask cluster.

The log is cut into token ranges by its shards (:func:`plan_ranges`); one task streams its range of every
selected layer into the mergeable partials of the other modules of :mod:`usmoe_lp.diagnostics`
(:class:`~usmoe_lp.diagnostics.stream.LayerStream`, one per layer) —

* load (:class:`~usmoe_lp.diagnostics.load.LoadPartial`) on the model's own selection;
* collapse (:class:`~usmoe_lp.diagnostics.collapse.CollapsePartial`) on logits, probabilities and,
  when captured, hidden states and router weights;
* margins (:class:`~usmoe_lp.diagnostics.margins.MarginPartial`) of the model's top-k decisions;

— and returns the rows of the sampled sequences it holds. The partials of each layer merge in range
order in one fixed tree (:func:`usmoe_lp.cluster.tree_merge`), so the result is the same bytes with no
cluster, 1 or 16 workers. The *sample* (the first whole sequences of the log, about ``sequence_tokens``
tokens per layer, decided from the sequence ids alone: :func:`choose_sample`) then goes, one task per
layer, through the per-sequence analyses of every router setting of the grid (any router of the
registry, :func:`usmoe_lp.routers.list_routers`; the grid is :func:`usmoe_lp.routers.default_configs`
over the swept parameters):

* counterfactual re-routing at matched budget, with certificates
  (:class:`~usmoe_lp.diagnostics.counterfactual.CounterfactualPartial`);
* prefix consistency (information leakage) of every setting, by the entry's prefix rule
  (:class:`~usmoe_lp.diagnostics.leakage.LeakagePartial`);
* the cross-sequence dependence of settings whose program couples the sequences of a batch
  (``entry.group(params)`` is ``batch`` or ``position``);
* the KV-cache decode mismatch of every setting (:func:`~usmoe_lp.diagnostics.leakage.decode_mismatch`);
* the global-threshold margins of settings whose prefix rule is ``global_topc`` with one group per
  sequence.

Memory per task is bounded by the chunk size plus the partials and the sampled rows, whatever the size of
the log. Merging the per-layer partials gives the pooled statistics over all layers (for the aux loss this
is what transformers' ``load_balancing_loss_func`` computes, since it concatenates the layers' tokens).

Scores. The routing probabilities are :func:`usmoe_lp.routing.probabilities` with the layer's score
function (softmax for ``softmax``, ``softmax_topk`` and ``unknown``; the per-token normalised
sigmoid for ``sigmoid`` layers, DeepSeek-V3 style). Each router re-routes on its own scores
(``entry.scores``), computed in float64. When the log records no selection, the model's selection
is replayed by the registry's ``native`` router where the layer's routing semantics are recorded
(:func:`model_mask`), else re-computed as the top-k of the probabilities, ties to the lowest expert
index (:func:`recompute_model_selection`).
"""

from __future__ import annotations

import os
import re
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from usmoe_lp._threads import one_torch_thread
from usmoe_lp._validate import check_int, check_padding_mask
from usmoe_lp.cluster import check_cluster, map_reduce, map_tasks, split_range, tree_merge
from usmoe_lp.diagnostics.collapse import CollapseStats
from usmoe_lp.diagnostics.counterfactual import CounterfactualPartial, CounterfactualStats, config_scores
from usmoe_lp.diagnostics.leakage import (
    DEFAULT_MAX_RECOMPUTE_TOKENS,
    DecodeStats,
    LeakagePartial,
    LeakageStats,
    cross_sequence_dependence,
    decode_mismatch,
)
from usmoe_lp.diagnostics.load import BALANCE_KEYS, LoadStats
from usmoe_lp.diagnostics.margins import MarginStats, topc_margin
from usmoe_lp.diagnostics.native import NativeAgreement
from usmoe_lp.diagnostics.patterns import PatternStats
from usmoe_lp.diagnostics.routed import Routed
from usmoe_lp.diagnostics.stream import (  # noqa: F401  (model_mask & co. re-exported: the driver's public helpers)
    LayerStream,
    model_mask,
    native_semantics,
    recompute_model_selection,
    selection_scores,
    stream_chunks,
)
from usmoe_lp.diagnostics.transitions import TransitionPartial, TransitionStats
from usmoe_lp.errors import InvalidParameter, InvalidScores, ShapeMismatch
from usmoe_lp.logs.format import LayerInfo
from usmoe_lp.logs.reader import Chunk, RouterLog
from usmoe_lp.routers import ROUTERS, RouterConfig, default_configs, get_router, list_routers

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``, called after every finished task: stage ``"stream"`` (done and total
in tokens x layers) or ``"sample"`` (layers of per-sequence analyses)."""

SHORTHANDS: Mapping[str, str] = {"alphas": "alpha", "kbars": "kbar", "scopes": "scope",
                                 "capacity_factor": "capacity_factor"}
"""AnalyzeConfig field -> the router parameter it sweeps (``capacity_factor``: Expert Choice's only)."""


def default_routers() -> tuple[str, ...]:
    """The routers ``analyze`` runs when none are named: the registry's ``in_default_sweep`` ones."""
    return tuple(name for name, r in ROUTERS.items() if r.in_default_sweep)


@dataclass(frozen=True)
class AnalyzeConfig:
    """What :func:`analyze` computes and how much of the log it samples.

    routers: registry router names (:func:`usmoe_lp.routers.list_routers`); default the routers with
    ``in_default_sweep``. sweep: parameter name -> values, swept for every router that has the
    parameter (e.g. ``{"kbar": (1, 1.5), "policy": ("position", "priority")}``); parameters not swept
    take the router's default (``kbar`` a grid around the model's k, ``alpha`` 0.3/0.5/0.7).
    alphas, kbars, scopes: shorthands for the ``alpha``, ``kbar``, ``scope`` entries of ``sweep``
    (None: the default). capacity_factor: Expert Choice's capacity factor (e = ceil(cf * T * k / N);
    None: its default 1); capacity-TC keeps the Switch default 1.25 unless swept.
    chunk_tokens: tokens per streamed chunk (chunks are cut at the log's multiples of it and at task
    boundaries, :func:`chunk_bounds`). sequence_tokens: the per-sequence analyses run on the first whole
    sequences of the log until this many tokens per layer are reached (the last one taken whole,
    :func:`choose_sample`). batch_size: sequences
    grouped for the batch/position groups. lp_sample: groups per config cross-checked by HiGHS, in
    the first ``lp_layers`` layers (the closed-form certificate covers every group of every layer;
    the LP solve is the expensive independent cross-check, a few seconds per config at 4096 x 64).
    eps: fragility thresholds (score units). leakage / counterfactual: switch those analyses off.
    max_recompute_tokens: the bound on router calls per sequence of the leakage ``recompute`` rule
    and of the per-token decode routing (longer sequences are sampled at that many positions).
    hidden: use captured hidden states and router weights for the collapse metrics. threads: run the
    collapse Grams in a worker thread, overlapping the rest of each chunk (results are identical).
    patterns: measure the routing patterns of the model's selection in the streaming pass (co-activation,
    vocabulary and domain specialisation, locality per layer: :mod:`usmoe_lp.diagnostics.patterns`; the
    transitions between consecutive analysed layers: :mod:`usmoe_lp.diagnostics.transitions`).
    """

    routers: tuple[str, ...] = field(default_factory=default_routers)
    alphas: tuple[float, ...] | None = None
    kbars: tuple[float, ...] | None = None
    scopes: tuple[str, ...] | None = ("sequence",)
    capacity_factor: float | None = None
    sweep: Mapping[str, tuple] = field(default_factory=dict)
    chunk_tokens: int = 65536
    sequence_tokens: int = 16384
    batch_size: int = 8
    lp_sample: int = 1
    lp_layers: int = 1
    eps: tuple[float, ...] = (1e-3, 1e-2, 5e-2)
    leakage: bool = True
    counterfactual: bool = True
    hidden: bool = True
    threads: bool = True
    max_recompute_tokens: int = DEFAULT_MAX_RECOMPUTE_TOKENS
    patterns: bool = True

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        names = (self.routers,) if isinstance(self.routers, str) else tuple(self.routers)
        unknown = [r for r in names if not isinstance(r, str) or r not in ROUTERS]
        if unknown:
            raise InvalidParameter(f"unknown router(s) {', '.join(map(repr, unknown))}; choose among "
                                   f"{', '.join(list_routers())}")
        set_(self, "routers", tuple(dict.fromkeys(get_router(r).name for r in names)))
        for name in ("lp_sample", "lp_layers"):
            set_(self, name, check_int(getattr(self, name), name, low=0))
        for name in ("chunk_tokens", "sequence_tokens", "batch_size", "max_recompute_tokens"):
            set_(self, name, check_int(getattr(self, name), name, low=1))
        eps = tuple(self.eps) if isinstance(self.eps, Sequence) else ()
        if not eps or not all(_is_real(e) and np.isfinite(e) and e > 0 for e in eps):
            raise InvalidParameter(f"eps must be finite thresholds > 0, got {self.eps}")
        set_(self, "eps", eps)
        for name in ("leakage", "counterfactual", "hidden", "threads", "patterns"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidParameter(f"{name} must be True or False, got {getattr(self, name)!r}")
        # a grid that is asked for but empty would silently drop its routers
        if self.counterfactual and not self.routers:
            raise InvalidParameter("routers is empty; name at least one router or set counterfactual=False")
        if not isinstance(self.sweep, Mapping):
            raise InvalidParameter(f"sweep must map parameter names to values, got {type(self.sweep).__name__}")
        sweep = {}
        for key, values in self.sweep.items():
            short = _SHORTHAND_OF.get(key)
            if short is not None and getattr(self, short) not in (None, _SHORTHAND_DEFAULTS.get(short)):
                raise InvalidParameter(f"{key} is given twice: in sweep and as {short}")
            sweep[str(key)] = self._check_values(f"sweep[{key!r}]", str(key), values, require_taker=True)
        set_(self, "sweep", sweep)
        for short, param in SHORTHANDS.items():
            value = getattr(self, short)
            if value is None:
                continue
            values = (value,) if short == "capacity_factor" else value
            checked = self._check_values(short, param, values, require_taker=False, only=("ec",) if
                                         short == "capacity_factor" else None)
            set_(self, short, checked[0] if short == "capacity_factor" else checked)

    def _check_values(self, where: str, param: str, values, *, require_taker: bool,
                      only: tuple[str, ...] | None = None) -> tuple:
        """``values`` as a tuple, each checked by every selected router that has ``param``."""
        if isinstance(values, str) or not isinstance(values, Sequence | np.ndarray):
            values = (values,)
        values = tuple(v.item() if isinstance(v, np.generic) else v for v in values)
        takers = [ROUTERS[r] for r in self.routers if param in ROUTERS[r].param_names and (only is None or r in only)]
        if require_taker and not takers:
            owners = [r.name for r in ROUTERS.values() if param in r.param_names]
            raise InvalidParameter(f"{where}: no router of routers ({', '.join(self.routers) or 'none'}) takes "
                                   f"{param}; it is a parameter of {', '.join(owners) or 'no registered router'}")
        if takers and not values:
            raise InvalidParameter(f"{where} must not be empty when routers includes {takers[0].name}")
        for r in takers:
            p = r.param(param)
            try:
                values = tuple(p.check(v, r.name) for v in values)
            except InvalidParameter as exc:
                raise InvalidParameter(f"{where}: {exc}") from None
        return values

    def configs(self, k: int, num_experts: int) -> tuple[RouterConfig, ...]:
        """The counterfactual router settings for a layer with top-k ``k`` and N experts."""
        short = {name: None if param in self.sweep else getattr(self, name) for name, param in SHORTHANDS.items()}
        return default_configs(k, routers=self.routers, num_experts=num_experts, sweep=self.sweep, **short)

    def swept_values(self) -> dict[str, tuple]:
        """Every explicitly swept parameter -> its values (shorthands included)."""
        out = dict(self.sweep)
        for short, param in SHORTHANDS.items():
            value = getattr(self, short)
            if value is not None and value != _SHORTHAND_DEFAULTS.get(short):
                out[param] = (value,) if short == "capacity_factor" else tuple(value)
        return out


_SHORTHAND_DEFAULTS = {"scopes": ("sequence",)}
_SHORTHAND_OF = {param: name for name, param in SHORTHANDS.items()}


def _is_real(v) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


def resolve_top_k(infos: Sequence[LayerInfo], top_k: int | None = None, *, name: str = "top_k") -> dict[str, int]:
    """The model's top-k of each layer of ``infos``: what the log records, else ``top_k``.

    ``top_k`` only fills in a log that does not record k: given where the log records another k it
    is an error (never silently ignored), as is a k outside 1..N. ``name`` is how the caller's
    interface spells the parameter (``--top-k`` on the command line).
    """
    if top_k is not None:
        top_k = check_int(top_k, name, low=1)
    out = {}
    for info in infos:
        recorded = info.top_k
        if recorded is not None and top_k is not None and top_k != recorded:
            raise InvalidParameter(f"{name} = {top_k}, but the log records k = {recorded} for layer {info.name!r}; "
                                   f"{name} only supplies k where the log does not record it: leave it out")
        k = recorded if recorded is not None else top_k
        if k is None:
            raise InvalidParameter(f"layer {info.name!r}: the log does not record the model's top-k; pass {name}")
        if k > info.num_experts:
            source = f"{name} = {k}" if recorded is None else f"the log records k = {k}, which"
            raise InvalidParameter(f"layer {info.name!r}: {source} exceeds the number of experts N = "
                                   f"{info.num_experts}; need 1 <= k <= N")
        out[info.name] = k
    return out


def check_sweep(config: AnalyzeConfig, infos: Sequence[LayerInfo], *, names: Mapping[str, str] | None = None) -> None:
    """Refuse swept values above a layer's number of experts N for parameters bounded by N (USMoE's
    k-bar): they would be dropped from the grid without a word. ``names``: how the caller's
    interface spells each parameter (``{"kbar": "--kbar"}`` on the command line)."""
    if not config.counterfactual:
        return
    names = names or {}
    for param, values in config.swept_values().items():
        bounded = [r for r in config.routers
                   if param in ROUTERS[r].param_names and ROUTERS[r].param(param).at_most_experts]
        if not bounded:
            continue
        for info in infos:
            above = [v for v in values if v > info.num_experts]
            if above:
                raise InvalidParameter(
                    f"{names.get(param, param)} {','.join(f'{v:g}' for v in above)} exceed the number of experts "
                    f"N = {info.num_experts} of layer {info.name!r}; {'/'.join(bounded)}'s {param} must be <= N")


NEEDS_LOGITS: Mapping[str, str] = {
    "routing_entropies": "token_entropy and mean_prob_entropy are entropies of the routing probabilities",
    "aux_loss": "the Switch aux loss and importance_cv2 weigh the load by the routing probabilities",
    "z_loss": "the z-loss is the mean squared logsumexp of the logits",
    "collapse": "effective ranks and expert cosines are those of the logits and probabilities",
    "margins": "a margin is a difference of the selection scores",
    "native_agreement": "the native router is replayed on the logits",
    "counterfactual": "every router setting re-routes the logits",
    "leakage": "prefix consistency re-routes the logits of every prefix",
}
"""The analyses that need the router logits -> what of the logits they use. On a selection log (the experts each
token was routed to, no logits: :attr:`usmoe_lp.logs.RouterLog.has_logits` False) :func:`analyze` computes the
rest (the load of the recorded selection, the routing patterns) and records these as unavailable."""

NO_LOGITS = "not computed: the log holds no router logits (a selection log: the experts each token was routed to)"


def unavailable_without_logits(cfg: AnalyzeConfig) -> dict[str, str]:
    """analysis -> the reason it was not computed, for a log without logits (:data:`NEEDS_LOGITS`; re-routing and
    leakage only where ``cfg`` asks for them)."""
    off = {"counterfactual": not cfg.counterfactual, "leakage": not cfg.leakage}
    return {name: f"{NO_LOGITS}; {why}" for name, why in NEEDS_LOGITS.items() if not off.get(name, False)}


@dataclass(frozen=True)
class LayerAnalysis:
    """Everything measured on one layer (None / empty where an analysis was off or impossible).

    counterfactual: the re-routing of every setting; leakage: label -> prefix consistency;
    cross_sequence: label -> cross-sequence dependence pooled over the sampled batches (keys
    ``batches``, ``sequences``, ``tokens``, ``flip_rate``, ``token_flip_rate``, ``jaccard_distance``);
    decode: label -> :class:`~usmoe_lp.diagnostics.leakage.DecodeStats` (KV-cache decode mismatch);
    topc_margins: label -> global-threshold margin sums (``global_topc`` settings grouped per sequence).
    native_agreement: how often the registry's ``native`` router, replayed on the captured logits with
    the layer's recorded routing semantics, selects exactly the experts the log records
    (:class:`~usmoe_lp.diagnostics.native.NativeAgreement`); None where the log records no selection
    or the layer's semantics are unknown.
    unavailable: analysis -> why it was not computed, for the analyses of :data:`NEEDS_LOGITS` on a selection
    log (the log holds the experts each token was routed to, not the router logits); empty otherwise. Their
    fields are None (``collapse``, ``margins``, ``counterfactual``, ``native_agreement``; the probability- and
    logit-based fields of ``load``) or empty (``leakage`` and the other per-sequence analyses).
    patterns: the routing patterns of the model's selection over every token of the layer
    (:class:`~usmoe_lp.diagnostics.patterns.PatternStats`; None with ``AnalyzeConfig.patterns`` off).
    """

    layer: str
    num_experts: int
    top_k: int
    score_function: str
    num_tokens: int
    selection_source: str  # "captured", "recomputed native" or "recomputed top-k"
    load: LoadStats
    collapse: CollapseStats | None
    margins: MarginStats | None
    counterfactual: CounterfactualStats | None
    leakage: dict[str, LeakageStats]
    cross_sequence: dict[str, dict[str, Any]]
    topc_margins: dict[str, dict[str, Any]]
    sample_sequences: int
    sample_tokens: int
    decode: dict[str, DecodeStats] = field(default_factory=dict)
    native_agreement: NativeAgreement | None = None
    unavailable: dict[str, str] = field(default_factory=dict)
    patterns: PatternStats | None = None


@dataclass(frozen=True)
class AnalyzeResult:
    """The result of :func:`analyze`: per layer and pooled over layers.

    ``pooled_load`` merges every layer's load partial (transformers' pooled convention);
    ``aux_loss_per_layer_mean`` is the OLMoE-scripts convention (mean of per-layer losses).
    ``unavailable``: analysis -> why it was not computed (a selection log: :data:`NEEDS_LOGITS`).
    ``transitions``: (layer l, layer l+1) -> the dependence of layer l+1's selection on layer l's
    (:class:`~usmoe_lp.diagnostics.transitions.TransitionStats`), for each pair of consecutive analysed layers
    (empty with ``AnalyzeConfig.patterns`` off or one layer).
    """

    source: str
    model: dict[str, Any]
    config: AnalyzeConfig
    layers: tuple[LayerAnalysis, ...]
    pooled_load: LoadStats
    pooled_counterfactual: CounterfactualStats | None
    pooled_leakage: dict[str, LeakageStats]
    seconds: float
    read_seconds: float = 0.0
    unavailable: dict[str, str] = field(default_factory=dict)
    transitions: dict[tuple[str, str], TransitionStats] = field(default_factory=dict)

    def _repr_html_(self) -> str:
        """Jupyter's rich display (:func:`usmoe_lp.report.notebook_html.analyze_result_html`)."""
        from usmoe_lp.report.notebook_html import analyze_result_html

        return analyze_result_html(self)

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(la.layer for la in self.layers)

    def layer(self, name: str) -> LayerAnalysis:
        for la in self.layers:
            if la.layer == name:
                return la
        raise KeyError(f"no layer {name!r}; layers are {self.layer_names}")

    @property
    def aux_loss_pooled(self) -> float | None:
        return None if self.pooled_load is None else self.pooled_load.aux_loss

    @property
    def aux_loss_per_layer_mean(self) -> float | None:
        vals = [la.load.aux_loss for la in self.layers]
        return None if any(v is None for v in vals) or not vals else float(np.mean(vals))

    # ---------------------------------------------------------------- tidy frames for notebooks
    def load_frame(self):
        """Tidy per-layer load metrics: one row per layer (plus ``pooled``)."""
        import pandas as pd

        rows = [{"layer": la.layer, **_load_row(la.load)} for la in self.layers]
        if self.pooled_load is not None:
            pooled = _load_row(self.pooled_load)
            for key in BALANCE_KEYS:  # expert e of one layer is not expert e of another: average instead
                if key in pooled:
                    pooled[key] = float(np.mean([r[key] for r in rows]))
            rows.append({"layer": "pooled", **pooled})
        return pd.DataFrame(rows)

    def expert_load_frame(self):
        """Tidy per-layer, per-expert load share (columns layer, expert, count, share)."""
        import pandas as pd

        rows = []
        for la in self.layers:
            counts = np.asarray(la.load.counts, dtype=float)
            total = counts.sum()
            for e, c in enumerate(counts):
                rows.append({"layer": la.layer, "expert": e, "count": int(c),
                             "share": float(c / total) if total > 0 else float("nan")})
        return pd.DataFrame(rows)

    def counterfactual_frame(self):
        """Tidy counterfactual table: one row per layer x router setting (plus ``pooled``), with the
        leakage, cross-sequence, decode and top-c margin columns of each setting joined in
        (columns: :meth:`CounterfactualRecord.row`, then ``flip_rate``, ``token_flip_rate``,
        ``leak_jaccard_distance``, ``displacement_mean``, ``leak_positions_sampled``,
        ``cross_flip_rate``, ``cross_token_flip_rate``, ``cross_jaccard_distance``, ``cross_tokens``,
        ``kv_decode_token_flip_rate``, ``kv_decode_flip_rate``, ``topc_margin_mean``,
        ``topc_fragile@eps``; NaN where a column does not apply)."""
        import pandas as pd

        frames = []
        for la in self.layers:
            if la.counterfactual is None:
                continue
            f = la.counterfactual.to_frame()
            f.insert(0, "layer", la.layer)
            f = _join_leakage(f, la.leakage)
            cross = la.cross_sequence
            for col, key in _CROSS_COLUMNS.items():
                f[col] = [cross[lb][key] if lb in cross else np.nan for lb in f["label"]]
            f["cross_tokens"] = [cross[lb]["tokens"] if lb in cross else 0 for lb in f["label"]]
            f = _join_decode(f, la.decode)
            for col, vals in _topc_columns(f["label"], [la.topc_margins]).items():
                f[col] = vals
            frames.append(f)
        if self.pooled_counterfactual is not None and frames:
            f = self.pooled_counterfactual.to_frame()
            f.insert(0, "layer", "pooled")
            f = _join_leakage(f, self.pooled_leakage)
            per_layer = pd.concat(frames, ignore_index=True)
            means = per_layer.groupby("label", sort=False)[[c for c in BALANCE_KEYS if c in per_layer]].mean()
            for col in means.columns:  # balance per layer, then averaged (expert ids differ across layers)
                f[col] = f["label"].map(means[col])
            tokens = per_layer.groupby("label", sort=False)["cross_tokens"].sum()
            for col in _CROSS_COLUMNS:
                w = (per_layer[col] * per_layer["cross_tokens"]).groupby(per_layer["label"], sort=False).sum()
                f[col] = f["label"].map(w / tokens.where(tokens > 0))
            f["cross_tokens"] = f["label"].map(tokens).fillna(0).astype(int)
            f = _join_decode(f, _merge_decode([la.decode for la in self.layers]))
            for col, vals in _topc_columns(f["label"], [la.topc_margins for la in self.layers]).items():
                f[col] = vals
            frames.append(f)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def experts_per_token_frame(self, labels: Sequence[str] | None = None):
        """Tidy experts-per-token shares pooled over layers (columns router, experts, share): the
        model's own selection and each counterfactual router (only ``labels`` when given)."""
        import pandas as pd

        rows = []

        def add(label, hist):
            hist = np.asarray(hist, dtype=float)
            total = hist.sum()
            rows.extend({"router": label, "experts": i, "share": float(h / total) if total else 0.0}
                        for i, h in enumerate(hist))

        if self.pooled_load is not None:
            add("model (captured)", self.pooled_load.experts_per_token)
        if self.pooled_counterfactual is not None:
            for label, hist in self.pooled_counterfactual.experts_per_token.items():
                if labels is None or label in labels:
                    add(label, hist)
        return pd.DataFrame(rows)

    def collapse_frame(self):
        """Tidy collapse and margin metrics: one row per layer."""
        import pandas as pd

        rows = []
        for la in self.layers:
            c, m = la.collapse, la.margins
            if c is None or m is None:  # a selection log: no logits
                continue
            rows.append({"layer": la.layer, "logit_effective_rank": c.logit_effective_rank,
                         "logit_effective_rank_centered": c.logit_effective_rank_centered,
                         "max_rank": c.max_rank, "mean_expert_cosine": c.mean_expert_cosine,
                         "router_row_similarity": c.router_row_similarity, "span_energy": c.span_energy,
                         "hidden_effective_rank": c.hidden_effective_rank, "mean_margin": m.mean_margin,
                         "median_margin": m.median_margin,
                         **{f"fragile@{float(e):g}": v for e, v in (m.fragile_share or {}).items()}})
        return pd.DataFrame(rows)

    def leakage_offset_frame(self):
        """Tidy per-offset flip-rate curves, pooled over layers (columns label, offset, flip_rate, tokens)."""
        import pandas as pd

        frames = []
        for label, stats in self.pooled_leakage.items():
            f = stats.per_offset_frame()
            f.insert(0, "label", label)
            frames.append(f)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def spectrum_frame(self):
        """Tidy singular spectra of the row-centred logits per layer (columns layer, index, sigma, sigma_rel)."""
        import pandas as pd

        rows = []
        for la in self.layers:
            if la.collapse is None:  # a selection log: no logits
                continue
            s = np.asarray(la.collapse.logit_spectrum_centered, dtype=float)
            top = s[0] if len(s) and s[0] > 0 else 1.0
            rows += [{"layer": la.layer, "index": i + 1, "sigma": float(v), "sigma_rel": float(v / top)}
                     for i, v in enumerate(s)]
        return pd.DataFrame(rows)


def _load_row(s: LoadStats) -> dict[str, Any]:
    return {"tokens": s.num_tokens, "load_entropy": s.entropy, "token_entropy": s.token_entropy,
            "token_entropy_normalised": s.token_entropy_normalised, "mean_prob_entropy": s.mean_prob_entropy,
            "maxvio": s.maxvio, "cv": s.cv,
            "gini": s.gini, "max_over_mean": s.max_over_mean, "dead_experts": s.dead_experts,
            "zero_expert_rate": s.zero_expert_rate, "aux_loss": s.aux_loss, "z_loss": s.z_loss}


_CROSS_COLUMNS = {"cross_flip_rate": "flip_rate", "cross_token_flip_rate": "token_flip_rate",
                  "cross_jaccard_distance": "jaccard_distance"}


def _topc_columns(labels, margin_dicts) -> dict[str, list[float]]:
    """Columns topc_margin_mean and topc_fragile@eps for each label, pooling the layers' sums."""
    rows = []
    for lb in labels:
        parts = [d[lb] for d in margin_dicts if lb in d]
        if not parts:
            rows.append({})
            continue
        pooled = {"sequences": sum(p["sequences"] for p in parts), "pairs": sum(p["pairs"] for p in parts),
                  "margin_sum": sum(p["margin_sum"] for p in parts),
                  "fragile_pairs": {e: sum(p["fragile_pairs"][e] for p in parts) for e in parts[0]["fragile_pairs"]}}
        rows.append(_topc_margin_row(pooled))
    cols = sorted({k for r in rows for k in r}, key=lambda k: (not k.startswith("topc_margin"), k))
    return {c: [r.get(c, float("nan")) for r in rows] for c in cols}


def _join_leakage(frame, leakage: Mapping[str, LeakageStats]):
    frame = frame.copy()

    def col(attr):
        return [getattr(leakage[lb], attr) if lb in leakage else np.nan for lb in frame["label"]]

    frame["flip_rate"] = col("flip_rate")
    frame["token_flip_rate"] = col("token_flip_rate")
    frame["leak_jaccard_distance"] = col("jaccard_distance")
    frame["displacement_mean"] = col("displacement_mean")
    frame["leak_positions_sampled"] = col("positions_sampled")
    return frame


def _join_decode(frame, decode: Mapping[str, DecodeStats]):
    frame["kv_decode_token_flip_rate"] = [decode[lb].token_flip_rate if lb in decode else np.nan
                                          for lb in frame["label"]]
    frame["kv_decode_flip_rate"] = [decode[lb].flip_rate if lb in decode else np.nan for lb in frame["label"]]
    return frame


def _merge_decode(per_layer: Sequence[Mapping[str, DecodeStats]]) -> dict[str, DecodeStats]:
    """Decode statistics pooled over the layers that have them (counts add; N must agree)."""
    out: dict[str, DecodeStats] = {}
    for d in per_layer:
        for label, stats in d.items():
            if label not in out:
                out[label] = stats
            elif out[label].num_experts == stats.num_experts:
                out[label] = out[label].merge(stats)
    return out


# ============================================================================ domain labels
@dataclass(frozen=True, eq=False)
class DomainLabels:
    """Domain labels of sequences, as the tasks carry them (picklable numpy arrays).

    names: the distinct labels, sorted (domain index d = position in ``names``); ids: (S,) int64 the labelled
    sequence ids, ascending; index: (S,) int64 the domain index of each."""

    names: tuple[str, ...]
    ids: np.ndarray
    index: np.ndarray

    def of(self, sequence_ids: np.ndarray) -> np.ndarray:
        """(n,) int64 domain index of each of (n,) ``sequence_ids`` (-1: the sequence has no label)."""
        seq = np.asarray(sequence_ids, dtype=np.int64)
        if not self.ids.size:
            return np.full(seq.shape, -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(self.ids, seq), self.ids.size - 1)
        return np.where(self.ids[at] == seq, self.index[at], -1)


def domain_labels(domains: Mapping, *, name: str = "domains") -> DomainLabels:
    """:class:`DomainLabels` of a mapping sequence id (int >= 0, or its decimal string) -> domain label (a
    non-empty str). Anything else raises :class:`InvalidParameter` naming the entry; ``name``: how the caller's
    interface names the mapping (``--domains FILE`` on the command line).

    >>> d = domain_labels({3: "code", "1": "web", 7: "code"})
    >>> d.names, d.of(np.array([1, 2, 3, 7])).tolist()
    (('code', 'web'), [1, -1, 0, 0])
    """
    if not isinstance(domains, Mapping):
        raise InvalidParameter(f"{name} must map sequence ids to domain labels, got {type(domains).__name__}")
    pairs: dict[int, str] = {}
    for key, label in domains.items():
        sid = key
        if isinstance(key, str) and re.fullmatch(r"\s*\d+\s*", key):
            sid = int(key)
        if isinstance(sid, np.integer):
            sid = int(sid)
        if not isinstance(sid, int) or isinstance(sid, bool) or sid < 0:
            raise InvalidParameter(f"{name}: {key!r} is not a sequence id (an integer >= 0)")
        if not isinstance(label, str) or not label.strip():
            raise InvalidParameter(f"{name}: the label of sequence {sid} must be a non-empty string, got {label!r}")
        if sid in pairs and pairs[sid] != label:
            raise InvalidParameter(f"{name}: sequence {sid} is labelled twice ({pairs[sid]!r} and {label!r})")
        pairs[sid] = label
    names = tuple(sorted(set(pairs.values())))
    ids = np.array(sorted(pairs), dtype=np.int64)
    of = {lb: i for i, lb in enumerate(names)}
    return DomainLabels(names, ids, np.array([of[pairs[i]] for i in ids.tolist()], dtype=np.int64))


# ============================================================================ sources
@dataclass(frozen=True)
class LogRef:
    """A router log named by its path, opened afresh by each task (on a Dask worker: in its process).

    path: absolute, on a filesystem every worker can read (see :func:`analyze`). verify: the reader's
    mode (:meth:`usmoe_lp.logs.RouterLog.open`) for the shards a task reads; ``"lazy"`` checks each
    shard's sha256 when the task first reads it."""

    path: str
    verify: str = "lazy"

    def open(self) -> _LogReader:
        return _LogReader(RouterLog.open(self.path, verify=self.verify))


class _LogReader:
    """Token ranges of an opened log, as the tasks read them."""

    def __init__(self, log: RouterLog) -> None:
        self.log = log

    def chunks(self, layer: str, start: int, stop: int, chunk_tokens: int, hidden: bool) -> Iterator[Chunk]:
        for a, b in chunk_bounds(start, stop, chunk_tokens):
            yield self.log.check_finite(self.log.read(layer, a, b, with_hidden=hidden))

    def sequence_ids(self, start: int, stop: int, chunk_tokens: int) -> Iterator[torch.Tensor]:
        # the reader has no metadata-only read: the first layer's rows come along (a fraction 1/L of a read)
        for a, b in chunk_bounds(start, stop, chunk_tokens):
            yield self.log.read(self.log.layers[0], a, b).sequence_ids


class _MemoryData:
    """In-memory logits (:func:`analyze_logits`) serving token ranges like a log (tasks run in-process)."""

    def __init__(self, data: dict[str, torch.Tensor], selected: dict[str, torch.Tensor], seq: torch.Tensor,
                 positions: torch.Tensor) -> None:
        self.data, self.selected, self.seq, self.positions = data, selected, seq, positions

    def open(self) -> _MemoryData:
        return self

    def chunks(self, layer: str, start: int, stop: int, chunk_tokens: int, hidden: bool) -> Iterator[Chunk]:
        for a, b in chunk_bounds(start, stop, chunk_tokens):
            yield Chunk(logits=self.data[layer][a:b], token_ids=torch.full((b - a,), -1),
                        sequence_ids=self.seq[a:b], positions=self.positions[a:b], token_start=a,
                        selected=self.selected[layer][a:b] if layer in self.selected else None, layer=layer)

    def sequence_ids(self, start: int, stop: int, chunk_tokens: int) -> Iterator[torch.Tensor]:
        for a, b in chunk_bounds(start, stop, chunk_tokens):
            yield self.seq[a:b]


@dataclass(frozen=True)
class _Source:
    """What the driver needs from a log: layer infos, its shards (the task cut), what tasks open
    (``data``: a :class:`LogRef` or in-memory data; ``scan``: the same for the sequence-id scan of the
    sample), router weights."""

    name: str
    infos: tuple[LayerInfo, ...]
    num_tokens: int
    shards: tuple[tuple[int, int], ...]
    data: Any
    scan: Any
    has_hidden: Callable[[str], bool]
    router_weights: Callable[[], dict[str, torch.Tensor] | None]
    model: dict[str, Any]
    in_memory: bool = False
    has_logits: bool = True


_TASK_VERIFY = {"lazy": "lazy", "full": "none", "none": "none"}
"""The caller's verify mode -> the tasks': ``full`` validated the whole log when it was opened, so the
tasks do not validate it again."""


def _log_source(log: RouterLog, verify: str, name: str) -> _Source:
    m = log.manifest.model
    path = str(Path(log.path).absolute())  # workers may run elsewhere (another cwd, another machine)
    return _Source(name=name, infos=tuple(log.layer_info(n) for n in log.layers), num_tokens=log.num_tokens,
                   shards=tuple((s.token_start, s.token_stop) for s in log.shards),
                   data=LogRef(path, _TASK_VERIFY[verify]), scan=LogRef(path, "none"),
                   has_hidden=lambda layer: log.has(layer, "hidden"), router_weights=log.router_weights,
                   model={"name": m.name, "family": m.family, "revision": m.revision} if m else {},
                   has_logits=log.has_logits)


def _memory_source(logits, *, top_k: int, padding_mask=None, score_function: str = "softmax",
                   selected=None, name: str = "in-memory logits") -> _Source:
    if isinstance(logits, torch.Tensor | np.ndarray):
        logits = (logits,)
    if isinstance(logits, Mapping):
        items = list(logits.items())
    else:
        items = [(f"layer{i}", t) for i, t in enumerate(logits)]
    if not items:
        raise InvalidScores("no layers given")
    tensors: dict[str, torch.Tensor] = {}
    for lname, t in items:
        t = torch.as_tensor(t)
        if t.ndim == 3:
            t = t.reshape(-1, t.shape[-1])
        if t.ndim != 2:
            raise ShapeMismatch(f"layer {lname!r}: logits must be (T, N), (B, T, N) or (B*T, N), got {tuple(t.shape)}")
        tensors[lname] = t
    n_rows = {t.shape[0] for t in tensors.values()}
    if len(n_rows) != 1:
        raise ShapeMismatch(f"layers have different numbers of rows: { {k: v.shape[0] for k, v in tensors.items()} }")
    rows = n_rows.pop()
    if padding_mask is not None:
        pm = check_padding_mask(padding_mask).cpu()
        if pm.ndim != 2 or pm.numel() != rows:
            raise ShapeMismatch(f"padding_mask of shape {tuple(pm.shape)} does not cover the {rows} logit rows; "
                                "expected (B, T) with B*T rows, True = padding")
        B, T = pm.shape
        real = ~pm
    else:
        real = None
        B, T = 1, rows
    seq = torch.arange(B).repeat_interleave(T)
    if real is not None:
        positions = (real.long().cumsum(-1) - 1).clamp(min=0).reshape(-1)
        keep = real.reshape(-1)
    else:
        positions = torch.arange(T).repeat(B)
        keep = torch.ones(rows, dtype=torch.bool)
    sel_map = {}
    if selected is not None:
        sel_items = selected.items() if isinstance(selected, Mapping) else zip(tensors, selected, strict=True)
        for lname, s in sel_items:
            s = torch.as_tensor(s)
            sel_map[lname] = s.reshape(rows, -1)[keep]
    data = {lname: t[keep] for lname, t in tensors.items()}
    seq, positions = seq[keep], positions[keep]
    n = int(keep.sum())
    infos = tuple(LayerInfo(lname, num_experts=int(t.shape[1]), top_k=top_k, score_function=score_function)
                  for lname, t in data.items())
    mem = _MemoryData(data, sel_map, seq, positions)
    return _Source(name=name, infos=infos, num_tokens=n, shards=((0, n),), data=mem, scan=mem,
                   has_hidden=lambda layer: False, router_weights=lambda: None, model={}, in_memory=True)


def log_path(log) -> Path:
    """The local path of a router log given as a path or a ``file://`` URL.

    Other URL schemes (``s3://``, ``gs://``, ``hdfs://``, ``http://``...) raise :class:`InvalidParameter`:
    the reader opens a log's files itself, one path component at a time, refusing symbolic links out of
    the log directory, so it reads local (or network-mounted) filesystems only.

    >>> str(log_path("file:///data/run1/log"))
    '/data/run1/log'
    """
    text = os.fspath(log) if isinstance(log, str | os.PathLike) else None
    if text is None:
        raise InvalidParameter(f"log must be a RouterLog, a path or a file:// URL, got {type(log).__name__}")
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", text)
    if scheme is None:
        return Path(text)
    if scheme.group(1).lower() != "file":
        raise InvalidParameter(
            f"{text}: a {scheme.group(1)}:// URL; router logs are read from a filesystem path (the reader opens "
            f"each file itself and refuses links out of the log directory). Mount the store (e.g. s3fs, gcsfuse, "
            f"NFS) or copy the log to a local or shared disk, and give its path")
    parts = urllib.parse.urlparse(text)
    if parts.netloc not in ("", "localhost"):
        raise InvalidParameter(f"{text}: a file:// URL on host {parts.netloc!r}; give a path on this machine's "
                               f"filesystem (file:///path or file://localhost/path)")
    return Path(urllib.parse.unquote(parts.path))


# ============================================================================ tasks over token ranges
GROUP_CHUNKS = 4
"""Consecutive whole shards are grouped into one task while it holds at most this many chunks of tokens
(``GROUP_CHUNKS * chunk_tokens``)."""

SPLIT_CHUNKS = 16
"""A shard longer than this many chunks is split into tasks of ``SPLIT_CHUNKS * chunk_tokens`` tokens (each
such task reads, and with ``verify="lazy"`` checksums, the whole shard)."""


def chunk_bounds(start: int, stop: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """The chunks a task streams of tokens ``[start, stop)``: cut at the log's multiples of ``chunk_tokens``
    (and at ``start``, ``stop``), so a chunk is the same rows whichever task reads it, and a range that
    starts and stops on multiples gives the chunks of one pass over the whole log.

    >>> chunk_bounds(5, 23, 8)
    [(5, 8), (8, 16), (16, 23)]
    """
    cuts = [start, *range((start // chunk_tokens + 1) * chunk_tokens, stop, chunk_tokens), stop]
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


@dataclass(frozen=True)
class TokenRange:
    """Tokens ``[start, stop)`` of every analysed layer: the work of one task; ``index``: its place in the
    log (partials merge in this order)."""

    index: int
    start: int
    stop: int

    @property
    def num_tokens(self) -> int:
        return self.stop - self.start


def plan_ranges(shards: Sequence[tuple[int, int]], chunk_tokens: int, *, group_chunks: int = GROUP_CHUNKS,
                split_chunks: int = SPLIT_CHUNKS) -> tuple[TokenRange, ...]:
    """The tasks of an analysis: the log's shards (``(token_start, token_stop)`` each, in order) cut into
    consecutive token ranges covering the log once.

    Consecutive whole shards are grouped while a range holds at most ``group_chunks * chunk_tokens`` tokens; a
    shard of more than ``split_chunks * chunk_tokens`` tokens is split into ranges of that many (the last
    shorter); no other shard is split, so each is read (and checksummed) by one task. The cut depends on the
    shards and ``chunk_tokens`` only, never on the cluster.

    >>> [(r.start, r.stop) for r in plan_ranges([(0, 3), (3, 6), (6, 9), (9, 40)], 2, group_chunks=3,
    ...                                         split_chunks=10)]
    [(0, 6), (6, 9), (9, 29), (29, 40)]
    """
    chunk_tokens = check_int(chunk_tokens, "chunk_tokens", low=1)
    group = check_int(group_chunks, "group_chunks", low=1) * chunk_tokens
    split = check_int(split_chunks, "split_chunks", low=1) * chunk_tokens
    cuts: list[tuple[int, int]] = []
    open_range: list[int] | None = None  # [start, stop] of the group being built
    for a, b in shards:
        if b <= a:
            continue
        if b - a > split:
            if open_range is not None:
                cuts.append(tuple(open_range))
                open_range = None
            cuts.extend(split_range(a, b, split))
        elif open_range is not None and b - open_range[0] <= group:
            open_range[1] = b
        else:
            if open_range is not None:
                cuts.append(tuple(open_range))
            open_range = [a, b]
    if open_range is not None:
        cuts.append(tuple(open_range))
    return tuple(TokenRange(i, a, b) for i, (a, b) in enumerate(cuts))


@dataclass(frozen=True)
class _StreamTask:
    """One task: stream tokens ``range`` of every layer of ``layers`` (info, k, with hidden states) and keep
    the rows of the sampled sequences (``sample``: their sorted ids; None: no sample)."""

    data: Any
    range: TokenRange
    layers: tuple[tuple[LayerInfo, int, bool], ...]
    chunk_tokens: int
    eps: tuple[float, ...]
    threads: bool
    sample: np.ndarray | None
    patterns: bool = False
    domains: DomainLabels | None = None


@dataclass(frozen=True)
class _SampledRows:
    """The rows of sampled sequences found in one range of one layer, in token order: sequence ids and
    positions (n,) int64, logits (n, N) float32, the model's selection (n, N) bool."""

    sequence_ids: torch.Tensor
    positions: torch.Tensor
    logits: torch.Tensor
    mask: torch.Tensor


@dataclass(frozen=True)
class _StreamOut:
    range: TokenRange
    streams: tuple[LayerStream, ...]
    rows: tuple[_SampledRows | None, ...]
    read_seconds: float
    transitions: tuple[TransitionPartial, ...] = ()  # layers (0, 1), (1, 2), ... with patterns on


def _merge_stream_outs(a: _StreamOut, b: _StreamOut) -> _StreamOut:
    """Two consecutive ranges' results as one: each layer's streams and each layer pair's transitions merged,
    sampled rows concatenated."""
    return _StreamOut(range=TokenRange(a.range.index, a.range.start, b.range.stop),
                      streams=tuple(x.merge(y) for x, y in zip(a.streams, b.streams, strict=True)),
                      rows=tuple(_concat_rows(x, y) for x, y in zip(a.rows, b.rows, strict=True)),
                      read_seconds=a.read_seconds + b.read_seconds,
                      transitions=tuple(x.merge(y) for x, y in zip(a.transitions, b.transitions, strict=True)))


def _concat_rows(a: _SampledRows | None, b: _SampledRows | None) -> _SampledRows | None:
    if a is None or b is None:
        return a if b is None else b
    return _SampledRows(*(torch.cat([getattr(a, f.name), getattr(b, f.name)]) for f in fields(a)))


def _stream_task(task: _StreamTask) -> _StreamOut:
    """Stream one token range of every layer (module-level: Dask workers import it).

    torch runs on one intra-op thread here, in one process as on a worker: a float32 matmul's bits depend on
    the thread count, and results must not depend on the cluster."""
    read_seconds = 0.0

    def timed(it):
        nonlocal read_seconds
        while True:
            t_read = time.perf_counter()
            chunk = next(it, None)
            read_seconds += time.perf_counter() - t_read
            if chunk is None:
                return
            yield chunk

    r = task.range
    sample = None if task.sample is None else torch.from_numpy(task.sample)
    streams, rows, transitions = [], [], []
    domains = task.domains
    names = None if domains is None else domains.names
    domains_of = None if domains is None else (lambda chunk: domains.of(chunk.sequence_ids.numpy()))
    prev: tuple[list[np.ndarray], int] | None = None  # the previous layer's ranked ids per chunk (int16), its N
    with one_torch_thread():
        reader = task.data.open()
        for info, k, hidden in task.layers:
            picked: list[tuple[torch.Tensor, ...]] = []
            ranked: list[np.ndarray] = []
            trans = None if prev is None else TransitionPartial.empty(prev[1], info.num_experts)

            def keep_sampled(chunk: Chunk, mask: torch.Tensor, picked=picked) -> None:
                if sample is None or not sample.numel():
                    return
                sel = torch.isin(chunk.sequence_ids, sample)
                if bool(sel.any()):
                    picked.append((chunk.sequence_ids[sel], chunk.positions[sel], chunk.logits[sel].float(),
                                   mask[sel]))

            def transition(routed: Routed, ranked=ranked, trans=trans, prev=prev) -> None:
                if trans is not None:  # the same chunk (the same tokens) of the previous layer
                    before = Routed(prev[0][len(ranked)].astype(np.int64), prev[1], token_ids=routed.token_ids,
                                    sequence_ids=routed.sequence_ids, positions=routed.positions)
                    trans.update(before, routed)
                ranked.append(routed.ranked.astype(np.int16))  # N < 2**15 (Routed's bound)

            chunks = timed(reader.chunks(info.name, r.start, r.stop, task.chunk_tokens, hidden))
            stream = LayerStream.empty(info, k, task.eps, patterns=task.patterns, domain_names=names)
            streams.append(stream_chunks(stream, chunks, hidden=hidden, threads=task.threads, on_chunk=keep_sampled,
                                         domains_of=domains_of, on_routed=transition if task.patterns else None))
            rows.append(_SampledRows(*(torch.cat(parts) for parts in zip(*picked, strict=True))) if picked else None)
            if trans is not None:
                transitions.append(trans)
            prev = (ranked, info.num_experts) if task.patterns else None
    return _StreamOut(r, tuple(streams), tuple(rows), read_seconds, tuple(transitions))


# ============================================================================ the sequence sample
@dataclass(frozen=True)
class _ScanTask:
    data: Any
    range: TokenRange
    chunk_tokens: int
    candidates: np.ndarray | None


def _scan_task(task: _ScanTask) -> tuple[np.ndarray, np.ndarray]:
    """The sequence ids of one range: with ``candidates`` None, its distinct ids in order of first
    appearance and their token counts; else the token count of each candidate (in the candidates' order)."""
    reader = task.data.open()
    r = task.range
    ids_parts = [s.numpy() for s in reader.sequence_ids(r.start, r.stop, task.chunk_tokens)]
    ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, dtype=np.int64)
    if task.candidates is None:
        uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
        order = np.argsort(first, kind="stable")
        return uniq[order], counts[order]
    cands = task.candidates
    srt = np.argsort(cands, kind="stable")
    pos = np.searchsorted(cands[srt], ids)
    pos = np.minimum(pos, cands.size - 1)
    hit = cands[srt][pos] == ids
    counts = np.zeros(cands.size, dtype=np.int64)
    np.add.at(counts, srt[pos[hit]], 1)
    return cands, counts


def choose_sample(first_ids: np.ndarray, first_counts: np.ndarray, total_counts: np.ndarray | None,
                  budget: int) -> np.ndarray:
    """The sampled sequence ids, in order of first appearance: the first sequences of the log, taken whole,
    until ``budget`` tokens are reached (the last one may overflow it, as it is taken whole).

    first_ids / first_counts: the distinct sequence ids of the log's first ``budget`` tokens in order of first
    appearance (no later sequence can be sampled: the tokens before its first appearance all belong to earlier
    sequences, which already hold ``budget`` tokens) and their counts there; total_counts: their counts over
    the whole log (None when the log has at most ``budget`` tokens).

    >>> choose_sample(np.array([4, 7, 9]), np.array([3, 3, 2]), np.array([5, 3, 9]), 8).tolist()
    [4, 7]
    """
    counts = first_counts if total_counts is None else total_counts
    taken, total = [], 0
    for sid, c in zip(first_ids.tolist(), counts.tolist(), strict=True):
        if total >= budget:
            break
        taken.append(sid)
        total += c
    return np.asarray(taken, dtype=np.int64)


def _decide_sample(src: _Source, cfg: AnalyzeConfig, ranges: Sequence[TokenRange], client) -> np.ndarray:
    """The sampled sequences (:func:`choose_sample`) from the sequence ids alone, whatever the task cut: the
    first ``sequence_tokens`` tokens give the candidates; when the log is longer, one pass over the ranges counts
    their tokens."""
    head = TokenRange(0, 0, min(cfg.sequence_tokens, src.num_tokens))
    first_ids, first_counts = map_tasks(_scan_task, [_ScanTask(src.scan, head, cfg.chunk_tokens, None)],
                                        client=client, key="usmoe-lp-analyze-scan")[0]
    total = None
    if src.num_tokens > head.stop and first_ids.size:
        parts = map_tasks(_scan_task, [_ScanTask(src.scan, r, cfg.chunk_tokens, first_ids) for r in ranges],
                          client=client, key="usmoe-lp-analyze-count")
        total = np.sum([c for _, c in parts], axis=0)
    return choose_sample(first_ids, first_counts, total, cfg.sequence_tokens)


def _sample_sequences(rows: Sequence[_SampledRows | None], sample: np.ndarray
                      ) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(sequence id, logits (T, N) float32, model selection (T, N) bool)`` of each sampled sequence, in the
    sample's order, rows by position: reassembled from the ranges' rows (in range order)."""
    rows = [r for r in rows if r is not None]
    if not rows:
        return []
    seq = torch.cat([r.sequence_ids for r in rows]).numpy()
    pos = torch.cat([r.positions for r in rows]).numpy()
    logits = torch.cat([r.logits for r in rows])
    mask = torch.cat([r.mask for r in rows])
    rank = {sid: i for i, sid in enumerate(sample.tolist())}
    order_of = np.fromiter((rank[s] for s in seq.tolist()), dtype=np.int64, count=seq.size)
    order = np.lexsort((pos, order_of))  # by sample order, then position (stable)
    ranks = order_of[order]
    bounds = np.flatnonzero(np.diff(ranks)) + 1
    idx = torch.from_numpy(order)
    logits, mask = logits[idx], mask[idx]
    out = []
    for a, b in zip(np.r_[0, bounds].tolist(), np.r_[bounds, ranks.size].tolist(), strict=True):
        out.append((int(sample[ranks[a]]), logits[a:b], mask[a:b]))
    return out


def _batches(seqs, batch_size: int):
    """Right-padded (B, Tmax, N) batches of consecutive sampled sequences, with padding masks."""
    for a in range(0, len(seqs), batch_size):
        group = seqs[a:a + batch_size]
        tmax = max(z.shape[0] for _, z, _ in group)
        N = group[0][1].shape[1]
        B = len(group)
        logits = torch.zeros(B, tmax, N)
        mask = torch.zeros(B, tmax, N, dtype=torch.bool)
        pad = torch.ones(B, tmax, dtype=torch.bool)
        for b, (_, z, m) in enumerate(group):
            logits[b, :z.shape[0]] = z
            mask[b, :z.shape[0]] = m
            pad[b, :z.shape[0]] = False
        yield logits, mask, pad


# ============================================================================ the driver
def analyze(log, *, config: AnalyzeConfig | None = None, layers: Sequence[str] | None = None, top_k: int | None = None,
            progress: Progress | None = None, client=None, verify: str = "lazy",
            domains: Mapping[int, str] | None = None) -> AnalyzeResult:
    """Analyse a router log: load, collapse, margins, counterfactual re-routing and leakage per layer.

    log: a :class:`~usmoe_lp.logs.RouterLog`, the path of one, or a ``file://`` URL (other URL schemes
    are refused: mount or copy the log). layers: a subset of the log's layers (default all). top_k: the
    model's experts per token where the log does not record it. progress: ``progress(stage, done,
    total)`` after every finished task: stage ``"stream"`` counts tokens x layers, ``"sample"`` layers
    of per-sequence analyses. verify: the reader's check of the shards (:meth:`RouterLog.open`) when
    ``log`` is a path (a ``RouterLog`` keeps its own): ``"lazy"`` checksums each shard in the task that
    reads it, ``"full"`` validates the whole log first, ``"none"`` trusts it.

    client: a ``dask.distributed.Client`` to run on (None: this process). The log is cut into token ranges
    by its shards (:func:`plan_ranges`); each task opens the log **by its path** on a worker, streams its
    range of every layer and returns mergeable partials, which merge in range order
    (:func:`usmoe_lp.cluster.tree_merge`); the per-sequence analyses run as one task per layer. Every
    worker must see the log at the same absolute path (a shared filesystem: NFS, Lustre, a mounted bucket;
    a local cluster shares this machine's). The result does not depend on the client or the number of
    workers (the same tasks, the same merge order, torch on one thread per task): the reports are the
    same bytes. Another cut (other task sizes) gives equal integer statistics and floats equal to float64
    round-off where the chunks are the same rows (:func:`chunk_bounds`: always when the shards hold
    multiples of ``chunk_tokens`` tokens, as by default); elsewhere the collapse Grams, which sum float32
    products per chunk, move at the float32 level (~1e-8 relative). A corrupted shard raises
    :class:`~usmoe_lp.logs.CorruptLog` naming its file, on a cluster as in one process. With
    ``verify="lazy"`` each task checks its own shards (checksum, tensors, token order within the task);
    the token order across tasks and duplicated shards in different tasks are checked by ``"full"``.

    domains: sequence id -> domain label (str), for the domain shares of the routing patterns
    (:func:`domain_labels`); sequences without a label are left out of them (and counted there). Labels of
    sequence ids the log does not hold are allowed (a corpus-wide table). Ignored with ``config.patterns`` off.

    A selection log (the experts each token was routed to, no logits: ``log.has_logits`` False) gives the load
    of the recorded selection and the routing patterns; the analyses that need logits are listed in the
    result's ``unavailable`` with the reason (:data:`NEEDS_LOGITS`) and their fields are None or empty.

    The sequence sample (counterfactual, leakage) is decided up front from the sequence ids alone
    (:func:`choose_sample`): the first sequences in order of first appearance, taken whole, until
    ``config.sequence_tokens`` tokens are reached. Where sequences interleave (decode steps) this counts
    whole sequences, not the tokens seen so far (the sample may differ slightly from a per-chunk count).

    Returns an :class:`AnalyzeResult`; :func:`usmoe_lp.report.write_analyze_report` renders it.
    """
    if isinstance(log, RouterLog):
        name, mode = str(log.path), log.verify
    else:
        if verify not in _TASK_VERIFY:
            raise InvalidParameter(f"verify must be one of {tuple(_TASK_VERIFY)}, got {verify!r}")
        path = log_path(log)
        name, mode = str(path), verify
        log = RouterLog.open(path, verify=verify)
    check_cluster(client=client)
    labels = None if domains is None else domain_labels(domains)
    return _analyze(_log_source(log, mode, name), config or AnalyzeConfig(), layers, top_k, progress, client,
                    labels)


def analyze_logits(router_logits, *, top_k: int, padding_mask=None, score_function: str = "softmax",
                   selected=None, config: AnalyzeConfig | None = None, attention_mask=None) -> AnalyzeResult:
    """:func:`analyze` on in-memory logits, e.g. the tuple transformers returns with
    ``output_router_logits=True`` (one (B*T, N) tensor per layer), a dict layer -> (B, T, N), or one
    tensor. padding_mask: (B, T) bool, True = padding (the package's one convention); required to
    split a (B*T, N) tensor into sequences. selected: optional per-layer (n, k) indices the model used.
    Runs in this process, through the same tasks as a log.

    ``attention_mask`` is refused with the conversion to use (``padding_mask = attention_mask == 0``).
    """
    if attention_mask is not None:
        raise InvalidParameter("analyze_logits takes padding_mask= (bool, True = padding), not attention_mask=; "
                               "from a Hugging Face attention_mask (1 = real token) pass "
                               "padding_mask = attention_mask == 0")
    src = _memory_source(router_logits, top_k=top_k, padding_mask=padding_mask,
                         score_function=score_function, selected=selected)
    return _analyze(src, config or AnalyzeConfig(), None, top_k, None, None)


def _analyze(src: _Source, cfg: AnalyzeConfig, layers, top_k, progress, client,
             domains: DomainLabels | None = None) -> AnalyzeResult:
    t0 = time.perf_counter()
    infos = {i.name: i for i in src.infos}
    names = tuple(layers) if layers is not None else tuple(infos)
    unknown = [n for n in names if n not in infos]
    if unknown:
        raise InvalidParameter(f"layer(s) {unknown} not in the log; it has {tuple(infos)}")
    if not names:
        raise InvalidParameter("no layers to analyse")
    if src.num_tokens == 0:
        raise InvalidScores(f"{src.name}: the log holds no tokens")
    ks = resolve_top_k([infos[n] for n in names], top_k)  # every layer checked before any work
    check_sweep(cfg, [infos[n] for n in names])
    weights = src.router_weights() if cfg.hidden else None

    ranges = plan_ranges(src.shards, cfg.chunk_tokens)
    unavailable = {} if src.has_logits else unavailable_without_logits(cfg)
    sampling = (cfg.counterfactual or cfg.leakage) and src.has_logits
    sample = _decide_sample(src, cfg, ranges, client) if sampling else None
    layer_specs = tuple((infos[n], ks[n], cfg.hidden and src.has_hidden(n)) for n in names)
    tasks = [_StreamTask(src.data, r, layer_specs, cfg.chunk_tokens, cfg.eps, cfg.threads, sample, cfg.patterns,
                         domains if cfg.patterns else None) for r in ranges]
    total, done = src.num_tokens * len(names), 0

    def streamed(i: int, out: _StreamOut) -> None:
        nonlocal done
        done += out.range.num_tokens * len(names)
        if progress is not None:
            progress("stream", done, total)

    # merged as they arrive, in the tree of tree_merge over range order: the driver holds O(log tasks) partials
    merged = map_reduce(_stream_task, tasks, _merge_stream_outs, client=client, progress=streamed,
                        key="usmoe-lp-analyze-stream")
    read_seconds = merged.read_seconds
    streams = list(merged.streams)
    samples = [_sample_sequences([merged.rows[j]], sample) if sampling else [] for j in range(len(names))]
    sample_tasks = [_SampleTask(info, k, cfg, cfg.lp_sample if j < cfg.lp_layers else 0, samples[j])
                    for j, (info, k, _) in enumerate(layer_specs)]
    finished = 0

    def analysed(i: int, out) -> None:
        nonlocal finished
        finished += 1
        if progress is not None:
            progress("sample", finished, len(sample_tasks))

    sampled = map_tasks(_sample_task, sample_tasks, client=client if sampling else None,
                        progress=analysed if sampling else None, key="usmoe-lp-analyze-sample")

    results, cf_parts, leak_parts = [], [], {}
    for (info, k, _), stream, (cf_part, leaks, cross, decode, topc), seqs in zip(layer_specs, streams, sampled,
                                                                                 samples, strict=True):
        w = None if weights is None else weights.get(info.name)
        st = stream.result(router_weights=None if w is None else w.float())
        results.append(LayerAnalysis(
            layer=info.name, num_experts=info.num_experts, top_k=k, score_function=info.score_function,
            num_tokens=st["tokens"], selection_source=st["source"], load=st["load"], collapse=st["collapse"],
            margins=st["margins"], counterfactual=cf_part.result() if cf_part is not None else None,
            leakage={label: p.result() for label, p in leaks.items()}, cross_sequence=cross, topc_margins=topc,
            sample_sequences=len(seqs), sample_tokens=sum(z.shape[0] for _, z, _ in seqs), decode=decode,
            native_agreement=st["native"], unavailable=dict(unavailable),
            patterns=None if stream.patterns is None else stream.patterns.result()))
        if cf_part is not None:
            cf_parts.append(cf_part)
        for label, part in leaks.items():
            leak_parts.setdefault(label, []).append(part)
    # Layers may differ in N or k (then pooling is undefined): pool only when every layer agrees.
    same_n = len({la.num_experts for la in results}) == 1
    same_cf = (same_n and len(cf_parts) == len(results) and len({p.configs for p in cf_parts}) == 1
               and len({p.score_function for p in cf_parts}) == 1)
    pooled_load = tree_merge([s.load for s in streams]).result() if same_n else None
    pooled_cf = tree_merge(cf_parts).result() if cf_parts and same_cf else None
    pooled_leak = {label: tree_merge(parts).result() for label, parts in leak_parts.items()
                   if len(parts) == len(results)} if same_n else {}
    return AnalyzeResult(source=src.name, model=src.model, config=cfg, layers=tuple(results),
                         pooled_load=pooled_load, pooled_counterfactual=pooled_cf, pooled_leakage=pooled_leak,
                         seconds=time.perf_counter() - t0, read_seconds=read_seconds, unavailable=unavailable,
                         transitions={pair: t.result() for pair, t in zip(zip(names[:-1], names[1:], strict=True),
                                                                          merged.transitions, strict=True)}
                         if cfg.patterns else {})


@dataclass(frozen=True)
class _SampleTask:
    """The per-sequence analyses of one layer on its sampled sequences (``seqs``: id, logits, selection)."""

    info: LayerInfo
    k: int
    cfg: AnalyzeConfig
    lp_sample: int
    seqs: list


def _sample_task(task: _SampleTask):
    """Module-level (Dask workers import it): :func:`_sample_analyses` of one layer, torch on one thread."""
    with one_torch_thread():
        return _sample_analyses(task.seqs, task.info, task.k, task.cfg, task.lp_sample)


def _sample_analyses(seqs, info: LayerInfo, k: int, cfg: AnalyzeConfig, lp_sample: int):
    """Counterfactual re-routing, leakage, decode mismatch, cross-sequence dependence and top-c margins
    of every configuration on the sampled sequences of one layer."""
    N = info.num_experts
    cf_part, leak_parts, cross, decode, topc = None, {}, {}, {}, {}
    configs = cfg.configs(k, N)
    sf = info.score_function
    if seqs and cfg.counterfactual:
        cf_part = CounterfactualPartial.empty(N, configs, lp_sample=lp_sample)
        for logits_b, mask_b, pad_b in _batches(seqs, cfg.batch_size):
            cf_part.update(logits_b, padding_mask=pad_b, model_mask=mask_b, layer=info)
    if seqs and (cfg.leakage or cfg.counterfactual):
        z64 = [z.double() for _, z, _ in seqs]
        for c in configs:
            entry, params = c.entry, c.param_dict
            margins_apply = entry.prefix == "global_topc" and entry.group(params) == "sequence"
            if not (cfg.leakage or margins_apply):
                continue
            own = [config_scores(z, c, sf, info) for z in z64]  # float64: margins are small differences
            if cfg.leakage:
                part = LeakagePartial.empty(c, num_experts=N, layer=info, max_recompute_tokens=cfg.max_recompute_tokens)
                for u in own:
                    part.update(u)
                leak_parts[c.label] = part
                decode[c.label] = tree_merge([decode_mismatch(u, c, layer=info,
                                                              max_recompute_tokens=cfg.max_recompute_tokens)
                                              for u in own])
                if entry.group(params) in ("batch", "position"):
                    stats = [cross_sequence_dependence(config_scores(lb.double(), c, sf, info), c, padding_mask=pb,
                                                       layer=info)
                             for lb, _, pb in _batches(seqs, cfg.batch_size) if lb.shape[0] > 1]
                    if stats:
                        cross[c.label] = _mean_cross(stats)
            if margins_apply:
                topc[c.label] = _topc_margin_sums(c, own, cfg.eps)
    return cf_part, leak_parts, cross, decode, topc


def _topc_margin_sums(cfg: RouterConfig, own: Sequence[torch.Tensor], eps) -> dict[str, Any]:
    """Global-threshold margins of a ``global_topc`` setting grouped per sequence over the sampled
    sequences (own scores, (T, N) float64 each), as sums (so layers pool by adding).

    Margins: the c-th minus (c+1)-th largest own score of each sequence, c = the entry's
    ``prefix_budget`` of the whole sequence, and the pairs within eps of the sequence's boundary
    (Megatron-LM's boundary margin, at the global cut)."""
    margin_sum, sequences, pairs = 0.0, 0, 0
    fragile = dict.fromkeys(eps, 0)
    for ut in own:
        u = ut.detach().cpu().numpy()
        T, N = u.shape
        c = cfg.entry.prefix_budget(T, N, cfg.param_dict, cfg.k)
        if not 1 <= c < u.size:
            continue
        g = topc_margin(u, c, eps=eps)
        margin_sum += g.margin
        sequences += 1
        pairs += u.size
        for e in eps:
            fragile[e] += round(g.fragile_share[e] * u.size)
    return {"sequences": sequences, "pairs": pairs, "margin_sum": margin_sum, "fragile_pairs": fragile}


def _topc_margin_row(sums: dict[str, Any]) -> dict[str, float]:
    n, pairs = sums["sequences"], sums["pairs"]
    row = {"topc_margin_mean": sums["margin_sum"] / n if n else float("nan")}
    for e, v in sums["fragile_pairs"].items():
        row[f"topc_fragile@{e:g}"] = v / pairs if pairs else float("nan")
    return row


def _mean_cross(stats) -> dict[str, Any]:
    """Cross-sequence statistics of several batches pooled over their real tokens."""
    tokens = sum(s.num_tokens for s in stats)
    w = [s.num_tokens / tokens if tokens else 0.0 for s in stats]
    return {"batches": len(stats), "sequences": sum(s.num_sequences for s in stats), "tokens": tokens,
            "flip_rate": float(sum(wi * s.flip_rate for wi, s in zip(w, stats, strict=True))),
            "token_flip_rate": float(sum(wi * s.token_flip_rate for wi, s in zip(w, stats, strict=True))),
            "jaccard_distance": float(sum(wi * s.jaccard_distance for wi, s in zip(w, stats, strict=True)))}
