"""Write an analysis as metrics.json, report.md, a self-contained report.html and PNG figures."""

from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from usmoe_lp._json import json_ready
from usmoe_lp.logs.format import library_versions
from usmoe_lp.report.analyze_figures import (
    plot_experts_per_token,
    plot_layer_balance,
    plot_leakage_offsets,
    plot_load_heatmap,
    plot_spectra,
    plot_sweeps,
)
from usmoe_lp.report.outputs import check_report_location, foreign_check, save_png
from usmoe_lp.staging import check_destination, staged_directory

SCHEMA = "usmoe-lp/analyze/1"

# key -> (definition, unit, source). Every number in metrics.json is one of these keys.
DEFINITIONS: dict[str, tuple[str, str, str]] = {
    "load_entropy": ("H(l)/log N of the load share l_e = c_e / sum c of the model's selection (top-k counts)",
                     "fraction of log N (1 = uniform)", "moewatch's load entropy"),
    "load_entropy_nats": ("H(l) of the load share", "nats", "moewatch's load entropy, in nats"),
    "token_entropy": ("mean over tokens of H(p_t), p_t the routing distribution", "nats",
                      "moewatch's entropy from logits"),
    "token_entropy_normalised": ("token_entropy / log N", "fraction of log N", "moewatch's entropy from logits"),
    "mean_prob_entropy": ("H(mean_t p_t) / log N, entropy of the mean routing distribution", "fraction of log N",
                          "Megatron-LM routing_diagnostics"),
    "maxvio": ("max_e c_e / mean_e c_e - 1", "ratio (0 = balanced)", "DeepSeek arXiv 2408.15664"),
    "max_over_mean": ("max_e c_e / mean_e c_e, zero-load experts counted in the mean", "ratio (1 = balanced)",
                      "moewatch and plumb-moe imbalance; plumb-moe leaves zero-load experts out"),
    "cv": ("population std_e(c_e) / mean_e(c_e)", "ratio (0 = balanced)", "Megatron-LM routing_diagnostics"),
    "gini": ("1 + 1/N - 2 sum_i (sum_{j<=i} c_(j)) / (N sum c), c ascending", "0 = balanced, (N-1)/N = collapse",
             "Megatron-LM routing_diagnostics, with the +1/N term it omits"),
    "dead_experts": ("experts with c_e = 0", "count", "Megatron-LM routing_diagnostics"),
    "cold_experts": ("experts with load share <= 0.001", "count", "moewatch's threshold"),
    "zero_expert_rate": ("share of tokens with no expert", "share of tokens",
                         "flaxformer fraction_tokens_left_behind"),
    "experts_per_token": ("histogram: tokens with 0, 1, ..., N experts", "count of tokens",
                          "this project (USMoE lets it vary, arXiv 2503.22996)"),
    "aux_loss": ("Switch/GShard N * sum_e f_e P_e, f_e = c_e / T (sums to k), P_e = mean_t p_te, this layer",
                 "dimensionless (k at perfect balance)", "Switch eqs. 4-6; transformers load_balancing_loss_func"),
    "aux_loss_pooled": ("the same loss over all layers' tokens pooled into one set", "dimensionless",
                        "transformers load_balancing_loss_func"),
    "aux_loss_per_layer_mean": ("mean over layers of the per-layer aux loss", "dimensionless",
                                "OLMoE training scripts (allenai/OLMoE)"),
    "z_loss": ("(1/T) sum_t (logsumexp_e z_te)^2", "logit units squared", "ST-MoE arXiv 2202.08906"),
    "logit_effective_rank": ("exp(H(q)), q_i = sigma_i / sum sigma of the logit matrix", "dimensions (<= N)",
                             "Roy & Vetterli 2007"),
    "logit_effective_rank_centered": ("effective rank of the row-centred logits (the part softmax sees)",
                                      "dimensions (<= N - 1)", "Roy & Vetterli 2007"),
    "mean_expert_cosine": ("mean over expert pairs of the cosine of their probability columns",
                           "cosine in [0, 1]", "this project (usmoe_lp.diagnostics.collapse)"),
    "router_row_similarity": ("mean_{i != j} |cos(W_i, W_j)| of router weight rows", "cosine in [0, 1]",
                              "arXiv 2605.12476"),
    "span_energy": ("||P_W H||_F^2 / ||H||_F^2, hidden energy in the router row space", "share (1 = collapse)",
                    "X-MoE, Chi et al. 2022"),
    "hidden_effective_rank": ("effective rank of the pre-router hidden states", "dimensions", "Roy & Vetterli 2007"),
    "mean_margin": ("mean over tokens of (min selected - max unselected) selection score", "score units",
                    "Megatron-LM router_diagnostics"),
    "fragile_share": ("share of token-expert decisions within eps of the token's top-k boundary", "share",
                      "this project (margins.py)"),
    "topc_margin_mean": ("mean over sequences of the c-th minus the (c+1)-th largest unified score (USMoE, "
                         "sequence scope)", "score units",
                         "this project (Megatron-LM's boundary margin at the global cut)"),
    "kv_decode_token_flip_rate": ("share of tokens whose expert set differs between the full-sequence top-c "
                                  "(training) and KV-cache decoding, where each step is a group of one token with "
                                  "c = round_half_up(k-bar)", "share of tokens",
                                  "this project (papers/routing-as-lp.md §5.3, decoding mismatch)"),
    "flip_rate": ("share of token-expert decisions of token t that differ between routing the prefix 1..t "
                  "(with its own budget) and routing the whole sequence", "share of decisions",
                  "this project (usmoe_lp.diagnostics.leakage)"),
    "token_flip_rate": ("share of tokens whose expert set differs between prefix and full routing",
                        "share of tokens", "this project (usmoe_lp.diagnostics.leakage)"),
    "jaccard": ("mean Jaccard distance between prefix and full expert sets", "distance in [0, 1]",
                "this project (usmoe_lp.diagnostics.leakage)"),
    "displacement_mean": ("earlier tokens whose expert set changes when one token is appended", "tokens",
                          "this project (usmoe_lp.diagnostics.leakage)"),
    "cross_flip_rate": ("share of token-expert decisions that differ between routing a sequence with its batch "
                        "(batch / position scope) and routing it alone", "share of decisions",
                        "this project (usmoe_lp.diagnostics.leakage)"),
    "objective": ("sum of routing probabilities over the selected pairs", "probability mass",
                  "papers/routing-as-lp.md §1"),
    "coverage": ("objective / total probability mass of the real tokens", "share", "this project"),
    "drop_rate": ("share of real tokens with no expert", "share of tokens", "flaxformer fraction_tokens_left_behind"),
    "agreement": ("mean Jaccard similarity of the router's expert set with the model's own", "similarity in [0, 1]",
                  "this project"),
    "certified_optimal": ("groups whose selection the closed-form dual certificate proves optimal for the "
                          "router's own program", "count of groups", "usmoe_lp.lp.certify"),
}


def _stats_dict(obj) -> dict[str, Any]:
    return obj.to_dict() if obj is not None else None


def metrics_dict(result) -> dict[str, Any]:
    """Every number of an :class:`~usmoe_lp.diagnostics.AnalyzeResult` as JSON-safe plain data."""
    layers = {}
    for la in result.layers:
        cf = la.counterfactual
        layers[la.layer] = {
            "num_experts": la.num_experts, "top_k": la.top_k, "score_function": la.score_function,
            "tokens": la.num_tokens, "selection_source": la.selection_source,
            "load": _stats_dict(la.load), "collapse": _stats_dict(la.collapse), "margins": _stats_dict(la.margins),
            "counterfactual": None if cf is None else _frame_records(_cf_frame(result, la.layer)),
            "leakage": {label: s.to_dict() for label, s in la.leakage.items()},
            "cross_sequence": la.cross_sequence,
            "sample": {"sequences": la.sample_sequences, "tokens": la.sample_tokens},
        }
    lf = result.load_frame()
    mean_row = lf[lf["layer"] == "pooled"].drop(columns=["layer"]).to_dict(orient="records")
    pooled = {
        "note": "load_over_layers: balance metrics averaged over layers (expert e of one layer is not expert e of "
                "another); load_pooled_tokens: every layer's tokens in one set, as transformers' pooled aux loss",
        "load_over_layers": mean_row[0] if mean_row else None,
        "load_pooled_tokens": _stats_dict(result.pooled_load),
        "aux_loss_pooled": result.aux_loss_pooled,
        "aux_loss_per_layer_mean": result.aux_loss_per_layer_mean,
        "counterfactual": None if result.pooled_counterfactual is None
        else _frame_records(_cf_frame(result, "pooled")),
        "leakage": {label: s.to_dict() for label, s in result.pooled_leakage.items()},
    }
    cfg = result.config
    return json_ready({
        "schema": SCHEMA,
        "source": result.source,
        "model": result.model,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
        "library_versions": library_versions(),
        "definitions": {k: {"definition": d, "unit": u, "source": s} for k, (d, u, s) in DEFINITIONS.items()},
        "layers": layers,
        "pooled": pooled,
    })


def _cf_frame(result, layer: str) -> pd.DataFrame:
    f = result.counterfactual_frame()
    return f[f["layer"] == layer].drop(columns=["layer"]) if not f.empty else f


def _frame_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}
            for row in frame.to_dict(orient="records")]


def make_figures(result) -> dict[str, Any]:
    """name.png -> matplotlib Figure (None entries skipped)."""
    cf = result.counterfactual_frame()
    figs = {
        "load_heatmap.png": plot_load_heatmap(result.expert_load_frame()),
        "layer_balance.png": plot_layer_balance(result.load_frame()),
        "experts_per_token.png": plot_experts_per_token(result.experts_per_token_frame(_leak_labels(result))),
        "leakage_per_offset.png": plot_leakage_offsets(result.leakage_offset_frame(), labels=_leak_labels(result)),
        "sweeps.png": plot_sweeps(cf) if not cf.empty else None,
        "collapse_spectra.png": plot_spectra(result.spectrum_frame()),
    }
    return {k: v for k, v in figs.items() if v is not None}


def _leak_labels(result) -> list[str] | None:
    """TC, EC, capacity-TC and the sequence-scoped USMoE configs of the alpha nearest 0.5 (one per k-bar)."""
    cf = result.counterfactual_frame()
    if cf.empty:
        return None
    pooled = cf[cf["layer"] == "pooled"]
    usm = pooled[(pooled["router"] == "usmoe") & (pooled["scope"] == "sequence")]
    keep = list(pooled[pooled["router"] != "usmoe"]["label"])
    if not usm.empty:
        alpha = usm["alpha"].iloc[(usm["alpha"] - 0.5).abs().argmin()]
        keep += list(usm[usm["alpha"] == alpha]["label"])
    return keep


CAPTIONS = {
    "load_heatmap.png": "Expert load per layer: each expert's share of the layer's token-expert assignments.",
    "layer_balance.png": "Routing entropy and load imbalance (MaxVio, Gini) per layer.",
    "experts_per_token.png": "Experts per token under the model's own routing and each counterfactual router.",
    "leakage_per_offset.png": "Leakage: how often the routing of token t changes once later tokens are seen.",
    "sweeps.png": "USMoE alpha x k-bar sweep against TC and EC: coverage, drops, leakage, balance.",
    "collapse_spectra.png": "Singular spectra of the row-centred router logits per layer.",
}


ANALYZE_OWNED: tuple[str, ...] = (r"metrics\.json", r"report\.md", r"report\.html",
                                  *(re.escape(name) for name in CAPTIONS))
"""What an analyze report directory holds (see :func:`usmoe_lp.report.outputs.foreign_entries`)."""


def check_analyze_destination(out: str | Path, *, log: str | Path | None = None, overwrite: bool = False,
                              overwrite_flag: str = "overwrite=True", out_flag: str = "out") -> None:
    """Raise :class:`~usmoe_lp.errors.OutputExists` unless ``out`` may receive an analyze report.

    ``out`` may be missing or empty; an earlier analyze report there needs ``overwrite``, and any
    other file there is refused (never deleted). ``out`` must not be (or lie inside) a router log,
    nor contain the analysed ``log``.
    """
    check_report_location(out, what="analyze report", inputs=() if log is None else (log,), out_flag=out_flag)
    check_destination(out, what="analyze report", overwrite=overwrite, foreign=foreign_check(ANALYZE_OWNED),
                      overwrite_flag=overwrite_flag)


def write_analyze_report(result, out: str | Path, *, title: str = "usmoe-lp analyze", overwrite: bool = False,
                         overwrite_flag: str = "overwrite=True") -> dict[str, Path]:
    """Write ``metrics.json``, ``report.md``, ``report.html`` (self-contained: figures embedded) and
    the PNG figures into the directory ``out``. Returns name -> path of every file written.

    The directory is built aside and swapped in only when complete (:mod:`usmoe_lp.staging`): a
    failure leaves an earlier report untouched, and a rerun leaves no figure of an earlier run. An
    existing non-empty ``out`` is replaced only with ``overwrite=True`` and only when it holds nothing
    but an earlier analyze report. The same result gives the same bytes whatever ``out`` is (no
    timings, no paths of the output in the files).
    """
    final = Path(out)
    check_analyze_destination(final, log=_log_path(result), overwrite=overwrite, overwrite_flag=overwrite_flag)
    with staged_directory(final, what="analyze report", overwrite=overwrite, foreign=foreign_check(ANALYZE_OWNED),
                          overwrite_flag=overwrite_flag) as tmp:
        names = _write_files(result, tmp, title)
    return {name: final / name for name in names}


def _log_path(result) -> Path | None:
    """The analysed router log's directory, when the result came from one on disk."""
    path = Path(result.source)
    return path if path.is_dir() else None


def _write_files(result, out: Path, title: str) -> list[str]:
    import matplotlib.pyplot as plt

    names = ["metrics.json"]
    (out / "metrics.json").write_text(json.dumps(metrics_dict(result), indent=1, allow_nan=False) + "\n")
    pngs: dict[str, bytes] = {}
    for name, fig in make_figures(result).items():
        buf = io.BytesIO()
        try:
            save_png(fig, buf, dpi=120)
        finally:
            plt.close(fig)
        pngs[name] = buf.getvalue()
        (out / name).write_bytes(pngs[name])
        names.append(name)
    tables = report_tables(result)
    (out / "report.md").write_text(_markdown(result, tables, pngs, title))
    (out / "report.html").write_text(_html(result, tables, pngs, title))
    return [*names, "report.md", "report.html"]


def report_tables(result) -> dict[str, pd.DataFrame]:
    """The tables of the report, as frames: per-layer load and collapse, counterfactual (pooled)."""
    load = result.load_frame()
    cols = [c for c in ("layer", "tokens", "load_entropy", "token_entropy", "maxvio", "cv", "gini", "max_over_mean",
                        "dead_experts", "aux_loss", "z_loss") if c in load]
    coll = result.collapse_frame().drop(columns=["max_rank", "median_margin"], errors="ignore")
    cf = result.counterfactual_frame()
    if not cf.empty:
        cf = cf[cf["layer"] == "pooled"]
        keep = [c for c in ("label", "realised_kbar", "coverage", "drop_rate", "agreement", "flip_rate",
                            "displacement_mean", "kv_decode_token_flip_rate", "cross_flip_rate", "topc_margin_mean",
                            "gini", "maxvio", "certified_optimal", "certified_total", "max_lp_gap") if c in cf]
        cf = cf[keep]
    return {"load": load[cols], "collapse": coll.dropna(axis=1, how="all"), "counterfactual": cf}


def summary_lines(result) -> list[str]:
    """Five lines that say what the analysis found (printed by the CLI and the demo)."""
    lines = []
    lf = result.load_frame()
    per = lf[lf["layer"] != "pooled"]
    worst = per.loc[per["maxvio"].idxmax()] if not per.empty else None
    lines.append(f"{len(result.layers)} layers x {result.layers[0].num_tokens} tokens, "
                 f"N = {result.layers[0].num_experts}, k = {result.layers[0].top_k}; "
                 f"load entropy {per['load_entropy'].min():.3f}-{per['load_entropy'].max():.3f} of log N")
    if worst is not None:
        lines.append(f"most imbalanced layer {worst['layer']}: MaxVio {worst['maxvio']:.2f}, Gini {worst['gini']:.3f}, "
                     f"{int(worst['dead_experts'])} dead experts")
    aux_p, aux_l = result.aux_loss_pooled, result.aux_loss_per_layer_mean
    if aux_p is not None:
        lines.append(f"aux loss pooled (transformers) {aux_p:.4f} vs per-layer mean (OLMoE) {aux_l:.4f}")
    cf = result.counterfactual_frame()
    if not cf.empty:
        pooled = cf[cf["layer"] == "pooled"]
        tc = pooled[pooled["router"] == "tc"]
        k = result.layers[0].top_k
        usm = pooled[(pooled["router"] == "usmoe") & (pooled["kbar"] == k)]
        if not tc.empty and not usm.empty:
            best = usm.loc[usm["coverage"].idxmax()]
            lines.append(f"re-routing at matched budget (k-bar = k = {k}): TC covers {tc['coverage'].iloc[0]:.3f} of "
                         f"the probability mass; best USMoE ({best['label']}) {best['coverage']:.3f} with "
                         f"{best['drop_rate']:.1%} tokens dropped")
        if "flip_rate" in pooled:
            leaky = pooled.dropna(subset=["flip_rate"])
            if not leaky.empty:
                w = leaky.loc[leaky["flip_rate"].idxmax()]
                tcf = leaky[leaky["router"] == "tc"]["flip_rate"]
                lines.append(f"leakage: {w['label']} flips {w['flip_rate']:.2%} of prefix decisions "
                             f"(TC {tcf.iloc[0]:.0%} by construction)" if not tcf.empty else
                             f"leakage: {w['label']} flips {w['flip_rate']:.2%} of prefix decisions")
    return lines[:5]


# ------------------------------------------------------------------------------- rendering
def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if isinstance(v, float | np.floating):
        return f"{v:.4g}"
    return str(v)


def _md_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "_(none)_\n"
    head = "| " + " | ".join(map(str, frame.columns)) + " |\n|" + "---|" * len(frame.columns) + "\n"
    body = "".join("| " + " | ".join(_fmt(v) for v in row) + " |\n" for row in frame.itertuples(index=False))
    return head + body


def _definitions_md() -> str:
    return "".join(f"- `{k}`: {d} [{u}] ({s})\n" for k, (d, u, s) in DEFINITIONS.items())


def _intro(result) -> list[str]:
    cfg = result.config
    la0 = result.layers[0]
    return [f"Source: `{result.source}`" + (f" (model {result.model.get('name')})" if result.model.get("name") else ""),
            f"Layers: {len(result.layers)}; tokens per layer: {la0.num_tokens}; experts: {la0.num_experts}; "
            f"top-k: {la0.top_k}; score function: {la0.score_function}; selection: {la0.selection_source}.",
            f"Counterfactual and leakage sample: {la0.sample_sequences} sequences, {la0.sample_tokens} tokens per "
            f"layer (whole sequences, the first of the log, until {cfg.sequence_tokens} tokens are reached). "
            f"USMoE grid: alpha {list(cfg.alphas)}, k-bar {list(cfg.kbars) if cfg.kbars else 'default'}, "
            f"scopes {list(cfg.scopes)}; EC capacity factor {cfg.capacity_factor}."]


def _markdown(result, tables, pngs, title) -> str:
    lines = [f"# {title}", "", *[f"{s}  " for s in _intro(result)], "", "## Summary", ""]
    lines += [f"- {s}" for s in summary_lines(result)] + [""]
    lines += ["## Load balance (model's own selection)", "",
              "Row `pooled`: balance metrics are averaged over layers (expert e of one layer is not expert e of "
              "another); `aux_loss` there is transformers' pooled loss.", "", _md_table(tables["load"])]
    lines += ["## Collapse and margins", "", _md_table(tables["collapse"])]
    lines += ["## Counterfactual re-routing (pooled over layers)", "",
              "Each router re-routes the captured logits; `coverage` is the share of probability mass its selection "
              "covers, `flip_rate` its leakage, `certified_optimal/total` the groups whose selection the exact dual "
              "certificate proves optimal for the router's own program.", "", _md_table(tables["counterfactual"])]
    lines += ["## Figures", ""]
    lines += [f"![{CAPTIONS.get(n, n)}]({n})\n\n{CAPTIONS.get(n, '')}\n" for n in pngs]
    lines += ["## Definitions", "", _definitions_md()]
    return "\n".join(lines) + "\n"


def _html(result, tables, pngs, title) -> str:
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
             "<style>body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 7px;"
             "text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}img{max-width:100%;"
             "border:1px solid #eee;margin:.5em 0}figcaption{color:#555;font-size:13px}code{background:#f5f5f5}"
             "</style></head><body>", f"<h1>{esc(title)}</h1>"]
    parts += [f"<p>{esc(s)}</p>" for s in _intro(result)]
    parts += ["<h2>Summary</h2><ul>", *[f"<li>{esc(s)}</li>" for s in summary_lines(result)], "</ul>"]
    for key, heading in (("load", "Load balance (model's own selection)"), ("collapse", "Collapse and margins"),
                         ("counterfactual", "Counterfactual re-routing (pooled over layers)")):
        frame = tables[key]
        parts.append(f"<h2>{esc(heading)}</h2>")
        parts.append(frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="–", border=0)
                     if not frame.empty else "<p>(none)</p>")
    parts.append("<h2>Figures</h2>")
    for name, data in pngs.items():
        b64 = base64.b64encode(data).decode("ascii")
        parts.append(f"<figure><img alt='{esc(CAPTIONS.get(name, name))}' src='data:image/png;base64,{b64}'>"
                     f"<figcaption>{esc(CAPTIONS.get(name, ''))} ({esc(name)})</figcaption></figure>")
    parts.append("<h2>Definitions</h2><ul>")
    parts += [f"<li><code>{esc(k)}</code>: {esc(d)} [{esc(u)}] ({esc(s)})</li>" for k, (d, u, s) in
              DEFINITIONS.items()]
    parts.append("</ul></body></html>")
    return "\n".join(parts) + "\n"
