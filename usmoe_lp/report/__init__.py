"""Rendering: report files and seaborn figures for verify and analyze results."""

from usmoe_lp.report.analyze_figures import (
    plot_experts_per_token,
    plot_layer_balance,
    plot_leakage_offsets,
    plot_load_heatmap,
    plot_spectra,
    plot_sweeps,
)
from usmoe_lp.report.analyze_report import metrics_dict, summary_lines, write_analyze_report
from usmoe_lp.report.figures import (
    plot_capped_gap,
    plot_gap_distributions,
    plot_usmoe_minus_tc,
    records_frame,
)
from usmoe_lp.report.verify_report import render_markdown, write_verify_report

__all__ = ["plot_capped_gap", "plot_gap_distributions", "plot_usmoe_minus_tc", "records_frame",
           "render_markdown", "write_verify_report", "write_analyze_report", "metrics_dict", "summary_lines",
           "plot_experts_per_token", "plot_layer_balance", "plot_leakage_offsets", "plot_load_heatmap",
           "plot_spectra", "plot_sweeps"]
