"""Analyse a live MoE model on texts in one call: capture its router logits, then run the analysis.

>>> res = analyze_model(model, tokenizer, ["def f(x): return x", "import os"])   # doctest: +SKIP
>>> res.load_frame()                                                             # doctest: +SKIP

:func:`analyze_model` is :func:`usmoe_lp.logs.capture` (the hooks, the padding dropped with the attention mask,
the sequence ids and positions) followed by :func:`usmoe_lp.diagnostics.analyze` on the log it wrote, so the numbers
are exactly those of ``usmoe-lp capture`` + ``usmoe-lp analyze`` on the same batches. Each text is one sequence of
the log: tokenized by the tokenizer as it is (its special tokens included), cut to ``max_length`` tokens, and
batched ``batch_size`` texts per forward, padded by the tokenizer (its pad token and padding side; padding never
reaches the log). The log goes to ``log_dir`` when given (and stays there), else to a temporary directory that is
removed, with only what this call created in it, before the function returns.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from usmoe_lp._validate import check_int
from usmoe_lp.diagnostics.analyze import AnalyzeConfig, AnalyzeResult, analyze
from usmoe_lp.errors import InvalidParameter
from usmoe_lp.logs.capture import capture, find_routers
from usmoe_lp.logs.importers import check_log_destination

__all__ = ["analyze_model"]


def analyze_model(model, tokenizer, texts, *, config: AnalyzeConfig | None = None,
                  log_dir: str | os.PathLike | None = None, max_length: int = 512, batch_size: int = 8,
                  hidden: bool = False, overwrite: bool = False, model_name: str | None = None) -> AnalyzeResult:
    """Run ``texts`` through ``model``, capture every router's logits and analyse them.

    Args:
        model: a torch MoE model whose routers :func:`usmoe_lp.logs.capture.find_routers` finds (any transformers
            MoE family, or a model with an ``experts`` module next to a Linear gate). Run in eval mode for the call
            (its mode is restored afterwards), on its own device, without gradients.
        tokenizer: a transformers tokenizer (called as ``tokenizer(text)["input_ids"]``); it needs a pad token
            when ``batch_size > 1`` (any id will do: padding is masked out).
        texts: a non-empty sequence of str, or of token-id sequences (taken as they are, as in
            :func:`usmoe_lp.live.evaluate.evaluate`); each one is a sequence of the log, of at most
            ``max_length`` tokens (longer ones are cut).
        config: what to analyse (:class:`~usmoe_lp.diagnostics.AnalyzeConfig`; None: its defaults).
        log_dir: where the router log is written and kept (an existing log there needs ``overwrite=True``); None:
            a temporary directory, removed afterwards (the result's ``source`` then names a path that is gone).
        max_length: tokens per text, at most. batch_size: texts per forward pass.
        hidden: also capture the routers' input hidden states (the collapse metrics' span energy and hidden-state
            effective rank need them). model_name: the name stored in the log (default: the model's config path).

    Returns:
        The :class:`~usmoe_lp.diagnostics.AnalyzeResult` of :func:`usmoe_lp.diagnostics.analyze` on the log:
        per layer (N experts, k, the model's own selection, the counterfactual re-routings).

    Raises:
        InvalidParameter: empty ``texts``, a str given instead of a list of texts, a text that gives no token,
            ``max_length`` or ``batch_size`` below 1, a tokenizer without a pad token for ``batch_size > 1``,
            ``config`` not an AnalyzeConfig.
        RouterNotFound: the model has no MoE router to capture (checked before any text is tokenized).
        LogExists: ``log_dir`` holds data and ``overwrite`` is False (checked before the model runs).
    """
    max_length = check_int(max_length, "max_length", low=1)
    batch_size = check_int(batch_size, "batch_size", low=1)
    if config is not None and not isinstance(config, AnalyzeConfig):
        raise InvalidParameter(f"config must be a usmoe_lp.diagnostics.AnalyzeConfig, got {type(config).__name__}")
    find_routers(model)  # RouterNotFound for a model without MoE routers, before any work
    rows = _token_rows(tokenizer, texts, max_length)
    _check_pad_token(tokenizer, batch_size, len(rows))
    if log_dir is not None:
        check_log_destination(log_dir, overwrite=overwrite)
        return _capture_and_analyze(model, tokenizer, rows, batch_size, Path(log_dir), config, hidden, overwrite,
                                    model_name, True)
    with tempfile.TemporaryDirectory(prefix="usmoe-lp-analyze-model-") as tmp:
        return _capture_and_analyze(model, tokenizer, rows, batch_size, Path(tmp) / "router-log", config, hidden,
                                    False, model_name, False)


def _token_rows(tokenizer, texts, max_length: int) -> list[list[int]]:
    """Each text's token ids (at most ``max_length``), checked: a list of texts, each giving a token."""
    if isinstance(texts, str | bytes):
        raise InvalidParameter("texts must be a list of texts (one sequence each), got a single "
                               f"{type(texts).__name__}: pass [text]")
    if not isinstance(texts, Sequence) or isinstance(texts, torch.Tensor) and texts.ndim != 2:
        raise InvalidParameter(f"texts must be a list of str (or of token-id lists), got {type(texts).__name__}")
    if len(texts) == 0:
        raise InvalidParameter("texts is empty: give at least one text to run through the model")
    if any(isinstance(t, str) for t in texts) and not callable(tokenizer):
        raise InvalidParameter(f"tokenizer must be a callable transformers tokenizer, got {type(tokenizer).__name__}")
    rows = []
    for i, text in enumerate(texts):
        if isinstance(text, str):
            ids = tokenizer(text)["input_ids"]
        elif isinstance(text, Sequence | torch.Tensor) and not isinstance(text, bytes):
            ids = text
        else:
            raise InvalidParameter(f"texts[{i}] must be a str or a sequence of token ids, got {type(text).__name__}")
        ids = [check_int(t, f"texts[{i}] token id", low=0) for t in
               (ids.tolist() if isinstance(ids, torch.Tensor) else list(ids))]
        if not ids:
            raise InvalidParameter(f"texts[{i}] gives no token: every text must hold at least one token")
        rows.append(ids[:max_length])
    return rows


def _check_pad_token(tokenizer, batch_size: int, texts: int) -> None:
    """A forward holding more than one text needs the tokenizer's padding (its ``pad`` and a pad token)."""
    if batch_size == 1 or texts == 1:
        return
    if not callable(getattr(tokenizer, "pad", None)):
        raise InvalidParameter(f"tokenizer must be a transformers tokenizer with a pad() method to batch "
                               f"batch_size = {batch_size} texts per forward, got {type(tokenizer).__name__}; "
                               "or pass batch_size=1")
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise InvalidParameter(f"the tokenizer has no pad token (tokenizer.pad_token_id is None), needed to batch "
                               f"batch_size = {batch_size} texts per forward: set one (padding is masked out, e.g. "
                               "tokenizer.pad_token = tokenizer.eos_token) or pass batch_size=1")


def _batches(model, tokenizer, rows: list[list[int]], batch_size: int) -> Iterator[dict[str, Any]]:
    """``model(**batch)`` keyword arguments: (B, T) int64 ``input_ids`` and ``attention_mask`` (1 = real token),
    padded by the tokenizer's own ``pad`` (its padding side); an encoder-decoder model also gets a (B, 1)
    ``decoder_input_ids`` of its decoder start token (its encoder's routers are the ones logged)."""
    config = getattr(model, "config", None)
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    start = getattr(config, "decoder_start_token_id", None)
    for b in range(0, len(rows), batch_size):
        chunk = rows[b:b + batch_size]
        if len(chunk) == 1:  # nothing to pad (a tokenizer without a pad token refuses any padding)
            batch = {"input_ids": torch.tensor(chunk, dtype=torch.long),
                     "attention_mask": torch.ones(1, len(chunk[0]), dtype=torch.long)}
        else:
            padded = tokenizer.pad({"input_ids": chunk}, padding=True, return_tensors="pt")
            batch = {"input_ids": padded["input_ids"].long(), "attention_mask": padded["attention_mask"].long()}
        if seq2seq:
            first = tokenizer.pad_token_id if start is None else start
            batch["decoder_input_ids"] = torch.full((len(chunk), 1), int(first or 0), dtype=torch.long)
        yield batch


def _capture_and_analyze(model, tokenizer, rows, batch_size: int, out: Path, config, hidden: bool,
                         overwrite: bool, model_name: str | None, fsync: bool) -> AnalyzeResult:
    was_training = model.training
    model.eval()
    try:
        with capture(model, out, hidden=hidden, overwrite=overwrite, model_name=model_name, fsync=fsync) as cap:
            cap.run(_batches(model, tokenizer, rows, batch_size))
    finally:
        if was_training:
            model.train()
    return analyze(out, config=config)
