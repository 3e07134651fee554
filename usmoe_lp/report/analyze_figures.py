"""Figures of an analysis: seaborn plots that take tidy frames and return the figure.

Every function takes the tidy frames of :class:`usmoe_lp.diagnostics.AnalyzeResult`
(``load_frame``, ``expert_load_frame``, ``counterfactual_frame``, ``leakage_offset_frame``,
``spectrum_frame``) and returns a :class:`matplotlib.figure.Figure`, or None when there is nothing to
plot. Axes are labelled with units; titles say what is shown. Every plot is deterministic (no
bootstrap error bars, no random jitter): equal frames give equal PNG bytes.
"""

from __future__ import annotations

# No matplotlib.use() here: a library must not switch the backend of a notebook that imports it.
# The CLI sets MPLBACKEND=Agg (usmoe_lp.cli.main); headless machines fall back to Agg anyway.
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns


def plot_load_heatmap(expert_load: pd.DataFrame) -> plt.Figure | None:
    """Heatmap of each expert's share of the layer's token-expert assignments (layer x expert).

    expert_load: columns layer, expert, share. The colour scale is centred on the uniform share 1/N.
    """
    if expert_load.empty:
        return None
    table = expert_load.pivot(index="layer", columns="expert", values="share")
    table = table.loc[list(dict.fromkeys(expert_load["layer"]))]
    n = table.shape[1]
    width = min(max(6.0, 0.45 * n + 2.5), 22.0)
    fig, ax = plt.subplots(figsize=(width, 0.45 * len(table) + 1.8))
    sns.heatmap(table, ax=ax, cmap="RdBu_r", center=1.0 / n, annot=n <= 16, fmt=".2f",
                cbar_kws={"label": f"share of assignments (uniform = 1/{n} = {1 / n:.3f})"})
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title("Expert load per layer (model's own selection)")
    fig.tight_layout()
    return fig


def plot_layer_balance(load: pd.DataFrame) -> plt.Figure | None:
    """Per layer: normalised entropies (left) and MaxVio / Gini (right) of the model's selection.

    load: :meth:`AnalyzeResult.load_frame` (the ``pooled`` row is drawn as a dashed line).
    """
    per = load[load["layer"] != "pooled"]
    if per.empty:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    ent = per.melt(id_vars="layer", value_vars=[c for c in ("load_entropy", "token_entropy_normalised",
                                                           "mean_prob_entropy") if c in per],
                   var_name="metric", value_name="value").dropna()
    sns.pointplot(data=ent, x="layer", y="value", hue="metric", ax=axes[0], markers="o", errorbar=None)
    axes[0].set_ylim(0, 1.05)
    axes[0].set_ylabel("entropy / log N (1 = uniform)")
    axes[0].set_title("Routing entropy per layer")
    bal = per.melt(id_vars="layer", value_vars=["maxvio", "gini"], var_name="metric", value_name="value").dropna()
    sns.pointplot(data=bal, x="layer", y="value", hue="metric", ax=axes[1], markers="o", errorbar=None)
    axes[1].set_ylabel("MaxVio = max/mean - 1; Gini (0 = balanced)")
    axes[1].set_title("Load imbalance per layer")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    return fig


def plot_experts_per_token(hist: pd.DataFrame) -> plt.Figure | None:
    """Share of tokens that get 0, 1, 2, ... experts, per router (pooled over layers).

    hist: columns router (label), experts, share.
    """
    if hist.empty:
        return None
    top = int(hist.loc[hist["share"] > 0, "experts"].max())
    hist = hist[hist["experts"] <= top]
    order = list(dict.fromkeys(hist["router"]))
    fig, ax = plt.subplots(figsize=(10, 4.2))
    sns.barplot(data=hist, x="experts", y="share", hue="router", hue_order=order, ax=ax, errorbar=None,
                palette=sns.color_palette("tab10", len(order)))
    ax.set_xlabel("experts per token")
    ax.set_ylabel("share of tokens")
    ax.set_title("Experts per token under each router (0 = dropped token)")
    ax.legend(fontsize=7, ncol=2, title="router")
    fig.tight_layout()
    return fig


def plot_leakage_offsets(curves: pd.DataFrame, labels: list[str] | None = None,
                         bins: int = 24) -> plt.Figure | None:
    """Prefix-consistency flip rate of token t against the number of tokens after it (T - t).

    curves: :meth:`AnalyzeResult.leakage_offset_frame` (label, offset, flip_rate, tokens).
    labels: the routers to draw (default: all). Offsets are pooled into ``bins`` log-spaced bins
    (token-weighted means) when there are more offsets than that, so long sequences stay readable.
    """
    if curves.empty:
        return None
    data = curves.dropna(subset=["flip_rate"])
    data = data[data["tokens"] > 0]
    if labels is not None:
        data = data[data["label"].isin(labels)]
    if data.empty:
        return None
    top = int(data["offset"].max())
    if top + 1 > bins:
        edges = np.unique(np.concatenate([[0], np.geomspace(1, top + 1, bins).astype(int)]))
        idx = np.searchsorted(edges, data["offset"].to_numpy(), side="right") - 1
        data = data.assign(bin=idx, weighted=data["flip_rate"] * data["tokens"])
        agg = data.groupby(["label", "bin"], sort=False).agg(weighted=("weighted", "sum"), tokens=("tokens", "sum"),
                                                              offset=("offset", "mean")).reset_index()
        data = agg.assign(flip_rate=agg["weighted"] / agg["tokens"])
    fig, ax = plt.subplots(figsize=(9, 4.4))
    order = list(dict.fromkeys(data["label"]))
    sns.lineplot(data=data, x="offset", y="flip_rate", hue="label", hue_order=order, ax=ax, linewidth=1.4,
                 marker="o", markersize=3, palette=sns.color_palette("tab10", len(order)), errorbar=None)
    if top > 30:
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(left=0)
    ax.set_xlabel("future tokens after the routed token (T - t)")
    ax.set_ylabel("flip rate (share of expert decisions changed)")
    ax.set_title("Information leakage: routing of the prefix 1..t vs the whole sequence")
    ax.legend(fontsize=7, title="router")
    fig.tight_layout()
    return fig


def plot_sweeps(cf: pd.DataFrame) -> plt.Figure | None:
    """USMoE alpha x k-bar sweep (pooled over layers) against TC and EC at the model's k.

    cf: :meth:`AnalyzeResult.counterfactual_frame` rows of layer ``pooled``. Panels: coverage of
    the probability mass, dropped-token rate, leakage flip rate and load Gini.
    """
    pooled = cf[cf["layer"] == "pooled"] if "layer" in cf else cf
    usm = pooled[(pooled["router"] == "usmoe") & (pooled["scope"].fillna("sequence") == "sequence")]
    if usm.empty:
        return None
    refs = pooled[pooled["router"].isin(["tc", "ec", "capacity_tc"])]
    panels = [("coverage", "share of probability mass covered"), ("drop_rate", "dropped tokens (share)"),
              ("flip_rate", "leakage flip rate"), ("gini", "load Gini (0 = balanced)")]
    panels = [(c, lab) for c, lab in panels if c in pooled]
    cols = 2 if len(panels) > 2 else len(panels)
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 3.9 * rows), squeeze=False)
    axes = axes.reshape(-1)[:len(panels)]
    usm = usm.assign(alpha=usm["alpha"].map(lambda a: f"{a:g}"))
    colors = {"tc": "black", "ec": "tab:red", "capacity_tc": "tab:gray"}
    for ax, (col, label) in zip(np.atleast_1d(axes), panels, strict=True):
        sns.lineplot(data=usm, x="kbar", y=col, hue="alpha", marker="o", ax=ax, errorbar=None)
        for _, r in refs.iterrows():
            if pd.notna(r.get(col)):
                ax.axhline(r[col], ls="--", lw=1, color=colors.get(r["router"], "gray"), label=r["label"])
        ax.set_xlabel("k-bar (experts per token, USMoE)")
        ax.set_ylabel(label)
        ax.legend(fontsize=6, title="alpha / ref")
    fig.suptitle("USMoE sweep over alpha and k-bar on the captured logits (dashed: TC, EC, capacity-TC at the "
                 "model's k)")
    fig.tight_layout()
    return fig


def plot_spectra(spectra: pd.DataFrame) -> plt.Figure | None:
    """Singular spectra of the (row-centred) router logits per layer, normalised to the largest.

    spectra: :meth:`AnalyzeResult.spectrum_frame` (layer, index, sigma_rel).
    """
    spectra = spectra[spectra["sigma_rel"] > 1e-12] if not spectra.empty else spectra  # row-centring: rank <= N-1
    if spectra.empty:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.2))
    sns.lineplot(data=spectra, x="index", y="sigma_rel", hue="layer", marker="o", ax=ax, errorbar=None)
    ax.set_yscale("log")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("sigma_i / sigma_1 (log scale)")
    ax.set_title("Spectrum of the row-centred router logits per layer (collapse = fast decay)")
    fig.tight_layout()
    return fig
