"""The command line's one translation point from library errors to messages in CLI words.

The library names its parameters as Python keywords (``top_k=``, ``module_pattern=``,
``overwrite=True``); on the command line the same parameter is a flag (``--top-k``,
``--module-pattern``, ``--overwrite``). Every command prints its errors through :func:`fail`, which
rewrites the message for the command being run (:func:`cli_message`): each keyword that names one of
that command's options becomes the option's flag, and ``aliases`` covers library keywords spelled
differently from the option (``num_layers`` -> ``--layers``). The message is printed as one line on
stderr, never with a traceback.

Usage in a command::

    try:
        ...
    except UsmoeLpError as exc:
        raise fail(exc) from None                 # exit 2, "error: ... --top-k ..."

The dtype spelling shared by ``capture`` and ``import`` (``--dtype float32|bfloat16|float16``) is
parsed here once (:func:`parse_dtype`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import click
import typer

try:  # typer >= 0.2x runs on its own copy of click, whose context stack is not click's
    from typer._click.globals import get_current_context as _typer_context
except ImportError:  # pragma: no cover - older typer on the installed click
    _typer_context = None

__all__ = ["DTYPE_METAVAR", "cli_message", "command_flags", "describe_os_error", "fail", "parse_dtype"]

DTYPES = ("float32", "bfloat16", "float16")
DTYPE_METAVAR = "|".join(DTYPES)
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_dtype(value: str | None) -> str | None:
    """``--dtype``: one of float32, bfloat16, float16 (also fp32, bf16, fp16; any case) -> canonical name."""
    if value is None:
        return None
    name = _DTYPE_ALIASES.get(value.strip().lower(), value.strip().lower())
    if name not in DTYPES:
        raise typer.BadParameter(f"must be one of {', '.join(DTYPES)}, got {value!r}")
    return name


def _current_context():
    for getter in (_typer_context, click.get_current_context):
        ctx = getter(silent=True) if getter is not None else None
        if ctx is not None:
            return ctx
    return None


def command_flags(ctx=None) -> dict[str, tuple[str, str | None]]:
    """Python name -> (flag, negative flag or None) of every option of the command being run
    (``ctx``: its click/typer context; default: the current one)."""
    ctx = ctx if ctx is not None else _current_context()
    if ctx is None:
        return {}
    flags: dict[str, tuple[str, str | None]] = {}
    for param in ctx.command.params:
        if getattr(param, "param_type_name", None) != "option" or not param.name:
            continue
        long = [o for o in param.opts if o.startswith("--")]
        negative = [o for o in param.secondary_opts if o.startswith("--")]
        if long:
            flags[param.name] = (long[0], negative[0] if negative else None)
    return flags


def cli_message(text: str, flags: Mapping[str, tuple[str, str | None]] | None = None,
                aliases: Mapping[str, str] | None = None) -> str:
    """``text`` with the Python keywords of ``flags`` (default: the running command's options) and
    ``aliases`` (keyword -> flag) written as CLI flags, on one line.

    ``top_k=9`` -> ``--top-k 9``; ``overwrite=True`` -> ``--overwrite`` (an ``(--overwrite)`` the library
    added after it is dropped); ``module_pattern=r"x"`` -> ``--module-pattern 'x'``; a bare keyword
    with an underscore (``shard_tokens must be ...``) -> ``--shard-tokens``. Keywords that are no
    option of the command stay as they are.

    >>> flags = {"top_k": ("--top-k", None), "overwrite": ("--overwrite", None)}
    >>> cli_message("top_k must be in 1..8, got 9; pass overwrite=True (--overwrite)", flags)
    '--top-k must be in 1..8, got 9; pass --overwrite'
    """
    table = {name: pair for name, pair in (command_flags() if flags is None else flags).items()}
    table.update({name: (flag, None) for name, flag in (aliases or {}).items()})
    for name in sorted(table, key=len, reverse=True):
        flag, negative = table[name]
        text = _translate(text, name, flag, negative)
    return " ".join(text.split())


def _translate(text: str, name: str, flag: str, negative: str | None) -> str:
    key = rf"(?<![\w.\-]){re.escape(name)}"
    text = re.sub(key + r"=(True|False)\b(\s*\(--[\w\-]+\))?",
                  lambda m: flag if m.group(1) == "True" else (negative or f"{flag} off"), text)
    text = re.sub(key + r"=r?(?P<q>[\"'])(?P<v>.*?)(?P=q)", lambda m: f"{flag} '{m.group('v')}'", text)
    text = re.sub(key + r"=(?=[^\s,;:)\]])", flag + " ", text)
    text = re.sub(key + r"=", flag, text)
    if "_" in name:
        text = re.sub(key + r"(?![\w=(])", flag, text)
    return text


def describe_os_error(exc: OSError) -> str:
    """``path: reason`` for an OSError (no errno numbers, no traceback)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{exc.filename}: {reason}" if exc.filename else reason


def fail(exc: BaseException | str, *, code: int = 2, aliases: Mapping[str, str] | None = None) -> typer.Exit:
    """Print ``error: <message in CLI words>`` as one line on stderr; return the ``typer.Exit(code)`` to raise.

    ``exc``: an exception (its notes are appended) or a message. ``aliases``: library keyword ->
    flag for keywords that differ from the command's option names. Exit code 2 is bad input
    (the default), 1 a run that failed on good input."""
    if isinstance(exc, OSError) and exc.strerror:  # a raw OSError, not one of ours (they carry a message)
        text = describe_os_error(exc)
    else:
        text = str(exc) if not isinstance(exc, str) else exc
    notes = getattr(exc, "__notes__", None) or []
    text = "; ".join([text, *notes])
    click.echo(f"error: {cli_message(text, aliases=aliases)}", err=True)
    return typer.Exit(code)
