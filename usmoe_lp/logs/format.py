"""The router-log format: names, the manifest, and atomic file writes.

A router log is a directory::

    LOG/
      manifest.json                  the Manifest below, rewritten atomically after every shard
      shards/00000.safetensors       tokens [0, n0): logits.<layer> (n0, N) in the captured dtype,
      shards/00001.safetensors       token_ids, sequence_ids, positions (n0,) int64, and optionally
      ...                            selected.<layer>, weights.<layer>, hidden.<layer> (n0, ...)
      router_weights.safetensors     optional: <layer> -> (N, d) router weight per layer

A *selection log* (``manifest.content == "selection"``, format version 2) holds no logits: only the experts
each token was routed to, ``selected.<layer>`` (n0, k) integer expert ids (best first where the source
ranks them, -1 for an empty slot), optionally ``weights.<layer>``, beside the token metadata. It is what
serving and training stacks record (SGLang, vLLM, Megatron-Core, the OLMoE scripts): every statistic that
needs no logits can be computed from it (:mod:`usmoe_lp.logs.foreign` imports them). Logits logs keep
format version 1, so the logs of earlier versions of usmoe-lp and the logs they read are unchanged.

Shards cover consecutive, non-overlapping token ranges ``[token_start, token_stop)`` from 0 to
``num_tokens``. The manifest lists each shard with its sha256 and size in bytes; a shard file on
disk that the manifest does not list (one in flight at a crash) is not part of the log.
``manifest.tensors`` is the schema every shard follows: tensor name -> dtype and the shape of one
row (a shard of n tokens holds that tensor with shape ``(n, *row_shape)``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from usmoe_lp.logs.errors import CorruptLog, InvalidLogInput, UnsupportedVersion
from usmoe_lp.staging import fsync_dir

FORMAT_VERSION = 2
"""The highest format version this usmoe-lp reads: 1 (logits logs) and 2 (selection logs)."""
CONTENTS = ("logits", "selection")
"""What a router log holds per layer (``Manifest.content``): the router logits, or only the selected experts."""
CONTENT_VERSIONS = {"logits": 1, "selection": 2}
"""The format version a log of each content is written with (the oldest usmoe-lp that reads it)."""
FORMAT_NAME = "usmoe-lp router log"
MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
SHARD_SUFFIX = ".safetensors"
TMP_SUFFIX = ".tmp"
ROUTER_WEIGHTS_NAME = "router_weights.safetensors"

LOGITS = "logits."
SELECTED = "selected."
WEIGHTS = "weights."
HIDDEN = "hidden."
METADATA_TENSORS = ("token_ids", "sequence_ids", "positions")
SCORE_FUNCTIONS = ("softmax", "sigmoid", "softmax_topk", "unknown")
SELECTION_SCORES = ("softmax", "sigmoid", "logits")
"""What a model's top-k ranks (``LayerInfo.selection_score``): the softmax or the sigmoid of the logits, or the
raw logits."""
WEIGHT_FUNCTIONS = ("softmax", "sigmoid", "softmax_topk", "sparsemixer")
"""How a model computes the combine weight of a selected expert (``LayerInfo.weight_function``)."""
GROUP_SCORES = ("top2_sum", "max")
"""How a group of experts is scored for group-limited routing (``LayerInfo.group_score``)."""
SCORE_DTYPES = ("float64", "float32", "bfloat16", "float16")
"""Floating dtypes a model may rank its selection scores in (``LayerInfo.score_dtype``)."""

SHARD_FILE_RE = re.compile(r"^shards/(\d{5,})\.safetensors$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

# safetensors header dtype codes <-> torch dtype names used in the manifest
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
_TORCH_DTYPES = {name: getattr(torch, name) for name in SAFETENSORS_DTYPES.values()}


def shard_file(index: int) -> str:
    """Relative path of shard ``index``: ``shard_file(3) == "shards/00003.safetensors"``."""
    return f"{SHARDS_DIR}/{index:05d}{SHARD_SUFFIX}"


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``; raises :class:`InvalidLogInput` for dtypes the log cannot hold."""
    name = str(dtype).removeprefix("torch.")
    if name not in _TORCH_DTYPES:
        raise InvalidLogInput(f"dtype {dtype} cannot be stored in a router log; use one of {sorted(_TORCH_DTYPES)}")
    return name


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (the inverse of :func:`dtype_name`)."""
    try:
        return _TORCH_DTYPES[name]
    except KeyError:
        raise InvalidLogInput(f"unknown dtype name {name!r}; known: {sorted(_TORCH_DTYPES)}") from None


# ----------------------------------------------------------------------------- records
@dataclass(frozen=True)
class ModelInfo:
    """The captured model: its name (e.g. a hub id), family (``"mixtral"``) and revision, if known."""

    name: str | None = None
    family: str | None = None
    revision: str | None = None


@dataclass(frozen=True)
class LayerInfo:
    """One MoE layer of the log, and the routing semantics of the model's router there.

    ``name`` keys the layer in the log (tensor ``logits.<name>``, shape (tokens, num_experts));
    ``module_path`` is the module in the model (``"model.layers.3.mlp.gate"``); ``top_k`` the
    experts per token the model uses (None if unknown).

    How the model selects its ``top_k`` experts from a token's logits z (N values), step by step
    (read by the registry's ``native`` router, :mod:`usmoe_lp.routers.entries.native`; ``capture``
    records every field from the model's config and modules):

    * ``score_function``: the model's routing distribution, one of :data:`SCORE_FUNCTIONS`:
      ``softmax``, ``sigmoid`` (DeepSeek-V3 style), ``softmax_topk`` (top-k of the logits, then a
      softmax over the k: GPT-OSS, Granite) or ``unknown``.
    * ``selection_score``: what the top-k ranks, one of :data:`SELECTION_SCORES`: ``softmax`` or
      ``sigmoid`` of z, or the raw ``logits`` (GPT-OSS, Granite, Llama-4, PhiMoE). None: unknown,
      then it follows ``score_function`` (``softmax_topk`` ranks the logits): :attr:`selection`.
    * ``score_dtype``: the floating dtype the model ranks those scores in, one of
      :data:`SCORE_DTYPES` (``float32`` where the router computes in float32 whatever the model's
      dtype, as most do; the model's dtype where it does not, as DBRX and LFM2-MoE). None: unknown
      (the scores are then ranked in float64, exactly).
    * ``selection_bias``: a per-expert bias (length N) added to the scores for selection only
      (DeepSeek-V3's ``e_score_correction_bias``; ERNIE-4.5, LFM2-MoE, LongCat, MiniMax-M2, HY-V3).
      A list is stored as a tuple, so the record stays immutable.
    * group-limited routing (DeepSeek-V2/V3, GLM-4-MoE, dots1, EXAONE-MoE): the N experts form
      ``n_group`` groups of N / n_group consecutive experts; each group is scored by
      ``group_score`` (:data:`GROUP_SCORES`: ``top2_sum``, the sum of its two best biased scores,
      DeepSeek-V3 and its followers; ``max``, its best score, DeepSeek-V2's
      ``group_limited_greedy``), the ``topk_group`` best groups are kept and the top-k is taken
      over their experts only. ``topk_group`` None or equal to ``n_group``: no group limit.
    * ``expert_capacity``: Switch Transformers' fixed capacity (tokens per expert in one row of a
      forward's batch); a token whose expert already took ``expert_capacity`` earlier tokens of the
      row (position order) is dropped: it gets no expert. None: no capacity.

    What the model then applies (the combine weights; not needed to reproduce the selection):

    * ``weight_function`` (:data:`WEIGHT_FUNCTIONS`): the weight of a selected expert is its
      ``softmax`` probability or its ``sigmoid``, without the bias; ``softmax_topk``: a softmax over
      the selected logits; ``sparsemixer``: PhiMoE's (with ``sparsemixer_eps``, its jitter
      threshold). None: unknown, then it follows ``score_function``: :attr:`weights`.
    * ``norm_topk_prob``: whether the selected weights are divided by their ``norm_topk_p``-norm
      (1: their sum; DBRX's ``moe_normalize_expert_weights``); None: unknown.
    * ``routed_scaling_factor``: the factor the weights are multiplied by last.
    * ``num_shared_experts``: experts every token gets besides the routed ones; they have no column
      in the router logits.

    A manifest written before these fields reads with the defaults: selection from
    ``score_function``, no group limit, no capacity, no shared experts, weights scaled by 1.
    Jitter noise (training only) and a bias inside the router's Linear (already in the logits) need
    no field.
    """

    name: str
    _: KW_ONLY
    num_experts: int
    top_k: int | None = None
    module_path: str = ""
    score_function: str = "unknown"
    selection_bias: tuple[float, ...] | None = None
    selection_score: str | None = None
    score_dtype: str | None = None
    n_group: int = 1
    topk_group: int | None = None
    group_score: str | None = None
    expert_capacity: int | None = None
    weight_function: str | None = None
    sparsemixer_eps: float | None = None
    norm_topk_prob: bool | None = None
    norm_topk_p: float = 1.0
    routed_scaling_factor: float = 1.0
    num_shared_experts: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or self.name != self.name.strip() or "/" in self.name:
            raise InvalidLogInput(f"layer name must be a non-empty string without '/' or surrounding spaces, "
                                  f"got {self.name!r}")
        where = f"layer {self.name!r}"
        if not _is_int(self.num_experts) or self.num_experts < 1:
            raise InvalidLogInput(f"{where}: num_experts must be an integer >= 1, got {self.num_experts!r}")
        n = self.num_experts
        if self.top_k is not None and (not _is_int(self.top_k) or not 1 <= self.top_k <= n):
            raise InvalidLogInput(f"{where}: top_k must be None or an integer in 1..{n}, got {self.top_k!r}")
        if not isinstance(self.module_path, str):
            raise InvalidLogInput(f"{where}: module_path must be a string, got {self.module_path!r}")
        for key, allowed, optional in (("score_function", SCORE_FUNCTIONS, False),
                                       ("selection_score", SELECTION_SCORES, True),
                                       ("score_dtype", SCORE_DTYPES, True), ("group_score", GROUP_SCORES, True),
                                       ("weight_function", WEIGHT_FUNCTIONS, True)):
            value = getattr(self, key)
            if not ((optional and value is None) or (isinstance(value, str) and value in allowed)):
                raise InvalidLogInput(f"{where}: {key} must be {'None or ' if optional else ''}one of {allowed}, "
                                      f"got {value!r}")
        if self.selection_bias is not None:
            bias = _finite_numbers(self.selection_bias)
            if bias is None or len(bias) != n:
                got = f"{len(bias)} numbers" if bias is not None else _shown(self.selection_bias)
                raise InvalidLogInput(f"{where}: selection_bias must be {n} finite numbers (one per expert), got {got}")
            object.__setattr__(self, "selection_bias", bias)
        if not _is_int(self.n_group) or self.n_group < 1 or n % self.n_group:
            raise InvalidLogInput(f"{where}: n_group must be an integer >= 1 dividing num_experts = {n}, "
                                  f"got {self.n_group!r}")
        if self.topk_group is not None and (not _is_int(self.topk_group) or not 1 <= self.topk_group <= self.n_group):
            raise InvalidLogInput(f"{where}: topk_group must be None or an integer in 1..n_group = {self.n_group}, "
                                  f"got {self.topk_group!r}")
        if self.group_score == "top2_sum" and self.n_group > 1 and n // self.n_group < 2:
            raise InvalidLogInput(f"{where}: group_score 'top2_sum' needs at least 2 experts per group; "
                                  f"{n} experts in {self.n_group} groups have {n // self.n_group}")
        for key in ("expert_capacity", "num_shared_experts"):
            value = getattr(self, key)
            if not ((value is None and key == "expert_capacity") or (_is_int(value) and value >= 0)):
                raise InvalidLogInput(f"{where}: {key} must be {'None or ' if key == 'expert_capacity' else ''}an "
                                      f"integer >= 0, got {value!r}")
        if self.norm_topk_prob is not None and not isinstance(self.norm_topk_prob, bool):
            raise InvalidLogInput(f"{where}: norm_topk_prob must be None, True or False, got {self.norm_topk_prob!r}")
        for key, low, optional in (("sparsemixer_eps", 0.0, True), ("norm_topk_p", None, False),
                                   ("routed_scaling_factor", None, False)):
            value = getattr(self, key)
            if optional and value is None:
                continue
            if not _is_number(value) or (low is not None and value < low) or (key == "norm_topk_p" and value <= 0):
                bound = " >= 0" if low is not None else " > 0" if key == "norm_topk_p" else ""
                raise InvalidLogInput(f"{where}: {key} must be {'None or ' if optional else ''}a finite number{bound}, "
                                      f"got {value!r}")
            object.__setattr__(self, key, float(value))

    @property
    def group_limited(self) -> bool:
        """Whether the top-k is limited to the ``topk_group`` best of ``n_group`` groups of experts."""
        return self.n_group > 1 and self.topk_group is not None and self.topk_group < self.n_group

    @property
    def selection(self) -> str | None:
        """What the top-k ranks (:data:`SELECTION_SCORES`): ``selection_score``, or where unrecorded the one
        ``score_function`` implies (``softmax_topk``: the logits); None when neither is known."""
        if self.selection_score is not None:
            return self.selection_score
        return {"softmax": "softmax", "sigmoid": "sigmoid", "softmax_topk": "logits"}.get(self.score_function)

    @property
    def weights(self) -> str | None:
        """How the combine weights are computed (:data:`WEIGHT_FUNCTIONS`): ``weight_function``, or where
        unrecorded the one ``score_function`` implies; None when neither is known."""
        if self.weight_function is not None:
            return self.weight_function
        return {"softmax": "softmax", "sigmoid": "sigmoid", "softmax_topk": "softmax_topk"}.get(self.score_function)


def _finite_numbers(values: Any) -> tuple[float, ...] | None:
    """``values`` (a sequence, array or tensor of real numbers) as a tuple of floats; None unless all are finite
    numbers (a string is not a sequence of numbers here, nor is a bool a number)."""
    if isinstance(values, (str, bytes, dict)):
        return None
    try:
        items = list(values)
    except TypeError:
        return None
    out = []
    for b in items:
        if isinstance(b, (str, bytes, bool)):
            return None
        try:
            x = float(b)
        except (TypeError, ValueError, RuntimeError):
            return None
        if not math.isfinite(x):
            return None
        out.append(x)
    return tuple(out)


@dataclass(frozen=True)
class TensorSpec:
    """Schema of one tensor in every shard: dtype name and the shape of one token's row."""

    dtype: str
    row_shape: tuple[int, ...]


@dataclass(frozen=True)
class ShardInfo:
    """One completed shard: tokens ``[token_start, token_stop)`` in ``file`` (relative to the log)."""

    file: str
    token_start: int
    token_stop: int
    sha256: str
    bytes: int

    @property
    def num_tokens(self) -> int:
        return self.token_stop - self.token_start


@dataclass(frozen=True)
class FileInfo:
    """A checksummed file of the log other than a shard (``router_weights.safetensors``)."""

    file: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """The content of ``manifest.json``.

    ``dtype`` is the logits dtype name (None before the first token, and always for a selection log);
    ``tensors`` maps tensor name -> :class:`TensorSpec`; ``shards`` are contiguous from token 0 to
    ``num_tokens``; ``complete`` is False until the writer closed cleanly (a crashed capture leaves it
    False). ``content``: ``"logits"`` or ``"selection"`` (:data:`CONTENTS`; the module docstring).
    """

    model: ModelInfo
    layers: tuple[LayerInfo, ...]
    dtype: str | None = None
    num_tokens: int = 0
    tensors: dict[str, TensorSpec] = field(default_factory=dict)
    shards: tuple[ShardInfo, ...] = ()
    router_weights: FileInfo | None = None
    capture: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    device: str | None = None
    created: str | None = None
    complete: bool = False
    format_version: int = 1
    content: str = "logits"

    @property
    def has_logits(self) -> bool:
        """False for a selection log (no ``logits.<layer>`` tensors)."""
        return self.content == "logits"

    def layer(self, name: str) -> LayerInfo:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "content": self.content,
            "model": dataclasses.asdict(self.model),
            "layers": [{**dataclasses.asdict(layer),
                        "selection_bias": None if layer.selection_bias is None else list(layer.selection_bias)}
                       for layer in self.layers],
            "dtype": self.dtype,
            "num_tokens": self.num_tokens,
            "tensors": {k: {"dtype": v.dtype, "row_shape": list(v.row_shape)} for k, v in self.tensors.items()},
            "shards": [dataclasses.asdict(s) for s in self.shards],
            "router_weights": None if self.router_weights is None else dataclasses.asdict(self.router_weights),
            "capture": self.capture,
            "versions": self.versions,
            "device": self.device,
            "created": self.created,
            "complete": self.complete,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = MANIFEST_NAME) -> Manifest:
        """Parse and check a manifest; errors name ``source`` (the manifest's path).

        Raises :class:`UnsupportedVersion` for a newer format, :class:`CorruptLog` for anything else.
        """
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptLog(f"{source}: not valid JSON ({exc}); the manifest is damaged") from None
        return cls.from_dict(data, source)

    @classmethod
    def from_dict(cls, data: Any, source: str = MANIFEST_NAME) -> Manifest:
        return _parse_manifest(data, source)


# ----------------------------------------------------------------------------- schema
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _is_timestamp(v: Any) -> bool:
    try:
        datetime.fromisoformat(v)
    except (TypeError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Kind:
    """A type of manifest value: ``name`` says it in messages, ``test`` accepts the parsed JSON value."""

    name: str
    test: Callable[[Any], bool]

    def optional(self) -> Kind:
        return Kind(f"null or {self.name}", lambda v, test=self.test: v is None or test(v))


STRING = Kind("a string", lambda v: isinstance(v, str))
BOOLEAN = Kind("true or false (a JSON boolean)", lambda v: isinstance(v, bool))
COUNT = Kind("an integer >= 0", lambda v: _is_int(v) and v >= 0)
POSITIVE = Kind("an integer >= 1", lambda v: _is_int(v) and v >= 1)
OBJECT = Kind("an object", lambda v: isinstance(v, dict))
LIST = Kind("a list", lambda v: isinstance(v, list))
SHA256 = Kind("64 lowercase hex digits", lambda v: isinstance(v, str) and bool(_SHA256_RE.match(v)))
DTYPE = Kind(f"a dtype name ({', '.join(sorted(SAFETENSORS_DTYPES.values()))})",
             lambda v: isinstance(v, str) and v in SAFETENSORS_DTYPES.values())
ROW_SHAPE = Kind("a list of integers >= 0", lambda v: isinstance(v, list) and all(COUNT.test(d) for d in v))
NUMBERS = Kind("a list of finite numbers", lambda v: isinstance(v, list) and all(_is_number(b) for b in v))
TIMESTAMP = Kind("an ISO 8601 date and time", lambda v: isinstance(v, str) and _is_timestamp(v))
STRING_MAP = Kind("an object of strings", lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()))
SHARD_PATH = Kind("a path of the form shards/NNNNN.safetensors",
                  lambda v: isinstance(v, str) and bool(SHARD_FILE_RE.match(v)))
NUMBER = Kind("a finite number", _is_number)


def one_of(values: tuple[str, ...]) -> Kind:
    """The :class:`Kind` of a string that must be one of ``values``."""
    return Kind(f"one of {', '.join(values)}", lambda v, values=values: isinstance(v, str) and v in values)


SCORE_FUNCTION = one_of(SCORE_FUNCTIONS)


@dataclass(frozen=True)
class Field:
    """One field of a manifest object: its key, its :class:`Kind`, and the default when it may be absent."""

    key: str
    kind: Kind
    required: bool = True
    default: Any = None


#: The manifest's schema, one table per JSON object. The parser reads every field through these
#: tables; a missing required field or a value of the wrong kind is a :class:`CorruptLog` naming
#: the file and the field. Cross-field rules (shards contiguous, layer names distinct, ...) follow.
MANIFEST_FIELDS = (
    Field("format", Kind(repr(FORMAT_NAME), lambda v: v == FORMAT_NAME), required=False, default=FORMAT_NAME),
    Field("format_version", POSITIVE),
    Field("model", OBJECT),
    Field("layers", LIST),
    Field("dtype", DTYPE.optional(), required=False),
    Field("num_tokens", COUNT),
    Field("tensors", OBJECT),
    Field("shards", LIST),
    Field("router_weights", OBJECT.optional(), required=False),
    Field("capture", OBJECT.optional(), required=False),
    Field("versions", STRING_MAP.optional(), required=False),
    Field("device", STRING.optional(), required=False),
    Field("created", TIMESTAMP.optional(), required=False),
    Field("complete", BOOLEAN, required=False, default=False),
    Field("content", one_of(CONTENTS), required=False, default="logits"),
)
MODEL_FIELDS = tuple(Field(key, STRING.optional(), required=False) for key in ("name", "family", "revision"))
LAYER_FIELDS = (
    Field("name", STRING),
    Field("num_experts", POSITIVE),
    Field("top_k", POSITIVE.optional(), required=False),
    Field("module_path", STRING, required=False, default=""),
    Field("score_function", SCORE_FUNCTION, required=False, default="unknown"),
    Field("selection_bias", NUMBERS.optional(), required=False),
    Field("selection_score", one_of(SELECTION_SCORES).optional(), required=False),
    Field("score_dtype", one_of(SCORE_DTYPES).optional(), required=False),
    Field("n_group", POSITIVE, required=False, default=1),
    Field("topk_group", POSITIVE.optional(), required=False),
    Field("group_score", one_of(GROUP_SCORES).optional(), required=False),
    Field("expert_capacity", COUNT.optional(), required=False),
    Field("weight_function", one_of(WEIGHT_FUNCTIONS).optional(), required=False),
    Field("sparsemixer_eps", NUMBER.optional(), required=False),
    Field("norm_topk_prob", BOOLEAN.optional(), required=False),
    Field("norm_topk_p", NUMBER, required=False, default=1.0),
    Field("routed_scaling_factor", NUMBER, required=False, default=1.0),
    Field("num_shared_experts", COUNT, required=False, default=0),
)
"""The fields of one ``layers[i]`` object: :class:`LayerInfo`'s, each optional but ``name`` and ``num_experts``
(a manifest written before the routing-semantics fields reads with their defaults)."""
TENSOR_FIELDS = (Field("dtype", DTYPE), Field("row_shape", ROW_SHAPE))
SHARD_FIELDS = (Field("file", SHARD_PATH), Field("token_start", COUNT), Field("token_stop", COUNT),
                Field("sha256", SHA256), Field("bytes", POSITIVE))
FILE_FIELDS = (Field("file", Kind(repr(ROUTER_WEIGHTS_NAME), lambda v: v == ROUTER_WEIGHTS_NAME)),
               Field("sha256", SHA256), Field("bytes", POSITIVE))


def _read_fields(obj: Any, table: tuple[Field, ...], where: str, bad: Callable[[str], CorruptLog]) -> dict[str, Any]:
    """The fields of ``table`` from the JSON object ``obj`` (``where``: its path, e.g. ``"shards[2]."``)."""
    if not isinstance(obj, dict):
        raise bad(f"field {where.rstrip('.') or 'top level'} is {_shown(obj)}, expected an object")
    out = {}
    for f in table:
        if f.key not in obj:
            if f.required:
                raise bad(f"field {where}{f.key} is missing")
            out[f.key] = f.default
            continue
        value = obj[f.key]
        if not f.kind.test(value):
            raise bad(f"field {where}{f.key} is {_shown(value)}, expected {f.kind.name}")
        out[f.key] = f.default if value is None and f.default is not None else value
    return out


def _shown(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return text if len(text) <= limit else text[:limit] + "..."


# ----------------------------------------------------------------------------- parsing
def _parse_manifest(data: Any, source: str) -> Manifest:
    def bad(what: str) -> CorruptLog:
        return CorruptLog(f"{source}: {what}; the manifest is damaged or not a usmoe-lp router log")

    if not isinstance(data, dict):
        raise bad("top level is not a JSON object")
    version = data.get("format_version")
    if _is_int(version) and version > FORMAT_VERSION:
        raise UnsupportedVersion(f"{source} was written by format version {version}; this usmoe-lp reads up to "
                                 f"{FORMAT_VERSION}: upgrade usmoe-lp to read it")
    top = _read_fields(data, MANIFEST_FIELDS, "", bad)
    model_info = ModelInfo(**_read_fields(top["model"], MODEL_FIELDS, "model.", bad))
    layers = []
    for i, layer in enumerate(top["layers"]):
        fields = _read_fields(layer, LAYER_FIELDS, f"layers[{i}].", bad)
        try:
            layers.append(LayerInfo(fields.pop("name"), **fields))
        except InvalidLogInput as exc:
            raise bad(f"layers[{i}]: {exc}") from None
    layers = tuple(layers)
    names = [layer.name for layer in layers]
    if not layers or len(set(names)) != len(names):
        raise bad(f"field layers must be a non-empty list of distinct names, got {names}")

    num_tokens, dtype, content = top["num_tokens"], top["dtype"], top["content"]
    if top["format_version"] < CONTENT_VERSIONS[content]:
        raise bad(f"field content is {content!r} but format_version is {top['format_version']}; a {content} log is "
                  f"format version {CONTENT_VERSIONS[content]}")
    tensors: dict[str, TensorSpec] = {}
    for name, spec in top["tensors"].items():
        fields = _read_fields(spec, TENSOR_FIELDS, f"tensors.{name}.", bad)
        if name not in METADATA_TENSORS and not any(
                name == prefix + layer for prefix in (LOGITS, SELECTED, WEIGHTS, HIDDEN) for layer in names):
            raise bad(f"field tensors.{name} names no tensor of this log (expected {', '.join(METADATA_TENSORS)} "
                      f"or logits./selected./weights./hidden.<layer>)")
        tensors[name] = TensorSpec(fields["dtype"], tuple(fields["row_shape"]))
    if content == "selection":
        _check_selection_schema(tensors, layers, dtype, num_tokens, bad)
    elif tensors or num_tokens:
        if dtype is None:
            raise bad("field dtype is null but the log has tensors")
        for layer in layers:
            spec = tensors.get(LOGITS + layer.name)
            if spec is None:
                raise bad(f"field tensors lacks {LOGITS + layer.name!r} for layer {layer.name!r}")
            if spec.row_shape != (layer.num_experts,) or spec.dtype != dtype:
                raise bad(f"tensor {LOGITS + layer.name!r} is {spec}, layer says ({layer.num_experts},) {dtype}")
        for name in METADATA_TENSORS:
            if tensors.get(name) != TensorSpec("int64", ()):
                raise bad(f"tensor {name!r} must be int64 with one value per token, got {tensors.get(name)}")

    shards = []
    expected_start = 0
    seen: dict[str, int] = {}
    for i, s in enumerate(top["shards"]):
        shard = ShardInfo(**_read_fields(s, SHARD_FIELDS, f"shards[{i}].", bad))
        if shard.token_start != expected_start or shard.token_stop <= shard.token_start:
            raise bad(f"shard {shard.file} covers tokens [{shard.token_start}, {shard.token_stop}) but the shards "
                      f"before it end at {expected_start}; shards must be contiguous and non-empty")
        for key in (shard.file, shard.sha256):
            if key in seen:
                raise bad(f"shards[{i}] ({shard.file}) repeats the {'file' if key == shard.file else 'sha256'} of "
                          f"shards[{seen[key]}]: a duplicated shard")
            seen[key] = i
        expected_start = shard.token_stop
        shards.append(shard)
    if expected_start != num_tokens:
        raise bad(f"num_tokens is {num_tokens} but the shards cover {expected_start} tokens")

    rw = top["router_weights"]
    router_weights = None if rw is None else FileInfo(**_read_fields(rw, FILE_FIELDS, "router_weights.", bad))
    return Manifest(model=model_info, layers=layers, dtype=dtype, num_tokens=num_tokens, tensors=tensors,
                    shards=tuple(shards), router_weights=router_weights, capture=top["capture"] or {},
                    versions=top["versions"] or {}, device=top["device"], created=top["created"],
                    complete=top["complete"], format_version=top["format_version"], content=content)


SELECTION_DTYPES = ("int16", "int32", "int64")
"""Integer dtypes a selection log stores expert ids in."""


def _check_selection_schema(tensors: dict[str, TensorSpec], layers: tuple[LayerInfo, ...], dtype: str | None,
                            num_tokens: int, bad: Callable[[str], CorruptLog]) -> None:
    """The schema rules of a selection log: no logits nor hidden states, no dtype, and per layer
    ``selected.<layer>`` (k,) integer ids (k = the layer's top_k where recorded)."""
    if dtype is not None:
        raise bad(f"field dtype is {dtype!r} but a selection log has no logits (dtype must be null)")
    for name in tensors:
        if name.startswith((LOGITS, HIDDEN)):
            raise bad(f"field tensors holds {name!r} but a selection log has no logits nor hidden states")
    if not (tensors or num_tokens):
        return
    for layer in layers:
        spec = tensors.get(SELECTED + layer.name)
        if spec is None:
            raise bad(f"field tensors lacks {SELECTED + layer.name!r} for layer {layer.name!r}")
        if spec.dtype not in SELECTION_DTYPES or len(spec.row_shape) != 1 or spec.row_shape[0] < 1:
            raise bad(f"tensor {SELECTED + layer.name!r} is {spec}; a selection log stores (k,) expert ids in one "
                      f"of {', '.join(SELECTION_DTYPES)}")
        if layer.top_k is not None and spec.row_shape[0] != layer.top_k:
            raise bad(f"tensor {SELECTED + layer.name!r} holds {spec.row_shape[0]} experts per token but layer "
                      f"{layer.name!r} says top_k = {layer.top_k}")
    for name in METADATA_TENSORS:
        if tensors.get(name) != TensorSpec("int64", ()):
            raise bad(f"tensor {name!r} must be int64 with one value per token, got {tensors.get(name)}")


ROUTER_LOG_OWNED: tuple[str, ...] = (
    *(re.escape(name) + f"(?:{re.escape(TMP_SUFFIX)})?" for name in (MANIFEST_NAME, ROUTER_WEIGHTS_NAME)),
    re.escape(SHARDS_DIR) + "/",
    SHARD_FILE_RE.pattern.removeprefix("^").removesuffix("$") + f"(?:{re.escape(TMP_SUFFIX)})?",
)
"""The entries of a router log directory: patterns over relative POSIX paths, directories with a trailing
``/`` (:func:`usmoe_lp.staging.foreign_entries`); anything else in a log directory is not the writer's."""


# ----------------------------------------------------------------------------- files
def fsync_file(path: str | os.PathLike) -> None:
    """fsync a file already written and closed."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same directory, fsync, ``os.replace``.

    A reader sees either the old file or the new one, never a partial write. ``mode``: permission bits
    to give the file (None: those of a newly created file, 0o666 less the umask).
    """
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        if mode is not None:
            os.fchmod(f.fileno(), mode)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str, mode: int | None = None) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in blocks (bounded memory)."""
    with open(path, "rb") as f:
        return sha256_stream(f, block)


def sha256_stream(f: BinaryIO, block: int = 1 << 20) -> str:
    """Hex sha256 of what remains to read in the binary file ``f``, read in blocks."""
    h = hashlib.sha256()
    while chunk := f.read(block):
        h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- token rules
def non_finite(t: torch.Tensor) -> tuple[int, int, int, int] | None:
    """``(n_nan, n_inf, row, column)`` of the non-finite entries of a 2-D floating tensor (row and column of
    the first), or None when every entry is finite.

    A float64 sum is finite iff every entry is (barring overflow, which falls through to the exact
    check): one fast reduction instead of torch.isfinite, which is ~10x slower on this CPU build.
    """
    if t.numel() == 0 or bool(torch.isfinite(t.sum(dtype=torch.float64))):
        return None
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return None
    n_nan = int(torch.isnan(t).sum())
    row, col = (int(v) for v in torch.nonzero(~finite)[0])
    return n_nan, int((~finite).sum()) - n_nan, row, col


class TokenOrder:
    """The rule every router log's token metadata follows, checked piece by piece in log order.

    Positions and sequence ids are >= 0, and within each sequence the positions strictly increase
    in log order: a sequence's tokens appear in order and once each. Sequences may interleave (the
    decode steps of ``generate()`` continue several sequences at once), but a sequence id reused for
    a new sequence (a wrapped counter: its positions restart) or the same tokens twice (a duplicated
    shard) break the rule. :meth:`check` keeps, per sequence, the last position seen (one int per
    sequence); it is vectorised over the piece (numpy), with a Python step per sequence of the piece.
    """

    def __init__(self) -> None:
        self._last: dict[int, int] = {}

    def check(self, sequence_ids: np.ndarray, positions: np.ndarray) -> tuple[int, str] | None:
        """Check the next ``(n,)`` int64 ``sequence_ids`` / ``positions``; None when they follow the rule
        (and then they are remembered), else ``(i, problem)``: the first bad token's index in this piece and
        what is wrong with it (a phrase to follow "token ...")."""
        seq, pos = np.asarray(sequence_ids), np.asarray(positions)
        if seq.size == 0:
            return None
        found: list[tuple[int, str]] = []       # (token, problem) candidates: the first token wins
        for name, values in (("position", pos), ("sequence id", seq)):
            if values.min() < 0:
                i = int(np.argmax(values < 0))
                found.append((i, f"has {name} {int(values[i])}; positions and sequence ids are >= 0"))
        order = None if bool((np.diff(seq) >= 0).all()) else np.argsort(seq, kind="stable")
        s, p = (seq, pos) if order is None else (seq[order], pos[order])
        same = s[1:] == s[:-1]
        bad = np.flatnonzero(same & (p[1:] <= p[:-1])) + 1          # in sorted order
        if bad.size:
            j = int(bad[0] if order is None else bad[np.argmin(order[bad])])
            found.append((j if order is None else int(order[j]), _out_of_order(int(s[j]), int(p[j]), int(p[j - 1]))))
        starts = np.flatnonzero(np.concatenate(([True], ~same)))
        stops = np.concatenate((starts[1:], [s.size])) - 1
        ids, firsts, lasts = s[starts].tolist(), p[starts].tolist(), p[stops].tolist()
        last = self._last
        for sid, first, k in zip(ids, firsts, starts.tolist(), strict=True):
            prev = last.get(sid)
            if prev is not None and first <= prev:
                found.append((k if order is None else int(order[k]), _out_of_order(sid, first, prev)))
        if found:
            return min(found, key=lambda item: item[0])
        last.update(zip(ids, lasts, strict=True))
        return None


def _out_of_order(sequence: int, position: int, before: int) -> str:
    return (f"(sequence {sequence}, position {position}) comes after position {before} of the same sequence; within "
            "a sequence positions must strictly increase in log order (a sequence id reused by a new sequence, or "
            "the same tokens twice, breaks this)")


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries a result depends on (installed ones only): capture, the
    solvers of verify and the certificates (scipy, highspy, pulp). The one definition, read by every report."""
    out = {"python": sys.version.split()[0]}
    for dist in ("usmoe-lp", "torch", "safetensors", "numpy", "transformers", "scipy", "highspy", "pulp"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out
