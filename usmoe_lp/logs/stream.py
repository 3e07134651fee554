"""Which tokens a forward of a model carries: batch shape, padding, sequence ids and positions, KV-cache decode steps.

Both hooks on a live model need this: :func:`usmoe_lp.logs.capture` (to log each real token with its sequence id and
position) and :func:`usmoe_lp.live.route` (to give a router the sequence structure and padding of the tokens it
routes, and to tell a prefill from a decode step). :class:`TokenStream` is the one implementation.

Per forward of the hooked module: :meth:`TokenStream.begin` reads the token ids and attention mask (1 = real token)
from the forward's arguments (or from :meth:`TokenStream.set_batch`) and finds the KV cache among them by what it is
(a ``transformers.cache_utils.Cache``, or any object with ``get_seq_length()``), whatever carries it (``cache=`` as
transformers >= 5.24 passes it, ``past_key_values=``, a positional argument). A forward whose cache is empty (or that
has none) starts new sequences. A forward whose cache already holds tokens is a decode step: the cache must be the one
the previous forward of this stream filled, untouched since (same object, same length, same tensors, same batch size);
its tokens (the new columns of the attention mask) continue their rows' sequences. Any other decode step raises the
stream's error class saying why. :meth:`TokenStream.finish` gives the forward's :class:`Tokens` (sequence ids and
positions of every (row, column), the padding mask) and records the stream for the next decode step.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Batch", "TokenStream", "Tokens", "find_cache"]


@dataclass
class Batch:
    """The token ids (B, T), attention mask (B, T) (1 = real) and shape of one forward, and its place in a stream."""

    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    shape: tuple[int, int] | None
    sequence_ids: torch.Tensor | None = None  # (B,) of a continued stream; None: new sequences
    start: torch.Tensor | None = None  # (B,) positions of each row's first token in this forward
    cache: Any = None  # the KV cache this forward fills (a weakref or the object), None: no stream
    width: int = 0  # tokens in the cache after this forward

    @property
    def decode_step(self) -> bool:
        """True when the forward continues sequences held in a KV cache."""
        return self.sequence_ids is not None

    def real_mask(self) -> torch.Tensor:
        """(B, T) bool on CPU, True for a real token (the attention mask; all True without one)."""
        b, t = self.shape
        if self.attention_mask is None:
            return torch.ones(b, t, dtype=torch.bool)
        return self.attention_mask.detach().cpu() != 0


@dataclass(frozen=True)
class Tokens:
    """Where the tokens of one forward sit: ``real`` (B, T) bool (False = padding), ``sequence_ids`` (B,) int64
    (running count of batch rows; a decode step keeps its prompt's), ``positions`` (B, T) int64 (real tokens before
    the token in its row, so left padding still starts at 0), ``decode_step`` (the forward continued a KV cache)."""

    real: torch.Tensor
    sequence_ids: torch.Tensor
    positions: torch.Tensor
    decode_step: bool



def _filled_outside(who: str, context: str) -> str:
    return f"it was filled outside {who} (before `{context}`, or by forwards of another model or stack)"


@dataclass
class _Stream:
    """Rows of the last forward that filled a KV cache, for the decode steps that follow it."""

    cache: Any  # a weakref to the cache (or the cache itself when it cannot be weakly referenced)
    sequence_ids: torch.Tensor  # (B,) int64
    next_position: torch.Tensor  # (B,) int64: each row's next position (its real tokens so far)
    width: int  # tokens in the cache after that forward
    snapshot: tuple[tuple[Any, int], ...] = ()  # _snapshot of the cache right after that forward

    def mismatch(self, cache: Any, past: int, rows: int, outside: str) -> str | None:
        """Why a forward over ``rows`` rows whose ``cache`` holds ``past`` tokens does not continue this stream;
        None when it does."""
        if _deref(self.cache) is not cache:
            return f"it is not the cache the last forward filled: {outside}"
        if rows != self.sequence_ids.numel():
            return (f"the batch has {rows} rows but the forward that filled the cache had "
                    f"{self.sequence_ids.numel()} (the batch size changed between the forwards)")
        if past != self.width:
            return (f"the last forward left {self.width} tokens in it (it was cropped, e.g. by assisted "
                    "decoding, or extended by forwards outside it)")
        if not _unchanged(self.snapshot, cache):
            return ("its contents were replaced between the forwards (beam search reorders its rows; cropping or "
                    "selecting rows rewrites it), so its rows are no longer the same sequences")
        return None


def _cache_type() -> type | None:
    """``transformers.cache_utils.Cache`` when transformers is loaded (no transformers cache exists otherwise)."""
    module = sys.modules.get("transformers.cache_utils")
    return getattr(module, "Cache", None)


_NOT_CACHES = (torch.Tensor, bool, int, float, str, type(None))


def _is_cache(value: Any, cache_type: type | None) -> bool:
    """A KV cache: a transformers ``Cache`` (``cache_type``, see :func:`_cache_type`), or any object with a callable
    ``get_seq_length`` (the caches of other libraries)."""
    if isinstance(value, _NOT_CACHES):
        return False
    return (cache_type is not None and isinstance(value, cache_type)) or callable(getattr(value, "get_seq_length",
                                                                                         None))


def find_cache(args: tuple, kwargs: Mapping[str, Any], error: type[Exception] = RuntimeError) -> Any:
    """The KV cache among a forward's arguments, whatever carries it (``cache=``, ``past_key_values=``, a positional
    argument); None when there is none. Two different caches raise ``error``."""
    cache_type = _cache_type()
    found = None
    for value in (*kwargs.values(), *args):
        if value is not found and _is_cache(value, cache_type):
            if found is not None:
                names = [k for k, v in kwargs.items() if v is found or v is value] or ["positional arguments"]
                raise error(f"the forward got two KV caches ({', '.join(names)}); cannot tell which one its "
                            "routers' tokens extend: pass one")
            found = value
    return found


def _cache_length(cache: Any) -> int | None:
    """Tokens held by a KV cache object, None when ``cache`` is None or cannot tell its length."""
    if cache is None:
        return None
    try:
        return int(cache.get_seq_length())
    except Exception:  # noqa: BLE001 - a cache that cannot tell its length starts a new batch
        return None


def _cache_tensors(cache: Any) -> list[torch.Tensor]:
    """The tensors of the first layer of a transformers cache (of its self-attention cache for an encoder-decoder
    one): what a beam-search reorder, a crop or a row selection replaces or rewrites in place between two forwards;
    [] for a cache without ``layers``."""
    layers = getattr(getattr(cache, "self_attention_cache", cache), "layers", None)
    if not isinstance(layers, list | tuple) or not layers:
        return []
    try:
        fields = vars(layers[0]).values()
    except TypeError:  # a layer with __slots__
        return []
    return [v for v in fields if isinstance(v, torch.Tensor)]


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference-mode tensor has no version counter: identity only
        return -1


def _snapshot(cache: Any) -> tuple[tuple[Any, int], ...]:
    """(weakref, version) of each of :func:`_cache_tensors`: a new tensor or an in-place write changes it."""
    return tuple((weakref.ref(t), _version(t)) for t in _cache_tensors(cache))


def _unchanged(snapshot: tuple[tuple[Any, int], ...], cache: Any) -> bool:
    now = _cache_tensors(cache)
    return len(now) == len(snapshot) and all(ref() is t and version == _version(t)
                                             for (ref, version), t in zip(snapshot, now, strict=True))


def _ref(obj: Any) -> Any:
    try:
        return weakref.ref(obj)
    except TypeError:
        return obj


def _deref(ref: Any) -> Any:
    return ref() if isinstance(ref, weakref.ref) else ref


class TokenStream:
    """The token stream of one hooked module (the top model, or one stack of an encoder-decoder model).

    ``prefix``: the prefix of the argument names to read (``"decoder_"`` for the decoder stack seen from the top
    model of an encoder-decoder model). ``track_cache``: follow KV-cache decode steps (False for an encoder).
    ``error``: the exception class raised for a decode step that continues no sequence of this stream.
    ``who`` and ``context``: the caller and how it is entered, for messages (``"the capture"``,
    ``"with capture(...)"``).
    """

    def __init__(self, *, prefix: str = "", track_cache: bool = True, error: type[Exception] = RuntimeError,
                 who: str = "the hooks", context: str = "the context") -> None:
        self.prefix = prefix
        self.track_cache = track_cache
        self.error = error
        self.context = context
        self.who = who
        self.sequences = 0
        self._pending: Batch | None = None
        self._stream: _Stream | None = None

    def set_batch(self, input_ids: Any = None, attention_mask: Any = None, *, what: str = "set_batch") -> None:
        """Token ids (B, T) and attention mask (B, T), 1 = real token, for the next forward (instead of reading
        them from its arguments). Either may be None."""
        ids = None if input_ids is None else torch.as_tensor(input_ids)
        mask = None if attention_mask is None else torch.as_tensor(attention_mask)
        for name, t in (("input_ids", ids), ("attention_mask", mask)):
            if t is not None and t.ndim != 2:
                raise self.error(f"{what}: {name} must be (B, T), got {tuple(t.shape)}")
        if ids is not None and mask is not None and ids.shape != mask.shape:
            raise self.error(f"{what}: input_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} "
                             "differ in shape")
        ref = ids if ids is not None else mask
        self._pending = Batch(ids, mask, None if ref is None else (int(ref.shape[0]), int(ref.shape[1])))

    def begin(self, args: tuple, kwargs: Mapping[str, Any]) -> Batch:
        """The :class:`Batch` of a forward about to run, from :meth:`set_batch` or its arguments; a decode step is
        checked against the stream (see the module docstring)."""
        if self._pending is not None:
            batch, self._pending = self._pending, None
        else:
            batch = self._batch_from(args, kwargs)
        if self.track_cache and batch.shape is not None:
            self._track_cache(batch, find_cache(args, kwargs, self.error))
        return batch

    def _batch_from(self, args: tuple, kwargs: Mapping[str, Any]) -> Batch:
        prefix = self.prefix
        ids = kwargs.get(prefix + "input_ids")
        if ids is None and not prefix and args and isinstance(args[0], torch.Tensor):
            ids = args[0]
        mask = kwargs.get(prefix + "attention_mask")
        if mask is None and not prefix and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]
        embeds = kwargs.get(prefix + "inputs_embeds")
        if isinstance(ids, torch.Tensor) and (ids.is_floating_point() or ids.is_complex()):
            ids, embeds = None, ids  # a plain torch model called on hidden states
        ref = ids if isinstance(ids, torch.Tensor) else mask if isinstance(mask, torch.Tensor) else embeds
        shape = None
        if isinstance(ref, torch.Tensor) and ref is embeds:
            shape = (1, int(ref.shape[0])) if ref.ndim == 2 else tuple(ref.shape[:2]) if ref.ndim == 3 else None
        elif isinstance(ref, torch.Tensor):
            shape = (int(ref.shape[0]), int(ref.shape[1])) if ref.ndim == 2 else None
        return Batch(ids if isinstance(ids, torch.Tensor) else None,
                     mask if isinstance(mask, torch.Tensor) else None, shape)

    def _track_cache(self, batch: Batch, cache: Any) -> None:
        past = _cache_length(cache)
        if past is None:
            self._stream = None
            return
        b, t = batch.shape
        if past > 0:
            stream = self._stream
            outside = _filled_outside(self.who, self.context)
            why = outside if stream is None else stream.mismatch(cache, past, b, outside)
            if why is not None:
                raise self.error(
                    f"a forward with a KV cache already holding {past} tokens does not continue a sequence "
                    f"{self.who} saw: {why}. generate() (greedy or sampling, num_beams=1) and decode loops work "
                    f"when their cache is filled inside `{self.context}` from empty")
            mask = batch.attention_mask
            if mask is not None and mask.ndim == 2 and mask.shape[0] == b and mask.shape[1] == past + t:
                batch.attention_mask = mask[:, past:]  # the columns of this forward's tokens
            batch.sequence_ids, batch.start = stream.sequence_ids, stream.next_position
        batch.cache, batch.width = _ref(cache), past + t

    def tokens(self, batch: Batch) -> Tokens:
        """The :class:`Tokens` of ``batch`` (without recording it: see :meth:`finish`)."""
        if batch is None or batch.shape is None:
            raise self.error("the batch shape is unknown: call the model with input_ids= (or inputs_embeds=), or "
                             "call set_batch(input_ids, attention_mask) before the forward")
        b, t = batch.shape
        mask = batch.real_mask()
        if tuple(mask.shape) != (b, t):
            hint = ("; a 4-D mask (generate() builds one for a static cache) does not say which tokens are padding: "
                    "use the default dynamic cache" if mask.ndim == 4 else "")
            raise self.error(f"attention_mask {tuple(mask.shape)} does not match the batch {b}x{t}{hint}")
        if batch.sequence_ids is None:
            rows = self.sequences + torch.arange(b, dtype=torch.int64)
            start = torch.zeros(b, dtype=torch.int64)
        else:
            rows, start = batch.sequence_ids, batch.start
        positions = start.unsqueeze(1) + torch.cumsum(mask.long(), dim=1) - 1
        return Tokens(real=mask, sequence_ids=rows, positions=positions, decode_step=batch.decode_step)

    def finish(self, batch: Batch, tokens: Tokens) -> None:
        """Record a forward that completed: count its new sequences and keep its cache for the next decode step."""
        if batch.sequence_ids is None:
            self.sequences += batch.shape[0]
        start = tokens.positions[:, :1] + 1 - tokens.real[:, :1].long()  # each row's first position
        self._stream = None if batch.cache is None else _Stream(
            batch.cache, tokens.sequence_ids, start[:, 0] + tokens.real.long().sum(1), batch.width,
            _snapshot(_deref(batch.cache)))

    def reset(self) -> None:
        """Forget the stream (a forward that raised)."""
        self._stream = None
