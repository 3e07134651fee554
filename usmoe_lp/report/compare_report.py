"""Write a comparison of router logs as compare.json, report.md, a self-contained report.html and PNG figures.

compare.json holds every number of :class:`usmoe_lp.compare.CompareResult` as records (tables of rows, so its
keys are names of quantities, never of logs or layers) and ``definitions``: for every key that occurs, its
definition, unit, source and section of the docs (the compare keys: ``docs/compare.md``; the per-log analyze
metrics: ``docs/definitions.md``, as in analyze's metrics.json).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd

from usmoe_lp._json import json_ready
from usmoe_lp.logs.format import library_versions
from usmoe_lp.report.analyze_report import COUNTERFACTUAL_GROUPS, Definition, definition_of
from usmoe_lp.report.compare_figures import plot_agreement, plot_side_by_side
from usmoe_lp.report.markup import Bullets, Figure, Heading, Paragraph, Table, render_html, render_markdown
from usmoe_lp.report.outputs import check_report_location, foreign_check, write_figures
from usmoe_lp.report.pattern_report import unavailable_lines
from usmoe_lp.staging import check_destination, staged_directory

SCHEMA = "usmoe-lp/compare/1"
DOCS = "docs/compare.md"
THIS = "this project"
LAYOUT = "layout-of-comparejson"
OLMOE = "OLMoE, Muennighoff et al. 2024, arXiv 2409.02060 §4.1 (router saturation)"
STABLEMOE = "StableMoE, Dai et al. 2022, arXiv 2204.08396 §2.2 (routing fluctuation)"


def _d(definition: str, unit: str, source: str, anchor: str) -> Definition:
    return Definition(definition, unit, source, f"{DOCS}#{anchor}")


DEFINITIONS: dict[str, Definition] = {
    "schema": _d("format name and version of compare.json", "string", THIS, LAYOUT),
    "logs": _d("the compared logs, in order: label, source, content, model", "list of objects", THIS, LAYOUT),
    "label": _d("the log's label (as given, else its directory name)", "string", THIS, LAYOUT),
    "source": _d("the log's path as given", "string", THIS, LAYOUT),
    "content": _d("what the log records: logits, or selection (expert ids only; load metrics only)", "string",
                  THIS, "selection-only-logs"),
    "model": _d("the captured model as the log records it: name, family, revision", "object", THIS, LAYOUT),
    "unavailable": _d("the analyses analyze could not compute on this log (a selection log: those that need the "
                      "router logits)", "list of analysis names", THIS, "selection-only-logs"),
    "name": _d("the model's name in `model`", "string", THIS, LAYOUT),
    "family": _d("the model family (transformers model_type) in `model`", "string", THIS, LAYOUT),
    "revision": _d("the model's revision in `model`", "string", THIS, LAYOUT),
    "layers": _d("the matched layers: per row, the layer's name in each log (in the logs' order)",
                 "list of lists of strings", THIS, "layer-matching"),
    "matched_by": _d("how layers were matched: name (every log has the names) or order (the names differ, the "
                     "numbers of layers agree)", "string", THIS, "layer-matching"),
    "alignment": _d("whether the logs route the same tokens in the same order (the condition for agreement)",
                    "object", THIS, "token-alignment"),
    "shared": _d("true when every log has the same tokens in the same order: equal sequence ids and positions, equal "
                 "token ids wherever both logs know them", "bool", THIS, "token-alignment"),
    "token_ids_checked": _d("compared tokens whose id every log knows (the rest matched on sequence and position)",
                            "count of tokens", THIS, "token-alignment"),
    "reason": _d("why no agreement is reported: the first token that differs, or the logs' lengths", "string", THIS,
                 "token-alignment"),
    "agreement": _d("routing agreement per matched layer and pair of logs (and `pooled` over layers)",
                    "list of records", THIS, "routing-agreement"),
    "layer": _d("the matched layer by the first log's name (`pooled`: every layer's tokens together)", "string",
                THIS, "layer-matching"),
    "log_layer": _d("the layer's name in this row's log", "string", THIS, "layer-matching"),
    "log": _d("the label of the log the row describes", "string", THIS, LAYOUT),
    "a": _d("label of the first log of the pair", "string", THIS, "routing-agreement"),
    "b": _d("label of the second log of the pair", "string", THIS, "routing-agreement"),
    "tokens": _d("tokens the row's numbers cover: the tokens compared (agreement) or the layer's tokens "
                 "(side by side)", "count of tokens", THIS, "routing-agreement"),
    "k": _d("experts per token dividing the overlap: the layer's k (the larger where the logs differ)",
            "count of experts", THIS, "routing-agreement"),
    "exact_agreement": _d("share of tokens whose expert sets are equal, S_a = S_b", "share of tokens", THIS,
                          "routing-agreement"),
    "jaccard": _d("mean over tokens of |S_a ∩ S_b| / |S_a ∪ S_b| (1 where both are empty)", "similarity in [0, 1]",
                  THIS, "routing-agreement"),
    "top1_agreement": _d("share of tokens whose top-1 expert (largest selection score among the selected) is the "
                         "same", "share of tokens", THIS, "routing-agreement"),
    "overlap": _d("mean over tokens of |S_a ∩ S_b| / k", "share of k", OLMOE, "routing-agreement"),
    "fluctuation": _d("share of tokens whose top-1 expert changed: 1 - top1_agreement", "share of tokens", STABLEMOE,
                      "routing-agreement"),
    "top1_chance": _d("sum_e P_a(e) P_b(e): the top-1 agreement of independent routings with these top-1 "
                      "frequencies (pooled: token-weighted mean over layers)", "share of tokens", THIS,
                      "routing-agreement"),
    "matched_top1_agreement": _d("top-1 agreement after the best one-to-one relabelling of b's experts "
                                 "(assignment on the top-1 contingency table; pooled: token-weighted mean)",
                                 "share of tokens", THIS, "routing-agreement"),
    "exact_tokens": _d("tokens with equal expert sets", "count of tokens", THIS, "routing-agreement"),
    "top1_tokens": _d("tokens with the same top-1 expert", "count of tokens", THIS, "routing-agreement"),
    "overlap_pairs": _d("sum over tokens of |S_a ∩ S_b|", "count of token-expert pairs", THIS, "routing-agreement"),
    "num_experts_a": _d("N of the layer in log a", "count of experts", THIS, "routing-agreement"),
    "num_experts_b": _d("N of the layer in log b", "count of experts", THIS, "routing-agreement"),
    "k_a": _d("k of the layer in log a", "count of experts", THIS, "routing-agreement"),
    "k_b": _d("k of the layer in log b", "count of experts", THIS, "routing-agreement"),
    "side_by_side": _d("per matched layer and log: analyze's load, collapse and margin metrics of that log",
                       "list of records", THIS, "side-by-side"),
    "counterfactual": _d("in `config`: whether re-routing ran; at the top: each log's counterfactual records pooled "
                         "over layers (analyze's counterfactual table)", "bool / list of records", THIS,
                         "side-by-side"),
    "config": _d("the analyze settings every log ran with (usmoe_lp.diagnostics.AnalyzeConfig)", "object", THIS,
                 "side-by-side"),
    "library_versions": _d("versions of Python and of the libraries the numbers depend on", "object of strings",
                           THIS, LAYOUT),
    "definitions": _d("this table: key -> definition, unit, source, see", "object", THIS, LAYOUT),
}


def definition(key: str) -> Definition | None:
    """The definition of a compare.json key: compare's own, else analyze's (:func:`definition_of`)."""
    return DEFINITIONS.get(key) or definition_of(key)


def _keys(obj: Any, out: dict[str, None]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.setdefault(k, None)
            _keys(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _keys(v, out)


def compare_dict(result) -> dict[str, Any]:
    """Every number of a :class:`~usmoe_lp.compare.CompareResult` as JSON-safe plain data, with ``definitions``
    for every key that occurs (no timings and no output paths: the same result gives the same bytes)."""
    logs = [{"label": label, "source": source, "content": content, "model": analysis.model,
             "unavailable": sorted(analysis.unavailable)}
            for label, source, content, analysis in zip(result.labels, result.sources, result.contents,
                                                        result.analyses, strict=True)]
    cf = result.counterfactual_frame()
    body = {
        "schema": SCHEMA,
        "logs": logs,
        "layers": [list(row) for row in result.layers],
        "matched_by": result.matched_by,
        "alignment": {"shared": result.alignment.shared, "tokens": result.alignment.tokens,
                      "token_ids_checked": result.alignment.token_ids_checked, "reason": result.alignment.reason},
        "agreement": _agreement_records(result),
        "side_by_side": result.side_by_side_frame().to_dict(orient="records"),
        "counterfactual": cf[cf["layer"] == "pooled"].drop(columns=["layer"]).to_dict(orient="records")
        if not cf.empty else [],
        "config": dict(vars(result.config)),
        "library_versions": library_versions(),
    }
    keys: dict[str, None] = {}
    _keys(json_ready(body), keys)
    body["definitions"] = {k: d._asdict() for k in [*keys, "definitions"] if (d := definition(k)) is not None}
    return json_ready(body)


def _agreement_records(result) -> list[dict[str, Any]]:
    frame = result.agreement_frame()
    counts = {(s.layer, s.a, s.b): s.to_dict() for s in result.agreement}
    return [{**counts.get((r["layer"], r["a"], r["b"]), {}), **r} for r in frame.to_dict(orient="records")]


def summary_lines(result) -> list[str]:
    """A few lines that say what the comparison found (printed by the CLI)."""
    lines = [f"{len(result.labels)} logs ({', '.join(result.labels)}), {len(result.layers)} layers matched by "
             f"{result.matched_by}"]
    al = result.alignment
    if not al.shared:
        lines.append(f"no routing agreement: {al.reason}")
    else:
        frame = result.agreement_frame()
        for _, r in frame[frame["layer"] == "pooled"].iterrows():
            per = frame[(frame["layer"] != "pooled") & (frame["a"] == r["a"]) & (frame["b"] == r["b"])]
            low = per.loc[per["top1_agreement"].astype(float).idxmin()]
            lines.append(f"{r['a']} vs {r['b']} over {al.tokens} tokens x {len(per)} layers: exact sets "
                         f"{r['exact_agreement']:.1%}, Jaccard {r['jaccard']:.3f}, overlap/k {r['overlap']:.3f}, "
                         f"top-1 {r['top1_agreement']:.1%} (chance {r['top1_chance']:.1%}); lowest top-1 in "
                         f"{low['layer']} ({low['top1_agreement']:.1%})")
    side = result.side_by_side_frame()
    ent = side.groupby("log", sort=False)["load_entropy"].mean()
    lines.append("mean load entropy over layers: " + ", ".join(f"{lb} {v:.3f}" for lb, v in ent.items()))
    return lines


CAPTIONS = {
    "agreement.png": "Routing agreement per layer, token by token, for each pair of logs (dashed: top-1 agreement "
                     "of independent routings with the same top-1 frequencies).",
    "side_by_side.png": "Key per-layer metrics of each log (analyze on each log).",
}

COMPARE_OWNED: tuple[str, ...] = (r"compare\.json", r"report\.md", r"report\.html",
                                  *(re.escape(name) for name in CAPTIONS))
"""What a compare report directory holds (see :func:`usmoe_lp.report.outputs.foreign_entries`)."""

SIDE_COLUMNS = ("layer", "log", "tokens", "load_entropy", "token_entropy_normalised", "maxvio", "cv", "gini",
                "dead_experts", "aux_loss", "logit_effective_rank_centered", "mean_expert_cosine", "mean_margin")
CF_COLUMNS = ("log", "label", "realised_kbar", "coverage", "drop_rate", "agreement", "flip_rate",
              "kv_decode_token_flip_rate", "gini", "maxvio")


def check_compare_destination(out: str | Path, *, logs=(), overwrite: bool = False,
                              overwrite_flag: str = "overwrite=True", out_flag: str = "out") -> None:
    """Raise :class:`~usmoe_lp.errors.OutputExists` unless ``out`` may receive a compare report: missing or empty,
    or an earlier compare report with ``overwrite`` (other files are refused, never deleted); not inside a router
    log, not containing one of ``logs``."""
    check_report_location(out, what="compare report", inputs=tuple(logs), out_flag=out_flag)
    check_destination(out, what="compare report", overwrite=overwrite, foreign=foreign_check(COMPARE_OWNED),
                      overwrite_flag=overwrite_flag)


def write_compare_report(result, out: str | Path, *, title: str = "usmoe-lp compare", overwrite: bool = False,
                         overwrite_flag: str = "overwrite=True") -> dict[str, Path]:
    """Write ``compare.json``, ``report.md``, ``report.html`` (figures embedded) and the PNG figures into the
    directory ``out``, built aside and swapped in only when complete (:mod:`usmoe_lp.staging`). Returns
    name -> path of every file written."""
    final = Path(out)
    logs = [s for s in result.sources if Path(s).is_dir()]
    check_compare_destination(final, logs=logs, overwrite=overwrite, overwrite_flag=overwrite_flag)
    with staged_directory(final, what="compare report", overwrite=overwrite, foreign=foreign_check(COMPARE_OWNED),
                          overwrite_flag=overwrite_flag) as tmp:
        names = _write_files(result, tmp, title)
    return {name: final / name for name in names}


def make_figures(result) -> dict[str, Any]:
    """name.png -> matplotlib Figure (figures with nothing to show are left out)."""
    figs = {"agreement.png": plot_agreement(result.agreement_frame()),
            "side_by_side.png": plot_side_by_side(result.side_by_side_frame())}
    return {k: v for k, v in figs.items() if v is not None}


def report_tables(result) -> dict[str, pd.DataFrame]:
    """The report's tables: agreement (per layer and pooled), side by side, counterfactual pooled per log."""
    side = result.side_by_side_frame()
    cf = result.counterfactual_frame()
    if not cf.empty:
        cf = cf[cf["layer"] == "pooled"]
        cf = cf[[c for c in CF_COLUMNS if c in cf]]
    agree = result.agreement_frame()
    return {"agreement": agree, "side_by_side": side[[c for c in SIDE_COLUMNS if c in side]].dropna(axis=1, how="all"),
            "counterfactual": cf}


def _intro(result) -> list[str]:
    lines = []
    for label, source, content in zip(result.labels, result.sources, result.contents, strict=True):
        kind = "router logits" if content == "logits" else f"{content} only: the load of its recorded selection"
        lines.append(f"Log `{label}`: `{source}` ({kind}).")
    how = ("by name" if result.matched_by == "name" else
           "by order (the logs' layer names differ; each row gives the first log's name)")
    lines.append(f"Layers: {len(result.layers)}, matched {how}.")
    al = result.alignment
    if al.shared:
        lines.append(f"The logs route the same {al.tokens} tokens in the same order ({al.token_ids_checked} of them "
                     "with token ids known in every log): routing agreement is measured token by token.")
    else:
        lines.append(f"No routing agreement: the logs do not share their tokens ({al.reason}). Only the "
                     "side-by-side tables are reported.")
    return lines


def _not_computed(result) -> list[str]:
    """One line per log and cause of what analyze could not compute on it (e.g. a selection log's logit metrics)."""
    return [f"Not computed for `{label}`: {line}" for label, analysis in zip(result.labels, result.analyses,
                                                                            strict=True)
            for line in unavailable_lines(analysis)]


def _definitions(tables) -> list[tuple[str, Definition]]:
    keys = dict.fromkeys(c for frame in tables.values() for c in frame.columns)
    return [(k, d) for k in keys if (d := definition(k)) is not None]


AGREEMENT_NOTE = ("Per matched layer, the tokens both logs route compared one by one: S_a and S_b are the expert "
                  "sets the two logs select for a token. `overlap` is OLMoE's router saturation, `fluctuation` "
                  "StableMoE's routing fluctuation; `top1_chance` is what independent routings with the same top-1 "
                  "frequencies would agree, `matched_top1_agreement` the agreement after the best relabelling of "
                  "the second log's experts. Row `pooled`: every layer's tokens together.")

SIDE_NOTE = ("Analyze's metrics of each log, layer by layer (rows: layer / log). A selection-only log has its load "
             "metrics only: the logit-based columns read –.")

SIDE_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Load balance of the model's own selection", ("tokens", "load_entropy", "token_entropy_normalised", "maxvio",
                                                   "cv", "gini", "dead_experts", "aux_loss")),
    ("Router logits: collapse and margins", ("logit_effective_rank_centered", "mean_expert_cosine",
                                             "mean_margin")),
)
"""The column groups of the side-by-side table (the layer / log key repeated), so it fits a 1280 px page."""

CF_NOTE = ("Each log's captured logits re-routed by analyze's router settings, pooled over layers (rows: log / "
           "setting). The table is cut in two (the key repeated) so it fits the page.")

KEY_NAMES = {"label": "setting"}
"""How a key column is named in a display table (the counterfactual ``label`` is the router setting)."""

KEY_SEP = " / "
"""Joins the parts of a display table's key column (``layer / log``, ``log / setting``)."""


def _keyed(frame: pd.DataFrame, parts: tuple[str, str]) -> pd.DataFrame:
    """``frame`` with its two key columns ``parts`` joined into one first column (the one markup repeats in every
    column group)."""
    if frame.empty:
        return frame
    key = frame[parts[0]].astype(str) + KEY_SEP + frame[parts[1]].astype(str)
    rest = frame.drop(columns=list(parts))
    return pd.concat([key.rename(KEY_SEP.join(KEY_NAMES.get(p, p) for p in parts)), rest], axis=1)


def _agreement_blocks(result, frame: pd.DataFrame) -> list:
    pairs = list(dict.fromkeys(zip(frame["a"], frame["b"], strict=True)))
    blocks: list = [Paragraph(AGREEMENT_NOTE)]
    for a, b in pairs:
        sub = frame[(frame["a"] == a) & (frame["b"] == b)].drop(columns=["a", "b"])
        blocks += [Paragraph(f"`{a}` (a) vs `{b}` (b), {result.alignment.tokens} tokens per layer:"),
                   Table(sub.reset_index(drop=True))]
    return blocks


def _figure_captions(result, pngs) -> dict[str, str]:
    """Captions with the sample sizes of this comparison."""
    side = result.side_by_side_frame()
    tokens = side.groupby("log", sort=False)["tokens"].max().astype(int) if not side.empty else {}
    sizes = ", ".join(f"`{lb}` {n} tokens" for lb, n in dict(tokens).items())
    out = {}
    for name in pngs:
        text = CAPTIONS.get(name, name)
        if name == "agreement.png" and result.alignment.shared:
            text += f" {result.alignment.tokens} tokens per layer, {len(result.layers)} layers."
        elif name == "side_by_side.png" and sizes:
            text += f" Tokens per layer: {sizes}; {len(result.layers)} layers."
        out[name] = text
    return out


DEFINITIONS_INTRO = (f"Every key of compare.json is defined in its `definitions`; see `{DOCS}` and "
                     "`docs/definitions.md` of the usmoe-lp repository. The columns of the tables:")


def report_blocks(result, tables, pngs, title: str) -> list:
    """The report as blocks (:mod:`usmoe_lp.report.markup`), the one text both report.md and report.html render.
    ``pngs``: figure name -> PNG bytes (or just the names, for Markdown)."""
    blocks: list = [Heading(title, 1), *[Paragraph(s) for s in _intro(result)],
                    *[Paragraph(s) for s in _not_computed(result)],
                    Heading("Summary"), Bullets(tuple(summary_lines(result)))]
    if result.alignment.shared and not tables["agreement"].empty:
        blocks += [Heading(SECTIONS[0][1]), *_agreement_blocks(result, tables["agreement"])]
    blocks += [Heading(SECTIONS[1][1]), Paragraph(SIDE_NOTE),
               Table(_keyed(tables["side_by_side"], ("layer", "log")), SIDE_GROUPS)]
    if not tables["counterfactual"].empty:
        blocks += [Heading(SECTIONS[2][1]), Paragraph(CF_NOTE),
                   Table(_keyed(tables["counterfactual"], ("log", "label")), COUNTERFACTUAL_GROUPS)]
    if pngs:
        captions = _figure_captions(result, pngs)
        blocks.append(Heading("Figures"))
        blocks += [Figure(n, pngs[n] if isinstance(pngs, dict) else b"", captions[n]) for n in pngs]
    blocks += [Heading("Definitions"), Paragraph(DEFINITIONS_INTRO),
               Bullets(tuple(f"`{k}`: {d.definition} [{d.unit}] ({d.source}; `{d.see}`)"
                             for k, d in _definitions(tables)))]
    return blocks


SECTIONS = (("agreement", "Routing agreement per layer (token by token)"),
            ("side_by_side", "Side by side: per-layer metrics of each log"),
            ("counterfactual", "Counterfactual re-routing of each log (pooled over layers)"))


def _write_files(result, out: Path, title: str) -> list[str]:
    (out / "compare.json").write_text(json.dumps(compare_dict(result), indent=1, allow_nan=False) + "\n")
    pngs = write_figures(make_figures(result), out)
    tables = report_tables(result)
    blocks = report_blocks(result, tables, pngs, title)
    (out / "report.md").write_text(render_markdown(blocks))
    (out / "report.html").write_text(render_html(blocks, title=title))
    return ["compare.json", *pngs, "report.md", "report.html"]
