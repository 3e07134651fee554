"""Command line for router logs: ``usmoe-lp log info LOG`` and ``usmoe-lp import SRC --out LOG``.

``log_app`` and ``import_command`` are mounted on the main app by ``usmoe_lp/cli.py``; this module
only parses arguments, calls the API and prints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from usmoe_lp.logs.errors import LogError
from usmoe_lp.logs.format import Manifest
from usmoe_lp.logs.importers import import_file
from usmoe_lp.logs.reader import RouterLog

log_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Inspect router logs.")

_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "fp16": "float16", "fp32": "float32"}


@log_app.callback()
def _log_group() -> None:
    """Inspect router logs (directories with manifest.json and shards/)."""


def _consoles() -> tuple[Console, Console]:
    """Made per command, so that COLUMNS and the streams in force at the call apply."""
    return Console(), Console(stderr=True)


def _fail(exc: Exception) -> typer.Exit:
    _, err = _consoles()
    err.print(f"[red]error:[/] {escape(str(exc))}")
    return typer.Exit(2)


def _summary_table(log: RouterLog) -> Table:
    m = log.manifest
    table = Table(title=f"router log {escape(str(log.path))}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    model = ", ".join(f"{k} {escape(str(v))}" for k, v in (("name", m.model.name), ("family", m.model.family),
                                                            ("revision", m.model.revision)) if v)
    extras = sorted({name.split(".", 1)[0] for name in m.tensors} - {"logits", "token_ids", "sequence_ids",
                                                                      "positions"})
    rows = [
        ("format version", str(m.format_version)),
        ("model", model or "unknown"),
        ("dtype", m.dtype or "- (no tokens)"),
        ("tokens", f"{m.num_tokens:,}"),
        ("shards", str(len(m.shards))),
        ("complete", "yes" if m.complete else "[yellow]no[/] (writer did not close: crashed or still running)"),
        ("also captured", ", ".join(extras) or "-"),
        ("router weights", "yes" if m.router_weights else "no"),
        ("device", escape(m.device or "-")),
        ("created", m.created or "-"),
        ("capture", escape(json.dumps(m.capture, sort_keys=True)) if m.capture else "-"),
        ("versions", escape(", ".join(f"{k} {v}" for k, v in m.versions.items())) or "-"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


def _layers_table(m: Manifest) -> Table:
    table = Table(title=f"{len(m.layers)} layers")
    for col in ("layer", "module", "N", "k", "score", "selection bias"):
        table.add_column(col)
    for layer in m.layers:
        bias = "-" if layer.selection_bias is None else (
            f"{len(layer.selection_bias)} values in [{min(layer.selection_bias):.3g}, {max(layer.selection_bias):.3g}]")
        table.add_row(escape(layer.name), escape(layer.module_path or "-"), str(layer.num_experts),
                      "-" if layer.top_k is None else str(layer.top_k), layer.score_function, bias)
    return table


def _shards_table(m: Manifest, limit: int) -> Table:
    table = Table(title=f"{len(m.shards)} shards")
    for col in ("file", "tokens", "count", "bytes", "sha256"):
        table.add_column(col)
    shown: list = list(m.shards)
    if 0 <= limit < len(shown):
        head = limit - limit // 3
        tail = limit - head
        shown = shown[:head] + [None] + (shown[-tail:] if tail else [])
    for s in shown:
        if s is None:
            table.add_row("...", "", "", "", "")
            continue
        table.add_row(s.file, f"[{s.token_start:,}, {s.token_stop:,})", f"{s.num_tokens:,}", f"{s.bytes:,}",
                      s.sha256[:16])
    return table


@log_app.command("info")
def info(
    log: Annotated[Path, typer.Argument(help="router log directory")],
    checksums: Annotated[bool, typer.Option("--checksums/--no-checksums",
                                            help="verify every shard's sha256 (reads the whole log)")] = True,
    shards: Annotated[int, typer.Option(help="list at most this many shards (-1: all)")] = 12,
) -> None:
    """Print the manifest of a router log in readable form and validate the log (exit 2 if corrupt)."""
    console, err = _consoles()
    try:
        opened = RouterLog.open(log, verify="none")
    except LogError as exc:
        raise _fail(exc) from None
    console.print(_summary_table(opened))
    console.print(_layers_table(opened.manifest))
    if opened.manifest.shards:
        console.print(_shards_table(opened.manifest, shards))
    try:
        report = opened.validate(checksums=checksums)
        sequences = len(opened.sequences)
    except LogError as exc:
        err.print(f"[red]invalid router log:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    what = "sizes, sha256 checksums, tensor names, shapes and dtypes" if checksums else \
        "sizes, tensor names, shapes and dtypes (checksums skipped)"
    console.print(f"[green]valid[/]: {report.shards_checked} shards, {report.num_tokens:,} tokens in {sequences:,} "
                  f"sequences; checked {what}")
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")


def import_command(
    src: Annotated[Path, typer.Argument(help="router logits: .pt/.pth (transformers tuple), .npy, .npz, "
                                              ".safetensors")],
    out: Annotated[Path, typer.Option("--out", "-o", help="router log directory to write")],
    attention_mask: Annotated[Path | None, typer.Option(
        "--attention-mask", help="(B, T) mask, 1 = real token (.pt/.npy/.npz/.safetensors); drops padding "
                                 "from a transformers tuple")] = None,
    input_ids: Annotated[Path | None, typer.Option("--input-ids", help="(B, T) token ids for a transformers "
                                                                       "tuple")] = None,
    model_name: Annotated[str | None, typer.Option("--model-name", help="model name recorded in the log")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="experts per token the model uses")] = None,
    shard_tokens: Annotated[int, typer.Option("--shard-tokens", help="tokens per shard")] = 65536,
    dtype: Annotated[str | None, typer.Option("--dtype", help="store logits as float32, float16 or bfloat16 "
                                                              "(default: as in the file)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing router log at --out")] = False,
) -> None:
    """Import router logits from another tool as a router log (the file type is chosen by extension)."""
    import torch

    console, err = _consoles()
    if dtype is not None and dtype.lower() not in _DTYPES:
        err.print(f"[red]error:[/] --dtype must be one of float32, float16, bfloat16, got {escape(dtype)!r}")
        raise typer.Exit(2)
    try:
        log = import_file(src, out, attention_mask=attention_mask, input_ids=input_ids, model_name=model_name,
                          top_k=top_k, shard_tokens=shard_tokens,
                          dtype=None if dtype is None else getattr(torch, _DTYPES[dtype.lower()]),
                          overwrite=overwrite)
    except LogError as exc:
        raise _fail(exc) from None
    experts = sorted(set(log.num_experts.values()))
    console.print(f"wrote {escape(str(log.path))}: {len(log.layers)} layers x "
                  f"{'/'.join(map(str, experts))} experts, {log.num_tokens:,} tokens in {len(log.sequences):,} "
                  f"sequences, {len(log.shards)} shards, {log.manifest.dtype}")
