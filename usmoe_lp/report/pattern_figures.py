"""Figures of the routing patterns of an analysis (:mod:`usmoe_lp.diagnostics.patterns`).

Every function takes ``(layer name, statistics)`` pairs in layer order and returns a
:class:`matplotlib.figure.Figure`, or None when there is nothing to plot. Axes are labelled with units, titles
state the sample sizes; every plot is deterministic (equal statistics give equal PNG bytes).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import TwoSlopeNorm

LIFT_RANGE = 3.0
"""The colour scale of the co-activation and domain heatmaps spans log2 ratios in [-3, 3] (1/8 to 8 times the
independent or uniform value); larger ratios take the end colours."""


def panel_layers(names: Sequence[str]) -> list[int]:
    """Indices of the layers drawn as panels: every layer up to 3, else the first, middle and last.

    >>> panel_layers(["a", "b", "c", "d", "e"])
    [0, 2, 4]
    """
    n = len(names)
    return list(range(n)) if n <= 3 else [0, (n - 1) // 2, n - 1]


def _log2_ratio(ratio: np.ndarray) -> np.ndarray:
    """log2 of a ratio, NaN where undefined; a ratio of 0 (never together, never used) at the bottom of the scale."""
    out = np.full(ratio.shape, np.nan)
    ok = np.isfinite(ratio)
    with np.errstate(divide="ignore"):
        out[ok] = np.log2(ratio[ok])
    return np.clip(out, -LIFT_RANGE, LIFT_RANGE)


def _heatmap(ax, values: np.ndarray, *, cmap: str = "RdBu_r"):
    cm = plt.get_cmap(cmap).with_extremes(bad="#d9d9d9")
    return ax.imshow(np.ma.masked_invalid(values), cmap=cm, norm=TwoSlopeNorm(0.0, -LIFT_RANGE, LIFT_RANGE),
                     interpolation="nearest", aspect="auto")


def _expert_ticks(ax, n: int, axis: str) -> None:
    step = max(1, int(np.ceil(n / 16)))
    ticks = np.arange(0, n, step)
    (ax.set_xticks if axis == "x" else ax.set_yticks)(ticks)


def plot_coactivation_lift(layers: Sequence[tuple[str, object]]) -> plt.Figure | None:
    """Heatmap of log2 lift[i, j] = log2 (P(i, j) / (P(i) P(j))) of one layer per panel (the first, middle and
    last layer when there are more than 3), diverging around 0 (independent); grey: undefined (the diagonal, an
    unused expert). layers: (name, :class:`~usmoe_lp.diagnostics.coactivation.CoactivationStats`)."""
    layers = [(n, s) for n, s in layers if s is not None and s.tokens > 0]
    if not layers:
        return None
    picked = [layers[i] for i in panel_layers([n for n, _ in layers])]
    fig, axes = plt.subplots(1, len(picked), figsize=(4.6 * len(picked) + 1.2, 4.6), squeeze=False,
                             layout="constrained")
    im = None
    for ax, (name, s) in zip(axes[0], picked, strict=True):
        im = _heatmap(ax, _log2_ratio(np.asarray(s.lift, dtype=float)))
        ax.set_title(f"{name}\nT = {s.tokens:,} tokens, {s.pairs:,} co-activated pairs", fontsize=10)
        ax.set_xlabel("expert j")
        ax.set_ylabel("expert i")
        _expert_ticks(ax, s.num_experts, "x")
        _expert_ticks(ax, s.num_experts, "y")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.85,
                 label="log2 lift = log2 P(i,j) / (P(i) P(j))\n(0: independent; clipped at ±3; darkest blue:\n"
                       "never chosen together; grey: diagonal or unused expert)")
    shown = "" if len(picked) == len(layers) else f" (first, middle and last of {len(layers)} layers)"
    fig.suptitle(f"Expert co-activation lift{shown}", fontsize=11)
    return fig


def plot_transition_mi(pairs: Sequence[tuple[str, str, object]]) -> plt.Figure | None:
    """Mutual information between the experts of consecutive layers, per layer pair: I(e; e') of the expert sets
    and of the top-1 experts (nats, left), and I / min(H_a, H_b) (right). pairs: (layer a, layer b,
    :class:`~usmoe_lp.diagnostics.transitions.TransitionStats`)."""
    pairs = [(a, b, s) for a, b, s in pairs if s is not None and s.tokens > 0]
    if not pairs:
        return None
    labels = [f"{a} → {b}" for a, b, _ in pairs]
    x = np.arange(len(pairs))
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(9.0, 0.5 * len(pairs) + 7.0), 4.2), layout="constrained")
    series = (("expert sets (e uniform in S_t)", "mutual_information", "mi_normalised", "o-"),
              ("top-1 experts", "top1_mutual_information", "top1_mi_normalised", "s--"))
    for label, mi, norm, style in series:
        left.plot(x, [float(getattr(s, mi)) for _, _, s in pairs], style, label=label)
        right.plot(x, [float(getattr(s, norm)) for _, _, s in pairs], style, label=label)
    bias = [(s.num_experts_a - 1) * (s.num_experts_b - 1) / (2 * s.tokens) for _, _, s in pairs]
    left.plot(x, bias, ":", color="grey", label="plug-in bias of independent layers\n(N_a-1)(N_b-1)/(2T)")
    left.set_ylabel("mutual information (nats)")
    right.set_ylabel("normalised MI = I / min(H_a, H_b)")
    right.set_ylim(0, max(1.0, np.nanmax([float(s.mi_normalised) for _, _, s in pairs] + [0.0])) * 1.05)
    tilt = len(pairs) > 2 or max(len(lb) for lb in labels) > 12
    for ax in (left, right):
        ax.set_xticks(x, labels, rotation=30 if tilt else 0, ha="right" if tilt else "center")
        ax.set_xlabel("layer pair (l → l+1)")
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    tokens = min(s.tokens for _, _, s in pairs)
    fig.suptitle(f"Layer-to-layer expert transitions (T ≥ {tokens:,} tokens per pair; right: 0 = independent, "
                 f"1 = determined)", fontsize=11)
    return fig


def plot_vocab_specialisation(layers: Sequence[tuple[str, object]]) -> plt.Figure | None:
    """Vocabulary specialisation (OLMoE): per layer, the mean over token ids seen at least ``min_count`` times of
    the share of their occurrences whose top-1 expert is the id's most frequent one (unweighted and
    occurrence-weighted, left); per layer and expert, the mean over the ids that favour the expert (right; grey:
    no id). layers: (name, :class:`~usmoe_lp.diagnostics.vocab.VocabStats`)."""
    layers = [(n, s) for n, s in layers if s is not None and s.eligible_ids > 0]
    if not layers:
        return None
    names = [n for n, _ in layers]
    x = np.arange(len(layers))
    n_exp = max(s.num_experts for _, s in layers)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.0, max(4.0, 0.3 * len(layers) + 2.5)), layout="constrained",
                                      gridspec_kw={"width_ratios": (1, 1.4)})
    left.plot(x, [s.specialisation for _, s in layers], "o-", label="mean over token ids (OLMoE)")
    left.plot(x, [s.specialisation_weighted for _, s in layers], "s--", label="weighted by occurrences")
    left.plot(x, [1.0 / s.num_experts for _, s in layers], ":", color="grey", label="1/N (no specialisation)")
    left.set_ylim(0, 1.02)
    left.set_xticks(x, names, rotation=45 if len(layers) > 6 else 0, ha="right" if len(layers) > 6 else "center")
    left.set_xlabel("layer")
    left.set_ylabel("share of an id's occurrences on its top-1 expert")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    grid = np.full((len(layers), n_exp), np.nan)
    for i, (_, s) in enumerate(layers):
        grid[i, :s.num_experts] = s.expert_specialisation
    cm = plt.get_cmap("viridis").with_extremes(bad="#d9d9d9")
    im = right.imshow(np.ma.masked_invalid(grid), cmap=cm, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    right.set_yticks(x, names)
    _expert_ticks(right, n_exp, "x")
    right.set_xlabel("expert (top-1)")
    right.set_ylabel("layer")
    right.set_title("per expert: mean over the ids that favour it (grey: no id favours the expert)", fontsize=10)
    fig.colorbar(im, ax=right, label="specialisation (share on the favourite expert)")
    s0 = layers[0][1]
    fig.suptitle(f"Vocabulary specialisation ({s0.eligible_ids:,} token ids seen ≥ {s0.min_count} times among the "
                 f"{s0.usable_tokens:,} usable tokens of {names[0]})", fontsize=11)
    return fig


def plot_domain_shares(layers: Sequence[tuple[str, object]]) -> plt.Figure | None:
    """Share of each domain's tokens routed to each expert against the uniform share k_d / N, as log2 of the ratio
    (domain x expert, diverging around 0 = uniform), one panel per layer (first, middle and last beyond 3).
    layers: (name, :class:`~usmoe_lp.diagnostics.domain.DomainStats`)."""
    layers = [(n, s) for n, s in layers if s is not None and s.tokens > 0]
    if not layers:
        return None
    picked = [layers[i] for i in panel_layers([n for n, _ in layers])]
    n_dom = len(picked[0][1].domain_names)
    fig, axes = plt.subplots(1, len(picked), figsize=(4.8 * len(picked) + 1.5, 0.35 * n_dom + 3.0), squeeze=False,
                             layout="constrained")
    im = None
    for j, (ax, (name, s)) in enumerate(zip(axes[0], picked, strict=True)):
        share = np.asarray(s.share, dtype=float)
        uniform = np.asarray(s.uniform_share, dtype=float)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            im = _heatmap(ax, _log2_ratio(share / uniform))
        ax.set_title(f"{name}\n{s.tokens:,} labelled tokens ({s.unlabelled_tokens:,} unlabelled)", fontsize=10)
        ax.set_xlabel("expert")
        _expert_ticks(ax, s.num_experts, "x")
        tokens = np.asarray(s.domain_tokens)
        if j == 0:
            ax.set_yticks(np.arange(n_dom), [f"{d} ({t:,})" for d, t in zip(s.domain_names, tokens, strict=True)])
            ax.set_ylabel("domain (tokens)")
        else:
            ax.set_yticks(np.arange(n_dom), [])
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.85,
                 label="log2 (share_d(e) / (k_d / N))\n(0: uniform; clipped at ±3)")
    shown = "" if len(picked) == len(layers) else f" (first, middle and last of {len(layers)} layers)"
    fig.suptitle(f"Expert use per domain against uniform k/N{shown}", fontsize=11)
    return fig


def plot_locality(layers: Sequence[tuple[str, object]], top_k: Sequence[int]) -> plt.Figure | None:
    """Routing locality along the sequences: the hit rate of a per-sequence LRU cache of m experts against m, per
    layer, with m = k marked (left); the expert reuse rate of consecutive tokens against its independence baseline
    sum_e c_e^2 / (T sum_e c_e), per layer (right). layers: (name,
    :class:`~usmoe_lp.diagnostics.locality.LocalityStats`); top_k: each layer's k."""
    pairs = [(n, s, k) for (n, s), k in zip(layers, top_k, strict=True) if s is not None and s.accesses > 0]
    if not pairs:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.5, 4.6), layout="constrained")
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(pairs)))
    for (name, s, _), c in zip(pairs, colors, strict=True):
        m = np.arange(1, s.num_experts + 1)
        left.plot(m, np.asarray(s.lru_hit_rate, dtype=float), "-", color=c, lw=1.3,
                  label=name if len(pairs) <= 12 else None)
    ks = sorted({k for _, _, k in pairs})
    for k in ks:
        left.axvline(k, color="black", ls=":", lw=1)
        left.annotate(f"m = k = {k}", (k, 0.02), xytext=(3, 0), textcoords="offset points", fontsize=8)
    left.set_xlabel("cache size m (experts kept per layer and sequence)")
    left.set_ylabel("LRU hit rate (hits / expert accesses)")
    left.set_ylim(0, 1.02)
    left.grid(alpha=0.3)
    if len(pairs) <= 12:
        left.legend(title="layer", fontsize=8, ncol=2 if len(pairs) > 6 else 1)
    else:
        sm = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(0, len(pairs) - 1))
        fig.colorbar(sm, ax=left, label="layer index")
    x = np.arange(len(pairs))
    right.plot(x, [s.expert_reuse_rate for _, s, _ in pairs], "o-", label="reuse rate |S_t ∩ S_t-1| / |S_t|")
    right.plot(x, [s.reuse_baseline for _, s, _ in pairs], "s--", color="grey",
               label="independent draws: Σ c_e² / (T Σ c_e)")
    right.set_xticks(x, [n for n, _, _ in pairs], rotation=45 if len(pairs) > 6 else 0,
                     ha="right" if len(pairs) > 6 else "center")
    right.set_xlabel("layer")
    right.set_ylabel("share of a token's experts used by the previous token")
    right.set_ylim(0, 1.02)
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    s0 = pairs[0][1]
    fig.suptitle(f"Expert locality along sequences ({s0.tokens:,} tokens, {s0.sequences:,} sequences, "
                 f"{s0.reuse_pairs:,} consecutive pairs per layer)", fontsize=11)
    return fig
