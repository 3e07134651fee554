"""``usmoe-lp analyze LOG --out DIR``: parse arguments, call :func:`analyze`, write the report, print a summary."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from usmoe_lp.cli_errors import fail
from usmoe_lp.errors import InvalidParameter, UsmoeLpError
from usmoe_lp.logs.errors import LogError


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise typer.BadParameter(f"--{name} must be comma-separated numbers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def analyze_command(
    log: Annotated[Path, typer.Argument(help="Router log directory (manifest.json + shards/).")],
    out: Annotated[Path, typer.Option("--out", help="Report directory (created).")] = Path("analysis"),
    routers: Annotated[str, typer.Option(help="Counterfactual routers: tc, ec, usmoe, capacity_tc.")]
    = "tc,ec,usmoe,capacity_tc",
    alpha: Annotated[str, typer.Option(help="USMoE unified-score alphas.")] = "0.3,0.5,0.7",
    kbar: Annotated[str, typer.Option(help="USMoE experts per token (fractional allowed); default around k.")] = "",
    scope: Annotated[str, typer.Option(help="USMoE scopes: sequence, batch, position.")] = "sequence",
    capacity_factor: Annotated[float, typer.Option(help="EC capacity factor: e = ceil(cf T k / N).")] = 1.0,
    layers: Annotated[str, typer.Option(help="Comma-separated layer names (default: all).")] = "",
    top_k: Annotated[int, typer.Option(help="Model top-k where the log does not record it (0 = from the log; "
                                            "an error where the log records another k).")] = 0,
    sequence_tokens: Annotated[int, typer.Option(help="Tokens per layer sampled for re-routing and leakage.")]
    = 16384,
    chunk_tokens: Annotated[int, typer.Option(help="Tokens per streamed chunk (bounds memory).")] = 65536,
    no_leakage: Annotated[bool, typer.Option("--no-leakage", help="Skip prefix-consistency leakage.")] = False,
    no_counterfactual: Annotated[bool, typer.Option("--no-counterfactual", help="Skip re-routing.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier analyze report at --out "
                                            "(never other files).")] = False,
) -> None:
    """Analyse a router log: load balance, collapse, margins, leakage and counterfactual re-routing.

    Writes metrics.json, report.md, report.html and PNG figures into --out. The report is built
    aside and replaces --out only when complete; an existing report needs --overwrite.
    """
    from usmoe_lp.diagnostics.analyze import AnalyzeConfig, analyze, check_kbars, resolve_top_k
    from usmoe_lp.logs.reader import RouterLog
    from usmoe_lp.report.analyze_report import check_analyze_destination, summary_lines, write_analyze_report

    console, err = Console(), Console(stderr=True)
    try:
        cfg = AnalyzeConfig(routers=_names(routers), alphas=_floats(alpha, "alpha"),
                            kbars=_floats(kbar, "kbar") or None, scopes=_names(scope),
                            capacity_factor=capacity_factor, chunk_tokens=chunk_tokens,
                            sequence_tokens=sequence_tokens, leakage=not no_leakage,
                            counterfactual=not no_counterfactual)
        if top_k < 0:
            raise InvalidParameter(f"--top-k must be >= 0 (0: the k the log records), got {top_k}")
        check_analyze_destination(out, log=log, overwrite=overwrite, overwrite_flag="--overwrite",
                                  out_flag="--out")
        rlog = RouterLog.open(log)
        names = _names(layers) or rlog.layers
        unknown = [n for n in names if n not in rlog.layers]
        if unknown:
            raise InvalidParameter(f"--layers {','.join(unknown)}: not in the log; it has {','.join(rlog.layers)}")
        infos = [rlog.layer_info(n) for n in names]
        resolve_top_k(infos, top_k or None, name="--top-k")
        check_kbars(cfg, infos, name="--kbar")
        t0 = time.perf_counter()
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("tokens"), TimeElapsedColumn(), console=err, transient=True) as bar:
            task = bar.add_task("analyse", total=len(names) * rlog.num_tokens)
            finished: dict[str, int] = {}

            def progress(layer: str, done: int, total: int) -> None:
                finished[layer] = done
                bar.update(task, completed=sum(finished.values()), description=f"layer {layer}")

            result = analyze(rlog, config=cfg, layers=names, top_k=top_k or None, progress=progress)
        written = write_analyze_report(result, out, overwrite=overwrite, overwrite_flag="--overwrite")
    except (UsmoeLpError, LogError) as exc:
        raise fail(exc) from None
    console.print(f"[bold]usmoe-lp analyze[/]: {escape(str(log))} in {time.perf_counter() - t0:.1f} s")
    for line in summary_lines(result):
        console.print(f"  {escape(line)}")
    console.print(f"report: {escape(str(written['report.html']))} (metrics: {escape(str(written['metrics.json']))})")
