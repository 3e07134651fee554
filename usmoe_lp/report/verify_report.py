"""Write a verify result as report.json, report.md, a self-contained report.html, counterexample files and PNG
figures. report.md and report.html are one text (:mod:`usmoe_lp.report.markup` blocks, :func:`report_blocks`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from usmoe_lp._json import json_ready
from usmoe_lp.logs.format import library_versions
from usmoe_lp.report.figures import (
    plot_capped_gap,
    plot_gap_distributions,
    plot_usmoe_minus_tc,
    records_frame,
)
from usmoe_lp.report.markup import Block, Bullets, Code, Figure, Heading, Paragraph, Table, render_html
from usmoe_lp.report.markup import render_markdown as render_blocks
from usmoe_lp.report.outputs import check_report_location, foreign_check, save_png
from usmoe_lp.staging import check_destination, staged_directory
from usmoe_lp.verify.runner import command_line

FIGURES = {
    "gap_distributions.png": plot_gap_distributions,
    "usmoe_minus_tc.png": plot_usmoe_minus_tc,
    "capped_greedy_gap.png": plot_capped_gap,
}


def usmoe_minus_tc_table(result) -> list[dict]:
    """Mean/min/max of obj(USMoE) - obj(TC) per matrix family x size x k (the relaxation gain)."""
    frame = records_frame(result)
    sub = frame[frame["claim"] == "usmoe_ge_tc"] if not frame.empty else frame
    if sub.empty:
        return []
    agg = sub.groupby(["family", "T", "N", "k"], sort=False)["value_usmoe_minus_tc"]
    out = []
    for (fam, T, N, k), s in agg:
        out.append({"family": fam, "size": f"{T}x{N}", "k": int(k), "mean": float(s.mean()),
                    "min": float(s.min()), "max": float(s.max()),
                    "mean_per_token": float(s.mean() / T)})
    return out


VERIFY_OWNED: tuple[str, ...] = (
    r"report\.json", r"report\.md", r"report\.html", *(re.escape(name) for name in FIGURES),
    r"counterexamples/", r"counterexamples/[A-Za-z0-9_]+__[A-Za-z0-9_]+__\d+x\d+\.json",
    r"counterexamples/all/", r"counterexamples/all/[A-Za-z0-9_]+__[A-Za-z0-9_]+__\d+x\d+__k\d+__t\d+\.json",
)
"""What a verify report directory holds (relative paths; see :func:`usmoe_lp.report.outputs.foreign_entries`)."""


def check_verify_destination(out: str | Path, *, overwrite: bool = False,
                             overwrite_flag: str = "overwrite=True", out_flag: str = "out") -> None:
    """Raise :class:`~usmoe_lp.errors.OutputExists` unless ``out`` may receive a verify report.

    ``out`` may be missing or empty; an earlier verify report there needs ``overwrite``, and any
    other file there is refused (never deleted). ``out`` must not be (or lie inside) a router log.
    """
    check_report_location(out, what="verify report", out_flag=out_flag)
    check_destination(out, what="verify report", overwrite=overwrite, foreign=foreign_check(VERIFY_OWNED),
                      overwrite_flag=overwrite_flag)


def write_verify_report(result, out: str | Path, command: str | None = None, *, overwrite: bool = False,
                        overwrite_flag: str = "overwrite=True") -> dict[str, Path]:
    """Write the report directory ``out``; returns {name: path}.

    The directory is built aside and swapped in only when complete (:mod:`usmoe_lp.staging`): a
    failure leaves an earlier report untouched. An existing non-empty ``out`` is replaced only with
    ``overwrite=True`` and only when it holds nothing but an earlier verify report. ``command``
    defaults to the ``usmoe-lp verify`` command line of ``result.config``
    (:func:`usmoe_lp.verify.runner.command_line`). The same result gives the same bytes in every
    file, whatever ``out`` is.
    """
    final = Path(out)
    check_verify_destination(final, overwrite=overwrite, overwrite_flag=overwrite_flag)
    with staged_directory(final, what="verify report", overwrite=overwrite, foreign=foreign_check(VERIFY_OWNED),
                          overwrite_flag=overwrite_flag) as tmp:
        names = _write_files(result, tmp, command_line(result.config) if command is None else command)
    return {name: final / name for name in names}


def _write_files(result, out: Path, command: str) -> list[str]:
    cex_dir = out / "counterexamples"
    cex_dir.mkdir()
    # counterexamples/<claim>__<matrix family>__<TxN>.json: the smallest of each cell;
    # counterexamples/all/...__k<k>__t<trial>.json: every shrunk failure (with shrink_all)
    for cell in result.cells():
        if cell["counterexample"] is not None:
            p = cex_dir / f"{cell['claim']}__{cell['family']}__{cell['size']}.json"
            p.write_text(json.dumps(json_ready(cell["counterexample"]), indent=1) + "\n")
    if result.config.shrink_all and result.counterexamples:
        all_dir = cex_dir / "all"
        all_dir.mkdir()
        for c in result.counterexamples:
            p = all_dir / f"{c.claim}__{c.family}__{c.T}x{c.N}__k{c.k}__t{c.trial}.json"
            p.write_text(json.dumps(json_ready(c.to_dict()), indent=1) + "\n")
    report = {
        "format": "usmoe-lp verify report v1",
        "command": command,
        "config": result.config.to_dict(),
        "versions": library_versions(),
        "definitions": {
            "gap": "size of the violation in score units: optimum minus the claimed router's "
                   "objective (0 when the claim holds)",
            "tolerance": "objective values are equal when |a - b| <= 1e-9 * max(1, |a|, |b|)",
            "budget": "c = T*k for the budget programs; EC capacity e = ceil(T*k/N)",
            "capped": "budget c = T*k (<=), at most k+1 experts per token, at most "
                      "ceil(1.25*T*k/N) tokens per expert",
            "family": "the matrix family: the generator of the random score matrices of an instance "
                      "(usmoe-lp families; docs/definitions.md#three-kinds-of-family)",
            "seed": "instance generator = numpy default_rng(seed); rebuild with "
                    "usmoe_lp.verify.FAMILIES[family].generate(default_rng(seed), T, N)",
        },
        "claims": result.claim_summary(),
        "cells": result.cells(),
        "usmoe_minus_tc": usmoe_minus_tc_table(result),
    }
    names = ["report.json"]
    (out / "report.json").write_text(json.dumps(json_ready(report), indent=1) + "\n")

    frame = records_frame(result)
    figs = []
    if not frame.empty:
        import matplotlib.pyplot as plt

        for name, fn in FIGURES.items():
            fig = fn(frame)
            if fig is None:
                continue
            try:
                save_png(fig, out / name, dpi=110)
            finally:
                plt.close(fig)
            figs.append(name)
    blocks = report_blocks(report, {name: (out / name).read_bytes() for name in figs})
    (out / "report.md").write_text(render_blocks(blocks))
    (out / "report.html").write_text(render_html(blocks, title="usmoe-lp verify report"))
    return [*names, *figs, "report.md", "report.html"]


def _fmt(x) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return "0" if x == 0 else f"{x:.3g}"
    return str(x)


def _matrix(rows: list[list[float]]) -> str:
    return "\n".join("[" + ", ".join(f"{v:.6g}" for v in row) + "]" for row in rows)


FIGURE_CAPTIONS = {
    "gap_distributions.png": "Gap of each failing claim per matrix family (score units; 0 where the claim holds).",
    "usmoe_minus_tc.png": "obj(USMoE) - obj(TC) at the budget c = T·k per matrix family, size and k.",
    "capped_greedy_gap.png": "Gap of the greedy router on the capped program against its optimum.",
}
"""The caption of each verify figure (its title says the sample size)."""


def render_markdown(report: dict, figures: list[str]) -> str:
    """report.md of ``report`` (the dict of report.json) with the figure files ``figures`` linked: the Markdown
    rendering of :func:`report_blocks` (figures need no bytes there)."""
    return render_blocks(report_blocks(report, dict.fromkeys(figures, b"")))


def report_blocks(report: dict, figures: dict[str, bytes]) -> list[Block]:
    """The verify report as :mod:`~usmoe_lp.report.markup` blocks: summary table, minimal counterexamples,
    the obj(USMoE) - obj(TC) table, the per-cell table, figures (name -> PNG bytes) and definitions."""
    import pandas as pd

    cfg = report["config"]
    blocks: list[Block] = [Heading("usmoe-lp verify report", 1)]
    if report.get("command"):
        blocks += [Paragraph("Command:"), Code(report["command"])]
    blocks += [
        Paragraph(f"Matrix families: {', '.join(cfg['families'])}. Sizes: {', '.join(cfg['sizes'])}. "
                  f"k: {', '.join(map(str, cfg['ks']))}. Trials per matrix family x size x k: {cfg['trials']}. "
                  f"Seed: {cfg['seed']}. Backends: {', '.join(cfg['backends'])} (integer programs up to "
                  f"{cfg['ilp_max_vars']} variables)."),
        Heading("Claims"),
        Table(pd.DataFrame([{
            "claim": f"`{c['claim']}`", "statement": c["statement"], "theory expects": c["expectation"],
            "verdict": {"holds": "holds", "fails": "**fails**"}.get(c["verdict"], c["verdict"]),
            "failures / trials": f"{c['failures']} / {c['trials']}", "worst gap": _fmt(c["worst_gap"]),
            "fails on (matrix families)": ", ".join(c["failing_families"]) or "–"} for c in report["claims"]],
            columns=["claim", "statement", "theory expects", "verdict", "failures / trials", "worst gap",
                     "fails on (matrix families)"])),
    ]
    failing = [c for c in report["claims"] if c["minimal_counterexample"]]
    if failing:
        blocks += [Heading("Minimal counterexamples"),
                   Paragraph("Each is the smallest sub-matrix (fewest tokens, then experts) of a failing instance "
                             "on which the claim still fails; removing any one token or expert makes it hold.")]
        for c in failing:
            cx = c["minimal_counterexample"]
            blocks += [Heading(f"`{c['claim']}` — {cx['size']}, k = {cx['k']} "
                               f"(from {cx['family']} {cx['from_size']}, seed {cx['seed']})", 3),
                       Code("S =\n" + _matrix(cx["scores"])), Paragraph(cx["note"])]
            if c.get("shrunk_failures", 0) > 1:
                blocks.append(Paragraph(f"{c['shrunk_failures']} failing instances were shrunk; they reduce to "
                                        f"{c['distinct_minimal_forms']} distinct minimal forms "
                                        "(all in `counterexamples/all/`)."))
    gains = report.get("usmoe_minus_tc") or []
    if gains:
        blocks += [Heading("obj(USMoE) − obj(TC) at c = T·k"),
                   Table(pd.DataFrame([{"matrix family": g["family"], "size": g["size"], "k": str(g["k"]),
                                        "mean": _fmt(g["mean"]), "min": _fmt(g["min"]), "max": _fmt(g["max"]),
                                        "mean per token": _fmt(g["mean_per_token"])} for g in gains]))]
    blocks += [Heading("Claim x matrix family x size"),
               Table(pd.DataFrame([{"claim": f"`{cell['claim']}`", "matrix family": cell["family"],
                                    "size": cell["size"], "trials": str(cell["trials"]),
                                    "failures": str(cell["failures"]), "worst gap": _fmt(cell["worst_gap"])}
                                   for cell in report["cells"]],
                                  columns=["claim", "matrix family", "size", "trials", "failures", "worst gap"]))]
    if figures:
        blocks.append(Heading("Figures"))
        blocks += [Figure(name, data, FIGURE_CAPTIONS.get(name, name)) for name, data in figures.items()]
    blocks += [Heading("Definitions"), Bullets(tuple(f"**{k}**: {v}" for k, v in report["definitions"].items()))]
    return blocks
