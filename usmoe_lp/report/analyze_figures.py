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


def plot_load_heatmap(expert_load: pd.DataFrame, tokens: int | None = None) -> plt.Figure | None:
    """Heatmap of each expert's share of the layer's token-expert assignments (layer x expert).

    expert_load: columns layer, expert, share. The colour scale is centred on the uniform share 1/N. Dead experts
    (share exactly 0: no assignment) are drawn as black cells, named in the legend, so they stand out instead of
    looking like a pale low share. tokens: tokens per layer behind each share (title).
    """
    if expert_load.empty:
        return None
    table = expert_load.pivot(index="layer", columns="expert", values="share")
    table = table.loc[list(dict.fromkeys(expert_load["layer"]))]
    n = table.shape[1]
    width = min(max(7.0, 0.45 * n + 3.5), 22.0)
    fig, ax = plt.subplots(figsize=(width, 0.45 * len(table) + 2.2))
    from usmoe_lp.diagnostics.load import COLD_SHARE

    values = table.to_numpy(dtype=float)
    dead = values == 0
    cold = (values > 0) & (values <= COLD_SHARE)
    annot = table.map(lambda v: "" if v == 0 else "cold" if v <= COLD_SHARE else f"{v:.3f}" if v < 0.01
                      else f"{v:.2f}") if n <= 16 else False
    sns.heatmap(table, ax=ax, cmap="RdBu_r", center=1.0 / n, annot=annot, fmt="", mask=dead,
                cbar_kws={"label": f"share of assignments\n(uniform = 1/{n} = {1 / n:.3f})"})
    handles, labels = [], []
    if dead.any():
        for r, c in zip(*np.nonzero(dead), strict=True):
            ax.add_patch(plt.Rectangle((c, r), 1, 1, facecolor="black", edgecolor="white", lw=0.5))
            if n <= 16:
                ax.text(c + 0.5, r + 0.5, "dead", ha="center", va="center", color="white", fontsize=8)
        handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="black"))
        labels.append(f"dead expert (no assignment): {int(dead.sum())}")
    if cold.any():
        for r, c in zip(*np.nonzero(cold), strict=True):
            ax.add_patch(plt.Rectangle((c, r), 1, 1, fill=False, hatch="///", edgecolor="black", lw=0.8))
        handles.append(plt.Rectangle((0, 0), 1, 1, fill=False, hatch="///", edgecolor="black"))
        labels.append(f"cold expert (share <= {COLD_SHARE:g}, moewatch): {int(cold.sum())}")
    if handles:
        ax.legend(handles=handles, labels=labels, loc="upper left", bbox_to_anchor=(0, -0.16), fontsize=8,
                  frameon=False, ncol=2)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    n_text = f", {tokens:,} tokens per layer" if tokens else ""
    ax.set_title(f"Expert load per layer (model's own selection{n_text})", fontsize=10)
    fig.tight_layout()
    return fig


def plot_layer_balance(load: pd.DataFrame) -> plt.Figure | None:
    """Per layer: normalised entropies (left) and MaxVio / Gini (right) of the model's selection.

    load: :meth:`AnalyzeResult.load_frame` (the ``pooled`` row is left out). Every series has its own marker and
    line style and is shifted slightly sideways, so a series equal to another stays visible. The title states the
    tokens per layer (the ``tokens`` column).
    """
    per = load[load["layer"] != "pooled"]
    if per.empty:
        return None
    layers = list(dict.fromkeys(per["layer"]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    panels = ((axes[0], [c for c in ("load_entropy", "token_entropy_normalised", "mean_prob_entropy") if c in per],
               "entropy / log N (1 = uniform)", "Routing entropy per layer"),
              (axes[1], [c for c in ("maxvio", "gini") if c in per],
               "MaxVio = max/mean - 1; Gini (0 = balanced)", "Load imbalance per layer"))
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-.")]
    x = np.arange(len(layers), dtype=float)
    for ax, cols, ylabel, title in panels:
        for i, col in enumerate(cols):
            marker, ls = styles[i % len(styles)]
            offset = (i - (len(cols) - 1) / 2) * 0.06
            y = per.set_index("layer").loc[layers, col].astype(float).to_numpy()
            ax.plot(x + offset, y, marker=marker, ls=ls, lw=1.6, ms=6, label=col)
        ax.set_xticks(x, layers, rotation=45 if len(layers) > 6 else 0)
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, title="metric",
                  title_fontsize=8)
    axes[0].set_ylim(0, 1.05)
    tokens = int(per["tokens"].max()) if "tokens" in per and per["tokens"].notna().any() else None
    if tokens is not None:
        fig.suptitle(f"Model's own selection, {tokens:,} tokens per layer (points shifted sideways so equal values "
                     "stay visible)", fontsize=10)
    fig.tight_layout()
    return fig


def shaded_palette(items, group_of: dict | None = None) -> dict[str, tuple[float, float, float]]:
    """A colour per item: one hue per group (``group_of[item]``, e.g. the router of a setting; an item
    without a group is its own), and the items of one group in shades of its hue, from darker to
    lighter. Hues follow the order of the groups in ``group_of`` (then of the items without one), so
    figures given the same ``group_of`` colour a router alike whichever of its settings they show.
    Deterministic."""
    items = list(dict.fromkeys(items))
    group_of = group_of or {}
    groups = list(dict.fromkeys([*group_of.values(), *(group_of.get(i, i) for i in items)]))
    colors = [*sns.color_palette("tab10", 10), *sns.color_palette("tab20", 20)[1::2]]
    if len(groups) > len(colors):
        colors += sns.color_palette("husl", len(groups) - len(colors))
    hues = dict(zip(groups, colors, strict=False))
    out = {}
    for group in groups:
        members = [i for i in items if group_of.get(i, i) == group]
        if not members:
            continue
        base = np.array(hues[group])
        weights = [0.0] if len(members) == 1 else np.linspace(-0.45, 0.45, len(members))
        for item, w in zip(members, weights, strict=True):
            shade = base * (1 + w) if w < 0 else base + (1 - base) * w   # darker toward black, lighter toward white
            out[item] = tuple(float(c) for c in np.clip(shade, 0, 1))
    return out


def _line_styles(items, group_of: dict | None = None) -> dict[str, str]:
    """A line style per item, cycling within its group (so shades of one hue also differ in style)."""
    group_of = group_of or {}
    seen: dict = {}
    out = {}
    for item in dict.fromkeys(items):
        g = group_of.get(item, item)
        out[item] = ["-", "--", "-.", ":"][seen.get(g, 0) % 4]
        seen[g] = seen.get(g, 0) + 1
    return out


def _legend_right(fig: plt.Figure, ax: plt.Axes, title: str) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    fig.legend(handles, labels, loc="center right", fontsize=7, title=title, title_fontsize=8, frameon=False)
    width = fig.get_size_inches()[0]
    fig.tight_layout(rect=(0, 0, 1 - 2.9 / width, 1))


def plot_experts_per_token(hist: pd.DataFrame, routers: dict[str, str] | None = None,
                           tokens: int | None = None) -> plt.Figure | None:
    """Share of tokens that get 0, 1, 2, ... experts, per router setting (pooled over layers).

    hist: columns router (the setting's label), experts, share. routers: label -> registry router
    name (settings of one router get shades of one hue). tokens: tokens behind each share (title).
    """
    if hist.empty:
        return None
    top = int(hist.loc[hist["share"] > 0, "experts"].max())
    hist = hist[hist["experts"] <= top]
    order = list(dict.fromkeys(hist["router"]))
    fig, ax = plt.subplots(figsize=(12, 4.4))
    sns.barplot(data=hist, x="experts", y="share", hue="router", hue_order=order, ax=ax, errorbar=None,
                palette=shaded_palette(order, routers))
    ax.set_xlabel("experts per token")
    ax.set_ylabel("share of tokens")
    n = f", {tokens:,} tokens per setting (all layers)" if tokens else ""
    ax.set_title(f"Experts per token under each router setting (0 = dropped token){n}", fontsize=10)
    _legend_right(fig, ax, "router setting")
    return fig


def plot_leakage_offsets(curves: pd.DataFrame, labels: list[str] | None = None,
                         bins: int = 24, routers: dict[str, str] | None = None) -> plt.Figure | None:
    """Prefix-consistency flip rate of token t against the number of tokens after it (T - t).

    curves: :meth:`AnalyzeResult.leakage_offset_frame` (label, offset, flip_rate, tokens).
    labels: the router settings to draw (default: all). routers: label -> registry router name
    (settings of one router get shades of one hue). Offsets are pooled into ``bins`` log-spaced bins
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
    tokens = int(data.groupby("label", sort=False)["tokens"].sum().max())
    top = int(data["offset"].max())
    if top + 1 > bins:
        edges = np.unique(np.concatenate([[0], np.geomspace(1, top + 1, bins).astype(int)]))
        idx = np.searchsorted(edges, data["offset"].to_numpy(), side="right") - 1
        data = data.assign(bin=idx, weighted=data["flip_rate"] * data["tokens"])
        agg = data.groupby(["label", "bin"], sort=False).agg(weighted=("weighted", "sum"), tokens=("tokens", "sum"),
                                                              offset=("offset", "mean")).reset_index()
        data = agg.assign(flip_rate=agg["weighted"] / agg["tokens"])
    fig, ax = plt.subplots(figsize=(11, 4.6))
    order = list(dict.fromkeys(data["label"]))
    sns.lineplot(data=data, x="offset", y="flip_rate", hue="label", hue_order=order, style="label",
                 style_order=order, dashes={lb: {"-": "", "--": (4, 2), "-.": (4, 1.5, 1, 1.5), ":": (1, 1.5)}[st]
                                             for lb, st in _line_styles(order, routers).items()},
                 ax=ax, linewidth=1.4, marker="o", markersize=3, markers=dict.fromkeys(order, "o"),
                 palette=shaded_palette(order, routers), errorbar=None)
    if top > 30:
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(left=0)
    ax.set_xlabel("future tokens after the routed token (T - t)")
    ax.set_ylabel("flip rate (share of expert decisions changed)")
    ax.set_title(f"Information leakage: routing of the prefix 1..t vs the whole sequence ({tokens:,} tokens per "
                 "setting, all layers)", fontsize=10)
    _legend_right(fig, ax, "router setting")
    return fig


SWEEP_PANELS: tuple[tuple[str, str], ...] = (
    ("coverage", "share of probability mass covered"),
    ("drop_rate", "dropped tokens (share of tokens)"),
    ("flip_rate", "leakage flip rate (share of decisions)"),
    ("gini", "load Gini (0 = balanced)"),
)
"""The panels of :func:`plot_sweeps`: counterfactual-frame column and axis label (units)."""


def pooled_rows(cf: pd.DataFrame) -> pd.DataFrame:
    """The rows of the counterfactual frame pooled over layers (``layer == "pooled"``), or the frame itself
    when it has no layer column or no pooled row (a single layer)."""
    if "layer" not in cf or cf.empty:
        return cf
    pooled = cf[cf["layer"] == "pooled"]
    if pooled.empty and cf["layer"].nunique() == 1:
        return cf
    return pooled


def _is_number(v) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool | np.bool_)


def _param_columns(frame: pd.DataFrame, router: str) -> list[str]:
    """The columns of ``frame`` that hold a parameter of ``router`` (registry order; none if unregistered)."""
    from usmoe_lp.routers import ROUTERS

    entry = ROUTERS.get(router)
    return [] if entry is None else [name for name in entry.param_names if name in frame]


def _fmt_value(v) -> str:
    return f"{v:g}" if _is_number(v) else str(v)


def sweep_layout(cf: pd.DataFrame) -> pd.DataFrame:
    """How each config of a (pooled) counterfactual frame is drawn in the sweep figures.

    One row per config, in frame order, with columns ``router``, ``label``, ``role`` (``curve``: the
    router has several settings that differ in a numeric parameter, drawn as a line against realised
    k-bar; ``reference``: a single point, and a dotted line at its value), ``series`` (the curve's
    name: the router and the values of its other varying parameters; a reference's label),
    ``curve_param`` (the numeric parameter along the curve: among the router's varying numeric
    parameters, the one most correlated with realised k-bar, registry order on ties; None for a
    reference) and ``curve_value``. Parameters come from the router registry, never from a router's name.
    """
    rows = []
    for router, g in cf.groupby("router", sort=False):
        params = _param_columns(cf, router)
        varying = [p for p in params if len({_fmt_value(v) for v in g[p]}) > 1]
        numeric = [p for p in varying if all(_is_number(v) and np.isfinite(v) for v in g[p])]
        if len(g) == 1 or not numeric:
            rows += [{"router": router, "label": lb, "role": "reference", "series": lb, "curve_param": None,
                      "curve_value": np.nan} for lb in g["label"]]
            continue
        x = g["realised_kbar"].astype(float).to_numpy() if "realised_kbar" in g else np.zeros(len(g))
        strength = [_correlation(g[p].astype(float).to_numpy(), x) for p in numeric]
        curve = numeric[int(np.argmax(strength))]   # the first on ties
        others = [p for p in varying if p != curve]
        for _, r in g.iterrows():
            name = " ".join([str(router), *(f"{p}={_fmt_value(r[p])}" for p in others)])
            rows.append({"router": router, "label": r["label"], "role": "curve", "series": name,
                         "curve_param": curve, "curve_value": float(r[curve])})
    return pd.DataFrame(rows, columns=["router", "label", "role", "series", "curve_param", "curve_value"])


def _correlation(v: np.ndarray, x: np.ndarray) -> float:
    """|Pearson correlation| of v and x, 0 where either is constant or not finite."""
    if not (np.isfinite(v).all() and np.isfinite(x).all()) or np.ptp(v) == 0 or np.ptp(x) == 0:
        return 0.0
    return abs(float(np.corrcoef(v, x)[0, 1]))


def representative_labels(cf: pd.DataFrame) -> list[str]:
    """Configs to draw where one line per setting would crowd a figure: every reference config, and of
    each router drawn as curves the one series whose other parameters are nearest the router's
    defaults (registry :class:`~usmoe_lp.routers.Param` defaults; strings: equal or not, numbers:
    absolute difference; first series on ties)."""
    pooled = pooled_rows(cf)
    if pooled.empty:
        return []
    layout = sweep_layout(pooled)
    keep: list[str] = []
    for router, g in layout.groupby("router", sort=False):
        if (g["role"] == "reference").all():
            keep += list(g["label"])
            continue
        series = list(dict.fromkeys(g["series"]))
        rows = pooled[pooled["router"] == router].set_index("label")
        firsts = [rows.loc[g.loc[g["series"] == name, "label"].iloc[0]] for name in series]
        dist = [_distance_to_defaults(router, row, skip=g["curve_param"].iloc[0]) for row in firsts]
        best = series[int(np.argmin(dist))]
        keep += list(g.loc[g["series"] == best, "label"])
    return keep


def _distance_to_defaults(router: str, row: pd.Series, *, skip: str) -> float:
    """How far a setting's parameters (but ``skip``) are from the router's registry defaults."""
    from usmoe_lp.routers import ROUTERS

    entry = ROUTERS.get(router)
    if entry is None:
        return 0.0
    k = int(row["k"]) if "k" in row and _is_number(row["k"]) else 1
    total = 0.0
    for p in entry.params:
        if p.name == skip or p.name not in row:
            continue
        default, value = p.resolve_default(k), row[p.name]
        if _is_number(default) and _is_number(value):
            total += abs(float(value) - float(default))
        else:
            total += float(value != default)
    return total


def sweep_omissions(cf: pd.DataFrame) -> list[str]:
    """One line per config of the counterfactual frame that :func:`plot_sweeps` leaves out of a panel,
    and why (its value there is undefined: NaN, None in metrics.json)."""
    pooled = pooled_rows(cf)
    out = []
    for _, r in pooled.iterrows():
        missing = [col for col, _ in SWEEP_PANELS if col in pooled and not np.isfinite(_as_float(r[col]))]
        missing += [col for col, _ in SWEEP_PANELS if col not in pooled]
        if not np.isfinite(_as_float(r.get("realised_kbar"))):
            missing = ["every panel (no realised k-bar)"]
        if missing:
            out.append(f"{r['label']}: not in {', '.join(missing)} (no value)")
    return out


def _as_float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _series_styles(data: pd.DataFrame) -> tuple[dict[str, tuple], dict[str, tuple[str, str]]]:
    """Colours and (line style, marker) of the sweep series: one hue per router (frame order), the
    series of one router in shades of its hue with distinct line styles and markers."""
    group_of = dict(zip(data["series"], data["router"], strict=True))
    series = list(dict.fromkeys(data["series"]))
    lines = _line_styles(series, group_of)
    markers, seen = {}, {}
    for name in series:
        g = group_of[name]
        markers[name] = ["o", "s", "^", "D", "v", "P"][seen.get(g, 0) % 6]
        seen[g] = seen.get(g, 0) + 1
    return shaded_palette(series, group_of), {name: (lines[name], markers[name]) for name in series}


def plot_sweeps(cf: pd.DataFrame) -> plt.Figure | None:
    """Every counterfactual config (pooled over layers) against realised k-bar: coverage of the
    probability mass, dropped-token rate, leakage flip rate and load Gini.

    cf: :meth:`AnalyzeResult.counterfactual_frame` (its ``pooled`` rows are drawn). x is the realised
    k-bar (selected pairs / real tokens: experts per token). Routers with several settings that differ
    in a numeric parameter are lines along it (one per value of their other varying parameters,
    :func:`sweep_layout`); the others are reference points with a dotted line at their value. Labels
    are the configs' registry labels. A config with no value in a panel is left out of that panel
    (:func:`sweep_omissions` lists them; each panel title counts what it shows).
    """
    pooled = pooled_rows(cf)
    if pooled.empty or "realised_kbar" not in pooled:
        return None
    layout = sweep_layout(pooled)
    data = pooled.reset_index(drop=True).assign(series=layout["series"].to_numpy(), role=layout["role"].to_numpy(),
                                                curve_value=layout["curve_value"].to_numpy())
    panels = [(c, lab) for c, lab in SWEEP_PANELS if c in data]
    if not panels:
        return None
    series = list(dict.fromkeys(data["series"]))
    palette, styles = _series_styles(data)
    references = list(dict.fromkeys(data.loc[data["role"] == "reference", "series"]))
    markers = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]
    cols = 2 if len(panels) > 1 else 1
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.4 * cols + 3.2, 3.8 * rows), squeeze=False)
    for ax in axes.reshape(-1)[len(panels):]:
        ax.set_visible(False)
    handles: dict[str, object] = {}
    for ax, (col, ylabel) in zip(axes.reshape(-1), panels, strict=False):
        y_all = data[col].map(_as_float)
        x_all = data["realised_kbar"].map(_as_float)
        shown = 0
        for i, name in enumerate(series):
            sel = (data["series"] == name) & np.isfinite(y_all) & np.isfinite(x_all)
            if not sel.any():
                continue
            sub = data[sel].assign(x=x_all[sel], y=y_all[sel])
            shown += len(sub)
            color = palette[name]
            if sub["role"].iloc[0] == "curve":
                sub = sub.sort_values("curve_value", kind="stable")
                (h,) = ax.plot(sub["x"], sub["y"], marker=styles[name][1], ms=4, lw=1.4, ls=styles[name][0],
                               color=color)
            else:
                # earlier references drawn larger, so coinciding points stay visible as rings
                size = max(4.0, 10.0 - 0.6 * references.index(name))
                (h,) = ax.plot(sub["x"], sub["y"], ls="none", marker=markers[i % len(markers)], ms=size, color=color,
                               markeredgecolor="black", markeredgewidth=0.5)
                ax.axhline(float(sub["y"].iloc[0]), ls=":", lw=0.9, color=color, alpha=0.8)
            handles.setdefault(name, h)
        ax.set_xlabel("realised k-bar (experts per token)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel.split(' (')[0]}: {shown} of {len(data)} settings", fontsize=10)
        ax.grid(alpha=0.3)
    first = layout.drop_duplicates("series").set_index("series")
    drawn = [s for s in series if s in handles]
    texts = [f"{s} (line over {first.loc[s, 'curve_param']})" if first.loc[s, "role"] == "curve" else s
             for s in drawn]
    fig.legend([handles[s] for s in drawn], texts, loc="center right", fontsize=7, title="router (settings)",
               title_fontsize=8, frameon=False)
    tokens = int(data["tokens"].max()) if "tokens" in data and data["tokens"].notna().any() else None
    n_text = f"; {tokens:,} tokens per setting (all layers)" if tokens is not None else ""
    fig.suptitle(f"Counterfactual routers on the captured logits, pooled over layers{n_text}\n"
                 "lines: routers swept over a numeric parameter; markers and dotted lines: single settings",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - 3.0 / fig.get_size_inches()[0], 1))
    return fig


def plot_spectra(spectra: pd.DataFrame, tokens: int | None = None) -> plt.Figure | None:
    """Singular spectra of the (row-centred) router logits per layer, normalised to the largest.

    spectra: :meth:`AnalyzeResult.spectrum_frame` (layer, index, sigma_rel). tokens: the rows T of each layer's
    logit matrix (title).
    """
    spectra = spectra[spectra["sigma_rel"] > 1e-12] if not spectra.empty else spectra  # row-centring: rank <= N-1
    if spectra.empty:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.2))
    sns.lineplot(data=spectra, x="index", y="sigma_rel", hue="layer", marker="o", ax=ax, errorbar=None)
    ax.set_yscale("log")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("sigma_i / sigma_1 (log scale)")
    n_text = f"\n{tokens:,} tokens per layer" if tokens else ""
    ax.set_title(f"Spectrum of the row-centred router logits per layer (collapse = fast decay){n_text}", fontsize=10)
    fig.tight_layout()
    return fig
