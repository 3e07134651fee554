"""The router-log format: names, the manifest, and atomic file writes.

A router log is a directory::

    LOG/
      manifest.json                  the Manifest below, rewritten atomically after every shard
      shards/00000.safetensors       tokens [0, n0): logits.<layer> (n0, N) in the captured dtype,
      shards/00001.safetensors       token_ids, sequence_ids, positions (n0,) int64, and optionally
      ...                            selected.<layer>, weights.<layer>, hidden.<layer> (n0, ...)
      router_weights.safetensors     optional: <layer> -> (N, d) router weight per layer

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

FORMAT_VERSION = 1
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
    """One MoE layer of the log.

    ``name`` keys the layer in the log (tensor ``logits.<name>``, shape (tokens, num_experts));
    ``module_path`` is the module in the model (``"model.layers.3.mlp.gate"``); ``top_k`` the
    experts per token the model uses (None if unknown); ``score_function`` one of
    :data:`SCORE_FUNCTIONS`; ``selection_bias`` an optional per-expert bias (length N) the model
    adds to the scores for selection only (DeepSeek-V3 style). A list given for
    ``selection_bias`` is stored as a tuple, so the record stays immutable.
    """

    name: str
    _: KW_ONLY
    num_experts: int
    top_k: int | None = None
    module_path: str = ""
    score_function: str = "unknown"
    selection_bias: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or self.name != self.name.strip() or "/" in self.name:
            raise InvalidLogInput(f"layer name must be a non-empty string without '/' or surrounding spaces, "
                                  f"got {self.name!r}")
        if isinstance(self.num_experts, bool) or not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise InvalidLogInput(f"layer {self.name!r}: num_experts must be an integer >= 1, got {self.num_experts!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or not 1 <= self.top_k <= self.num_experts):
            raise InvalidLogInput(f"layer {self.name!r}: top_k must be None or an integer in 1..{self.num_experts}, "
                                  f"got {self.top_k!r}")
        if not isinstance(self.module_path, str):
            raise InvalidLogInput(f"layer {self.name!r}: module_path must be a string, got {self.module_path!r}")
        if self.score_function not in SCORE_FUNCTIONS:
            raise InvalidLogInput(f"layer {self.name!r}: score_function must be one of {SCORE_FUNCTIONS}, "
                                  f"got {self.score_function!r}")
        if self.selection_bias is not None:
            bias = _finite_numbers(self.selection_bias)
            if bias is None or len(bias) != self.num_experts:
                got = f"{len(bias)} numbers" if bias is not None else _shown(self.selection_bias)
                raise InvalidLogInput(f"layer {self.name!r}: selection_bias must be {self.num_experts} finite "
                                      f"numbers (one per expert), got {got}")
            object.__setattr__(self, "selection_bias", bias)


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

    ``dtype`` is the logits dtype name (None before the first token); ``tensors`` maps tensor name
    -> :class:`TensorSpec`; ``shards`` are contiguous from token 0 to ``num_tokens``;
    ``complete`` is False until the writer closed cleanly (a crashed capture leaves it False).
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
    format_version: int = FORMAT_VERSION

    def layer(self, name: str) -> LayerInfo:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
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
SCORE_FUNCTION = Kind(f"one of {', '.join(SCORE_FUNCTIONS)}", lambda v: v in SCORE_FUNCTIONS)


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
)
MODEL_FIELDS = tuple(Field(key, STRING.optional(), required=False) for key in ("name", "family", "revision"))
LAYER_FIELDS = (
    Field("name", STRING),
    Field("num_experts", POSITIVE),
    Field("top_k", POSITIVE.optional(), required=False),
    Field("module_path", STRING, required=False, default=""),
    Field("score_function", SCORE_FUNCTION, required=False, default="unknown"),
    Field("selection_bias", NUMBERS.optional(), required=False),
)
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

    num_tokens, dtype = top["num_tokens"], top["dtype"]
    tensors: dict[str, TensorSpec] = {}
    for name, spec in top["tensors"].items():
        fields = _read_fields(spec, TENSOR_FIELDS, f"tensors.{name}.", bad)
        if name not in METADATA_TENSORS and not any(
                name == prefix + layer for prefix in (LOGITS, SELECTED, WEIGHTS, HIDDEN) for layer in names):
            raise bad(f"field tensors.{name} names no tensor of this log (expected {', '.join(METADATA_TENSORS)} "
                      f"or logits./selected./weights./hidden.<layer>)")
        tensors[name] = TensorSpec(fields["dtype"], tuple(fields["row_shape"]))
    if tensors or num_tokens:
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
                    complete=top["complete"], format_version=top["format_version"])


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
    """Versions of Python and the libraries that matter to a capture (installed ones only)."""
    out = {"python": sys.version.split()[0]}
    for dist in ("usmoe-lp", "torch", "safetensors", "numpy", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out
