"""Write a live evaluation (:class:`usmoe_lp.live.evaluate.EvaluateResult`) as evaluate.json, report.md, a
self-contained report.html and PNG figures (:mod:`usmoe_lp.report.evaluate_figures`).

``evaluate.json`` is the result's ``to_json()`` (keys ``model``, ``settings``, ``quality``, ``layers``,
``generation``, ``definitions``, ``config``) with two keys of the file itself: ``schema`` (its format name and
version) and ``library_versions``. Every key is defined in ``docs/definitions.md`` (section *Live evaluation*);
the columns of the frames also in the file's own ``definitions``, with their units.

The directory is built aside and swapped in only when complete (:mod:`usmoe_lp.staging`), as every report of
the package: an earlier evaluate report is replaced only with ``overwrite``, a directory holding anything else
never, and the run's inputs (a model directory, a text file) are never inside it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from usmoe_lp._json import json_ready
from usmoe_lp.logs.format import library_versions
from usmoe_lp.report.evaluate_figures import NATIVE, flop_scale, plot_corruption, plot_quality_vs_cost, quality_at
from usmoe_lp.report.markup import (
    BASE_STYLE,
    Bullets,
    Figure,
    Heading,
    Paragraph,
    Table,
    figure_html,
    render_html,
    render_markdown,
)
from usmoe_lp.report.outputs import check_report_location, foreign_check, write_figures
from usmoe_lp.staging import check_destination, staged_directory

__all__ = ["CAPTIONS", "EVALUATE_OWNED", "HTML_STYLE", "SCHEMA", "best_cheaper", "check_evaluate_destination",
           "ci_text", "evaluate_dict", "front_sentence", "make_figures", "native_row", "png_figure", "quality_at",
           "report_tables", "summary_lines", "write_evaluate_report", "write_files"]

SCHEMA = "usmoe-lp/evaluate/1"
DOCS = "docs/definitions.md#live-evaluation"

CAPTIONS = {
    "quality_vs_cost.png": "Cross-entropy of each router setting (left) and its difference to native's (right) "
                           "against the routed experts' FLOPs per token (top axis: realised k-bar). Left: bootstrap "
                           "intervals over documents; right: paired intervals (both sides on the same resampled "
                           "documents), which is why they are narrower. Dashed step: the Pareto front; star: the "
                           "model's own routing; settings at one cost are spread slightly sideways.",
    "corruption.png": "Cross-entropy on the clean next tokens (left) and its difference to native's (right) when a "
                      "share of the input tokens is replaced by random tokens, per router setting (points dodged "
                      "sideways so the intervals stay apart).",
}

EVALUATE_OWNED: tuple[str, ...] = (r"evaluate\.json", r"report\.md", r"report\.html",
                                   *(re.escape(name) for name in CAPTIONS))
"""What an evaluate report directory holds (see :func:`usmoe_lp.report.outputs.foreign_entries`)."""

HTML_STYLE = BASE_STYLE
"""The stylesheet of the evaluate report (every report's, :data:`usmoe_lp.report.markup.BASE_STYLE`)."""


# ------------------------------------------------------------------------------------------------ files
def evaluate_dict(result) -> dict[str, Any]:
    """evaluate.json: ``schema``, the result's ``to_json()``, ``library_versions``; JSON-safe (NaN -> None)."""
    return json_ready({"schema": SCHEMA, **result.to_json(), "library_versions": library_versions()})


def check_evaluate_destination(out: str | Path, *, inputs: Sequence[str | Path] = (), overwrite: bool = False,
                               overwrite_flag: str = "overwrite=True", out_flag: str = "out") -> None:
    """Raise :class:`~usmoe_lp.errors.OutputExists` unless ``out`` may receive an evaluate report.

    ``out`` may be missing or empty; an earlier evaluate report there needs ``overwrite``, and any other file
    there is refused (never deleted). ``out`` must not be (or lie inside) a router log, nor contain one of
    ``inputs`` (the evaluated model's directory, the text file). ``overwrite_flag`` / ``out_flag``: how the
    caller's interface names those options, for the messages.
    """
    check_report_location(out, what="evaluate report", inputs=inputs, out_flag=out_flag)
    check_destination(out, what="evaluate report", overwrite=overwrite, foreign=foreign_check(EVALUATE_OWNED),
                      overwrite_flag=overwrite_flag)


def write_evaluate_report(result, out: str | Path, *, title: str = "usmoe-lp evaluate",
                          inputs: Sequence[str | Path] = (), overwrite: bool = False,
                          overwrite_flag: str = "overwrite=True", out_flag: str = "out") -> dict[str, Path]:
    """Write ``evaluate.json``, ``report.md``, ``report.html`` (self-contained: figures inlined as base64) and the
    PNG figures (``quality_vs_cost.png``; ``corruption.png`` with several corruption rates) into ``out``.
    Returns name -> path of every file written.

    ``result``: an :class:`~usmoe_lp.live.evaluate.EvaluateResult`. ``inputs``: paths the run read (never
    inside ``out``). The directory is built aside and swapped in only when complete; see
    :func:`check_evaluate_destination` for what may be replaced.
    """
    final = Path(out)
    check_evaluate_destination(final, inputs=inputs, overwrite=overwrite, overwrite_flag=overwrite_flag,
                               out_flag=out_flag)
    with staged_directory(final, what="evaluate report", overwrite=overwrite, foreign=foreign_check(EVALUATE_OWNED),
                          overwrite_flag=overwrite_flag) as tmp:
        names = write_files(result, tmp, title=title)
    return {name: final / name for name in names}


def write_files(result, out: Path, *, title: str = "usmoe-lp evaluate") -> list[str]:
    """Write the report's files into the existing directory ``out`` (no staging: the caller's job, as the demo
    does for its sub-directory); returns the names written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluate.json").write_text(json.dumps(evaluate_dict(result), indent=1, allow_nan=False) + "\n")
    pngs = write_figures(make_figures(result), out)
    tables = report_tables(result)
    (out / "report.md").write_text(_markdown(result, tables, list(pngs), title))
    (out / "report.html").write_text(_html(result, tables, pngs, title))
    return ["evaluate.json", *pngs, "report.md", "report.html"]


def _confidence(result) -> float | None:
    value = (getattr(result, "config", None) or {}).get("confidence")
    return None if value is None else float(value)


def make_figures(result) -> dict[str, Any]:
    """name.png -> matplotlib Figure: ``quality_vs_cost.png`` (at the lowest corruption rate) and, with several
    corruption rates, ``corruption.png``."""
    import matplotlib.pyplot as plt

    from usmoe_lp.live.evaluate import pareto_front

    figs = {}
    level = _confidence(result)
    front = pareto_front(quality_at(result.quality))
    for name, plot, args in (("quality_vs_cost.png", plot_quality_vs_cost, (front,)),
                             ("corruption.png", plot_corruption, ())):
        fig, axes = plt.subplots(1, 2, figsize=(15, 5.8))
        drawn = [plot(result.quality, *args, y=y, ax=ax, confidence=level, legend=y == "delta_ce")
                 for y, ax in zip(("ce", "delta_ce"), axes, strict=True)]
        if any(a is None for a in drawn):
            plt.close(fig)
            continue
        fig.tight_layout()
        figs[name] = fig
    return figs


# ------------------------------------------------------------------------------------------------ words
def ci_text(v, lo, hi, digits: int = 3, sign: bool = False) -> str:
    """``v [lo, hi]`` with ``digits`` decimals (``sign``: always signed); ``v`` alone without an interval, – for NaN."""
    if v is None or not np.isfinite(float(v)):
        return "–"
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    if lo is None or hi is None or not (np.isfinite(float(lo)) and np.isfinite(float(hi))):
        return f.format(float(v))
    return f"{f.format(float(v))} [{f.format(float(lo))}, {f.format(float(hi))}]"


def native_row(frame: pd.DataFrame) -> pd.Series | None:
    """The row of ``native`` in ``frame`` (rows of one corruption rate), or None."""
    nat = frame[frame["router"] == NATIVE]
    return None if nat.empty else nat.iloc[0]


def front_sentence(result) -> str:
    """One sentence on the quality-vs-cost figure, from the result's numbers: which settings are on the Pareto
    front (at the lowest corruption rate), what each costs relative to native and what it loses in cross-entropy.
    """
    from usmoe_lp.live.evaluate import pareto_front

    clean = quality_at(result.quality)
    front = pareto_front(clean).sort_values("moe_flops_per_token", kind="stable")
    native = native_row(clean)
    parts = [f"`{r['label']}` ({float(r['flops_vs_native']):.0%} of native's FLOPs, Δce "
             f"{ci_text(r['delta_ce'], r['delta_low'], r['delta_high'], sign=True)} nats/token)"
             for _, r in front.iterrows()]
    lead = (f"On {_documents(clean)} ({int(clean['tokens'].max()):,} scored tokens per "
            f"setting), native scores {float(native['ce']):.3f} nats/token; " if native is not None else "")
    return (f"{lead}{len(front)} of the {len(clean)} settings are on the Pareto front (no other setting has lower "
            f"cross-entropy for at most its FLOPs): " + "; ".join(parts) + ".")


MATCHED = 0.02
"""Settings whose FLOPs are within this share of native's count as at native's cost."""


def best_cheaper(quality: pd.DataFrame) -> pd.Series | None:
    """Among the settings of ``quality`` (rows of one corruption rate) that cost less than native (FLOPs below
    ``1 - MATCHED`` of native's), the one with the lowest delta_ce (first on ties); None if there is none."""
    cheaper = quality[(quality["router"] != NATIVE) & (quality["flops_vs_native"].astype(float) < 1 - MATCHED)]
    return None if cheaper.empty else cheaper.loc[cheaper["delta_ce"].astype(float).idxmin()]


def summary_lines(result) -> list[str]:
    """Up to five lines that say what the evaluation found (printed by the CLI, in the report). No router is
    named in advance: the lines compare whatever settings were evaluated."""
    q = result.quality
    clean = quality_at(q)
    native = native_row(clean)
    lines = []
    m = result.model
    lines.append(f"{m.get('name', 'model')}: {m.get('family')}, {m.get('layers')} MoE layers, N = "
                 f"{m.get('num_experts')}, k = {m.get('k')}; {clean['label'].nunique()} settings on "
                 f"{_documents(clean)}, {int(clean['tokens'].max()):,} scored tokens each"
                 + (f"; native {ci_text(native['ce'], native['ce_low'], native['ce_high'])} nats/token"
                    if native is not None else ""))
    others = clean[clean["router"] != NATIVE]
    if not others.empty:
        b = best_cheaper(clean)
        if b is not None:
            lines.append(f"below native's cost: best {b['label']} at {float(b['flops_vs_native']):.0%} of its FLOPs, "
                         f"Δce {ci_text(b['delta_ce'], b['delta_low'], b['delta_high'], sign=True)} nats/token")
        matched = others[(others["flops_vs_native"].astype(float) - 1).abs() <= MATCHED]
        if not matched.empty:
            b = matched.loc[matched["delta_ce"].astype(float).idxmin()]
            w = matched.loc[matched["delta_ce"].astype(float).idxmax()]
            text = f"at native's cost (±{MATCHED:.0%}): best {b['label']} Δce " \
                   f"{ci_text(b['delta_ce'], b['delta_low'], b['delta_high'], sign=True)}"
            if w["label"] != b["label"]:
                text += f", worst {w['label']} {ci_text(w['delta_ce'], w['delta_low'], w['delta_high'], sign=True)}"
            lines.append(text + " nats/token")
    rates = sorted(q["corrupt"].astype(float).unique())
    if len(rates) > 1:
        top = q[np.isclose(q["corrupt"].astype(float), rates[-1])]
        nat = native_row(top)
        rest = top[top["router"] != NATIVE]
        text = f"inputs corrupted at rate {rates[-1]:g}"
        if nat is not None and native is not None:
            text += f": native {float(nat['ce']):.3f} nats/token ({float(nat['ce']) - float(native['ce']):+.3f} " \
                    f"vs clean inputs)"
        if not rest.empty:
            b = rest.loc[rest["delta_ce"].astype(float).idxmin()]
            w = rest.loc[rest["delta_ce"].astype(float).idxmax()]
            text += f"; Δce vs native from {float(b['delta_ce']):+.3f} ({b['label']}) to {float(w['delta_ce']):+.3f} " \
                    f"({w['label']})"
        lines.append(text)
    gen = result.generation
    if gen is not None and not gen.empty:
        rest = gen[gen["label"].isin(set(clean.loc[clean["router"] != NATIVE, "label"]))]
        if not rest.empty:
            lo = rest.loc[rest["token_agreement"].astype(float).idxmin()]
            hi = rest.loc[rest["decode_mismatch"].astype(float).fillna(-1).idxmax()]
            lines.append(f"greedy continuation ({int(gen['new_tokens'].max())} tokens): agreement with native down "
                         f"to {float(lo['token_agreement']):.1%} ({lo['label']}); decode-time routing differs from "
                         f"teacher forcing on up to {_share(hi['decode_mismatch'])} of (token, layer) ({hi['label']})")
    return lines[:5]


def _share(v) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "–"
    return f"{f:.1%}" if np.isfinite(f) else "–"


# ------------------------------------------------------------------------------------------------ tables
def report_tables(result) -> dict[str, pd.DataFrame]:
    """The report's tables as display frames (strings): ``quality`` (every setting and rate, CIs in brackets),
    ``layers`` (realised k-bar per layer at the lowest rate) and ``generation`` (empty without generation)."""
    q = result.quality
    divisor, unit = flop_scale(q["moe_flops_per_token"]) if not q.empty else (1.0, "FLOP")
    several = q["corrupt"].nunique() > 1
    rows = []
    for _, r in q.iterrows():
        row = {"label": r["label"]}
        if several:
            row["corrupt"] = f"{float(r['corrupt']):g}"
        row.update({"ce (nats/token)": ci_text(r["ce"], r["ce_low"], r["ce_high"]),
                    "Δce vs native": ci_text(r["delta_ce"], r["delta_low"], r["delta_high"], sign=True),
                    "rel Δce": _pct(r["rel_delta"]),
                    "bits/byte": _num(r.get("bpb"), 3),
                    "k-bar": _num(r["kbar"], 3),
                    f"MoE {unit}/token": _num(float(r["moe_flops_per_token"]) / divisor, 1),
                    "FLOPs vs native": _pct(r["flops_vs_native"], signed=False),
                    "tokens/s": _num(r.get("tokens_per_s"), 0)})
        rows.append(row)
    quality = pd.DataFrame(rows)
    if "bits/byte" in quality and (quality["bits/byte"] == "–").all():
        quality = quality.drop(columns=["bits/byte"])
    lay = result.layers
    layers = pd.DataFrame()
    if lay is not None and not lay.empty:
        rate = float(lay["corrupt"].astype(float).min())
        sub = lay[np.isclose(lay["corrupt"].astype(float), rate)]
        order = list(dict.fromkeys(sub["layer"]))
        table = sub.pivot_table(index="label", columns="layer", values="kbar", sort=False).reindex(columns=order)
        table = table.reindex(list(dict.fromkeys(sub["label"])))
        dropped = sub.groupby("label", sort=False)["dropped"].sum() / sub.groupby("label", sort=False)["tokens"].sum()
        layers = table.map(lambda v: _num(v, 3)).assign(**{"dropped (share, all layers)": dropped.map(_share)})
        layers = layers.reset_index()
    gen = result.generation
    generation = pd.DataFrame()
    if gen is not None and not gen.empty:
        generation = pd.DataFrame({
            "label": gen["label"], "new tokens": gen["new_tokens"].map(lambda v: _num(v, 0)),
            "sequences": gen["sequences"].map(lambda v: _num(v, 0)),
            "token agreement": gen["token_agreement"].map(_share),
            "first divergence": gen["first_divergence"].map(lambda v: _num(v, 1)),
            "decode mismatch": gen["decode_mismatch"].map(_share)})
    return {"quality": quality, "layers": layers, "generation": generation}


def _documents(frame: pd.DataFrame) -> str:
    n = int(frame["documents"].max())
    return f"{n:,} document{'s' if n != 1 else ''}"


def _num(v, digits: int) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "–"
    return f"{f:,.{digits}f}" if np.isfinite(f) else "–"


def _pct(v, signed: bool = True) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "–"
    return (f"{f:+.1%}" if signed else f"{f:.0%}") if np.isfinite(f) else "–"


# ------------------------------------------------------------------------------------------------ rendering
def _intro(result) -> list[str]:
    m, cfg = result.model, getattr(result, "config", None) or {}
    clean = quality_at(result.quality)
    params = m.get("parameters")
    lines = [f"Model: {m.get('name')}: {m.get('family')}, {m.get('layers')} MoE layers, N = {m.get('num_experts')} "
             f"experts, k = {m.get('k')}" + (f", {int(params):,} parameters" if params is not None else "") + ".",
             f"Text: {_documents(clean)}, {int(clean['tokens'].max()):,} scored tokens per setting (windows of "
             f"{cfg.get('seq_len')} tokens); cross-entropy in nats per scored token, " + (
                 f"{_level(cfg)} bootstrap intervals over documents ({cfg.get('bootstrap')} resamples, seed "
                 f"{cfg.get('seed')}); Δce against native on the same resampled documents (paired)."
                 if cfg.get("bootstrap") else "no intervals (no bootstrap replicates)."),
             f"Settings: {', '.join(f'`{lb}`' for lb in dict.fromkeys(clean['label']))}; combine weights: "
             f"{cfg.get('weights')}."]
    rates = sorted(result.quality["corrupt"].astype(float).unique())
    if len(rates) > 1 or rates[0] > 0:
        lines.append(f"Input corruption rates: {', '.join(f'{r:g}' for r in rates)} (each input token replaced by a "
                     "uniformly random token with that probability; the targets stay clean).")
    return lines


def _level(cfg) -> str:
    c = cfg.get("confidence")
    return f"{float(c):.0%}" if c is not None else ""


def _definitions(result, tables) -> list[tuple[str, str]]:
    """The result's definitions of the quality, layer and generation columns (what the tables show)."""
    defs = dict(getattr(result, "definitions", None) or {})
    keys = [*result.quality.columns]
    for frame in (result.layers, result.generation, getattr(result, "documents", None)):
        if frame is not None:
            keys += list(frame.columns)
    return [(k, str(defs[k])) for k in dict.fromkeys(keys) if k in defs]


DEFINITIONS_INTRO = ("Definitions of the result's columns (units in brackets); every key of evaluate.json is defined "
                     f"in its `definitions` and in {DOCS} of the usmoe-lp repository.")

TABLE_HEADINGS = (("quality", "Quality and cost per setting"),
                  ("layers", "Realised k-bar per layer (lowest corruption rate)"),
                  ("generation", "Greedy generation against native"))


def report_blocks(result, tables, pngs, title: str) -> list:
    """The report as blocks (:mod:`usmoe_lp.report.markup`), the one text of report.md and report.html.
    ``pngs``: figure name -> PNG bytes (or just the names, for Markdown)."""
    blocks: list = [Heading(title, 1), *[Paragraph(s) for s in _intro(result)],
                    Heading("Summary"), Bullets(tuple(summary_lines(result)))]
    if "quality_vs_cost.png" in pngs:
        blocks.append(Paragraph(front_sentence(result)))
    for key, heading in TABLE_HEADINGS:
        if not tables[key].empty:
            blocks += [Heading(heading), Table(tables[key])]
    blocks.append(Heading("Figures"))
    blocks += [Figure(n, pngs[n] if isinstance(pngs, dict) else b"", CAPTIONS.get(n, n)) for n in pngs]
    blocks += [Heading("Definitions"), Paragraph(DEFINITIONS_INTRO),
               Bullets(tuple(f"`{k}`: {d}" for k, d in _definitions(result, tables)))]
    return blocks


def _markdown(result, tables, pngs, title: str) -> str:
    return render_markdown(report_blocks(result, tables, pngs, title))


def png_figure(data: bytes, caption: str, name: str | None = None) -> str:
    """An HTML figure with the PNG ``data`` inlined as base64 (the page loads nothing)."""
    return figure_html(data, caption, name)


def _html(result, tables, pngs: dict[str, bytes], title: str) -> str:
    return render_html(report_blocks(result, tables, pngs, title), title=title, style=HTML_STYLE)
