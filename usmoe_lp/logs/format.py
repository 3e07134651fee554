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
from dataclasses import KW_ONLY, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from usmoe_lp.logs.errors import CorruptLog, InvalidLogInput, UnsupportedVersion

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
            bias = tuple(float(b) for b in self.selection_bias)
            if len(bias) != self.num_experts or not all(math.isfinite(b) for b in bias):
                raise InvalidLogInput(f"layer {self.name!r}: selection_bias must be {self.num_experts} finite "
                                      f"numbers (one per expert), got {len(bias)}")
            object.__setattr__(self, "selection_bias", bias)


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


# ----------------------------------------------------------------------------- parsing
def _parse_manifest(data: Any, source: str) -> Manifest:
    def bad(what: str) -> CorruptLog:
        return CorruptLog(f"{source}: {what}; the manifest is damaged or not a usmoe-lp router log")

    if not isinstance(data, dict):
        raise bad("top level is not a JSON object")
    version = data.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise bad(f"format_version is {version!r}, expected a positive integer")
    if version > FORMAT_VERSION:
        raise UnsupportedVersion(f"{source} was written by format version {version}; this usmoe-lp reads up to "
                                 f"{FORMAT_VERSION}: upgrade usmoe-lp to read it")

    def get(obj: dict, key: str, types, where: str = ""):
        if key not in obj:
            raise bad(f"missing key {where}{key!r}")
        value = obj[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
            raise bad(f"{where}{key!r} is {value!r}, not of type {_type_names(types)}")
        return value

    model = get(data, "model", dict)
    layers_data = get(data, "layers", list)
    layers = []
    try:
        model_info = ModelInfo(**{k: model.get(k) for k in ("name", "family", "revision")})
        for layer in layers_data:
            if not isinstance(layer, dict):
                raise bad(f"layer entry {layer!r} is not an object")
            layers.append(LayerInfo(
                get(layer, "name", str, "layer "), num_experts=get(layer, "num_experts", int, "layer "),
                top_k=layer.get("top_k"), module_path=layer.get("module_path", ""),
                score_function=layer.get("score_function", "unknown"), selection_bias=layer.get("selection_bias")))
    except (InvalidLogInput, TypeError) as exc:
        raise bad(str(exc)) from None
    layers = tuple(layers)
    names = [layer.name for layer in layers]
    if not layers or len(set(names)) != len(names):
        raise bad(f"layers must be a non-empty list of distinct names, got {names}")

    num_tokens = get(data, "num_tokens", int)
    dtype = data.get("dtype")
    tensors: dict[str, TensorSpec] = {}
    for name, spec in get(data, "tensors", dict).items():
        if not isinstance(spec, dict) or spec.get("dtype") not in _TORCH_DTYPES or not isinstance(
                spec.get("row_shape"), list) or not all(isinstance(d, int) and d >= 0 for d in spec["row_shape"]):
            raise bad(f"tensor spec {name!r} is {spec!r}; expected {{dtype, row_shape}}")
        tensors[name] = TensorSpec(spec["dtype"], tuple(spec["row_shape"]))
    if tensors or num_tokens:
        if dtype not in _TORCH_DTYPES:
            raise bad(f"dtype is {dtype!r}")
        for layer in layers:
            spec = tensors.get(LOGITS + layer.name)
            if spec is None:
                raise bad(f"tensors lacks {LOGITS + layer.name!r} for layer {layer.name!r}")
            if spec.row_shape != (layer.num_experts,) or spec.dtype != dtype:
                raise bad(f"tensor {LOGITS + layer.name!r} is {spec}, layer says ({layer.num_experts},) {dtype}")
        for name in METADATA_TENSORS:
            if tensors.get(name) != TensorSpec("int64", ()):
                raise bad(f"tensor {name!r} must be int64 with one value per token, got {tensors.get(name)}")

    shards = []
    expected_start = 0
    for i, s in enumerate(get(data, "shards", list)):
        if not isinstance(s, dict):
            raise bad(f"shard entry {i} is not an object")
        where = f"shards[{i}]."
        shard = ShardInfo(get(s, "file", str, where), get(s, "token_start", int, where),
                          get(s, "token_stop", int, where), get(s, "sha256", str, where), get(s, "bytes", int, where))
        if not SHARD_FILE_RE.match(shard.file):
            raise bad(f"shard file name {shard.file!r} is not of the form shards/NNNNN.safetensors")
        if not _SHA256_RE.match(shard.sha256):
            raise bad(f"shard {shard.file}: sha256 {shard.sha256!r} is not 64 hex digits")
        if shard.token_start != expected_start or shard.token_stop <= shard.token_start or shard.bytes <= 0:
            raise bad(f"shard {shard.file} covers tokens [{shard.token_start}, {shard.token_stop}) but the shards "
                      f"before it end at {expected_start}; shards must be contiguous and non-empty")
        expected_start = shard.token_stop
        shards.append(shard)
    if len({s.file for s in shards}) != len(shards):
        raise bad("two shards name the same file")
    if expected_start != num_tokens:
        raise bad(f"num_tokens is {num_tokens} but the shards cover {expected_start} tokens")

    rw = data.get("router_weights")
    router_weights = None
    if rw is not None:
        if not isinstance(rw, dict):
            raise bad("router_weights is not an object")
        router_weights = FileInfo(get(rw, "file", str, "router_weights."), get(rw, "sha256", str, "router_weights."),
                                  get(rw, "bytes", int, "router_weights."))
        if router_weights.file != ROUTER_WEIGHTS_NAME or not _SHA256_RE.match(router_weights.sha256):
            raise bad(f"router_weights entry {rw!r} is malformed")

    capture = data.get("capture") or {}
    versions = data.get("versions") or {}
    if not isinstance(capture, dict) or not isinstance(versions, dict):
        raise bad("capture and versions must be objects")
    return Manifest(model=model_info, layers=layers, dtype=dtype, num_tokens=num_tokens, tensors=tensors,
                    shards=tuple(shards), router_weights=router_weights, capture=capture,
                    versions={str(k): str(v) for k, v in versions.items()}, device=data.get("device"),
                    created=data.get("created"), complete=bool(data.get("complete", False)), format_version=version)


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def _type_names(types) -> str:
    return " or ".join(t.__name__ for t in _as_tuple(types))


# ----------------------------------------------------------------------------- files
def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that a rename inside it survives a power cut (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """fsync a file already written and closed."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same directory, fsync, ``os.replace``.

    A reader sees either the old file or the new one, never a partial write.
    """
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in blocks (bounded memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that matter to a capture (installed ones only)."""
    out = {"python": sys.version.split()[0]}
    for dist in ("usmoe-lp", "torch", "safetensors", "numpy", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out
