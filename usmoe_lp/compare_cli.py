"""``usmoe-lp compare LOG_A LOG_B [...] --out DIR``: parse arguments, call :func:`usmoe_lp.compare.compare`, write
the report, print a summary. Errors go through :func:`usmoe_lp.cli_errors.fail` (one line in flag words, exit 2).
"""

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


def _names(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def compare_command(
    logs: Annotated[list[str], typer.Argument(help="Two or more router log directories (paths or file:// URLs). "
                                                   "With --workers/--scheduler every worker reads them at these "
                                                   "paths.", show_default=False, metavar="LOG...")],
    out: Annotated[Path, typer.Option("--out", help="Report directory (created).")] = Path("comparison"),
    label: Annotated[list[str] | None, typer.Option(
        "--label", help="A name for each log, in the order of the logs (repeatable; default: the directory "
                        "names).")] = None,
    layers: Annotated[str, typer.Option("--layers", help="Comma-separated layers, by the first log's names "
                                                         "(default: all).")] = "",
    top_k: Annotated[int, typer.Option("--top-k", help="Model top-k where a log does not record it (0 = from the "
                                                       "logs).")] = 0,
    chunk_tokens: Annotated[int, typer.Option("--chunk-tokens", help="Tokens per streamed chunk (bounds memory).")]
    = 65536,
    no_counterfactual: Annotated[bool, typer.Option("--no-counterfactual", help="Skip analyze's counterfactual "
                                                                               "re-routing of each log.")] = False,
    no_leakage: Annotated[bool, typer.Option("--no-leakage", help="Skip analyze's prefix-consistency leakage of "
                                                                  "each log.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier compare report at --out "
                                                                "(never other files).")] = False,
    workers: Annotated[int | None, typer.Option(
        "--workers", help="Run on a local Dask cluster of N worker processes (default: this process).")] = None,
    scheduler: Annotated[str | None, typer.Option(
        "--scheduler", help="Run on a running dask.distributed cluster at ADDRESS; its workers open the logs by "
                            "their absolute paths (a filesystem they all see).")] = None,
) -> None:
    """Compare router logs: each analysed side by side per layer and, where the logs route the same tokens
    (equal sequence ids, positions and token ids, in the same order), their routing agreement token by token.

    Writes compare.json, report.md, report.html and PNG figures into --out. Layers are matched by name, or by
    order where the names differ but the numbers of layers agree (the report says which). The report is built
    aside and replaces --out only when complete; an existing report needs --overwrite.
    """
    from usmoe_lp.cluster import check_cluster, dask_client
    from usmoe_lp.compare import compare, default_labels, match_layers
    from usmoe_lp.diagnostics.analyze import AnalyzeConfig, log_path
    from usmoe_lp.logs.reader import RouterLog
    from usmoe_lp.report.compare_report import check_compare_destination, summary_lines, write_compare_report

    console, err = Console(), Console(stderr=True)
    flags = {"workers": "--workers", "scheduler": "--scheduler"}
    try:
        check_cluster(workers, scheduler, names=flags)
        if len(logs) < 2:
            raise InvalidParameter(f"compare needs at least two router logs (LOG arguments), got {len(logs)}")
        labels = tuple(label) if label else None
        if labels is not None and len(labels) != len(logs):
            raise InvalidParameter(f"--label is given {len(labels)} times for {len(logs)} logs; give one --label per "
                                   "log, in the order of the logs")
        if labels is not None and (len(set(labels)) < len(labels) or not all(s.strip() for s in labels)):
            raise InvalidParameter(f"--label values must be unique and non-empty, got {', '.join(labels)}")
        if top_k < 0:
            raise InvalidParameter(f"--top-k must be >= 0 (0: the k the logs record), got {top_k}")
        if chunk_tokens < 1:
            raise InvalidParameter(f"--chunk-tokens must be >= 1, got {chunk_tokens}")
        paths = [log_path(p) for p in logs]
        check_compare_destination(out, logs=paths, overwrite=overwrite, overwrite_flag="--overwrite",
                                  out_flag="--out")
        opened = [RouterLog.open(p) for p in paths]
        names = labels or default_labels(paths)
        match_layers(opened, names, _names(layers) or None, name="--layers")
        cfg = AnalyzeConfig(chunk_tokens=chunk_tokens, counterfactual=not no_counterfactual, leakage=not no_leakage)
        t0 = time.perf_counter()
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), console=err, transient=True) as bar, \
                dask_client(workers=workers, scheduler=scheduler, names=flags) as client:
            bars: dict[str, int] = {}

            def progress(stage: str, done: int, total: int) -> None:
                if stage not in bars:
                    unit = "layers" if stage.endswith("sample") else "tokens x layers"
                    bars[stage] = bar.add_task(stage, total=total, unit=unit)
                bar.update(bars[stage], completed=done, total=total)

            result = compare(opened, labels=names, layers=_names(layers) or None, config=cfg, client=client,
                             progress=progress, top_k=top_k or None)
        written = write_compare_report(result, out, overwrite=overwrite, overwrite_flag="--overwrite")
    except (UsmoeLpError, LogError) as exc:
        raise fail(exc, aliases={"labels": "--label", "top_k": "--top-k"}) from None
    console.print(f"[bold]usmoe-lp compare[/]: {len(logs)} logs in {time.perf_counter() - t0:.1f} s")
    for line in summary_lines(result):
        console.print(f"  {escape(line)}")
    console.print(f"report: {escape(str(written['report.html']))} (numbers: {escape(str(written['compare.json']))})")
