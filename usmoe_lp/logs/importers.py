"""Importers: turn foreign router-logit dumps into ordinary router logs.

- :func:`import_hf_router_logits`: the tuple transformers returns with ``output_router_logits=True``
  (per MoE layer, (B*T, N), or (B, T, N) for Switch Transformers), live or ``torch.save``d, with
  an optional (B, T) attention mask (1 = real token) that drops padding.
- :func:`import_array`: ``.npy`` (T, N), or a 3-D array whose ``layout`` the caller names:
  ``"ltn"`` (L, T, N) = L layers over the same tokens, ``"btn"`` (B, T, N) = one layer, B sequences
  of T tokens (one sequence per row); ``.npz`` with one (T, N) (or, with ``layout="btn"``,
  (B, T, N)) array per layer.
- :func:`import_safetensors`: one (T, N) tensor per layer, one (L, T, N) tensor, or the tensors
  of a router-log shard (``logits.<layer>``).
- :func:`import_file`: any of these, chosen by the file extension.

Router logits are floating arrays (float16/32/64, bfloat16 in torch and safetensors files; a
big-endian ``.npy`` is converted exactly to native byte order). Integer arrays are refused with a
message: they are the expert ids a serving engine returns (vLLM, SGLang), not logits;
:mod:`usmoe_lp.logs.foreign` imports those as selection logs.

Sequence boundaries matter (leakage and sequence-scoped routing are computed per sequence), so
each importer takes them from, in this order: the ``.npz`` / safetensors keys ``sequence_ids``
(and optionally ``positions``), ``layout="btn"`` (one sequence per row), ``sequence_length=L``
(consecutive rows of L tokens), an attention mask or batch layout (transformers tuples).
In ``.npz`` and safetensors files the keys ``token_ids``, ``sequence_ids`` and ``positions``
((T,) integers) are token metadata, not layers. Without any of these every token belongs to
sequence 0 at positions 0..T-1 (positions restart per sequence when only ``sequence_ids`` is
given; the manifest's ``capture["sequences"]`` says where the boundaries came from, ``"none"``
for this case), and token ids are -1 (unknown).

Every importer checks its input fully (shapes, dtypes, finite logits, metadata) before it
writes anything, then writes through :class:`RouterLogWriter` in ``shard_tokens`` pieces and
returns the :class:`RouterLog` it wrote. Refused input therefore leaves the destination as it
was (an earlier log replaced with ``overwrite=True`` included); the importers never delete
anything themselves (replacing an old log is the writer's job).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from usmoe_lp._validate import check_int
from usmoe_lp.logs.errors import ImportFailed, LogError, LogExists
from usmoe_lp.logs.format import LOGITS, METADATA_TENSORS, LayerInfo, ModelInfo
from usmoe_lp.logs.reader import RouterLog
from usmoe_lp.logs.writer import RouterLogWriter, _check_finite, _foreign_entries, _refuse_incomplete_log
from usmoe_lp.staging import check_destination

RowReader = Callable[[str, int, int], torch.Tensor]
HF_SUFFIXES = (".pt", ".pth", ".bin")
ARRAY_SUFFIXES = (".npy", ".npz")
SAFETENSORS_SUFFIXES = (".safetensors",)


# ----------------------------------------------------------------------------- HF tuple
def import_hf_router_logits(
    src: Any,
    out: str | os.PathLike,
    attention_mask: Any = None,
    *,
    input_ids: Any = None,
    batch_size: int | None = None,
    model_name: str | None = None,
    family: str | None = None,
    top_k: int | None = None,
    score_function: str = "unknown",
    layer_names: Sequence[str] | None = None,
    sequence_length: int | None = None,
    shard_tokens: int = 65536,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> RouterLog:
    """Import transformers' ``router_logits``.

    ``src``: a path to a ``torch.save``d tuple/list (or a dict with key ``router_logits`` and
    optionally ``attention_mask``, ``input_ids``), or the live tuple, list or model output.
    Per layer (None entries, dense layers, are skipped; a ``(logits, expert_index)`` pair counts
    as its logits): (B*T, N) rows in batch-major order (row b*T + t), or (B, T, N); torch tensors
    or numpy arrays (any strides or byte order).
    ``attention_mask``: (B, T), 1 = real token, or a path to it; padding rows are dropped (the
    rows may also be the real tokens only, already dropped). ``input_ids``: (B, T) token ids.
    Sequence ids are the batch row b; positions count the real tokens before each one in its row
    (so left padding gives positions from 0). Without a mask, (B, T) comes from a 3-D layer, else
    from ``batch_size`` or ``sequence_length`` (rows of that many tokens), else the rows are one
    sequence. Layers are named ``layer{i}`` by tuple index unless ``layer_names`` says otherwise;
    ``top_k`` and ``score_function`` apply to every layer.
    """
    source = str(src) if isinstance(src, str | os.PathLike) else None
    obj = _torch_load(Path(src)) if source is not None else src
    if isinstance(obj, Mapping):
        if "router_logits" not in obj:
            raise ImportFailed(f"{source or 'the mapping'} has no 'router_logits' entry (keys: {sorted(obj)[:10]})")
        if attention_mask is None:
            attention_mask = obj.get("attention_mask")
        if input_ids is None:
            input_ids = obj.get("input_ids")
        obj = obj["router_logits"]
    elif hasattr(obj, "router_logits") and not isinstance(obj, tuple | list | torch.Tensor):
        obj = obj.router_logits
    where = source or "router_logits"
    if isinstance(obj, torch.Tensor):
        raise ImportFailed(f"{where} holds one tensor of shape {tuple(obj.shape)}; expected the tuple of per-layer "
                           "tensors transformers returns (an (L, T, N) array: save it as .npy and import that with "
                           "layout='ltn')")
    if not isinstance(obj, tuple | list) or not obj:
        raise ImportFailed(f"{where} holds {type(obj).__name__}; expected a non-empty tuple of per-layer tensors")

    layers: dict[str, torch.Tensor] = {}
    shape3 = None
    for i, entry in enumerate(obj):
        if entry is None:
            continue
        if isinstance(entry, tuple | list) and entry and isinstance(entry[0], torch.Tensor | np.ndarray):
            entry = entry[0]
        if isinstance(entry, np.ndarray):  # any strides and byte order: copied to native, C order
            _check_logits_dtype(entry.dtype, f"{where}: layer {i}")
            entry = torch.from_numpy(_native_rows(entry, 0, len(entry)))
        if not isinstance(entry, torch.Tensor):
            raise ImportFailed(f"{where}: entry {i} is {type(entry).__name__}, not a tensor")
        if entry.ndim == 3:
            if shape3 is not None and tuple(entry.shape[:2]) != shape3:
                raise ImportFailed(f"{where}: layer {i} is (B, T)={tuple(entry.shape[:2])} but an earlier layer is "
                                   f"{shape3}; every layer must cover the same tokens")
            shape3 = tuple(entry.shape[:2])
            entry = entry.reshape(-1, entry.shape[2])
        elif entry.ndim != 2:
            raise ImportFailed(f"{where}: layer {i} has shape {tuple(entry.shape)}; router logits are (B*T, N) or "
                               "(B, T, N)")
        _check_logits_dtype(entry.dtype, f"{where}: layer {i}")
        layers[f"layer{i}"] = entry.detach().cpu()
    if not layers:
        raise ImportFailed(f"{where}: every entry is None; no router logits to import")
    names = _names(list(layers), layer_names, where)
    layers = dict(zip(names, layers.values(), strict=True))
    rows = _same_rows({k: v.shape[0] for k, v in layers.items()}, where)

    mask = None if attention_mask is None else _load_aux(attention_mask, "attention_mask")
    ids = None if input_ids is None else _load_aux(input_ids, "input_ids")
    keep, seq, pos, (B, T) = _hf_token_layout(rows, shape3, mask, batch_size, sequence_length, where)
    if ids is not None:
        if ids.ndim == 1:
            ids = ids[None]
        if tuple(ids.shape) != (B, T):
            raise ImportFailed(f"input_ids have shape {tuple(ids.shape)} but the tokens are (B, T)=({B}, {T})")
        token_ids = ids.reshape(-1).to(torch.int64)[keep]
    else:
        token_ids = torch.full((len(keep),), -1, dtype=torch.int64)
    row_index = keep if rows == B * T else torch.arange(rows)

    def read(layer: str, a: int, b: int) -> torch.Tensor:
        return layers[layer][row_index[a:b]]

    infos = _layer_infos({name: t.shape[1] for name, t in layers.items()}, top_k, score_function)
    sequences = ("attention_mask" if mask is not None else "batch" if shape3 is not None
                 else "sequence_length" if sequence_length is not None else "batch_size" if batch_size is not None
                 else "none")
    capture = {"source": "import_hf_router_logits", "file": source, "batch_size": B, "sequence_length": T,
               "attention_mask": mask is not None, "padding_dropped": B * T - len(keep) if rows == B * T else 0,
               "sequences": sequences}
    return _write(out, infos, len(keep), read, {"token_ids": token_ids, "sequence_ids": seq, "positions": pos},
                  ModelInfo(model_name, family), capture, shard_tokens, dtype, overwrite)


def _hf_token_layout(rows: int, shape3, mask: torch.Tensor | None, batch_size: int | None,
                     sequence_length: int | None, where: str):
    """Kept row indices into the (B*T) grid, their sequence ids and positions, and (B, T)."""
    if sequence_length is not None:
        sequence_length = check_int(sequence_length, "sequence_length", low=1)
        known = (tuple(int(d) for d in mask.shape[-2:]) if mask is not None and mask.ndim == 2 else
                 (1, int(mask.shape[0])) if mask is not None and mask.ndim == 1 else shape3)
        if known is not None and known[1] != sequence_length:
            raise ImportFailed(f"{where}: sequence_length={sequence_length} but the "
                               f"{'attention mask' if mask is not None else 'router logits'} give sequences of "
                               f"{known[1]} positions (B, T)={known}; leave sequence_length out")
        if known is None:
            if rows % sequence_length:
                raise ImportFailed(f"{where}: {rows} rows are not a whole number of sequences of "
                                   f"sequence_length={sequence_length} tokens; give the true sequence length (or "
                                   "an attention mask when padding was dropped)")
            if batch_size is not None and batch_size * sequence_length != rows:
                raise ImportFailed(f"{where}: batch_size={batch_size!r} and sequence_length={sequence_length} "
                                   f"disagree with the {rows} rows; give one of them")
            batch_size = rows // sequence_length
    if mask is not None:
        if mask.ndim == 1:
            mask = mask[None]
        if mask.ndim != 2:
            raise ImportFailed(f"attention_mask has shape {tuple(mask.shape)}; expected (B, T)")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ImportFailed("attention_mask must hold only 0 (padding) and 1 (real token)")
        B, T = (int(d) for d in mask.shape)
        if shape3 is not None and shape3 != (B, T):
            raise ImportFailed(f"attention_mask is (B, T)=({B}, {T}) but the router logits are {shape3}")
        flat = mask.reshape(-1).to(torch.bool)
        real = int(flat.sum())
        if rows not in (B * T, real):
            raise ImportFailed(f"{where}: the layers have {rows} rows but the attention mask is ({B}, {T}) = "
                               f"{B * T} positions with {real} real tokens; the rows must be all positions "
                               "(padding is dropped) or the real tokens only")
        keep = torch.nonzero(flat).reshape(-1)
        positions = (torch.cumsum(mask.to(torch.int64), dim=1) - 1).reshape(-1)[keep]
        return keep, keep // T, positions, (B, T)
    if shape3 is not None:
        B, T = shape3
    elif batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1 or rows % batch_size:
            raise ImportFailed(f"batch_size={batch_size!r} does not divide the {rows} rows of {where}")
        B, T = batch_size, rows // batch_size
    else:
        B, T = 1, rows
    keep = torch.arange(rows)
    return keep, keep // T, keep % T, (B, T)


# ----------------------------------------------------------------------------- arrays
LAYOUTS = {"tn": "(T, N): one layer, rows are tokens",
           "ltn": "(L, T, N): L layers over the same T tokens",
           "btn": "(B, T, N): one layer, B sequences of T tokens (one sequence per row)"}


def import_array(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    layout: str | None = None,
    sequence_length: int | None = None,
    model_name: str | None = None,
    family: str | None = None,
    top_k: int | None = None,
    score_function: str = "unknown",
    layer_names: Sequence[str] | None = None,
    shard_tokens: int = 65536,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> RouterLog:
    """Import router logits from a ``.npy`` or ``.npz`` file.

    ``.npy``: a (T, N) array is one layer (``layout`` ``"tn"``, the default for 2-D). A 3-D array
    is ambiguous, so ``layout`` must say which it is: ``"ltn"`` (L, T, N), L layers named
    ``layer0``... over the same T tokens; ``"btn"`` (B, T, N), one layer of B sequences of T tokens
    (sequence b = row b, positions 0..T-1). The array is memory-mapped and read a shard at a time.

    ``.npz``: keys are layer names, each a (T, N) array (with ``layout="btn"``: each (B, T, N)),
    plus optional token metadata, each a (T,) integer array (T = all tokens):
    ``sequence_ids`` (the sequence of each token), ``positions`` (its position in that sequence;
    default: the count of earlier tokens of the same sequence) and ``token_ids`` (default -1).

    ``sequence_length=L``: consecutive rows of L tokens are one sequence (T must be a multiple of
    L); not with ``sequence_ids`` or ``layout="btn"``, which give the boundaries already.
    Router logits are floating arrays (float16/32/64, kept as they are; big-endian converted
    exactly to native byte order); integer arrays (expert ids) and object, string or complex
    arrays are refused with a message. Pickled objects are never loaded.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if layout is not None and layout not in LAYOUTS:
        raise ImportFailed(f"{path}: layout={layout!r} is not one of {_layouts_text()}")
    meta: dict[str, np.ndarray] = {}
    row_length = None
    try:
        if suffix == ".npy":
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            arrays, row_length = _npy_layers(arr, layout, str(path))
        elif suffix == ".npz":
            if layout == "ltn":
                raise ImportFailed(f"{path}: layout='ltn' is for one (L, T, N) array in a .npy; an .npz holds one "
                                   "array per layer, each (T, N) (layout 'tn') or (B, T, N) (layout 'btn')")
            with np.load(path, allow_pickle=False) as npz:
                arrays = {}
                for key in npz.files:
                    value = npz[key]
                    if key in METADATA_TENSORS:
                        meta[key] = value
                        continue
                    _check_logits_dtype(value.dtype, f"{path}: array {key!r}")
                    arrays[key], rows = _npz_layer(value, layout, f"{path}: array {key!r}")
                    if row_length is not None and rows != row_length:
                        raise ImportFailed(f"{path}: array {key!r} has rows of {rows} tokens but another layer has "
                                           f"{row_length}; every layer must cover the same tokens")
                    row_length = rows
        else:
            raise ImportFailed(f"{path}: import_array reads .npy and .npz files, not {suffix or 'no suffix'}")
    except ImportFailed:
        raise
    except FileNotFoundError:
        raise ImportFailed(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImportFailed(f"{path}: is a directory, not a {suffix} file") from None
    except (OSError, ValueError, EOFError) as exc:
        if "Object arrays" in str(exc) or "Python objects" in str(exc):
            raise ImportFailed(f"{path}: holds Python objects (a pickled object array), not numbers; import never "
                               "unpickles a file: save the router logits as a float array") from None
        raise ImportFailed(f"{path}: not a readable {suffix} file ({_first_line(exc)})") from None
    if not arrays:
        raise ImportFailed(f"{path}: no layer arrays (only {sorted(meta)})")
    for key, arr in arrays.items():
        _check_logits_dtype(arr.dtype, f"{path}: layer {key!r}")
    names = _names(list(arrays), layer_names, str(path))
    arrays = dict(zip(names, arrays.values(), strict=True))
    T = _same_rows({k: v.shape[0] for k, v in arrays.items()}, str(path))

    def read(layer: str, a: int, b: int) -> torch.Tensor:
        return torch.from_numpy(_native_rows(arrays[layer], a, b))

    infos = _layer_infos({name: a.shape[1] for name, a in arrays.items()}, top_k, score_function)
    metadata, sequences = _metadata(meta, T, str(path), sequence_length=sequence_length, row_length=row_length)
    capture = {"source": "import_array", "file": str(path), "layout": layout or "tn", "sequences": sequences}
    return _write(out, infos, T, read, metadata, ModelInfo(model_name, family), capture, shard_tokens, dtype,
                  overwrite)


def _layouts_text() -> str:
    return "; ".join(f"{name} = {what}" for name, what in LAYOUTS.items())


def _npy_layers(arr: np.ndarray, layout: str | None, where: str) -> tuple[dict[str, Any], int | None]:
    """The layers of a .npy array under ``layout`` and the tokens per sequence row (btn) or None."""
    if arr.ndim == 2:
        if layout not in (None, "tn"):
            raise ImportFailed(f"{where}: the array is 2-D {arr.shape}, which is (T, N), one layer (layout 'tn'); "
                               f"layout={layout!r} is for 3-D arrays")
        return {"layer0": arr}, None
    if arr.ndim != 3:
        raise ImportFailed(f"{where}: array of shape {arr.shape}; expected (T, N), or a 3-D array with its layout "
                           f"({_layouts_text()})")
    if layout is None:
        raise ImportFailed(f"{where}: a 3-D array {arr.shape} is ambiguous: pass layout='ltn' or 'btn' to say "
                           f"which it is ({_layouts_text()})")
    if layout == "tn":
        raise ImportFailed(f"{where}: layout='tn' is (T, N) but the array is 3-D {arr.shape}; use 'ltn' or 'btn'")
    if layout == "ltn":
        return {f"layer{i}": arr[i] for i in range(arr.shape[0])}, None
    return {"layer0": _FlatRows(arr)}, int(arr.shape[1])


def _npz_layer(value: np.ndarray, layout: str | None, where: str) -> tuple[Any, int | None]:
    if layout == "btn":
        if value.ndim != 3:
            raise ImportFailed(f"{where} has shape {value.shape}; with layout 'btn' each layer is (B, T, N)")
        return _FlatRows(value), int(value.shape[1])
    if value.ndim != 2:
        raise ImportFailed(f"{where} has shape {value.shape}; each layer of an .npz is (T, N) (for (B, T, N) "
                           "layers pass layout 'btn'; put an (L, T, N) array in a .npy with layout 'ltn')")
    return value, None


class _FlatRows:
    """A (B, T, N) array read as its (B*T, N) rows, batch-major, without copying it whole."""

    def __init__(self, arr: np.ndarray) -> None:
        self.arr = arr
        B, T, N = arr.shape
        self.shape = (B * T, N)
        self.dtype = arr.dtype

    def __getitem__(self, rows: slice) -> np.ndarray:
        if self.arr.flags.c_contiguous:
            return self.arr.reshape(self.shape)[rows]
        index = np.arange(self.shape[0])[rows]
        T = self.arr.shape[1]
        return self.arr[index // T, index % T]


def _native_rows(arr: Any, a: int, b: int) -> np.ndarray:
    """Rows a..b as a fresh C-contiguous array in native byte order (exact; big-endian converted)."""
    chunk = arr[a:b]
    return np.array(chunk, dtype=chunk.dtype.newbyteorder("="), order="C", copy=True)



# ----------------------------------------------------------------------------- safetensors
def import_safetensors(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model_name: str | None = None,
    family: str | None = None,
    top_k: int | None = None,
    score_function: str = "unknown",
    layer_names: Sequence[str] | None = None,
    sequence_length: int | None = None,
    shard_tokens: int = 65536,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> RouterLog:
    """Import a safetensors file: one floating (T, N) tensor per layer (key = layer name), or a
    single (L, T, N) tensor (layers ``layer0``...), or a router-log shard's ``logits.<layer>``
    tensors; plus optional (T,) ``token_ids`` / ``sequence_ids`` / ``positions``, or
    ``sequence_length`` (rows of that many tokens are one sequence). Read a shard at a time;
    dtypes kept (bf16 included)."""
    path = Path(path)
    if not path.is_file():
        raise ImportFailed(f"{path}: no such file")
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:  # SafetensorError for a damaged file
        raise ImportFailed(f"{path}: not a readable safetensors file ({exc})") from None
    with handle as f:
        keys = list(f.keys())
        meta = {k: f.get_tensor(k).numpy() for k in keys if k in METADATA_TENSORS}
        data_keys = [k for k in keys if k not in METADATA_TENSORS]
        if any(k.startswith(LOGITS) for k in data_keys):
            data_keys = [k for k in data_keys if k.startswith(LOGITS)]  # a router-log shard: logits only
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in data_keys}
        for k in data_keys:
            _check_logits_dtype(f.get_slice(k).get_dtype(), f"{path}: tensor {k!r}")
    if not data_keys:
        raise ImportFailed(f"{path}: no layer tensors (keys: {keys})")
    if len(data_keys) == 1 and len(shapes[data_keys[0]]) == 3:
        key = data_keys[0]
        sources = {f"layer{i}": (key, i) for i in range(shapes[key][0])}
        rows_cols = {name: shapes[key][1:] for name in sources}
    else:
        for k, shape in shapes.items():
            if len(shape) != 2:
                raise ImportFailed(f"{path}: tensor {k!r} has shape {shape}; each layer is (T, N) (or give one "
                                   "(L, T, N) tensor)")
        sources = {k.removeprefix(LOGITS): (k, None) for k in data_keys}
        rows_cols = {k.removeprefix(LOGITS): shapes[k] for k in data_keys}
    names = _names(list(sources), layer_names, str(path))
    sources = dict(zip(names, sources.values(), strict=True))
    rows_cols = dict(zip(names, rows_cols.values(), strict=True))
    T = _same_rows({k: v[0] for k, v in rows_cols.items()}, str(path))

    def read(layer: str, a: int, b: int) -> torch.Tensor:
        key, index = sources[layer]
        with safe_open(str(path), framework="pt") as f:
            sl = f.get_slice(key)
            return sl[a:b] if index is None else sl[index:index + 1, a:b][0]

    infos = _layer_infos({name: rc[1] for name, rc in rows_cols.items()}, top_k, score_function)
    metadata, sequences = _metadata(meta, T, str(path), sequence_length=sequence_length)
    capture = {"source": "import_safetensors", "file": str(path), "sequences": sequences}
    return _write(out, infos, T, read, metadata, ModelInfo(model_name, family), capture, shard_tokens, dtype,
                  overwrite)


# ----------------------------------------------------------------------------- dispatch
def import_file(src: str | os.PathLike, out: str | os.PathLike, *, attention_mask: Any = None,
                input_ids: Any = None, batch_size: int | None = None, layout: str | None = None,
                **kwargs: Any) -> RouterLog:
    """Import ``src`` by extension: .pt/.pth/.bin (transformers tuple), .npy/.npz, .safetensors.
    ``attention_mask``, ``input_ids`` (tensors, arrays or files) and ``batch_size`` apply to
    transformers tuples only, ``layout`` to .npy/.npz only; other keyword arguments
    (``sequence_length``, ``top_k``, ``score_function``, ...) go to the importer."""
    suffix = Path(src).suffix.lower()
    if layout is not None and suffix not in ARRAY_SUFFIXES:
        raise ImportFailed(f"{src}: layout= applies to .npy/.npz arrays, not to {suffix or 'these'} files, whose "
                           "layout is fixed")
    if suffix in HF_SUFFIXES:
        return import_hf_router_logits(src, out, attention_mask, input_ids=input_ids, batch_size=batch_size,
                                       **kwargs)
    given = [name for name, v in (("attention_mask", attention_mask), ("input_ids", input_ids),
                                  ("batch_size", batch_size)) if v is not None]
    if given:
        raise ImportFailed(f"{src}: {' and '.join(given)} apply to transformers router_logits (.pt/.pth), "
                           f"not to {suffix or 'these'} files, whose rows are tokens already")
    if suffix in ARRAY_SUFFIXES:
        return import_array(src, out, layout=layout, **kwargs)
    if suffix in SAFETENSORS_SUFFIXES:
        return import_safetensors(src, out, **kwargs)
    raise ImportFailed(f"{src}: unknown file type {suffix or '(no suffix)'}; import reads "
                       f"{', '.join(HF_SUFFIXES + ARRAY_SUFFIXES + SAFETENSORS_SUFFIXES)}")


def load_tensor(path: str | os.PathLike, key: str | None = None) -> torch.Tensor:
    """Load one tensor from .pt/.pth/.bin, .npy, .npz or .safetensors (``key``, or the only
    entry, or the one called ``attention_mask``). Used for ``--attention-mask FILE``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise ImportFailed(f"{path}: no such file")
    try:
        if suffix in HF_SUFFIXES:
            obj = _torch_load(path)
            entries = dict(obj) if isinstance(obj, Mapping) else {"": obj}
        elif suffix == ".npy":
            entries = {"": np.load(path, allow_pickle=False)}
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                entries = {k: npz[k] for k in npz.files}
        elif suffix in SAFETENSORS_SUFFIXES:
            with safe_open(str(path), framework="pt") as f:
                entries = {k: f.get_tensor(k) for k in f.keys()}
        else:
            raise ImportFailed(f"{path}: unknown file type {suffix or '(no suffix)'}")
    except ImportFailed:
        raise
    except Exception as exc:  # numpy/safetensors raise assorted errors for damaged files
        raise ImportFailed(f"{path}: not a readable {suffix} file ({exc})") from None
    if key is None:
        key = next(iter(entries)) if len(entries) == 1 else "attention_mask"
    if key not in entries:
        raise ImportFailed(f"{path}: holds {sorted(entries)}; expected a single tensor or one named {key!r}")
    return _load_aux(entries[key], key, str(path))


# ----------------------------------------------------------------------------- helpers
def _torch_load(path: Path) -> Any:
    if not path.is_file():
        raise ImportFailed(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors alike
        raise ImportFailed(f"{path}: cannot be read as a torch.save file of tensors ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def _load_aux(value: Any, what: str, source: str | None = None) -> torch.Tensor:
    if isinstance(value, str | os.PathLike):
        return load_tensor(value)
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise ImportFailed(f"{source or what}: {what} has dtype {value.dtype}; expected integers or booleans")
        value = torch.from_numpy(_native_rows(value, 0, len(value)) if value.ndim else value.astype(
            value.dtype.newbyteorder("=")))
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            raise ImportFailed(f"{source or what}: {what} is {type(value).__name__}, not a tensor") from None
    return value.detach().cpu()


def _names(found: list[str], given: Sequence[str] | None, where: str) -> list[str]:
    if given is None:
        return found
    given = list(given)
    if len(given) != len(found):
        raise ImportFailed(f"{where}: {len(found)} layers but {len(given)} layer_names were given")
    return given


def _same_rows(rows: dict[str, int], where: str) -> int:
    first_name, first = next(iter(rows.items()))
    for name, r in rows.items():
        if r != first:
            raise ImportFailed(f"{where}: layer {name!r} has {r} tokens but layer {first_name!r} has {first}; "
                               "every layer must cover the same tokens")
    if first == 0:
        raise ImportFailed(f"{where}: no tokens to import")
    return first


def _metadata(meta: Mapping[str, Any], T: int, where: str, *, sequence_length: int | None = None,
              row_length: int | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """(T,) int64 token_ids, sequence_ids, positions, and where the sequence boundaries came from.

    ``meta``: the file's own (T,) integer arrays; ``sequence_length``: rows of that many tokens;
    ``row_length``: the T of a (B, T, N) layout, one sequence per row. At most one of the three
    may give the boundaries."""
    out = {}
    for key, value in meta.items():
        arr = np.asarray(value)
        if arr.shape != (T,) or arr.dtype.kind not in "iu":
            raise ImportFailed(f"{where}: {key!r} must be ({T},) integers, got {arr.shape} {arr.dtype}")
        out[key] = torch.from_numpy(arr.astype(np.int64))
    given = [name for name, on in (("the file's sequence_ids", "sequence_ids" in out),
                                   ("layout 'btn' (one sequence per row)", row_length is not None),
                                   (f"sequence_length={sequence_length}", sequence_length is not None)) if on]
    if len(given) > 1:
        raise ImportFailed(f"{where}: the sequence boundaries are given twice ({' and '.join(given)}); keep one")
    if "positions" in out and "sequence_ids" not in out:
        raise ImportFailed(f"{where}: 'positions' without 'sequence_ids'; positions count within a sequence, so "
                           "give the sequence_ids too")
    sequences = "sequence_ids" if "sequence_ids" in out else "none"
    if row_length is not None:
        out["sequence_ids"], sequences = torch.arange(T, dtype=torch.int64) // row_length, "layout btn"
    elif sequence_length is not None:
        sequence_length = check_int(sequence_length, "sequence_length", low=1)
        if T % sequence_length:
            raise ImportFailed(f"{where}: {T} tokens are not a whole number of sequences of sequence_length="
                               f"{sequence_length}; give the true sequence length, or per-token sequence_ids "
                               "(.npz / safetensors key) when the sequences differ in length")
        out["sequence_ids"], sequences = torch.arange(T, dtype=torch.int64) // sequence_length, "sequence_length"
    if "sequence_ids" not in out:
        out["sequence_ids"] = torch.zeros(T, dtype=torch.int64)
    if "positions" not in out:
        out["positions"] = _positions_within(out["sequence_ids"].numpy())
    if "token_ids" not in out:
        out["token_ids"] = torch.full((T,), -1, dtype=torch.int64)
    return out, sequences


def _positions_within(seq: np.ndarray) -> torch.Tensor:
    """Position of each token among the earlier tokens of its sequence: (T,) int64."""
    _, inverse, counts = np.unique(seq, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.cumsum(counts) - counts
    pos = np.empty(len(seq), dtype=np.int64)
    pos[order] = np.arange(len(seq)) - np.repeat(starts, counts)
    return torch.from_numpy(pos)


_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                       "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
                       "U8": torch.uint8, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
                       "BOOL": torch.bool}
_EXPERT_IDS_HINT = ("which looks like the expert ids a serving engine returns (vLLM and SGLang return the chosen "
                    "experts per token), not router logits. usmoe-lp needs the raw router logits, (T, N) floating "
                    "scores: capture them with `usmoe-lp capture` (or output_router_logits=True in transformers), "
                    "or import the expert ids as a selection log (no logits) with `usmoe-lp import --format "
                    "vllm|sglang|megatron|olmoe --num-experts N`")


def _check_logits_dtype(dtype: np.dtype | torch.dtype | str, where: str) -> None:
    """Refuse, with a message saying what the data is, anything but floating router logits.

    ``dtype``: a numpy dtype, a torch dtype or a safetensors dtype code (``"F32"``, ``"I64"``...)."""
    if isinstance(dtype, str):
        if dtype not in _SAFETENSORS_DTYPES:
            raise ImportFailed(f"{where} has dtype {dtype}; router logits are float16, bfloat16, float32 or "
                               "float64")
        dtype = _SAFETENSORS_DTYPES[dtype]
    if isinstance(dtype, torch.dtype):
        kind = "f" if dtype.is_floating_point else "c" if dtype.is_complex else "b" if dtype == torch.bool else "i"
        shown = str(dtype).removeprefix("torch.")
    else:
        dtype = np.dtype(dtype)
        kind, shown = dtype.kind, str(dtype)
    if kind == "f":
        return
    what = {"i": f"integers ({shown}), {_EXPERT_IDS_HINT}", "u": f"integers ({shown}), {_EXPERT_IDS_HINT}",
            "b": "booleans (a routing mask?), not router logits; usmoe-lp needs the raw (T, N) floating logits",
            "c": f"complex numbers ({shown}); router logits are real",
            "U": f"strings ({shown}), not numbers", "S": f"bytes strings ({shown}), not numbers",
            "O": "Python objects, not numbers (object arrays are never unpickled)",
            "V": f"raw or structured records ({shown}); save router logits as float16/32/64 (bfloat16: in a "
                 ".safetensors or .pt file)"}
    raise ImportFailed(f"{where} holds {what.get(kind, f'dtype {shown}')}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _layer_infos(experts: Mapping[str, int], top_k: int | None, score_function: str) -> list[LayerInfo]:
    """One LayerInfo per layer (which validates them); ``top_k`` and ``score_function`` apply to every layer."""
    return [LayerInfo(name, num_experts=int(n), top_k=top_k, score_function=score_function)
            for name, n in experts.items()]


def _check_input(infos: list[LayerInfo], T: int, read: RowReader, shard_tokens: int,
                 dtype: torch.dtype | None) -> None:
    """Read every layer once, a shard at a time, and refuse non-finite logits (also after the cast to
    ``dtype``) before the writer touches the destination."""
    shard_tokens = check_int(shard_tokens, "shard_tokens", low=1)
    for info in infos:
        for a in range(0, T, shard_tokens):
            b = min(a + shard_tokens, T)
            t = read(info.name, a, b)
            cast = t.to(dtype) if dtype is not None and dtype != t.dtype else None
            for value, after in ((t, ""), (cast, f" after casting to {str(dtype).removeprefix('torch.')}")):
                if value is not None and not _sum_is_finite(value):
                    _check_finite(value, info.name, f"{after} (rows {a}..{b - 1} of the input)")


def _sum_is_finite(t: torch.Tensor) -> bool:
    """Whether a float64 sum of ``t`` is finite (true iff every entry is, barring overflow, which the
    caller's exact check then settles). numpy's sum: ~20x faster than torch's float64 sum on this CPU."""
    if t.dtype == torch.bfloat16:
        t = t.float()
    return bool(np.isfinite(np.sum(t.numpy(), dtype=np.float64)))


def check_log_destination(out: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Raise :class:`LogExists` unless ``out`` can take a new router log: the checks
    :class:`RouterLogWriter` makes (a file, a path under a file, a non-empty directory without
    ``overwrite``, an incomplete log, files no router log holds), made before any slow work."""
    out = Path(out)
    if not overwrite:
        _refuse_incomplete_log(out, "overwrite=True")
    check_destination(out, what="router log", overwrite=overwrite, foreign=_foreign_entries, error=LogExists)


def _write(out, infos: list[LayerInfo], T: int, read: RowReader, meta: dict[str, torch.Tensor], model: ModelInfo,
           capture: dict, shard_tokens: int, dtype: torch.dtype | None, overwrite: bool) -> RouterLog:
    """Check the destination and the whole input, then write. Deletes nothing itself: replacing an
    earlier log (``overwrite``) is the writer's job, and a write that fails midway leaves what the
    writer leaves (a log marked incomplete)."""
    out = Path(out)
    check_log_destination(out, overwrite=overwrite)
    _check_input(infos, T, read, shard_tokens, dtype)
    try:
        with RouterLogWriter(out, infos, model=model, capture=capture, shard_tokens=shard_tokens, dtype=dtype,
                             overwrite=overwrite) as writer:
            for a in range(0, T, shard_tokens):
                b = min(a + shard_tokens, T)
                writer.append({info.name: read(info.name, a, b) for info in infos},
                              meta["token_ids"][a:b], meta["sequence_ids"][a:b], meta["positions"][a:b])
    except LogError as exc:
        if capture.get("file"):
            exc.add_note(f"while importing {capture['file']} into {out}")
        raise
    return RouterLog.open(out)
