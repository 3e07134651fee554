"""Diagnostics on router logits: load, collapse, leakage, margins, counterfactual re-routing.

Each module computes one family of metrics, in one shot on in-memory arrays or streaming with a
mergeable partial (``XPartial.empty / update / merge / result``, the protocol
:class:`~usmoe_lp.diagnostics.partial.Partial`); every router of the registry
(:func:`usmoe_lp.routers.list_routers`) is re-routed, checked for leakage and certified from its
registry entry, with no per-router code here. :func:`analyze` drives them all
over a router log, and :func:`usmoe_lp.report.write_analyze_report` renders the result.
(The one-shot ``counterfactual`` function stays in its module, ``usmoe_lp.diagnostics.counterfactual``,
so that the package attribute remains the module.)
Definitions and sources: each module's and function's docstring, and the definitions table of the
analyze report (``usmoe_lp.report.analyze_report.DEFINITIONS``: definition, unit and source of every metric).
"""

from usmoe_lp.diagnostics.analyze import (
    AnalyzeConfig,
    AnalyzeResult,
    LayerAnalysis,
    analyze,
    analyze_logits,
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

__all__ = [
    "AnalyzeConfig", "AnalyzeResult", "LayerAnalysis", "analyze", "analyze_logits",
    "CollapsePartial", "CollapseStats", "collapse_stats", "cosine_matrix", "effective_rank", "router_row_similarity",
    "singular_spectrum", "span_energy",
    "CounterfactualPartial", "CounterfactualStats", "RouterConfig", "default_configs", "reroute",
    "CrossSequenceStats", "DecodeStats", "LeakagePartial", "LeakageStats", "cross_sequence_dependence",
    "decode_mismatch", "prefix_consistency",
    "LoadPartial", "LoadStats", "aux_loss", "balance_metrics", "load_stats", "router_z_loss",
    "GlobalMargin", "MarginPartial", "MarginStats", "fragile_counts", "margin_stats", "topc_margin", "topk_margins",
    "NativeAgreement", "NativeAgreementPartial", "Partial",
]
