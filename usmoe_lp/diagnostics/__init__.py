"""Diagnostics on router logits: load, collapse, leakage, margins, counterfactual re-routing, routing patterns.

Each module computes one family of metrics, in one shot on in-memory arrays or streaming with a
mergeable partial (``XPartial.empty / update / merge / result``, the protocol
:class:`~usmoe_lp.diagnostics.partial.Partial`); every router of the registry
(:func:`usmoe_lp.routers.list_routers`) is re-routed, checked for leakage and certified from its
registry entry, with no per-router code here. :func:`analyze` drives them all
over a router log (a selection log too: the experts each token was routed to, without logits, gives the load and
the routing patterns, and the analyses that need logits are listed as unavailable), and
:func:`usmoe_lp.report.write_analyze_report` renders the result. The routing patterns (co-activation, layer
transitions, vocabulary and domain specialisation, locality) take a :class:`Routed` chunk: the experts of each
token, best first.
(The one-shot ``counterfactual`` function stays in its module, ``usmoe_lp.diagnostics.counterfactual``,
so that the package attribute remains the module.)
Definitions and sources: each module's and function's docstring, and the definitions table of the
analyze report (``usmoe_lp.report.analyze_report.DEFINITIONS``: definition, unit and source of every metric).
"""

from usmoe_lp.diagnostics.analyze import (
    NEEDS_LOGITS,
    AnalyzeConfig,
    AnalyzeResult,
    DomainLabels,
    LayerAnalysis,
    analyze,
    analyze_logits,
    domain_labels,
)
from usmoe_lp.diagnostics.collapse import (
    CollapsePartial,
    CollapseStats,
    collapse_stats,
    cosine_matrix,
    effective_rank,
    router_row_similarity,
    singular_spectrum,
    span_energy,
)
from usmoe_lp.diagnostics.counterfactual import (
    CounterfactualPartial,
    CounterfactualStats,
    RouterConfig,
    default_configs,
    reroute,
)
from usmoe_lp.diagnostics.leakage import (
    CrossSequenceStats,
    DecodeStats,
    LeakagePartial,
    LeakageStats,
    cross_sequence_dependence,
    decode_mismatch,
    prefix_consistency,
)
from usmoe_lp.diagnostics.load import (
    LoadPartial,
    LoadStats,
    aux_loss,
    balance_metrics,
    load_stats,
    router_z_loss,
)
from usmoe_lp.diagnostics.margins import (
    GlobalMargin,
    MarginPartial,
    MarginStats,
    fragile_counts,
    margin_stats,
    topc_margin,
    topk_margins,
)
from usmoe_lp.diagnostics.native import NativeAgreement, NativeAgreementPartial
from usmoe_lp.diagnostics.partial import Partial
from usmoe_lp.diagnostics.patterns import PatternStats, PatternStream
from usmoe_lp.diagnostics.routed import Routed
from usmoe_lp.diagnostics.transitions import TransitionPartial, TransitionStats

__all__ = [
    "AnalyzeConfig", "AnalyzeResult", "DomainLabels", "LayerAnalysis", "NEEDS_LOGITS", "analyze", "analyze_logits",
    "domain_labels",
    "CollapsePartial", "CollapseStats", "collapse_stats", "cosine_matrix", "effective_rank", "router_row_similarity",
    "singular_spectrum", "span_energy",
    "CounterfactualPartial", "CounterfactualStats", "RouterConfig", "default_configs", "reroute",
    "CrossSequenceStats", "DecodeStats", "LeakagePartial", "LeakageStats", "cross_sequence_dependence",
    "decode_mismatch", "prefix_consistency",
    "LoadPartial", "LoadStats", "aux_loss", "balance_metrics", "load_stats", "router_z_loss",
    "GlobalMargin", "MarginPartial", "MarginStats", "fragile_counts", "margin_stats", "topc_margin", "topk_margins",
    "NativeAgreement", "NativeAgreementPartial", "Partial",
    "PatternStats", "PatternStream", "Routed", "TransitionPartial", "TransitionStats",
]
