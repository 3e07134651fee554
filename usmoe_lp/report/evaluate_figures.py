"""Figures of a live evaluation: quality against cost, and quality against input corruption.

Seaborn-style functions: each takes a tidy frame (the ``quality`` frame of
:class:`usmoe_lp.live.evaluate.EvaluateResult`, one row per (label, corrupt)) and an optional ``ax``, draws on it
and returns the Axes (None when there is nothing to draw). Axes are labelled with units; every plot is
deterministic (the confidence intervals are the result's bootstrap intervals, computed once by the API), so equal
frames give equal PNG bytes.

Colours: one hue per registry router (in registry order, the same in every run), the settings of one router in
shades of it (:func:`usmoe_lp.report.analyze_figures.shaded_palette`, the analyze report's rule); markers: one shape
per router; native black.
"""

from __future__ import annotations

# No matplotlib.use() here: a library must not switch the backend of a notebook that imports it.
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from usmoe_lp.report.analyze_figures import shaded_palette

__all__ = ["FLOP_UNITS", "Y_COLUMNS", "flop_scale", "plot_corruption", "plot_quality_vs_cost", "quality_at"]

NATIVE = "native"
"""The label (and router name) of the model's own routing, the reference of every delta."""

MARKERS = ("o", "^", "s", "D", "v", "P", "X", "h", "<", ">", "p", "d")
"""Marker shapes, one per registry router in registry order (native always gets the star)."""

FLOP_UNITS: tuple[tuple[float, str], ...] = ((1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "kFLOP"),
                                             (1.0, "FLOP"))


def flop_scale(values) -> tuple[float, str]:
    """``(divisor, unit)`` that writes the largest of ``values`` (FLOPs) with 1 to 3 digits before the point.

    >>> flop_scale([7.9e5, 3.9e5])
    (1000.0, 'kFLOP')
    """
    finite = [float(v) for v in values if np.isfinite(float(v))]
    top = max(finite, default=1.0)
    for divisor, unit in FLOP_UNITS:
        if top >= divisor:
            return divisor, unit
    return 1.0, "FLOP"


def quality_at(quality: pd.DataFrame, corrupt: float | None = None) -> pd.DataFrame:
    """The rows of ``quality`` at corruption rate ``corrupt`` (default: the lowest rate in the frame)."""
    if quality.empty:
        return quality
    rate = float(quality["corrupt"].min()) if corrupt is None else float(corrupt)
    return quality[np.isclose(quality["corrupt"].astype(float), rate)]


def _styles(frame: pd.DataFrame) -> tuple[dict, dict]:
    """label -> colour (shades of the router's hue) and router -> marker. Hues and markers follow the registry's
    order of routers (:func:`usmoe_lp.routers.list_routers`), so a router looks the same in every figure whichever
    routers a run evaluated; native is black."""
    from usmoe_lp.routers import list_routers

    labels = list(dict.fromkeys(frame["label"]))
    routers = dict(zip(frame["label"], frame["router"], strict=False))
    order = [r for r in list_routers() if r != NATIVE]
    order += [r for r in dict.fromkeys(frame["router"]) if r not in order and r != NATIVE]
    # one placeholder item per registry router fixes the order of the hues (shaded_palette skips them)
    palette = shaded_palette(labels, {**{f"\0{r}": r for r in order}, **routers})
    palette.update({lb: (0.0, 0.0, 0.0) for lb in labels if routers.get(lb) == NATIVE})
    markers = {r: MARKERS[i % len(MARKERS)] for i, r in enumerate(order)}
    markers[NATIVE] = "*"
    return palette, markers


def _kbar_per_flop(frame: pd.DataFrame) -> float | None:
    """k-bar per FLOP when it is one constant over the settings (every layer's experts of one shape), else None."""
    if "kbar" not in frame or frame.empty:
        return None
    kbar = frame["kbar"].astype(float).to_numpy()
    flops = frame["moe_flops_per_token"].astype(float).to_numpy()
    ok = np.isfinite(kbar) & np.isfinite(flops) & (flops > 0)
    if not ok.any():
        return None
    ratio = kbar[ok] / flops[ok]
    return float(ratio[0]) if np.allclose(ratio, ratio[0], rtol=1e-6, atol=0) else None


Y_COLUMNS: dict[str, tuple[str, str, str, str]] = {
    "ce": ("ce_low", "ce_high", "cross-entropy (nats per token)", "bootstrap CI over documents"),
    "delta_ce": ("delta_low", "delta_high", "Δ cross-entropy vs native (nats per token)",
                 "paired bootstrap CI (same documents)"),
}
"""The quantities the figures draw on y: column -> (interval low, interval high, axis label, interval kind)."""


def _dodge(x: np.ndarray, width: float) -> np.ndarray:
    """Offsets that spread points sharing (to 0.1% of the range) an x apart by ``width`` each, centred on it."""
    span = float(np.ptp(x)) if x.size > 1 else 1.0
    keys = np.round(x / (span or 1.0) * 1000)
    out = np.zeros(x.size)
    for key in np.unique(keys):
        idx = np.flatnonzero(keys == key)
        out[idx] = (np.arange(idx.size) - (idx.size - 1) / 2) * width
    return out


def _errors(data: pd.DataFrame, y: str) -> tuple[pd.Series, list[pd.Series]]:
    low_col, high_col, _, _ = Y_COLUMNS[y]
    v = data[y].astype(float)
    return v, [(v - data[low_col].astype(float)).clip(lower=0).fillna(0),
               (data[high_col].astype(float) - v).clip(lower=0).fillna(0)]


def _sample_size(data: pd.DataFrame, documents: int | None, tokens: int | None) -> str:
    docs = int(data["documents"].max()) if documents is None and "documents" in data else documents
    toks = int(data["tokens"].max()) if tokens is None and "tokens" in data else tokens
    return ", ".join(s for s in (f"{docs:,} document{'s' if docs != 1 else ''}" if docs is not None else "",
                                 f"{toks:,} scored tokens per setting" if toks is not None else "") if s)


def _y_label(data: pd.DataFrame, y: str, confidence: float | None, suffix: str = "") -> str:
    """The axis label of ``y``: the quantity and units, and the intervals drawn (none without bootstrap)."""
    low_col, _, label, kind = Y_COLUMNS[y]
    if not np.isfinite(data[low_col].astype(float)).any():
        return f"{label}{suffix}\n(no interval: no bootstrap replicates)"
    level = f"{confidence:.0%} " if confidence is not None else ""
    return f"{label}{suffix},\n{level}{kind}"


def _legend(ax: plt.Axes) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, title="router setting", title_fontsize=8,
              frameon=False)


def plot_quality_vs_cost(quality: pd.DataFrame, front: pd.DataFrame | None = None, *, y: str = "ce",
                         corrupt: float | None = None, ax: plt.Axes | None = None, confidence: float | None = None,
                         documents: int | None = None, tokens: int | None = None, legend: bool = True,
                         dodge: float = 0.015) -> plt.Axes | None:
    """Quality against the routed experts' FLOPs per token, one marker per router setting, CIs as error bars.

    quality: the ``quality`` frame (columns label, router, corrupt, ce, ce_low, ce_high, delta_ce, delta_low,
    delta_high, kbar, moe_flops_per_token, tokens, documents); the rows at ``corrupt`` are drawn (default: the
    lowest rate). y: ``ce`` (nats per token, bootstrap interval over documents) or ``delta_ce`` (ce minus native's,
    paired bootstrap interval: narrower, since both sides see the same documents). front: the Pareto front of
    those rows (:func:`usmoe_lp.live.evaluate.pareto_front`), drawn as a dashed step; None draws none. Markers:
    one shape per router, the router's settings in shades of one hue; native is the black star. Settings at the
    same cost are spread sideways by ``dodge`` of the axis range each, so their intervals stay apart. A top axis
    reads the position as realised k-bar where FLOPs are proportional to it (experts of one shape in every
    layer). confidence: the intervals' level, for the axis label. documents / tokens: the sample size in the title
    (default: read from the frame). legend: draw the legend right of the axes. Returns the Axes, or None when
    there is no row to draw.
    """
    if y not in Y_COLUMNS:
        raise ValueError(f"y must be one of {', '.join(Y_COLUMNS)}, got {y!r}")
    data = quality_at(quality, corrupt)
    data = data[np.isfinite(data["moe_flops_per_token"].astype(float)) & np.isfinite(data[y].astype(float))]
    if data.empty:
        return None
    if ax is None:
        _, ax = plt.subplots(figsize=(9.5, 5.2))
    divisor, unit = flop_scale(data["moe_flops_per_token"])
    palette, markers = _styles(data)
    x = data["moe_flops_per_token"].astype(float).to_numpy() / divisor
    span = float(np.ptp(x)) or float(x.max()) or 1.0
    xs = x + _dodge(x, dodge * span)
    v, err = _errors(data, y)
    if front is not None and not front.empty:
        dodged = dict(zip(data.index, xs, strict=True))  # the front through the markers as drawn
        f = front.assign(_x=[dodged.get(i, float(v) / divisor) for i, v in front["moe_flops_per_token"].items()])
        f = f.sort_values("_x", kind="stable")
        ax.step(f["_x"], f[y].astype(float), where="post", color="0.45", ls="--", lw=1.2, zorder=1,
                label=f"Pareto front ({len(f)} settings not dominated)")
    for i, (_, r) in enumerate(data.iterrows()):
        native = r["router"] == NATIVE
        ax.errorbar(xs[i], v.iloc[i], yerr=[[err[0].iloc[i]], [err[1].iloc[i]]], fmt=markers[r["router"]],
                    color=palette[r["label"]], ms=15 if native else 8, mec="black", mew=0.6, capsize=3, lw=1.1,
                    zorder=2 if native else 3,  # a setting on native's point stays visible inside the star
                    label=f"{r['label']} (model's own routing)" if native else r["label"])
    nat = np.flatnonzero((data["router"] == NATIVE).to_numpy())
    if nat.size:
        ax.axhline(float(v.iloc[nat[0]]), color="black", lw=0.7, ls=":", zorder=0)
        ax.annotate("native", (xs[nat[0]], float(v.iloc[nat[0]])), xytext=(-10, -4), ha="right", va="top",
                    textcoords="offset points", fontsize=9, fontweight="bold")
    per_flop = _kbar_per_flop(data)
    if per_flop is not None:
        top = ax.secondary_xaxis("top", functions=(lambda t: t * divisor * per_flop,
                                                   lambda t: t / (divisor * per_flop)))
        top.set_xlabel("realised k-bar (experts per token, mean over layers)")
    ax.set_xlabel(f"routed-expert FLOPs per token ({unit}; shared experts and router excluded)")
    ax.set_ylabel(_y_label(data, y, confidence))
    rate = float(data["corrupt"].iloc[0])
    corrupt_text = f"; inputs corrupted at rate {rate:g}" if rate > 0 else ""
    what = "Cross-entropy" if y == "ce" else "Cross-entropy minus native's"
    ax.set_title(f"{what} vs cost ({_sample_size(data, documents, tokens)}{corrupt_text})", fontsize=10, pad=10)
    ax.grid(alpha=0.3)
    if legend:
        _legend(ax)
    return ax


def plot_corruption(quality: pd.DataFrame, *, y: str = "ce", ax: plt.Axes | None = None,
                    confidence: float | None = None, legend: bool = True) -> plt.Axes | None:
    """Quality against the input corruption rate, one line per router setting (shades of the router's hue; native
    black), CIs as error bars (points dodged sideways so the intervals stay apart).

    quality: the ``quality`` frame (label, router, corrupt, ce, ce_low, ce_high, delta_ce, delta_low, delta_high,
    tokens, documents). y: ``ce`` (nats per token on the clean targets, bootstrap interval over documents) or
    ``delta_ce`` (minus native's at the same rate, paired interval). legend: draw the legend right of the axes.
    Returns the Axes, or None when the frame holds fewer than two corruption rates.
    """
    if y not in Y_COLUMNS:
        raise ValueError(f"y must be one of {', '.join(Y_COLUMNS)}, got {y!r}")
    if quality.empty or quality["corrupt"].nunique() < 2:
        return None
    if ax is None:
        _, ax = plt.subplots(figsize=(9.5, 5.2))
    palette, markers = _styles(quality)
    labels = list(dict.fromkeys(quality["label"]))
    rates = sorted(quality["corrupt"].astype(float).unique())
    spread = (rates[-1] - rates[0]) * 0.012 * (np.arange(len(labels)) - (len(labels) - 1) / 2)
    for offset, label in zip(spread, labels, strict=True):
        g = quality[quality["label"] == label].sort_values("corrupt", kind="stable")
        v, err = _errors(g, y)
        native = g["router"].iloc[0] == NATIVE
        ax.errorbar(g["corrupt"].astype(float) + offset, v, yerr=err, marker=markers[g["router"].iloc[0]],
                    color=palette[label], ms=9 if native else 5, lw=2.0 if native else 1.2, capsize=2,
                    mec="black", mew=0.4, zorder=3 if native else 2, label=label)
    ax.set_xticks(rates, [f"{r:g}" for r in rates])
    ax.set_xlabel("input corruption rate (share of input tokens replaced by uniform random tokens)")
    ax.set_ylabel(_y_label(quality, y, confidence, " on the clean targets"))
    what = "Cross-entropy" if y == "ce" else "Cross-entropy minus native's"
    ax.set_title(f"{what} vs input corruption\n({_sample_size(quality, None, None)} and rate)", fontsize=10)
    ax.grid(alpha=0.3)
    if legend:
        _legend(ax)
    return ax
