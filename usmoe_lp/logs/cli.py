"""Command line for router logs: ``usmoe-lp log info LOG``, ``usmoe-lp import SRC --out LOG`` and
``usmoe-lp capture --model M --text FILE --out LOG`` (``usmoe-lp log export`` lives in ``usmoe_lp/export_cli.py``).

``log_app``, ``import_command`` and ``capture_command`` are mounted on the main app by
``usmoe_lp/cli.py``; this module only parses arguments, calls the API and prints. Every error
is printed through :func:`usmoe_lp.cli_errors.fail` (one line, in CLI flags, exit 2).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from usmoe_lp.cli_errors import DTYPE_METAVAR, fail, parse_dtype
from usmoe_lp.errors import UsmoeLpError
from usmoe_lp.logs.errors import LogError
from usmoe_lp.logs.foreign import FORMATS, import_foreign
from usmoe_lp.logs.format import SCORE_FUNCTIONS, Manifest
from usmoe_lp.logs.importers import LAYOUTS, check_log_destination, import_file
from usmoe_lp.logs.reader import RouterLog

# rich_markup_mode=None: click's plain help, where flags show no "<bool>" value they would refuse
log_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Inspect router logs.",
                      rich_markup_mode=None)


@log_app.callback()
def _log_group() -> None:
    """Inspect router logs (directories with manifest.json and shards/)."""


def _consoles() -> tuple[Console, Console]:
    """Made per command, so that COLUMNS and the streams in force at the call apply."""
    return Console(), Console(stderr=True)


def _choice(allowed, what: str):
    """A typer parser accepting one of ``allowed`` (the usage error lists them)."""
    def parse(value: str | None) -> str | None:
        if value is not None and value not in allowed:
            raise typer.BadParameter(f"{value!r} is not a {what}; use one of {', '.join(allowed)}")
        return value
    return parse


def _summary_table(log: RouterLog) -> Table:
    m = log.manifest
    table = Table(title=f"router log {escape(str(log.path))}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    model = ", ".join(f"{k} {escape(str(v))}" for k, v in (("name", m.model.name), ("family", m.model.family),
                                                            ("revision", m.model.revision)) if v)
    extras = sorted({name.split(".", 1)[0] for name in m.tensors} - {"logits", "token_ids", "sequence_ids",
                                                                      "positions"} - ({"selected"} if not
                                                                                      m.has_logits else set()))
    rows = [
        ("format version", str(m.format_version)),
        ("content", "logits" if m.has_logits else "selection (no logits): the experts each token was routed to"),
        ("model", model or "unknown"),
        ("dtype", m.dtype or ("- (no tokens)" if m.has_logits else "- (no logits)")),
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
    shards: Annotated[int, typer.Option(min=-1, help="list at most this many shards (-1: all)")] = 12,
) -> None:
    """Print the manifest of a router log in readable form and validate the log (exit 2 if corrupt)."""
    console, err = _consoles()
    try:
        opened = RouterLog.open(log, verify="none")
    except (UsmoeLpError, OSError) as exc:
        raise fail(exc) from None
    console.print(_summary_table(opened))
    console.print(_layers_table(opened.manifest))
    if opened.manifest.shards:
        console.print(_shards_table(opened.manifest, shards))
    try:
        report = opened.validate(checksums=checksums)
        sequences = len(opened.sequences)
    except (UsmoeLpError, OSError) as exc:
        raise fail(f"invalid router log: {exc}" if isinstance(exc, LogError) else exc) from None
    what = "sizes, sha256 checksums, tensor names, shapes and dtypes" if checksums else \
        "sizes, tensor names, shapes and dtypes (checksums skipped)"
    console.print(f"[green]valid[/]: {report.shards_checked} shards, {report.num_tokens:,} tokens in {sequences:,} "
                  f"sequences{'' if opened.has_logits else ' (content: selection, no logits)'}; checked {what}")
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")


_IMPORT_HELP = f"""Import router logits from another tool, or the experts a serving or training stack routed
each token to, as a router log.

--format auto (the default): router logits, the file type chosen by extension.

.pt/.pth/.bin: the tuple transformers returns with output_router_logits=True (per layer (B*T, N)
or (B, T, N)), with --attention-mask (drops padding, gives the sequences) and --input-ids.

.npy: (T, N) is one layer (layout tn). A 3-D array needs --layout:
{'; '.join(f"{k} = {v}" for k, v in LAYOUTS.items())}.

.npz: one array per layer (key = layer name), each (T, N), or (B, T, N) with --layout btn; plus
optional token metadata, each a (T,) integer array over all T tokens: sequence_ids (the sequence of
each token), positions (its position in that sequence; default: counted per sequence) and
token_ids (default -1).

.safetensors: one (T, N) tensor per layer, one (L, T, N) tensor, or a router-log shard; the same
metadata keys as .npz.

Sequence boundaries (leakage is computed per sequence) come from sequence_ids, --layout btn (one
sequence per row), --sequence-length L (rows of L tokens) or the attention mask; without any, all
tokens are one sequence and a warning says so.

--format {'|'.join(FORMATS)}: the experts each token was routed to, written as a selection log
(no logits; docs/importing.md): {'; '.join(f"{f.name} = {f.summary} ({f.accepts})" for f in FORMATS.values())}.
One sequence per request (per step for megatron, per line for olmoe), positions 0.. in order. Pass
--num-experts N (the dumps do not say N; a Megatron trace with its logits sidecar does, and is
imported as a logits log); --top-k is checked against the dump (and splits SGLang's flat bytes).
"""


def import_command(
    src: Annotated[Path, typer.Argument(help="router logits: .pt/.pth (transformers tuple), .npy, .npz, "
                                              ".safetensors; or, with --format, a serving/training stack's dump")],
    out: Annotated[Path, typer.Option("--out", "-o", help="router log directory to write")],
    format: Annotated[str, typer.Option(
        "--format", metavar="|".join(("auto", *FORMATS)), parser=_choice(("auto", *FORMATS), "format"),
        help="what SRC is: auto = router logits by file extension; "
             + "; ".join(f"{f.name} = {f.summary}" for f in FORMATS.values()))] = "auto",
    num_experts: Annotated[int | None, typer.Option(
        "--num-experts", min=1, help="experts per MoE layer (N), for --format dumps that do not say it")] = None,
    layout: Annotated[str | None, typer.Option(
        "--layout", metavar="|".join(LAYOUTS), parser=_choice(tuple(LAYOUTS), "layout"),
        help="what the axes of a 3-D .npy (or the .npz layers) are: ltn = (layers, tokens, experts), btn = "
             "(sequences, tokens, experts) of one layer, tn = (tokens, experts)")] = None,
    sequence_length: Annotated[int | None, typer.Option(
        "--sequence-length", min=1, help="consecutive rows of this many tokens are one sequence")] = None,
    attention_mask: Annotated[Path | None, typer.Option(
        "--attention-mask", help="(B, T) mask, 1 = real token (.pt/.npy/.npz/.safetensors); drops padding "
                                 "from a transformers tuple")] = None,
    input_ids: Annotated[Path | None, typer.Option("--input-ids", help="(B, T) token ids for a transformers "
                                                                       "tuple")] = None,
    model_name: Annotated[str | None, typer.Option("--model-name", help="model name recorded in the log")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", min=1, help="experts per token the model uses")] = None,
    score_function: Annotated[str, typer.Option(
        "--score-function", metavar="|".join(SCORE_FUNCTIONS), parser=_choice(SCORE_FUNCTIONS, "score function"),
        help="how the model turns logits into gate scores")] = "unknown",
    shard_tokens: Annotated[int, typer.Option("--shard-tokens", min=1, help="tokens per shard")] = 65536,
    dtype: Annotated[str | None, typer.Option("--dtype", metavar=DTYPE_METAVAR, parser=parse_dtype,
                                              help="store logits in this dtype (default: as in the file)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing router log at --out (only "
                                                                "once the new one is complete)")] = False,
) -> None:
    import torch

    console, err = _consoles()
    if format != "auto":
        _import_foreign(format, src, out, console, num_experts=num_experts, top_k=top_k, model_name=model_name,
                        score_function=score_function, shard_tokens=shard_tokens, dtype=dtype, overwrite=overwrite,
                        refused={"--layout": layout, "--sequence-length": sequence_length,
                                 "--attention-mask": attention_mask, "--input-ids": input_ids})
        return
    if num_experts is not None:
        raise fail(f"--num-experts applies to --format {'|'.join(FORMATS)} (expert-id dumps); router logits give N "
                   "themselves")
    try:
        log = import_file(src, out, attention_mask=attention_mask, input_ids=input_ids, layout=layout,
                          sequence_length=sequence_length, model_name=model_name, top_k=top_k,
                          score_function=score_function, shard_tokens=shard_tokens,
                          dtype=None if dtype is None else getattr(torch, dtype), overwrite=overwrite)
    except (UsmoeLpError, OSError) as exc:
        raise fail(exc) from None
    capture = log.manifest.capture
    experts = sorted(set(log.num_experts.values()))
    layout_text = f" (layout {capture['layout']})" if "layout" in capture else ""
    console.print(f"wrote {escape(str(log.path))}{layout_text}: {len(log.layers)} layers x "
                  f"{'/'.join(map(str, experts))} experts, {log.num_tokens:,} tokens in {len(log.sequences):,} "
                  f"sequences, {len(log.shards)} shards, {log.manifest.dtype}")
    if capture.get("sequences") == "none" and log.num_tokens > 1:
        err.print(f"[yellow]warning:[/] all {log.num_tokens:,} tokens are one sequence: nothing said where "
                  "sequences start (sequence_ids in the file, --sequence-length, --layout btn, --attention-mask); "
                  "leakage and sequence-scoped routing treat them as one")


import_command.__doc__ = _IMPORT_HELP


def _import_foreign(format: str, src: Path, out: Path, console: Console, *, refused: dict, dtype: str | None,
                    **kwargs) -> None:
    """``usmoe-lp import --format FMT``: refuse the flags of router-logit files, import, print a summary."""
    import torch

    given = [flag for flag, value in refused.items() if value is not None]
    if given:
        raise fail(f"{' and '.join(given)} {'applies' if len(given) == 1 else 'apply'} to router-logit files "
                   f"(--format auto), not to --format {format}, "
                   "whose dump says where each request's tokens are")
    if dtype is not None and not FORMATS[format].logits:
        raise fail(f"--dtype casts router logits; a --format {format} dump holds none")
    try:
        log = import_foreign(src, out, format=format, dtype=None if dtype is None else getattr(torch, dtype),
                             **kwargs)
    except (UsmoeLpError, OSError) as exc:
        raise fail(exc) from None
    capture = log.manifest.capture
    what = "router logits and the recorded selection" if log.has_logits else "selection (no logits)"
    console.print(f"wrote {escape(str(log.path))} from {format}: {len(log.layers)} layers x "
                  f"{'/'.join(map(str, sorted(set(log.num_experts.values()))))} experts, top-"
                  f"{log.layer_info(log.layers[0]).top_k}, {log.num_tokens:,} tokens in {len(log.sequences):,} "
                  f"sequences, {len(log.shards)} shards; {what}")
    if capture.get("dense_layers_dropped"):
        console.print(f"left out {len(capture['dense_layers_dropped'])} layers whose ids are all 0 (dense layers the "
                      f"stack records too): {escape(', '.join(capture['dense_layers_dropped']))}")


# ----------------------------------------------------------------------------- usmoe-lp capture
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model", "sentencepiece.bpe.model")
_HUB_HINT = ("download it where the hub is reachable (e.g. `hf download ID --local-dir DIR`, or "
             "`AutoModelForCausalLM.from_pretrained(ID).save_pretrained(DIR)` plus the tokenizer) and pass "
             "--model DIR")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


class _CaptureError(UsmoeLpError):
    """A user error of ``usmoe-lp capture``: printed without a traceback, exit 2."""


def _looks_local(model: str) -> bool:
    """Whether --model can only be a local path: it exists, or it is no Hugging Face Hub id
    (``name`` or ``namespace/name``): starts with . / ~, has a backslash or several slashes, or its
    first component is an existing local directory (``models/typo`` beside a ``models/``)."""
    path = Path(model).expanduser()
    return (path.exists() or not _HUB_ID.match(model) or model.startswith((".", "/", "~"))
            or ("/" in model and Path(model.split("/", 1)[0]).is_dir()))


def _hub_unreachable(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(s in text for s in ("couldn't connect", "could not connect", "offline", "connection", "resolve host",
                                   "name or service not known", "network", "timed out"))


def _load_error(what: str, model: str, local: bool, exc: BaseException) -> _CaptureError:
    text = " ".join(str(exc).split())
    if local:
        return _CaptureError(f"cannot load the {what} from {model}: {text}")
    if _hub_unreachable(exc):
        return _CaptureError(f"--model {model}: no such local directory, and as a Hugging Face Hub id it cannot be "
                             f"loaded: the hub is not reachable from here (no network, or offline mode) and it is "
                             f"not in the local cache. A local directory works: {_HUB_HINT}")
    return _CaptureError(f"--model {model}: no such local directory, and loading the {what} of {model!r} from the "
                         f"Hugging Face Hub failed: {text}. For a local model pass --model DIR")


def _load_model_and_tokenizer(model: str, dtype: str | None, device: str):
    """(model in eval mode on ``device``, tokenizer, is_encoder_decoder); raises _CaptureError."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    local = _looks_local(model)
    source = model
    if local:
        path = Path(model).expanduser()
        if not path.exists():
            raise _CaptureError(f"--model {model}: no such directory (model directory not found)")
        if not path.is_dir():
            raise _CaptureError(f"--model {model} is a file; pass the directory holding config.json and the "
                                "weights (what save_pretrained writes)")
        if not (path / "config.json").is_file():
            raise _CaptureError(f"{model} has no config.json: pass a directory written by save_pretrained "
                                "(config.json, weights, tokenizer files)")
        if not any((path / f).is_file() for f in _TOKENIZER_FILES):
            raise _CaptureError(
                f"{model} has no tokenizer (none of {', '.join(_TOKENIZER_FILES[:4])}, ...): add one with "
                f"`AutoTokenizer.from_pretrained(BASE_MODEL).save_pretrained({str(path)!r})`, where BASE_MODEL is "
                "the model it was trained with")
        source = str(path)
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, ...
        raise _load_error("config", model, local, exc) from None
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001
        raise _load_error("tokenizer", model, local, exc) from None
    try:
        loaded = cls.from_pretrained(source, config=config, dtype="auto" if dtype is None else getattr(torch, dtype))
    except Exception as exc:  # noqa: BLE001
        raise _load_error("model", model, local, exc) from None
    return loaded.to(device).eval(), tokenizer, seq2seq


def _token_batches(ids: list[int], *, seq_len: int, batch_size: int, pad_id: int, seq2seq: bool,
                   decoder_start: int, left_pad: bool = False) -> list[dict]:
    """Sequences of ``seq_len`` tokens in batches of ``batch_size``; a short last sequence is padded
    (masked out) on the right, or on the left when the batch is to be continued by ``generate()``."""
    import torch

    seqs = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    batches = []
    for b in range(0, len(seqs), batch_size):
        rows = seqs[b:b + batch_size]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            cols = slice(width - len(r), width) if left_pad else slice(0, len(r))
            input_ids[i, cols] = torch.tensor(r, dtype=torch.long)
            mask[i, cols] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if seq2seq:  # the encoder's routers are logged; the decoder needs some input
            batch["decoder_input_ids"] = torch.full((len(rows), 1), decoder_start, dtype=torch.long)
        batches.append(batch)
    return batches


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def capture_command(
    model: Annotated[str, typer.Option("--model", "-m", help="model directory (save_pretrained layout, with its "
                                                             "tokenizer) or Hugging Face Hub id")],
    text: Annotated[Path, typer.Option("--text", "-t", help="UTF-8 text file to run through the model")],
    out: Annotated[Path, typer.Option("--out", "-o", help="router log directory to write")],
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="log at most this many tokens of the "
                                                                         "text")] = 65536,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="sequences per forward pass")] = 8,
    seq_len: Annotated[int, typer.Option("--seq-len", min=1, help="tokens per sequence")] = 512,
    device: Annotated[str | None, typer.Option("--device", help="cuda or cpu (default: cuda if available)")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", metavar=DTYPE_METAVAR, parser=parse_dtype,
                                              help="run the model in this dtype (default: the checkpoint's "
                                                   "dtype)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing router log at --out (only "
                                                                "once the new one is complete)")] = False,
    shard_tokens: Annotated[int, typer.Option("--shard-tokens", min=1, help="tokens per shard")] = 65536,
    module_pattern: Annotated[str | None, typer.Option(
        "--module-pattern", help="regex (full match on module names) of the router modules, for models whose "
                                 "routers are not found automatically")] = None,
    generate: Annotated[int, typer.Option("--generate", min=0, help="continue each sequence with N greedy tokens "
                                          "through model.generate() and the KV cache; decode steps are logged "
                                          "with their true positions in the same sequence")] = 0,
) -> None:
    """Run a text file through a MoE model and log every router's raw logits as a router log.

    The text is tokenized (no special tokens added), cut into sequences of --seq-len tokens up to
    --max-tokens (the last one right-padded; padding is not logged) and fed --batch-size sequences
    at a time. For encoder-decoder models the encoder's routers are logged. With --generate N
    (decoder-only models) the batches are left-padded and continued by greedy ``generate()``; every
    forward it runs is logged, so each sequence holds its prompt and N - 1 generated tokens (the
    last generated token is never fed back through the model).
    """
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from usmoe_lp.logs.capture import capture

    console, err = _consoles()
    try:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.split(":")[0] not in ("cuda", "cpu"):
            raise _CaptureError(f"--device must be cuda or cpu, got {device!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise _CaptureError("--device cuda was asked for but CUDA is not available here (torch "
                                f"{torch.__version__}, built with CUDA {torch.version.cuda or 'no'}); use --device cpu")
        if not text.is_file():
            raise _CaptureError(f"--text {text}: text file not found" if not text.exists() else
                                f"--text {text} is not a file")
        content = text.read_text(encoding="utf-8", errors="replace")
        check_log_destination(out, overwrite=overwrite)  # before the slow model load
        loaded, tokenizer, seq2seq = _load_model_and_tokenizer(model, dtype, device)
        ids = tokenizer(content, add_special_tokens=False)["input_ids"][:max_tokens]
        if not ids:
            raise _CaptureError(f"{text} gives no tokens")
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = getattr(loaded.config, "pad_token_id", None) or tokenizer.eos_token_id or 0
        decoder_start = getattr(loaded.config, "decoder_start_token_id", None)
        if generate and seq2seq:
            raise _CaptureError("--generate is supported for decoder-only models; this is an encoder-decoder "
                                "model (its encoder routers are logged without --generate)")
        batches = _token_batches(ids, seq_len=seq_len, batch_size=batch_size, pad_id=pad_id, seq2seq=seq2seq,
                                 decoder_start=pad_id if decoder_start is None else decoder_start,
                                 left_pad=generate > 0)
        name = model if not _looks_local(model) else Path(model).expanduser().resolve().name
        t0 = time.perf_counter()
        logged = 0
        with capture(loaded, out, shard_tokens=shard_tokens, module_pattern=module_pattern, overwrite=overwrite,
                     model_name=name) as cap:
            with Progress(TextColumn("capture"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                          TimeElapsedColumn(), console=err, transient=True) as progress:
                task = progress.add_task("capture", total=len(ids))
                for batch in batches:
                    if generate:
                        on_device = {k: v.to(loaded.device) for k, v in batch.items()}
                        with torch.no_grad():
                            loaded.generate(**on_device, max_new_tokens=generate, min_new_tokens=generate,
                                            do_sample=False, pad_token_id=pad_id)
                    else:
                        logged += cap.run([batch])
                    progress.advance(task, int(batch["attention_mask"].sum()))
        seconds = time.perf_counter() - t0
    except (UsmoeLpError, OSError) as exc:
        raise fail(exc) from None
    log = RouterLog.open(out, verify="none")
    logged = log.num_tokens
    nbytes = _dir_bytes(Path(out))
    experts = sorted(set(log.num_experts.values()))
    table = Table(title=f"captured {escape(str(out))}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in (
        ("model", f"{escape(name)} ({escape(str(log.manifest.model.family or type(loaded).__name__))}) on {device}"),
        ("tokens", f"{logged:,} in {len(log.sequences):,} sequences, {len(batches)} batches"),
        ("layers", str(len(log.layers))),
        ("experts", "/".join(map(str, experts))),
        ("dtype", str(log.manifest.dtype)),
        ("shards", str(len(log.shards))),
        ("bytes on disk", f"{nbytes:,} ({nbytes / 1e6:.1f} MB)"),
        ("time", f"{seconds:.2f} s"),
        ("tokens/s", f"{logged / seconds:,.0f}"),
        ("MB/s", f"{nbytes / 1e6 / seconds:.1f}"),
    ):
        table.add_row(key, value)
    console.print(table)
