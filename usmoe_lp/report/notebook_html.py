"""Compact HTML views of an analyze or evaluate result, for Jupyter's rich display (``_repr_html_``).

:func:`analyze_result_html` and :func:`evaluate_result_html` return one self-contained ``<div>``: no script, no
image, no link, no external resource; its style applies only inside it (every rule is scoped to the
``usmoe-lp-view`` class), and it fits a ~1000 px output cell (tables scroll sideways inside it rather than
widening the page). Every text from the result (source, model name, router labels) is HTML-escaped. The words and
tables are those of the written reports (:mod:`usmoe_lp.report.analyze_report`,
:mod:`usmoe_lp.report.evaluate_report`): the same summary lines, the same selection of columns, fewer rows.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable

import numpy as np
import pandas as pd

from usmoe_lp.report import analyze_report, evaluate_report
from usmoe_lp.report.analyze_figures import pooled_rows

__all__ = ["analyze_result_html", "evaluate_result_html"]

CLASS = "usmoe-lp-view"
STYLE = (f".{CLASS}{{font-family:system-ui,sans-serif;font-size:13px;max-width:1000px;color:inherit}}"
         f".{CLASS} h4{{margin:.4em 0 .2em}}.{CLASS} .wrap{{overflow-x:auto;max-width:100%}}"
         f".{CLASS} table{{border-collapse:collapse;font-size:12px;margin:.3em 0}}"
         f".{CLASS} td,.{CLASS} th{{border:1px solid #ccc;padding:2px 6px;text-align:right;white-space:nowrap}}"
         f".{CLASS} td:first-child,.{CLASS} th:first-child{{text-align:left}}"
         f".{CLASS} ul{{margin:.2em 0;padding-left:1.4em}}.{CLASS} .note{{color:#777}}")
"""The view's CSS: every rule scoped to the ``usmoe-lp-view`` class (nothing leaks into the notebook's page)."""

ANALYZE_LAYER_COLUMNS = ("layer", "tokens", "load_entropy", "token_entropy_normalised", "maxvio", "gini",
                         "dead_experts", "aux_loss", "logit_effective_rank", "mean_margin")
"""The per-layer columns of :func:`analyze_result_html` (``load_frame`` joined with ``collapse_frame``)."""

ANALYZE_COUNTERFACTUAL_COLUMNS = ("label", "realised_kbar", "coverage", "drop_rate", "agreement", "flip_rate",
                                  "gini", "certified", "max_lp_gap")
"""The counterfactual columns of :func:`analyze_result_html` (pooled over layers); ``certified`` is
``certified_optimal / certified_total`` and the kind of certificate."""

EVALUATE_DROPPED = ("tokens/s",)
"""Columns of the report's quality table that the compact view leaves out (wall-clock speed: see ``quality``)."""


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _text(value) -> str:
    """Escaped text, with the report's `backquoted` names set as code."""
    return re.sub(r"`([^`<>]+)`", r"<code>\1</code>", _esc(value))


def _number(v) -> str:
    """A table cell: 4 significant digits for floats, – for None / NaN, the value otherwise."""
    if v is None:
        return "–"
    if isinstance(v, float | np.floating):
        return f"{float(v):.4g}" if np.isfinite(v) else "–"
    return str(v)


def _table(frame: pd.DataFrame) -> str:
    """An escaped HTML table in a sideways-scrolling wrapper (``(none)`` for an empty frame)."""
    if frame.empty:
        return "<p class='note'>(none)</p>"
    shown = frame.apply(lambda col: col.map(_number)) if len(frame.columns) else frame.copy()
    shown.columns = [str(c) for c in shown.columns]  # no axis name row (a pivot's columns carry one)
    return "<div class='wrap'>" + shown.to_html(index=False, border=0, escape=True) + "</div>"


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _items(lines: Iterable[str]) -> str:
    lines = list(lines)
    return "<ul>" + "".join(f"<li>{_text(s)}</li>" for s in lines) + "</ul>" if lines else ""


def _view(title: str, body: list[str]) -> str:
    return f"<div class='{CLASS}'><style>{STYLE}</style><h4>{_esc(title)}</h4>" + "".join(body) + "</div>"


# ------------------------------------------------------------------------------------------------- analyze
def analyze_layer_frame(result) -> pd.DataFrame:
    """One row per layer (plus ``pooled``): the columns :data:`ANALYZE_LAYER_COLUMNS` that the result has."""
    load = result.load_frame()
    coll = result.collapse_frame()
    frame = load.merge(coll, on="layer", how="left") if not coll.empty else load
    return frame[[c for c in ANALYZE_LAYER_COLUMNS if c in frame.columns]]


def analyze_counterfactual_frame(result) -> pd.DataFrame:
    """The counterfactual settings pooled over layers: the columns :data:`ANALYZE_COUNTERFACTUAL_COLUMNS`."""
    cf = result.counterfactual_frame()
    if cf.empty:
        return cf
    cf = pooled_rows(cf).copy()
    cf["certified"] = [_certified(r) for _, r in cf.iterrows()]
    return cf[[c for c in ANALYZE_COUNTERFACTUAL_COLUMNS if c in cf.columns]].reset_index(drop=True)


def _certified(row) -> str:
    total = row.get("certified_total")
    if total is None or (isinstance(total, float) and not np.isfinite(total)):
        return "no program"
    return f"{int(row['certified_optimal'])}/{int(total)} ({row.get('certificate')})"


def analyze_result_html(result) -> str:
    """A compact HTML view of an :class:`~usmoe_lp.diagnostics.AnalyzeResult` (a ``<div>``, self-contained).

    Source and model, layers, N, k and tokens; the report's summary lines
    (:func:`usmoe_lp.report.analyze_report.summary_lines`); a per-layer table (:data:`ANALYZE_LAYER_COLUMNS`: load
    balance of the model's own selection, normalised token entropy, aux loss, effective rank of the logits, mean
    top-k margin); the counterfactual re-routing pooled over layers (:data:`ANALYZE_COUNTERFACTUAL_COLUMNS`), with
    each setting's certificate count. Definitions: ``docs/definitions.md`` and the report's ``metrics.json``.
    """
    model = result.model or {}
    name, family = model.get("name"), model.get("family")
    who = f"<b>{_esc(name)}</b>" if name else "unnamed"
    if family and family != name:
        who += f" ({_esc(family)})"
    body = [f"<p>Source <code>{_esc(result.source)}</code>; model {who}"]
    if result.layers:
        la = result.layers[0]
        body[0] += (f"; {len(result.layers)} MoE layers, N = {la.num_experts}, k = {la.top_k}, "
                    f"{la.num_tokens:,} tokens per layer; selection {_esc(la.selection_source)}; score "
                    f"{_esc(la.score_function)}; counterfactual sample {_plural(la.sample_sequences, 'sequence')}, "
                    f"{la.sample_tokens:,} tokens.</p>")
        body.append(_items(analyze_report.summary_lines(result)))
    else:
        body[0] += "; no layer analysed.</p>"
    body += ["<h4>Per layer (the model's own selection)</h4>", _table(analyze_layer_frame(result))]
    cf = analyze_counterfactual_frame(result)
    body.append("<h4>Counterfactual re-routing, pooled over layers</h4>")
    body.append(_table(cf) if not cf.empty else "<p class='note'>off</p>")
    body.append("<p class='note'>Full tables: <code>load_frame()</code>, <code>counterfactual_frame()</code>, "
                "<code>collapse_frame()</code>; files: <code>usmoe_lp.report.write_analyze_report</code>.</p>")
    return _view("usmoe-lp analyze", body)


# ------------------------------------------------------------------------------------------------ evaluate
def evaluate_result_html(result) -> str:
    """A compact HTML view of an :class:`~usmoe_lp.live.evaluate.EvaluateResult` (a ``<div>``, self-contained).

    Model, documents and scored tokens (:func:`usmoe_lp.report.evaluate_report._intro`'s words); the report's
    summary lines; the quality-and-cost table (cross-entropy and its delta to native with their intervals, k-bar,
    routed-expert FLOPs; :func:`usmoe_lp.report.evaluate_report.report_tables` less :data:`EVALUATE_DROPPED`); the
    realised k-bar per layer and the dropped share; greedy generation against native when it was run.
    """
    tables = evaluate_report.report_tables(result)
    body = [f"<p>{_text(s)}</p>" for s in evaluate_report._intro(result)]
    body.append(_items(evaluate_report.summary_lines(result)))
    tables["quality"] = tables["quality"].drop(columns=[c for c in EVALUATE_DROPPED if c in tables["quality"]])
    for key, heading in evaluate_report.TABLE_HEADINGS:
        if not tables[key].empty:
            body += [f"<h4>{_esc(heading)}</h4>", _table(tables[key])]
    body.append("<p class='note'>Full frames: <code>quality</code>, <code>layers</code>, <code>documents</code>; "
                "files: <code>usmoe_lp.report.evaluate_report.write_evaluate_report</code>.</p>")
    return _view("usmoe-lp evaluate", body)
