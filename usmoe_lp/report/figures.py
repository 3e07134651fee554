"""Figures for the verify report (seaborn; tidy DataFrames in, matplotlib Axes/Figures out)."""

from __future__ import annotations

# No matplotlib.use() here: a library must not switch the backend of a notebook that imports it.
# The CLI sets MPLBACKEND=Agg (usmoe_lp.cli.main); headless machines fall back to Agg anyway.
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns


def records_frame(result) -> pd.DataFrame:
    """Tidy DataFrame of a :class:`VerifyResult`: one row per claim x instance.

    Columns: claim, family (the matrix family), T, N, size, k, trial, seed, passed, gap, note, plus value_* columns.
    """
    rows = []
    for r in result.records:
        row = {"claim": r.claim, "family": r.family, "T": r.T, "N": r.N, "size": f"{r.T}x{r.N}",
               "k": r.k, "trial": r.trial, "seed": r.seed, "passed": r.passed, "gap": r.gap,
               "note": r.note}
        row.update({f"value_{k}": v for k, v in r.values.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def _size_order(frame: pd.DataFrame) -> list[str]:
    pairs = frame[["T", "N"]].drop_duplicates().sort_values(["N", "T"])
    return [f"{T}x{N}" for T, N in pairs.itertuples(index=False)]


def plot_gap_distributions(frame: pd.DataFrame) -> plt.Figure | None:
    """Strip plot of the violation size of every failing instance, per claim and matrix family.

    Returns None when no claim failed.
    """
    fails = frame[~frame["passed"] & (frame["gap"] > 0)]
    if fails.empty:
        return None
    claims = list(dict.fromkeys(fails["claim"]))
    sizes = _size_order(frame)
    palette = dict(zip(sizes, sns.color_palette("viridis", len(sizes)), strict=True))
    fig, axes = plt.subplots(1, len(claims), figsize=(4.2 * len(claims) + 0.9, 4.2), squeeze=False)
    shown: dict = {}
    for ax, claim in zip(axes[0], claims, strict=True):
        sub = fails[fails["claim"] == claim]
        families = list(dict.fromkeys(sub["family"]))
        # a strip plot whose jitter comes from a seeded Generator (seaborn's stripplot draws it from
        # numpy's global state, so two identical runs gave different PNGs)
        jitter = np.random.default_rng(0).uniform(-0.25, 0.25, size=len(sub))
        sub = sub.assign(x=sub["family"].map(families.index).to_numpy() + jitter)
        sns.scatterplot(data=sub, x="x", y="gap", hue="size", hue_order=sizes, palette=palette, ax=ax, s=16,
                        linewidth=0)
        ax.set_xticks(range(len(families)), families)
        ax.set_xlim(-0.5, len(families) - 0.5)
        ax.set_yscale("log")
        total = int((frame["claim"] == claim).sum())
        ax.set_title(f"{claim}\n{len(sub)} failing of {total} instances", fontsize=10)
        ax.set_xlabel("matrix family")
        ax.set_ylabel("violation (optimum - claimed, score units)")
        ax.tick_params(axis="x", rotation=45)
        handles, labels = ax.get_legend_handles_labels()
        shown.update({lb: h for h, lb in zip(handles, labels, strict=True) if lb not in shown})
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    # one legend for every panel, outside them (a size has one colour in every panel)
    fig.legend([shown[s] for s in sizes if s in shown], [s for s in sizes if s in shown], title="T x N",
               loc="center right", fontsize=7, title_fontsize=8, frameon=False)
    fig.suptitle("Where the claims fail: size of each violation", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1 - 0.9 / fig.get_size_inches()[0], 1))
    return fig


MIN_TRIALS_FOR_INTERVAL = 5
"""Fewer trials per point than this: the point is drawn without an interval (a 90% interval of 2 numbers says
nothing)."""


def _gain_rtol() -> float:
    """The verifier's default relative tolerance for equal objectives (``Context.rtol``)."""
    from usmoe_lp.verify.claims import Context

    return float(Context.rtol)


def usmoe_gain_per_token(frame: pd.DataFrame) -> pd.Series:
    """obj(USMoE) - obj(TC) per token of the ``usmoe_ge_tc`` rows of a :func:`records_frame`, with differences
    the verifier counts as equal set to 0: |diff| <= rtol * max(1, |obj(USMoE)|, |obj(TC)|), rtol the verifier's
    default 1e-9 (floating-point noise such as -3e-16 on all-equal scores is no negative gain)."""
    diff = frame["value_usmoe_minus_tc"].astype(float)
    usmoe = frame["value_usmoe"].astype(float) if "value_usmoe" in frame else pd.Series(0.0, index=frame.index)
    scale = np.maximum(1.0, np.maximum(usmoe.abs(), (usmoe - diff).abs()))
    return diff.where(diff.abs() > _gain_rtol() * scale, 0.0) / frame["T"].astype(float)


def plot_usmoe_minus_tc(frame: pd.DataFrame) -> plt.Figure | None:
    """obj(USMoE) - obj(TC) per token vs N, one line per k, one panel per matrix family.

    Uses the ``usmoe_ge_tc`` records; returns None when that claim was not run. Differences within the verifier's
    tolerance are drawn as 0 (:func:`usmoe_gain_per_token`). Points are medians over the trials; the 90% interval
    is drawn only with at least :data:`MIN_TRIALS_FOR_INTERVAL` trials per point, and the title says how many.
    """
    sub = frame[frame["claim"] == "usmoe_ge_tc"].copy()
    if sub.empty or "value_usmoe_minus_tc" not in sub:
        return None
    sub["gain_per_token"] = usmoe_gain_per_token(sub)
    sub["k"] = sub["k"].astype(str)
    sub["size"] = pd.Categorical(sub["size"], categories=_size_order(sub), ordered=True)
    trials = sub.groupby(["family", "size", "k"], observed=True).size()
    lo, hi = int(trials.min()), int(trials.max())
    n_text = f"{lo}" if lo == hi else f"{lo}-{hi}"
    interval = lo >= MIN_TRIALS_FOR_INTERVAL
    g = sns.catplot(data=sub, x="size", y="gain_per_token", hue="k", col="family", col_wrap=3,
                    kind="point", estimator="median", errorbar=("pi", 90) if interval else None, height=2.6,
                    aspect=1.3, dodge=0.25 if sub["k"].nunique() > 1 else False,  # seaborn divides by #k - 1
                    sharey=False, legend_out=True)
    g.set_axis_labels("size T x N (sorted by N)", "gain per token (score units)")
    g.set_titles("matrix family {col_name}")
    for ax in g.axes.flat:
        ax.axhline(0.0, color="grey", lw=0.8)
    spread = ("median and 90% interval over trials" if interval else
              f"median over trials; no interval below {MIN_TRIALS_FOR_INTERVAL} trials")
    g.figure.suptitle(f"obj(USMoE global top-c, c = T k) - obj(TC, k), per token, vs N and k\n{spread}; {n_text} "
                      f"trials per point; |gain| <= {_gain_rtol():g} x max(1, |obj|) drawn as 0 (equal objectives)",
                      fontsize=10)
    if g.legend is not None:   # one legend, right of every panel (tight_layout alone pulls it over the last column)
        g.legend.set_title("k (experts\nper token)")
        sns.move_legend(g, "center right", bbox_to_anchor=(1.0, 0.5), frameon=False)
    g.figure.tight_layout(rect=(0, 0, 1 - 1.1 / g.figure.get_size_inches()[0], 1))
    return g.figure


def plot_capped_gap(frame: pd.DataFrame) -> plt.Figure | None:
    """ECDF of the relative gap of greedy capped top-c to the capped program's optimum."""
    sub = frame[frame["claim"] == "capped_greedy_optimal"].copy()
    if sub.empty or "value_relative_gap" not in sub:
        return None
    sub["relative gap"] = sub["value_relative_gap"].astype(float)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sns.ecdfplot(data=sub, x="relative gap", hue="size", hue_order=_size_order(sub), ax=ax,
                 palette="viridis")
    share = float(np.mean(~sub["passed"].astype(bool)))
    ax.set_title(f"Greedy capped top-c vs the b-matching optimum ({len(sub)} instances)\n"
                 f"{share:.1%} of instances suboptimal; worst {sub['relative gap'].max():.2%}", fontsize=10)
    ax.set_xlabel("(optimum - greedy) / optimum")
    ax.set_ylabel("fraction of instances")
    fig.tight_layout()
    return fig
