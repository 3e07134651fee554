"""Rendering: report files and seaborn figures for verify (and later analyze) results."""

from usmoe_lp.report.figures import (
    plot_capped_gap,
    plot_gap_distributions,
    plot_usmoe_minus_tc,
    records_frame,
)
from usmoe_lp.report.verify_report import render_markdown, write_verify_report

__all__ = ["plot_capped_gap", "plot_gap_distributions", "plot_usmoe_minus_tc", "records_frame",
           "render_markdown", "write_verify_report"]
