"""``usmoe-lp log export LOG --out FILE.parquet``: parse arguments, call :func:`usmoe_lp.export.export_parquet`,
print a summary. Mounted on the ``log`` group by ``usmoe_lp/cli.py`` (the export reads the model selection
from :mod:`usmoe_lp.diagnostics`, a layer above ``usmoe_lp.logs``, so the command lives beside it, not in
``usmoe_lp/logs/cli.py``). Errors go through :func:`usmoe_lp.cli_errors.fail` (one line, exit 2)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from usmoe_lp.cli_errors import fail
from usmoe_lp.errors import UsmoeLpError
from usmoe_lp.export import export_parquet
from usmoe_lp.logs.reader import RouterLog


def export_command(
    log: Annotated[Path, typer.Argument(help="router log directory")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Parquet file to write (e.g. log.parquet)")],
    layers: Annotated[str | None, typer.Option("--layers", help="comma-separated layers to export (default: all)")]
    = None,
    logits: Annotated[bool, typer.Option("--logits", help="also export the raw router logits (a fixed-size list "
                                                          "column of N values per row)")] = False,
    top_k: Annotated[int | None, typer.Option("--top-k", min=1, help="the model's experts per token, for a log "
                                                                     "that does not record it")] = None,
    chunk_tokens: Annotated[int, typer.Option("--chunk-tokens", min=1, help="tokens per chunk (and rows per row "
                                                                            "group)")] = 65536,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing Parquet file at --out")]
    = False,
) -> None:
    """Export the per-token routing table of a router log to a Parquet file (pandas, polars, DuckDB).

    One row per (layer, token), sorted by layer then token: layer_index, layer, token_index,
    sequence_id, position, token_id, experts (the model's selected experts, most probable first),
    probabilities (their routing probabilities) and with --logits the raw logits. A selection log
    (imported expert ids, no logits) gives experts as recorded, plus weights where it records them,
    and no probabilities or logits. The log is streamed a chunk at a time; the file appears only
    once complete.
    """
    console, err = Console(), Console(stderr=True)
    names = None if layers is None else [n.strip() for n in layers.split(",") if n.strip()]
    t0 = time.perf_counter()
    try:
        opened = RouterLog.open(log)
        total = opened.num_tokens * len(opened.layers if names is None else names)
        with Progress(TextColumn("export"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
                      TimeElapsedColumn(), console=err, transient=True) as progress:
            task = progress.add_task("export", total=total)
            result = export_parquet(opened, out, layers=names, include_logits=logits, top_k=top_k,
                                    chunk_tokens=chunk_tokens, overwrite=overwrite,
                                    progress=lambda rows: progress.advance(task, rows))
    except (UsmoeLpError, OSError) as exc:
        raise fail(exc, aliases={"include_logits": "--logits"}) from None
    seconds = time.perf_counter() - t0
    sources = ", ".join(sorted(set(result.selection_source.values()))) or "-"
    console.print(f"wrote {escape(str(result.path))}: {result.rows:,} rows ({len(result.layers)} layers x "
                  f"{result.num_tokens:,} tokens), {result.row_groups} row groups, {result.bytes:,} bytes in "
                  f"{seconds:.2f} s; selection: {escape(sources)}")
