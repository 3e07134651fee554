"""``usmoe-lp evaluate --routers ... --out DIR``: parse arguments, call :func:`usmoe_lp.live.evaluate.evaluate`,
write the report (:mod:`usmoe_lp.report.evaluate_report`), print a summary.

Routers are the registry's: ``--routers`` names any of them and ``--param NAME=V1,V2`` sweeps any router
parameter (repeatable), parsed as ``usmoe-lp analyze`` parses them (:func:`usmoe_lp.diagnostics.cli.parse_params`);
``--kbar``, ``--alpha`` and ``--scope`` are shorthands for the parameters of those names. The model is the embedded
tiny MoE (:func:`usmoe_lp.tiny.load_tiny`) unless ``--model DIR`` names a saved transformers causal MoE LM; the text
is its held-out documents unless ``--text FILE`` gives documents separated by blank lines.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from usmoe_lp.cli_errors import describe_os_error, fail
from usmoe_lp.diagnostics.cli import parse_params, parse_routers
from usmoe_lp.errors import InvalidParameter, UsmoeLpError
from usmoe_lp.routers import list_routers

__all__ = ["build_settings", "evaluate_command", "load_model", "parse_ks", "parse_sweep", "read_documents"]

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
SHORTHANDS = ("kbar", "alpha", "scope")
"""Router parameters with a flag of their own (``--kbar 1,1.5`` is ``--param kbar=1,1.5``)."""


def _items(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _numbers(text: str, flag: str, kind: type) -> tuple:
    try:
        return tuple(kind(p) for p in _items(text))
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise InvalidParameter(f"{flag} must be comma-separated {what}, got {text!r}") from None


def read_documents(path: Path) -> list[str]:
    """The documents of a UTF-8 text file: blocks separated by blank lines (a line of nothing but spaces or tabs),
    stripped; empty blocks dropped. Errors name ``--text``."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidParameter(f"--text {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise InvalidParameter(f"--text {describe_os_error(exc)}") from None
    docs = [d.strip() for d in _PARAGRAPH_BREAK.split(text) if d.strip()]
    if not docs:
        raise InvalidParameter(f"--text {path}: no document in the file (documents are blocks of text separated by "
                               "blank lines)")
    return docs


def load_model(directory: Path | None):
    """``(model, tokenizer, name)``: the embedded tiny model, or the transformers causal LM saved in ``directory``
    (``from_pretrained(directory, local_files_only=True)``, eval mode) with its tokenizer. Errors name ``--model``."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' per-weight loading bar: noise on the command's stderr
    try:
        return _load_model(directory)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _load_model(directory: Path | None):
    if directory is None:
        from usmoe_lp.tiny import load_tiny

        model, tokenizer = load_tiny()
        return model, tokenizer, "usmoe-lp tiny (embedded)"
    if not (directory / "config.json").is_file():
        what = "does not exist" if not directory.exists() else "holds no config.json"
        raise InvalidParameter(f"--model {directory} {what}: pass a directory written by save_pretrained (a "
                               "transformers causal MoE language model and its tokenizer)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidParameter(f"--model {directory}: transformers cannot load it as a causal language model "
                               f"({' '.join(str(exc).split())[:300]})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidParameter(f"--model {directory}: no tokenizer loads from it ({' '.join(str(exc).split())[:300]});"
                               " save the tokenizer with the model (tokenizer.save_pretrained)") from None
    return model.eval(), tokenizer, str(directory)


def _model_k(model) -> int:
    from usmoe_lp.live.evaluate import model_top_k

    try:
        return model_top_k(model)
    except InvalidParameter as exc:
        raise InvalidParameter(str(exc).replace("k: ", "--k: ", 1).replace("give the budget unit k",
                                                                        "give the budget unit with --k K")) from None


def parse_sweep(routers: str, *, kbar: str = "", alpha: str = "", scope: str = "",
                param: list[str] | None = None) -> tuple[tuple[str, ...], dict[str, tuple], dict[str, str]]:
    """``(names, sweep, flags)``: the routers of ``--routers``, the swept parameter values of ``--param`` and the
    shorthands ``--kbar``/``--alpha``/``--scope`` (typed by :func:`usmoe_lp.diagnostics.cli.parse_params`), and
    parameter -> the flag that gave it (for the messages). Errors name the flag."""
    names = parse_routers(routers)
    items = list(param or ())
    short: dict[str, str] = {}
    for name, text in (("kbar", kbar), ("alpha", alpha), ("scope", scope)):
        if text.strip():
            if any(i.partition("=")[0].strip() == name for i in items):
                raise InvalidParameter(f"--{name} and --param {name} both give {name}; use one of them")
            short[name] = text
    shorthand = {name: f"--{name}" for name in short}
    try:
        sweep = parse_params([*items, *(f"{n}={v}" for n, v in short.items())], names)
    except InvalidParameter as exc:
        raise _flag_words(exc, shorthand) from None
    return names, sweep, {**{p: f"--param {p}" for p in sweep}, **shorthand}


def parse_ks(text: str) -> tuple[int, ...]:
    """``--k K1,K2`` -> the budget units (empty: the model's k)."""
    ks = _numbers(text, "--k", int)
    for kk in ks:
        if kk < 1:
            raise InvalidParameter(f"--k must be >= 1, got {kk}")
    return ks


def build_settings(names: tuple[str, ...], sweep: dict[str, tuple], flags: dict[str, str],
                   ks: tuple[int, ...]) -> tuple:
    """The :class:`~usmoe_lp.routers.RouterConfig` settings of :func:`parse_sweep`'s result at each k of ``ks``,
    through :func:`usmoe_lp.live.evaluate.settings_grid`, native left out
    (:func:`~usmoe_lp.live.evaluate.evaluate` always runs it, at the model's k). Errors name the flag."""
    from usmoe_lp.live.evaluate import settings_grid

    settings, labels = [], {}
    for kk in ks:
        try:
            grid = settings_grid(kk, names, sweep=sweep)
        except InvalidParameter as exc:
            raise _flag_words(exc, flags) from None
        for cfg in grid:
            if cfg.router == "native":
                continue  # evaluate() always runs native, at the model's k, first
            if cfg.label in labels and labels[cfg.label] != cfg.k:
                raise InvalidParameter(f"--k {','.join(map(str, ks))}: the settings of {cfg.router} at k = "
                                       f"{labels[cfg.label]} and k = {cfg.k} share the label {cfg.label!r}; evaluate "
                                       "one k at a time")
            if cfg.label not in labels:
                labels[cfg.label] = cfg.k
                settings.append(cfg)
    return tuple(settings)


EVALUATE_FLAGS = {name: "--" + name.replace("_", "-") for name in (
    "seq_len", "batch_size", "corrupt", "generate", "prompt_tokens", "bootstrap", "confidence", "seed", "weights",
    "max_tokens")}
"""evaluate()'s keywords -> this command's flags (its errors say ``corrupt must ...``; the command says
``--corrupt must ...``)."""


def _flag_words(exc: InvalidParameter, flags: dict[str, str]) -> InvalidParameter:
    """A parameter error in the command's words: ``--param kbar`` (parse_params' words for a shorthand) and a bare
    ``kbar must ...`` or ``generate: ...`` (the library's) -> the flag that gave it (``flags``: parameter -> flag)."""
    text = str(exc)
    for name, flag in flags.items():
        text = text.replace(f"--param {name}", flag)
        text = re.sub(rf"(?<![\w-])(?<!--param ){re.escape(name)}(?= must|:)", flag, text)
    return InvalidParameter(text)


def evaluate_command(
    routers: Annotated[str, typer.Option(help=f"Routers to evaluate, comma-separated, among "
                                              f"{', '.join(list_routers())}; native (the model's own routing) is "
                                              "always evaluated, as the reference.")],
    out: Annotated[Path, typer.Option("--out", help="Report directory (created): evaluate.json, report.md, "
                                                    "report.html, figures.")],
    model: Annotated[Path | None, typer.Option("--model", help="A saved transformers causal MoE LM directory "
                                                               "(default: the embedded tiny model).")] = None,
    text: Annotated[Path | None, typer.Option("--text", help="UTF-8 file of documents separated by blank lines "
                                                             "(default: the embedded held-out documents).")] = None,
    k: Annotated[str, typer.Option("--k", help="Budget unit k of the settings, comma-separated (default: the "
                                               "model's k).")] = "",
    kbar: Annotated[str, typer.Option(help="Experts per token on average (fractional allowed), comma-separated; "
                                           "for the routers that take kbar (default around k).")] = "",
    alpha: Annotated[str, typer.Option(help="USMoE unified-score alphas, comma-separated (default 0.3,0.5,0.7).")]
    = "",
    scope: Annotated[str, typer.Option(help="USMoE scopes: sequence, batch, position (default sequence).")] = "",
    param: Annotated[list[str] | None, typer.Option(
        "--param", help="Sweep a router parameter: NAME=V1,V2 (repeatable), e.g. --param capacity_factor=1,1.25; "
                        "every router that has NAME takes each value.")] = None,
    weights: Annotated[str, typer.Option(help="Combine weights of the selected experts: model (the model's own "
                                              "rule), reference or score (usmoe_lp.live.WEIGHT_RULES); native always "
                                              "keeps the model's.")] = "model",
    corrupt: Annotated[str, typer.Option(help="Input corruption rates, comma-separated: each input token replaced "
                                              "by a random token with this probability (targets stay clean).")]
    = "0",
    generate: Annotated[int, typer.Option(help="Greedy-generate this many tokens per setting through the KV cache "
                                               "and compare with native (0: off).")] = 0,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt tokens of each generated continuation.")] = 64,
    seq_len: Annotated[int, typer.Option(help="Tokens per evaluation window.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Windows per forward.")] = 8,
    max_tokens: Annotated[int | None, typer.Option(help="Use at most this many tokens of the documents, in "
                                                        "order (the last one cut; default: all).")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples of the documents for the confidence "
                                                "intervals.")] = 1000,
    confidence: Annotated[float, typer.Option(help="Confidence level of the intervals.")] = 0.95,
    seed: Annotated[int, typer.Option(help="Seed of the corruption and the bootstrap (same seed, same numbers).")]
    = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier evaluate report at --out "
                                            "(never other files).")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Evaluate router settings live in a MoE language model: cross-entropy with bootstrap intervals, the cost in
    routed-expert FLOPs, robustness to corrupted inputs and (with --generate) greedy generation, against the
    model's own routing.

    Writes evaluate.json, report.md, report.html and quality_vs_cost.png (corruption.png with several --corrupt
    rates) into --out. The report is built aside and replaces --out only when complete; an earlier report needs
    --overwrite, and --out never holds anything else.
    """
    from usmoe_lp.live.evaluate import evaluate
    from usmoe_lp.report.evaluate_report import check_evaluate_destination, summary_lines, write_evaluate_report

    console = Console()
    inputs = [p for p in (model, text) if p is not None]
    try:
        rates = _numbers(corrupt, "--corrupt", float) or (0.0,)
        check_evaluate_destination(out, inputs=inputs, overwrite=overwrite, overwrite_flag="--overwrite",
                                   out_flag="--out")
        names, sweep, flags = parse_sweep(routers, kbar=kbar, alpha=alpha, scope=scope, param=param)
        ks = parse_ks(k)
        build_settings(names, sweep, flags, ks or (1,))  # the values checked before the model loads
        documents = read_documents(text) if text is not None else None
        lm, tokenizer, name = load_model(model)
        if documents is None:
            from usmoe_lp.tiny import heldout_documents

            documents = heldout_documents()
        settings = build_settings(names, sweep, flags, ks or (_model_k(lm),))
        t0 = time.perf_counter()
        try:
            result = evaluate(lm, documents, settings, tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size,
                              corrupt=rates, generate=generate, prompt_tokens=prompt_tokens, bootstrap=bootstrap,
                              confidence=confidence, seed=seed, weights=weights, progress=progress,
                              max_tokens=max_tokens)
        except InvalidParameter as exc:
            raise _flag_words(exc, EVALUATE_FLAGS) from None
        seconds = time.perf_counter() - t0
        if model is None:  # the embedded model by its name, not the path of the installed package's weights
            result = dataclasses.replace(result, model={**result.model, "name": name})
        written = write_evaluate_report(result, out, title=f"usmoe-lp evaluate: {name}", inputs=inputs,
                                        overwrite=overwrite, overwrite_flag="--overwrite", out_flag="--out")
    except UsmoeLpError as exc:
        raise fail(exc) from None
    console.print(f"[bold]usmoe-lp evaluate[/]: {len(result.settings)} settings (native included) in {seconds:.1f} s")
    for line in summary_lines(result):
        console.print(f"  {escape(line)}")
    console.print(f"report: {escape(str(written['report.html']))} (numbers: {escape(str(written['evaluate.json']))})")
