"""Diagnostics on router logits: load, collapse, leakage, margins, counterfactual re-routing.

Each module computes one family of metrics, in one shot on in-memory arrays or streaming with a
mergeable partial (``XPartial.empty / update / merge / result``); :func:`analyze` drives them all
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
    routing_probs,
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
    LeakagePartial,
    LeakageStats,
    cross_sequence_dependence,
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

__all__ = [
    "AnalyzeConfig", "AnalyzeResult", "LayerAnalysis", "analyze", "analyze_logits", "routing_probs",
    "CollapsePartial", "CollapseStats", "collapse_stats", "cosine_matrix", "effective_rank", "router_row_similarity",
    "singular_spectrum", "span_energy",
    "CounterfactualPartial", "CounterfactualStats", "RouterConfig", "default_configs", "reroute",
    "CrossSequenceStats", "LeakagePartial", "LeakageStats", "cross_sequence_dependence", "prefix_consistency",
    "LoadPartial", "LoadStats", "aux_loss", "balance_metrics", "load_stats", "router_z_loss",
    "GlobalMargin", "MarginPartial", "MarginStats", "fragile_counts", "margin_stats", "topc_margin", "topk_margins",
]
