"""Quality against cost of routers in a live MoE language model: :func:`evaluate`.

Each setting (a :class:`~usmoe_lp.routers.RouterConfig`) routes the model live (:func:`usmoe_lp.live.route`, one
``with route(...)`` per setting and corruption rate), and the model scores held-out documents:

* **Windows and targets** are those of the tiny model's evaluation (:func:`usmoe_lp.tiny.evaluate.eval_windows`):
  each document's token stream is cut into windows of ``seq_len`` tokens with stride ``seq_len - 1``, so every
  token but the document's first is predicted once; targets equal to the model's BOS token are not scored. Each
  document is scored on its own, so the uncertainty is a bootstrap over documents.
* **Cross-entropy** ``ce``: nats per scored target, the mean of ``-ln p(target)`` over every scored target of every
  document (the quantity ``model(input_ids, labels=...)`` averages over one window); **bits per byte** ``bpb`` over
  the byte targets only, for a byte-level model (:mod:`usmoe_lp.tiny.data`: tokens 0-255 are bytes), as
  :func:`usmoe_lp.tiny.evaluate.evaluate` reports it.
* **Bootstrap** (:func:`bootstrap_ci`): documents resampled with replacement, ``bootstrap`` times, one draw shared
  by every setting and rate, so a delta to native is *paired* (the same resampled documents on both sides);
  percentile intervals at ``confidence`` (Efron & Tibshirani 1993, ch. 13).
* **Corruption** (:func:`usmoe_lp.live.corrupt.corrupt_tokens`): each input token replaced with probability p by a
  uniformly random token, seeded per document; the targets stay the clean next tokens.
* **Cost**: the realised experts per token (``kbar``) from the route's per-layer counts
  (:class:`usmoe_lp.live.RouteStats`), and the routed experts' FLOPs per token from their parameter shapes
  (:func:`usmoe_lp.live.flops.expert_multiply_adds`; shared experts and the router left out).
* **Generation** (``generate > 0``): greedy continuations through the KV cache under each setting, compared with
  native's, and the decode-time routing of the generated tokens compared with the teacher-forced routing of the
  same sequence under the same setting (what a router's decode rule changes, :mod:`usmoe_lp.live.selectors`).

``native`` (the model's own router, its own weights) is always evaluated, first: it is the reference of every delta.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from usmoe_lp._json import json_ready
from usmoe_lp._validate import check_int, check_real
from usmoe_lp.errors import InvalidParameter
from usmoe_lp.live.corrupt import corrupt_tokens
from usmoe_lp.live.flops import expert_multiply_adds
from usmoe_lp.live.route import Route, route
from usmoe_lp.live.weights import get_weight_rule
from usmoe_lp.routers.config import RouterConfig, router_grid
from usmoe_lp.tiny.data import BOS_ID, EOS_ID, VOCAB_SIZE, document_ids
from usmoe_lp.tiny.evaluate import eval_windows, scored_targets

__all__ = ["DEFINITIONS", "EvaluateResult", "bootstrap_ci", "evaluate", "pareto_front", "settings_grid"]

NATIVE = "native"

DEFINITIONS: dict[str, str] = {
    # quality
    "label": "the setting's name (RouterConfig.label; 'native' is the model's own router)",
    "router": "the registry router of the setting",
    "corrupt": "input corruption rate p: each input token replaced with probability p by a uniformly random token "
               "(bytes 0-255 for a byte-level model); targets stay clean",
    "ce": "cross-entropy, nats per scored target token (BOS targets not scored), pooled over documents",
    "ce_low": "lower end of the bootstrap percentile interval of ce over documents (nats/token)",
    "ce_high": "upper end of the bootstrap percentile interval of ce over documents (nats/token)",
    "bpb": "bits per byte over the byte targets (EOS and BOS excluded); NaN for a model that is not byte-level",
    "delta_ce": "ce minus native's ce at the same corruption rate (nats/token)",
    "delta_low": "lower end of the paired bootstrap interval of delta_ce (same resampled documents; nats/token)",
    "delta_high": "upper end of the paired bootstrap interval of delta_ce (nats/token)",
    "rel_delta": "delta_ce / native's ce at the same corruption rate (unitless)",
    "kbar": "realised experts per real input token, mean over the routed layers",
    "pairs_per_token": "selected (token, expert) pairs per real input token and layer (pairs / tokens over layers)",
    "moe_flops_per_token": "FLOPs of the routed experts per real input token: 2 x multiply-adds of one expert's "
                           "weight matrices (from their shapes) x selected pairs, summed over layers; shared "
                           "experts, router, biases and activations excluded",
    "flops_vs_native": "moe_flops_per_token / native's at the same corruption rate",
    "wall_s": "wall time of the setting's forwards at this rate (seconds; measured, machine-dependent)",
    "tokens_per_s": "scored target tokens per second of wall_s",
    "tokens": "scored target tokens",
    "documents": "documents scored (the bootstrap's resampling unit)",
    # layers
    "layer": "the routed layer's name",
    "pairs": "selected (token, expert) pairs of real input tokens in the layer",
    "dropped": "real input tokens given no expert in the layer",
    "rows_computed": "expert rows the experts module computed (native: padding rows included)",
    "flops_per_pair": "FLOPs of one (token, expert) pair in the layer: 2 x multiply-adds of one expert",
    # generation
    "new_tokens": "greedy tokens generated per sequence through the KV cache",
    "sequences": "sequences generated (prompts: the first prompt_tokens tokens of the first documents)",
    "token_agreement": "fraction of generated tokens equal to native's continuation at the same position",
    "first_divergence": "mean over sequences of the index (0-based) of the first generated token differing from "
                        "native's; new_tokens when none differs",
    "decode_mismatch": "fraction of (fed generated token, layer) whose decode-time expert set differs from the "
                       "teacher-forced routing of the same sequence under the same setting",
    # documents
    "document": "the document's index among the scored documents (0-based, in input order)",
    "nll": "summed negative log-likelihood of the document's scored targets (nats)",
}
"""Column -> one-line definition with units, for every column of the frames of :class:`EvaluateResult`."""


# ----------------------------------------------------------------------------- result
@dataclass(frozen=True)
class EvaluateResult:
    """What :func:`evaluate` measured, as tidy pandas frames (columns defined in :attr:`definitions`).

    quality: one row per (label, corrupt). layers: one row per (label, corrupt, layer). generation: one row per
    label, or None when ``generate=0``. documents: one row per (label, corrupt, document): its summed nats and
    scored tokens (``nll``, ``tokens``), what a paired comparison of any two settings or another resampling unit
    starts from. model: name, family, layers, num_experts, k, parameters. settings: per setting
    ``RouterConfig.to_dict()`` plus its ``weights`` rule. definitions: column -> definition with units. config: the
    call's arguments (and the scored tokens and documents).
    """

    quality: Any
    layers: Any
    generation: Any
    model: dict
    settings: tuple[dict, ...]
    definitions: dict
    config: dict
    documents: Any = None

    def _repr_html_(self) -> str:
        """Jupyter's rich display (:func:`usmoe_lp.report.notebook_html.evaluate_result_html`)."""
        from usmoe_lp.report.notebook_html import evaluate_result_html

        return evaluate_result_html(self)

    def to_json(self) -> dict:
        """The JSON-ready dict: keys ``model``, ``settings``, ``quality``, ``layers``, ``generation``,
        ``documents``, ``definitions``, ``config`` (frames as lists of records; NaN as None)."""
        return json_ready({
            "model": self.model, "settings": list(self.settings),
            "quality": self.quality.to_dict("records"), "layers": self.layers.to_dict("records"),
            "generation": None if self.generation is None else self.generation.to_dict("records"),
            "documents": None if self.documents is None else self.documents.to_dict("records"),
            "definitions": self.definitions, "config": self.config})


# ----------------------------------------------------------------------------- bootstrap
def _multiplicities(documents: int, replicates: int, seed: int) -> np.ndarray:
    """(replicates, documents) float64: how often each document is drawn in each bootstrap replicate
    (``numpy.random.default_rng(seed).integers(0, documents, (replicates, documents))``)."""
    idx = np.random.default_rng(seed).integers(0, documents, size=(replicates, documents))
    flat = (idx + documents * np.arange(replicates)[:, None]).ravel()
    return np.bincount(flat, minlength=replicates * documents).reshape(replicates, documents).astype(np.float64)


def _interval(weights: np.ndarray, numerator: np.ndarray, denominator: np.ndarray,
              confidence: float) -> tuple[float, float]:
    if weights.shape[0] == 0:
        return float("nan"), float("nan")
    ratios = (weights @ numerator) / (weights @ denominator)
    low, high = np.quantile(ratios, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
    return float(low), float(high)


def bootstrap_ci(sums, counts, *, reference=None, replicates: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """The pooled ratio ``sum(sums) / sum(counts)`` over documents and its bootstrap percentile interval.

    Args:
        sums: (D,) per-document sums (e.g. nats over a document's targets). counts: (D,) > 0 per-document counts
            (its scored targets). reference: (D,) per-document sums of the reference (native) on the same
            documents, or None; when given, the statistic is the paired difference
            ``(sum(sums) - sum(reference)) / sum(counts)``, resampled on the same documents.
        replicates: bootstrap replicates (0: no interval, NaN). confidence: the interval's coverage, in (0, 1).
        seed: replicate r draws the documents ``numpy.random.default_rng(seed).integers(0, D, (replicates, D))[r]``.

    Returns:
        ``(estimate, low, high)``, the percentile interval's ends at ``(1 - confidence) / 2`` and
        ``(1 + confidence) / 2`` (``numpy.quantile``, linear interpolation; Efron & Tibshirani 1993, ch. 13).

    >>> bootstrap_ci([2.0, 6.0], [1, 1], replicates=2000)     # replicates: {2, 4, 6} with prob. 1/4, 1/2, 1/4
    (4.0, 2.0, 6.0)
    >>> bootstrap_ci([3.0, 5.0], [1, 1], reference=[1.0, 3.0], replicates=100)   # paired: always 2
    (2.0, 2.0, 2.0)
    """
    s = np.asarray(sums, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64)
    if s.ndim != 1 or s.shape != n.shape or s.size == 0:
        raise InvalidParameter(f"sums and counts must be non-empty 1-d arrays of one shape, got {s.shape}, {n.shape}")
    if not (n > 0).all():
        raise InvalidParameter("counts must be > 0 for every document")
    if reference is not None:
        r = np.asarray(reference, dtype=np.float64)
        if r.shape != s.shape:
            raise InvalidParameter(f"reference has shape {r.shape}, not {s.shape}")
        s = s - r
    replicates = check_int(replicates, "replicates", low=0)
    confidence = check_real(confidence, "confidence", low=0.0, high=1.0, low_open=True)
    weights = _multiplicities(s.size, replicates, check_int(seed, "seed", low=0))
    return (float(s.sum() / n.sum()), *_interval(weights, s, n, confidence))


# ----------------------------------------------------------------------------- grid, front
def _values(x) -> tuple:
    return tuple(x) if isinstance(x, Sequence) and not isinstance(x, str) else (x,)


def settings_grid(k: int, routers: Sequence[str], *, kbar=None, alpha=None, scope=None,
                  sweep: Mapping[str, Sequence] | None = None) -> tuple[RouterConfig, ...]:
    """The settings of ``routers`` for a model with top-``k`` routing, each router's parameters swept by
    :func:`usmoe_lp.routers.config.router_grid` (the one sweep definition: its defaults, e.g. ``kbar`` over
    :func:`~usmoe_lp.routers.config.default_kbars`, unless given). ``kbar``, ``alpha``, ``scope``: a value or a
    sequence, shorthands for ``sweep`` entries; a router without the parameter ignores it.

    >>> [c.label for c in settings_grid(2, ["native", "tc", "usmoe"], kbar=(1, 1.5), alpha=0.5)]
    ['native', 'tc k=2', 'usmoe a=0.5 kbar=1 seq', 'usmoe a=0.5 kbar=1.5 seq']
    """
    if isinstance(routers, str):
        routers = (routers,)
    grid: dict[str, Sequence] = dict(sweep or {})
    for name, value in (("kbar", kbar), ("alpha", alpha), ("scope", scope)):
        if value is not None:
            grid[name] = _values(value)
    out: list[RouterConfig] = []
    for name in routers:
        out.extend(router_grid(name, k, sweep=grid))
    return tuple(out)


def pareto_front(quality):
    """The rows of a ``quality`` frame not dominated in (``moe_flops_per_token``, ``ce``), per corruption rate:
    a row is dominated when another row of the same rate has no more FLOPs and no higher ce, and less of one.
    Sorted by rate, then FLOPs.

    >>> import pandas as pd
    >>> q = pd.DataFrame({"label": ["a", "b", "c", "d"], "corrupt": 0.0, "moe_flops_per_token": [1.0, 2.0, 2.0, 3.0],
    ...                   "ce": [3.0, 2.0, 2.5, 2.0]})
    >>> pareto_front(q)["label"].tolist()
    ['a', 'b']
    """
    if quality.empty:
        return quality.copy()
    keep = []
    for _, group in quality.groupby("corrupt", sort=True):
        f = group["moe_flops_per_token"].to_numpy(dtype=np.float64)
        c = group["ce"].to_numpy(dtype=np.float64)
        for i, index in enumerate(group.index):
            dominated = ((f <= f[i]) & (c <= c[i]) & ((f < f[i]) | (c < c[i]))).any()
            if not dominated and np.isfinite(f[i]) and np.isfinite(c[i]):
                keep.append(index)
    return quality.loc[keep].sort_values(["corrupt", "moe_flops_per_token", "ce"], kind="stable")


# ----------------------------------------------------------------------------- documents
def _byte_level(model) -> bool:
    """The model is byte-level as the tiny model is (:mod:`usmoe_lp.tiny.data`: vocabulary of 259, BOS, EOS)."""
    cfg = getattr(model, "config", None)
    return (getattr(cfg, "vocab_size", None) == VOCAB_SIZE and getattr(cfg, "bos_token_id", None) == BOS_ID
            and getattr(cfg, "eos_token_id", None) == EOS_ID)


def _encode(doc: Any, i: int, tokenizer: Any, byte_level: bool, vocab: int) -> torch.Tensor:
    if isinstance(doc, str) and tokenizer is not None:
        ids = list(tokenizer(doc)["input_ids"])
        bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        if eos is not None and (not ids or ids[-1] != eos):
            ids = [*ids, eos]
        out = torch.tensor(ids, dtype=torch.long)
    elif isinstance(doc, str | bytes):
        if not byte_level:
            raise InvalidParameter("documents are text but the model is not byte-level: pass tokenizer= (or token-id "
                                   "lists)")
        out = document_ids([doc]) if isinstance(doc, str) else torch.tensor([BOS_ID, *doc, EOS_ID], dtype=torch.long)
    else:
        try:
            out = torch.as_tensor(doc).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            raise InvalidParameter(f"documents[{i}] must be a str or a sequence of token ids, got "
                                   f"{type(doc).__name__}") from None
        if out.is_floating_point() or out.is_complex() or out.dtype == torch.bool:
            raise InvalidParameter(f"documents[{i}] must hold integer token ids, got {out.dtype}")
        out = out.long()
    if out.numel() and (int(out.min()) < 0 or int(out.max()) >= vocab):
        raise InvalidParameter(f"documents[{i}] has token ids outside 0..{vocab - 1} (the model's vocabulary)")
    return out


def _streams(model, documents, tokenizer, byte_level: bool, max_tokens: int | None) -> list[torch.Tensor]:
    if isinstance(documents, str | bytes) or not isinstance(documents, Sequence):
        raise InvalidParameter("documents must be a sequence of documents (str, or token-id lists), got "
                               f"{type(documents).__name__}")
    vocab = int(model.config.vocab_size)
    streams, total = [], 0
    for i, doc in enumerate(documents):
        ids = _encode(doc, i, tokenizer, byte_level, vocab)
        if max_tokens is not None:
            ids = ids[: max_tokens - total]
            total += int(ids.numel())
        streams.append(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    return streams


@dataclass
class _Batch:
    rows: torch.Tensor  # (B,) document of each window
    index: torch.Tensor  # (B, L) positions in the flat stream, 0 where padding
    real: torch.Tensor  # (B, L) bool
    scored: torch.Tensor  # (B, L - 1) bool: targets scored
    is_byte: torch.Tensor | None  # (B, L - 1) bool: byte targets (byte-level models)


def _plan(streams: list[torch.Tensor], seq_len: int, batch_size: int, byte_level: bool,
          bos: int | None) -> tuple[list[_Batch], torch.Tensor, np.ndarray, np.ndarray]:
    """Windows of every document (eval_windows on each stream's positions), longest first (stable), in batches;
    the flat clean stream; scored targets and byte targets per document."""
    offsets = np.cumsum([0] + [int(s.numel()) for s in streams])
    flat = torch.cat(streams) if streams else torch.zeros(0, dtype=torch.long)
    windows = [(d, w + int(offsets[d])) for d, s in enumerate(streams)
               for w in eval_windows(torch.arange(s.numel()), seq_len)]
    windows.sort(key=lambda item: -item[1].numel())
    counts = np.zeros(len(streams))
    nbytes = np.zeros(len(streams))
    batches = []
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        L = chunk[0][1].numel()
        index = torch.zeros(len(chunk), L, dtype=torch.long)
        real = torch.zeros(len(chunk), L, dtype=torch.bool)
        for row, (_, w) in enumerate(chunk):
            index[row, : w.numel()] = w
            real[row, : w.numel()] = True
        targets = flat[index[:, 1:]]
        if byte_level:
            scored, is_byte = scored_targets(targets)
            is_byte = is_byte & real[:, 1:]
        else:
            scored = targets != bos if bos is not None else torch.ones_like(targets, dtype=torch.bool)
            is_byte = None
        scored = scored & real[:, 1:]
        rows = torch.tensor([d for d, _ in chunk], dtype=torch.long)
        np.add.at(counts, rows.numpy(), scored.sum(1).numpy())
        if is_byte is not None:
            np.add.at(nbytes, rows.numpy(), is_byte.sum(1).numpy())
        batches.append(_Batch(rows, index, real, scored, is_byte))
    return batches, flat, counts, nbytes


# ----------------------------------------------------------------------------- progress
class _Progress:
    """A rich progress bar on stderr (or nothing)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self._bar = None
        if enabled and total > 0:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=Console(stderr=True))
            self._bar.start()
            self._task = self._bar.add_task("evaluate", total=total)

    def step(self, description: str, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=n, description=description)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


# ----------------------------------------------------------------------------- passes
def model_top_k(model, layers=None) -> int:
    """The model's experts per token k (the budget unit of every setting): the one k its routers record
    (``layers``: the route's :class:`~usmoe_lp.live.route.LiveLayer` list, found when not given);
    :class:`InvalidParameter` when they record none or several."""
    if layers is None:
        layers = route(model, NATIVE).layers
    ks = {layer.info.top_k for layer in layers if layer.info.top_k is not None}
    if len(ks) != 1:
        raise InvalidParameter(f"k: the model's routers record {'no k' if not ks else f'several k ({sorted(ks)})'}; "
                               "give the budget unit k")
    return ks.pop()


def _route(model, config: RouterConfig, weights: str, on_select=None) -> Route:
    return route(model, config, weights="model" if config.router == NATIVE else weights, on_select=on_select)


def _score_pass(model, config: RouterConfig, weights: str, batches: list[_Batch], flat_in: torch.Tensor,
                flat_clean: torch.Tensor, documents: int, pad: int, device, bar: _Progress, what: str):
    """One pass of every window under ``config``: per-document nats (all scored targets, byte targets), the
    route's stats and the forwards' wall time."""
    nll_doc = torch.zeros(documents, dtype=torch.float64)
    byte_doc = torch.zeros(documents, dtype=torch.float64)
    wall = 0.0
    with _route(model, config, weights) as r:
        for b in batches:
            inputs = torch.where(b.real, flat_in[b.index], torch.full_like(b.index, pad)).to(device)
            mask = None if bool(b.real.all()) else b.real.to(device=device, dtype=torch.long)
            t0 = time.perf_counter()
            logits = model(input_ids=inputs, attention_mask=mask, use_cache=False).logits
            wall += time.perf_counter() - t0
            targets = flat_clean[b.index[:, 1:]].to(device)
            B, L1 = targets.shape
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(B * L1, -1), targets.reshape(-1),
                                                    reduction="none").reshape(B, L1).double().cpu()
            nll_doc.index_add_(0, b.rows, torch.where(b.scored, nll, 0.0).sum(1))
            if b.is_byte is not None:
                byte_doc.index_add_(0, b.rows, torch.where(b.is_byte, nll, 0.0).sum(1))
            bar.step(what)
        stats = r.stats
    return nll_doc.numpy(), byte_doc.numpy(), stats, wall


class _Recorder:
    """Records each layer's selection of every forward of a route (its ``on_select`` callback)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, ctx, selection) -> None:
        self.calls.append((ctx.layer.name, bool(ctx.decode_step), selection.mask.detach().cpu(),
                           ctx.positions.detach().cpu(), ctx.real.detach().cpu()))

    def masks(self, rows: int, length: int, num_experts: dict[str, int]) -> dict[str, torch.Tensor]:
        """layer -> (rows, length, N) bool, each row's selection at each position of the recorded calls."""
        out = {name: torch.zeros(rows, length, n, dtype=torch.bool) for name, n in num_experts.items()}
        for name, _, mask, positions, real in self.calls:
            b, t = real.nonzero(as_tuple=True)
            keep = positions[b, t] < length
            out[name][b[keep], positions[b, t][keep]] = mask[b[keep], t[keep]]
        self.calls = []
        return out


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers < 4.56
        return DynamicCache()


def _cache_keyword(model) -> str:
    """``cache`` (transformers >= 5.24) or ``past_key_values``: the model's KV-cache argument."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _generate(model, config: RouterConfig, weights: str, prompts: torch.Tensor, new_tokens: int,
              device, bar: _Progress, what: str) -> tuple[torch.Tensor, float]:
    """Greedy continuation of ``prompts`` (G, P) by ``new_tokens`` tokens through the KV cache under ``config``,
    and the fraction of (fed generated token, layer) whose decode-time experts differ from the teacher-forced
    routing of prompt + continuation (NaN when no generated token is fed back, new_tokens = 1)."""
    G, P = prompts.shape
    recorder = _Recorder()
    with _route(model, config, weights, on_select=recorder) as r:
        sizes = {layer.info.name: layer.info.num_experts for layer in r.layers}
        cache = _new_cache(model)  # passed in from empty, as generate() does, so the route sees the decode steps
        key = _cache_keyword(model)
        out = model(input_ids=prompts.to(device), use_cache=True, **{key: cache})
        token = out.logits[:, -1].argmax(-1)
        generated = [token]
        bar.step(what)
        for _ in range(new_tokens - 1):
            out = model(input_ids=token[:, None], use_cache=True, **{key: cache})
            token = out.logits[:, -1].argmax(-1)
            generated.append(token)
            bar.step(what)
        gen = torch.stack(generated, dim=1).cpu()
        if new_tokens < 2:
            return gen, float("nan")
        length = P + new_tokens - 1
        decoded = recorder.masks(G, length, sizes)
        model(input_ids=torch.cat([prompts, gen[:, :-1]], dim=1).to(device), use_cache=False)
        forced = recorder.masks(G, length, sizes)
    differ = [(decoded[n][:, P:] != forced[n][:, P:]).any(dim=-1) for n in sizes]
    return gen, float(torch.stack(differ).double().mean())


# ----------------------------------------------------------------------------- evaluate
def _settings(settings, k: int) -> list[RouterConfig]:
    if isinstance(settings, RouterConfig | str):
        settings = (settings,)
    configs = []
    for i, s in enumerate(settings):
        if isinstance(s, str):
            s = RouterConfig(s, k)
        if not isinstance(s, RouterConfig):
            raise InvalidParameter(f"settings[{i}] must be a RouterConfig (or a router name), got {type(s).__name__}")
        if s.router == NATIVE and s.k != k:
            raise InvalidParameter(f"settings[{i}]: native replays the model's router, k = {k}, not {s.k}")
        configs.append(s)
    out = [RouterConfig(NATIVE, k)] + [c for c in configs if c.router != NATIVE]
    labels = [c.label for c in out]
    dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dupes:
        raise InvalidParameter(f"settings repeat {dupes}: each setting once")
    return out


def _model_info(model, layers) -> dict:
    cfg = getattr(model, "config", None)
    return {"name": getattr(cfg, "_name_or_path", "") or type(model).__name__,
            "family": getattr(cfg, "model_type", None), "layers": len(layers),
            "num_experts": layers[0].info.num_experts, "k": layers[0].info.top_k,
            "parameters": int(sum(p.numel() for p in model.parameters()))}


@torch.inference_mode()
def evaluate(model, documents, settings, *, tokenizer=None, seq_len: int = 256, batch_size: int = 8,
             corrupt: Sequence[float] = (0.0,), generate: int = 0, prompt_tokens: int = 64, bootstrap: int = 1000,
             confidence: float = 0.95, seed: int = 0, weights: str = "model", progress: bool | None = None,
             max_tokens: int | None = None) -> EvaluateResult:
    """Cross-entropy, its cost and its uncertainty under each router setting of a live MoE language model.

    Args:
        model: a transformers decoder-only MoE causal LM (the embedded :func:`usmoe_lp.tiny.load_tiny` model is the
            default case), any device and dtype; put in eval mode for the call.
        documents: a sequence of str (encoded with ``tokenizer``: its ids, with its BOS prepended and EOS appended
            where it has them and did not add them; without a tokenizer, ``[BOS] + UTF-8 bytes + [EOS]`` for a
            byte-level model, :func:`usmoe_lp.tiny.data.document_ids`) or of token-id sequences (taken as they
            are). Each document is scored on its own (module docstring).
        settings: :class:`~usmoe_lp.routers.RouterConfig` values (or router names, at the model's k);
            ``native`` is always evaluated, first, with the model's own weights: the reference of every delta.
        seq_len: window length in tokens (stride ``seq_len - 1``). batch_size: windows per forward (longest
            first, right-padded; a router whose group is the batch couples the windows of one forward).
        corrupt: input corruption rates, each in [0, 1] (:func:`usmoe_lp.live.corrupt.corrupt_tokens`: seeded
            by ``seed`` and the document's index; the vocabulary drawn from is bytes 0-255 for a byte-level model,
            else ``min(len(tokenizer), vocab_size)``).
        generate: N > 0: greedy continuations of N tokens through the KV cache for the first ``batch_size``
            documents of at least ``prompt_tokens`` tokens, prompted with their first ``prompt_tokens`` tokens.
        bootstrap: bootstrap replicates over documents (0: no intervals). confidence: the intervals' coverage.
        seed: seeds the corruption and the bootstrap. weights: the combine-weight rule of the settings other than
            native (:data:`usmoe_lp.live.WEIGHT_RULES`). progress: a progress bar on stderr (default: when stderr
            is a terminal). max_tokens: use the documents' tokens up to this many in all (the last one cut).

    Returns:
        An :class:`EvaluateResult` (columns: :data:`DEFINITIONS`).
    """
    seq_len = check_int(seq_len, "seq_len", low=2)
    batch_size = check_int(batch_size, "batch_size", low=1)
    rates = tuple(check_real(p, "corrupt", low=0.0, high=1.0) for p in _values(corrupt))
    if not rates or len(set(rates)) != len(rates):
        raise InvalidParameter(f"corrupt must be distinct rates in [0, 1], got {corrupt!r}")
    generate = check_int(generate, "generate", low=0)
    prompt_tokens = check_int(prompt_tokens, "prompt_tokens", low=1)
    bootstrap = check_int(bootstrap, "bootstrap", low=0)
    confidence = check_real(confidence, "confidence", low=0.0, high=1.0, low_open=True)
    if confidence >= 1.0:
        raise InvalidParameter(f"confidence must lie in (0, 1), got {confidence!r}")
    seed = check_int(seed, "seed", low=0)
    get_weight_rule(weights)
    if max_tokens is not None:
        max_tokens = check_int(max_tokens, "max_tokens", low=2)

    native_route = route(model, NATIVE)  # finds the layers (and refuses an unroutable model) up front
    layers = native_route.layers
    if not layers:
        raise InvalidParameter(f"{type(model).__name__} has no MoE router to route")
    configs = _settings(settings, model_top_k(model, layers))
    for c in configs:  # every setting's parameters checked against every layer before any forward
        route(model, c, weights="model" if c.router == NATIVE else weights)
    flops_pair = {lay.info.name: 2.0 * (expert_multiply_adds(lay.block.experts, lay.info.num_experts)
                                        if isinstance(getattr(lay.block, "experts", None), torch.nn.Module)
                                        else float("nan")) for lay in layers}

    byte_level = _byte_level(model)
    streams = [s for s in _streams(model, documents, tokenizer, byte_level, max_tokens) if s.numel() >= 2]
    if not streams:
        raise InvalidParameter("no document has 2 tokens or more: nothing to predict")
    bos = getattr(model.config, "bos_token_id", None)
    batches, flat_clean, counts, nbytes = _plan(streams, seq_len, batch_size, byte_level,
                                                bos if isinstance(bos, int) else None)
    keep = counts > 0  # documents without a scored target take no part in the bootstrap
    vocab = 256 if byte_level else min(int(model.config.vocab_size), len(tokenizer) if tokenizer is not None
                                       else int(model.config.vocab_size))
    pad = getattr(model.config, "pad_token_id", None)
    pad = pad if isinstance(pad, int) and 0 <= pad < int(model.config.vocab_size) else 0
    device = next(model.parameters()).device

    prompts = None
    if generate:
        long_enough = [s[:prompt_tokens] for s in streams if s.numel() >= prompt_tokens][:batch_size]
        if not long_enough:
            raise InvalidParameter(f"generate: no document has prompt_tokens = {prompt_tokens} tokens")
        prompts = torch.stack(long_enough)

    total = len(configs) * (len(rates) * len(batches) + (generate if generate else 0))
    bar = _Progress(sys.stderr.isatty() if progress is None else bool(progress), total)
    weights_mc = _multiplicities(int(keep.sum()), bootstrap, seed)
    was_training = model.training
    model.eval()
    quality, layer_rows, generation, doc_rows = [], [], [], []
    try:
        for rate in rates:
            flat_in = torch.cat([corrupt_tokens(s, rate, vocab, seed=seed, stream=d)[0]
                                 for d, s in enumerate(streams)])
            reference = None
            for c in configs:
                what = f"{c.label} p={rate:g}"
                nll, byte_nll, stats, wall = _score_pass(model, c, weights, batches, flat_in, flat_clean,
                                                         len(streams), pad, device, bar, what)
                nll, byte_nll, n = nll[keep], byte_nll[keep], counts[keep]
                doc_rows.extend({"label": c.label, "router": c.router, "corrupt": rate, "document": d,
                                 "nll": float(nll[d]), "tokens": int(n[d])} for d in range(nll.shape[0]))
                flops = sum(flops_pair[s.layer] * s.kbar for s in stats.layers if s.tokens)
                if reference is None:
                    reference = (nll, flops)
                ce = float(nll.sum() / n.sum())
                ce_native = float(reference[0].sum() / n.sum())
                low, high = _interval(weights_mc, nll, n, confidence)
                dlow, dhigh = _interval(weights_mc, nll - reference[0], n, confidence)
                delta = float((nll - reference[0]).sum() / n.sum())
                tokens = int(n.sum())
                quality.append({
                    "label": c.label, "router": c.router, "corrupt": rate, "ce": ce, "ce_low": low, "ce_high": high,
                    "bpb": float(byte_nll.sum() / nbytes.sum() / math.log(2)) if byte_level and nbytes.sum()
                    else float("nan"),
                    "delta_ce": delta, "delta_low": dlow, "delta_high": dhigh, "rel_delta": delta / ce_native,
                    "kbar": stats.kbar,
                    "pairs_per_token": stats.pairs / max(sum(s.tokens for s in stats.layers), 1) if stats.layers
                    else float("nan"),
                    "moe_flops_per_token": flops, "flops_vs_native": flops / reference[1] if reference[1] else
                    float("nan"), "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else float("nan"),
                    "tokens": tokens, "documents": int(keep.sum())})
                for s in stats.layers:
                    layer_rows.append({"label": c.label, "router": c.router, "corrupt": rate, "layer": s.layer,
                                       "kbar": s.kbar, "pairs": s.pairs, "tokens": s.tokens, "dropped": s.dropped,
                                       "rows_computed": s.rows_computed, "flops_per_pair": flops_pair[s.layer]})
        if generate:
            native_gen = None
            for c in configs:
                gen, mismatch = _generate(model, c, weights, prompts, generate, device, bar, f"{c.label} generate")
                if native_gen is None:
                    native_gen = gen
                same = gen == native_gen
                first = torch.where(same.all(dim=1), generate, (~same).int().argmax(dim=1))
                generation.append({"label": c.label, "router": c.router, "new_tokens": generate,
                                   "sequences": int(gen.shape[0]), "token_agreement": float(same.double().mean()),
                                   "first_divergence": float(first.double().mean()), "decode_mismatch": mismatch})
    finally:
        bar.close()
        if was_training:
            model.train()

    import pandas as pd

    config = {"seq_len": seq_len, "batch_size": batch_size, "corrupt": list(rates), "generate": generate,
              "prompt_tokens": prompt_tokens, "bootstrap": bootstrap, "confidence": confidence, "seed": seed,
              "weights": weights, "max_tokens": max_tokens, "byte_level": byte_level,
              "corrupt_vocab": vocab, "documents": int(keep.sum()), "tokens": int(counts.sum())}
    return EvaluateResult(
        quality=pd.DataFrame(quality), layers=pd.DataFrame(layer_rows),
        generation=pd.DataFrame(generation) if generate else None, model=_model_info(model, layers),
        settings=tuple({**c.to_dict(), "weights": "model" if c.router == NATIVE else weights} for c in configs),
        definitions=dict(DEFINITIONS), config=config, documents=pd.DataFrame(doc_rows))
