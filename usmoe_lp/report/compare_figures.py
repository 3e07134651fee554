"""Figures of a comparison of router logs: tidy frames of :class:`usmoe_lp.compare.CompareResult` in, a
matplotlib Figure out (None when there is nothing to plot).

Axes are labelled with units, titles state the sample sizes, legends sit outside the panels (beside
them, or below a wide figure). Plain
matplotlib lines over the layers (no bootstrap, no jitter): equal frames give equal PNG bytes.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

AGREEMENT_SERIES = {
    "exact_agreement": "exact expert set",
    "jaccard": "Jaccard of the sets (mean)",
    "overlap": "|S_a ∩ S_b| / k (router saturation)",
    "top1_agreement": "same top-1 (1 - fluctuation)",
    "matched_top1_agreement": "same top-1 after the best expert relabelling",
}
"""Agreement columns drawn, with their legend text."""

SIDE_BY_SIDE_METRICS = {
    "load_entropy": ("Load entropy", "H(load share) / log N (1 = uniform)"),
    "token_entropy_normalised": ("Per-token routing entropy", "mean H(p_t) / log N"),
    "maxvio": ("MaxVio", "max_e c_e / mean_e c_e - 1 (0 = balanced)"),
    "gini": ("Gini of the expert loads", "Gini (0 = balanced)"),
    "logit_effective_rank_centered": ("Effective rank of the logits", "dimensions (row-centred logits)"),
    "mean_margin": ("Top-k decision margin", "mean s_(k) - s_(k+1) (score units)"),
}
"""Side-by-side panels: column -> (title, y label)."""

LOAD_METRICS = ("load_entropy", "maxvio", "gini")
"""The side-by-side metrics of the selection alone (a selection-only log has these and no other)."""


LEGEND_INCHES = 3.4
"""Width kept right of the panels for the legend (the report's PNGs are saved without cropping)."""


def _legend_outside(fig, handles, texts, panels: float, title: str | None = None,
                    legend: float = LEGEND_INCHES) -> None:
    """Lay the panels out in the left ``panels`` inches and put the legend in the ``legend`` inches to their right."""
    right = panels / (panels + legend)
    fig.tight_layout(rect=(0, 0, right, 0.94))
    fig.legend(handles, texts, loc="center left", bbox_to_anchor=(right + 0.005, 0.5), fontsize=8, frameon=False,
               title=title, title_fontsize=8)


def _layer_axis(ax, layers: list[str]) -> None:
    ax.set_xticks(range(len(layers)), layers)
    ax.set_xlabel("layer (the first log's name)")
    if len(layers) > 6:
        ax.tick_params(axis="x", rotation=45)


def plot_agreement(agreement: pd.DataFrame) -> plt.Figure | None:
    """Per-layer routing agreement of each pair of logs, one panel per pair: exact-set, Jaccard, overlap / k,
    top-1 and relabelled top-1 agreement, with the top-1 agreement chance would give (dashed).

    agreement: :meth:`CompareResult.agreement_frame` (its ``pooled`` rows are left out; the panel title states
    the tokens per layer).
    """
    per = agreement[agreement["layer"] != "pooled"] if not agreement.empty else agreement
    if per.empty:
        return None
    pairs = list(dict.fromkeys(zip(per["a"], per["b"], strict=True)))
    layers = list(dict.fromkeys(per["layer"]))
    cols = min(3, len(pairs))
    rows = -(-len(pairs) // cols)
    panels = (0.35 * max(len(layers), 8) + 1.2) * cols
    fig, axes = plt.subplots(rows, cols, figsize=(panels, 3.6 * rows + 1.0), squeeze=False, sharey=True)
    colours = plt.get_cmap("tab10")
    for ax, (a, b) in zip(axes.flat, pairs, strict=False):
        sub = per[(per["a"] == a) & (per["b"] == b)].set_index("layer").loc[layers]
        x = np.arange(len(layers))
        for i, (col, text) in enumerate(AGREEMENT_SERIES.items()):
            matched = col == "matched_top1_agreement"  # drawn over top-1 where no relabelling helps: keep both seen
            ax.plot(x, sub[col].astype(float), marker="x" if matched else "o", ms=6 if matched else 4,
                    lw=1.0 if matched else 1.3, ls=":" if matched else "-", color=colours(i), label=text)
        ax.plot(x, sub["top1_chance"].astype(float), ls="--", lw=1.0, color="grey", label="top-1 agreement by chance")
        tokens = sorted(set(sub["tokens"].astype(int)))
        ax.set_title(f"{a} vs {b}\n{tokens[0] if len(tokens) == 1 else tokens} tokens per layer", fontsize=10)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        _layer_axis(ax, layers)
    for ax in list(axes.flat)[len(pairs):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("share of tokens (Jaccard, overlap: mean)")
    handles, texts = axes[0][0].get_legend_handles_labels()
    below = 0.6 / (3.6 * rows + 1.0)   # the legend's band under the panels (a wide figure: no room at its side)
    fig.tight_layout(rect=(0, below, 1, 0.95))
    fig.legend(handles, texts, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8, frameon=False)
    fig.suptitle("Routing agreement per layer, token by token (a vs b)", fontsize=11)
    return fig


def plot_side_by_side(side: pd.DataFrame) -> plt.Figure | None:
    """Key per-layer metrics of every log on common axes (one line per log): load entropy, per-token entropy,
    MaxVio, Gini, effective rank of the logits, mean top-k margin (panels whose metric no log has are left
    out).

    side: :meth:`CompareResult.side_by_side_frame`.
    """
    if side.empty:
        return None
    metrics = {c: v for c, v in SIDE_BY_SIDE_METRICS.items() if c in side and side[c].notna().any()}
    if not metrics:
        return None
    layers = list(dict.fromkeys(side["layer"]))
    logs = list(dict.fromkeys(side["log"]))
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    panels = (0.3 * max(len(layers), 8) + 1.3) * cols
    fig, axes = plt.subplots(rows, cols, figsize=(panels + 2.0, 3.3 * rows + 0.5), squeeze=False)
    colours = plt.get_cmap("tab10")
    x = np.arange(len(layers))
    for ax, (col, (title, ylabel)) in zip(axes.flat, metrics.items(), strict=False):
        for i, log in enumerate(logs):
            sub = side[side["log"] == log].set_index("layer").loc[layers]
            ax.plot(x + (i - (len(logs) - 1) / 2) * 0.06, sub[col].astype(float), marker="o", ms=4, lw=1.3,
                    color=colours(i % 10), label=log)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
        _layer_axis(ax, layers)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    tokens = side.groupby("log", sort=False)["tokens"].max().astype(int)
    handles, _ = axes.flat[0].get_legend_handles_labels()
    logit_only = [c for c in metrics if c not in LOAD_METRICS]
    load_only = {log for log in logs if logit_only and side.loc[side["log"] == log, logit_only].isna().all().all()}
    _legend_outside(fig, handles, [f"{log}\n({tokens[log]} tokens per layer"
                                   + ("; load\nmetrics only" if log in load_only else "") + ")" for log in logs],
                    panels, title="log", legend=2.0)
    fig.suptitle("Per-layer metrics of each log (analyze on each; a selection-only log has load metrics only)",
                 fontsize=11)
    return fig
