"""Importers: turn foreign router-logit dumps into ordinary router logs.

- :func:`import_hf_router_logits`: the tuple transformers returns with ``output_router_logits=True``
  (per MoE layer, (B*T, N), or (B, T, N) for Switch Transformers), live or ``torch.save``d, with
  an optional (B, T) attention mask (1 = real token) that drops padding.
- :func:`import_array`: ``.npy`` (T, N) or (L, T, N); ``.npz`` with one (T, N) array per layer.
- :func:`import_safetensors`: one (T, N) tensor per layer, one (L, T, N) tensor, or the tensors
  of a router-log shard (``logits.<layer>``).
- :func:`import_file`: any of these, chosen by the file extension.

In ``.npz`` and safetensors files the keys ``token_ids``, ``sequence_ids`` and ``positions``
((T,) integers) are token metadata, not layers. Without them every token belongs to sequence 0
at positions 0..T-1 (positions restart per sequence when only ``sequence_ids`` is given), and
token ids are -1 (unknown). Every importer writes through :class:`RouterLogWriter` in
``shard_tokens`` pieces and returns the :class:`RouterLog` it wrote; a failed import leaves no
log behind.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from usmoe_lp.logs.errors import ImportFailed, LogError
from usmoe_lp.logs.format import LOGITS, MANIFEST_NAME, METADATA_TENSORS, SHARDS_DIR, TMP_SUFFIX, LayerInfo, ModelInfo
from usmoe_lp.logs.reader import RouterLog
from usmoe_lp.logs.writer import RouterLogWriter

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
    shard_tokens: int = 65536,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> RouterLog:
    """Import transformers' ``router_logits``.

    ``src``: a path to a ``torch.save``d tuple/list (or a dict with key ``router_logits`` and
    optionally ``attention_mask``, ``input_ids``), or the live tuple, list or model output.
    Per layer (None entries, dense layers, are skipped; a ``(logits, expert_index)`` pair counts
    as its logits): (B*T, N) rows in batch-major order (row b*T + t), or (B, T, N).
    ``attention_mask``: (B, T), 1 = real token, or a path to it; padding rows are dropped (the
    rows may also be the real tokens only, already dropped). ``input_ids``: (B, T) token ids.
    Sequence ids are the batch row b; positions count the real tokens before each one in its row
    (so left padding gives positions from 0). Without a mask, (B, T) comes from a 3-D layer, else
    from ``batch_size``, else the rows are one sequence. Layers are named ``layer{i}`` by tuple
    index unless ``layer_names`` says otherwise; ``top_k`` applies to every layer.
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
                           "tensors transformers returns (for an (L, T, N) array use import_array / .npy)")
    if not isinstance(obj, tuple | list) or not obj:
        raise ImportFailed(f"{where} holds {type(obj).__name__}; expected a non-empty tuple of per-layer tensors")

    layers: dict[str, torch.Tensor] = {}
    shape3 = None
    for i, entry in enumerate(obj):
        if entry is None:
            continue
        if isinstance(entry, tuple | list) and entry and isinstance(entry[0], torch.Tensor):
            entry = entry[0]
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
        if not entry.dtype.is_floating_point:
            raise ImportFailed(f"{where}: layer {i} has dtype {entry.dtype}; router logits are floating")
        layers[f"layer{i}"] = entry.detach().cpu()
    if not layers:
        raise ImportFailed(f"{where}: every entry is None; no router logits to import")
    names = _names(list(layers), layer_names, where)
    layers = dict(zip(names, layers.values(), strict=True))
    rows = _same_rows({k: v.shape[0] for k, v in layers.items()}, where)

    mask = None if attention_mask is None else _load_aux(attention_mask, "attention_mask")
    ids = None if input_ids is None else _load_aux(input_ids, "input_ids")
    keep, seq, pos, (B, T) = _hf_token_layout(rows, shape3, mask, batch_size, where)
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

    infos = [LayerInfo(name, num_experts=int(t.shape[1]), top_k=top_k, score_function=score_function)
             for name, t in layers.items()]
    capture = {"source": "import_hf_router_logits", "file": source, "batch_size": B, "sequence_length": T,
               "attention_mask": mask is not None, "padding_dropped": B * T - len(keep) if rows == B * T else 0}
    return _write(out, infos, len(keep), read, {"token_ids": token_ids, "sequence_ids": seq, "positions": pos},
                  ModelInfo(model_name, family), capture, shard_tokens, dtype, overwrite)


def _hf_token_layout(rows: int, shape3, mask: torch.Tensor | None, batch_size: int | None, where: str):
    """Kept row indices into the (B*T) grid, their sequence ids and positions, and (B, T)."""
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
def import_array(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model_name: str | None = None,
    family: str | None = None,
    top_k: int | None = None,
    score_function: str = "unknown",
    layer_names: Sequence[str] | None = None,
    shard_tokens: int = 65536,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> RouterLog:
    """Import a ``.npy`` array, (T, N) (one layer) or (L, T, N) (L layers, named ``layer0``...,
    memory-mapped, read a shard at a time), or a ``.npz`` whose keys are layer names, each (T, N),
    plus optional (T,) ``token_ids`` / ``sequence_ids`` / ``positions``. Floating arrays only
    (float16/32/64, kept as they are)."""
    path = Path(path)
    suffix = path.suffix.lower()
    meta: dict[str, np.ndarray] = {}
    try:
        if suffix == ".npy":
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            if arr.ndim == 2:
                arrays = {"layer0": arr}
            elif arr.ndim == 3:
                arrays = {f"layer{i}": arr[i] for i in range(arr.shape[0])}
            else:
                raise ImportFailed(f"{path}: array of shape {arr.shape}; expected (T, N) or (L, T, N)")
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                arrays = {}
                for key in npz.files:
                    value = npz[key]
                    if key in METADATA_TENSORS:
                        meta[key] = value
                    elif value.ndim != 2:
                        raise ImportFailed(f"{path}: array {key!r} has shape {value.shape}; each layer of an .npz "
                                           "is (T, N) (put an (L, T, N) array in a .npy)")
                    else:
                        arrays[key] = value
        else:
            raise ImportFailed(f"{path}: import_array reads .npy and .npz files, not {suffix or 'no suffix'}")
    except ImportFailed:
        raise
    except FileNotFoundError:
        raise ImportFailed(f"{path}: no such file") from None
    except (OSError, ValueError, EOFError) as exc:
        raise ImportFailed(f"{path}: not a readable {suffix} file ({exc})") from None
    if not arrays:
        raise ImportFailed(f"{path}: no layer arrays (only {sorted(meta)})")
    for key, arr in arrays.items():
        if arr.dtype.kind != "f":
            raise ImportFailed(f"{path}: layer {key!r} has dtype {arr.dtype}; router logits are floating")
    names = _names(list(arrays), layer_names, str(path))
    arrays = dict(zip(names, arrays.values(), strict=True))
    T = _same_rows({k: v.shape[0] for k, v in arrays.items()}, str(path))

    def read(layer: str, a: int, b: int) -> torch.Tensor:
        return torch.from_numpy(np.array(arrays[layer][a:b]))

    infos = [LayerInfo(name, num_experts=int(a.shape[1]), top_k=top_k, score_function=score_function)
             for name, a in arrays.items()]
    capture = {"source": "import_array", "file": str(path)}
    return _write(out, infos, T, read, _metadata(meta, T, str(path)), ModelInfo(model_name, family), capture,
                  shard_tokens, dtype, overwrite)


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
    shard_tokens: int = 65536,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> RouterLog:
    """Import a safetensors file: one floating (T, N) tensor per layer (key = layer name), or a
    single (L, T, N) tensor (layers ``layer0``...), or a router-log shard's ``logits.<layer>``
    tensors; plus optional (T,) ``token_ids`` / ``sequence_ids`` / ``positions``. Read a shard at
    a time; dtypes kept (bf16 included)."""
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
            t = sl[a:b] if index is None else sl[index:index + 1, a:b][0]
        if not t.dtype.is_floating_point:
            raise ImportFailed(f"{path}: tensor {key!r} has dtype {t.dtype}; router logits are floating")
        return t

    infos = [LayerInfo(name, num_experts=int(rc[1]), top_k=top_k, score_function=score_function)
             for name, rc in rows_cols.items()]
    capture = {"source": "import_safetensors", "file": str(path)}
    return _write(out, infos, T, read, _metadata(meta, T, str(path)), ModelInfo(model_name, family), capture,
                  shard_tokens, dtype, overwrite)


# ----------------------------------------------------------------------------- dispatch
def import_file(src: str | os.PathLike, out: str | os.PathLike, *, attention_mask: Any = None,
                input_ids: Any = None, batch_size: int | None = None, **kwargs: Any) -> RouterLog:
    """Import ``src`` by extension: .pt/.pth/.bin (transformers tuple), .npy/.npz, .safetensors.
    ``attention_mask``, ``input_ids`` (tensors, arrays or files) and ``batch_size`` apply to
    transformers tuples only; other keyword arguments go to the importer."""
    suffix = Path(src).suffix.lower()
    if suffix in HF_SUFFIXES:
        return import_hf_router_logits(src, out, attention_mask, input_ids=input_ids, batch_size=batch_size,
                                       **kwargs)
    given = [name for name, v in (("attention mask", attention_mask), ("input ids", input_ids),
                                  ("batch size", batch_size)) if v is not None]
    if given:
        raise ImportFailed(f"{src}: {' and '.join(given)} apply to transformers router_logits (.pt/.pth), "
                           f"not to {suffix or 'these'} files, whose rows are tokens already")
    if suffix in ARRAY_SUFFIXES:
        return import_array(src, out, **kwargs)
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
            raise ImportFailed(f"{source or what}: {what} has dtype {value.dtype}")
        value = torch.from_numpy(np.ascontiguousarray(value))
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


def _metadata(meta: Mapping[str, Any], T: int, where: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in meta.items():
        arr = np.asarray(value)
        if arr.shape != (T,) or arr.dtype.kind not in "iu":
            raise ImportFailed(f"{where}: {key!r} must be ({T},) integers, got {arr.shape} {arr.dtype}")
        out[key] = torch.from_numpy(arr.astype(np.int64))
    if "sequence_ids" not in out:
        out["sequence_ids"] = torch.zeros(T, dtype=torch.int64)
    if "positions" not in out:
        out["positions"] = _positions_within(out["sequence_ids"].numpy())
    if "token_ids" not in out:
        out["token_ids"] = torch.full((T,), -1, dtype=torch.int64)
    return out


def _positions_within(seq: np.ndarray) -> torch.Tensor:
    """Position of each token among the earlier tokens of its sequence: (T,) int64."""
    _, inverse, counts = np.unique(seq, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.cumsum(counts) - counts
    pos = np.empty(len(seq), dtype=np.int64)
    pos[order] = np.arange(len(seq)) - np.repeat(starts, counts)
    return torch.from_numpy(pos)


def _write(out, infos: list[LayerInfo], T: int, read: RowReader, meta: dict[str, torch.Tensor], model: ModelInfo,
           capture: dict, shard_tokens: int, dtype: torch.dtype | None, overwrite: bool) -> RouterLog:
    out = Path(out)
    created = not out.exists()
    writer = RouterLogWriter(out, infos, model=model, capture=capture, shard_tokens=shard_tokens, dtype=dtype,
                             overwrite=overwrite)
    try:
        for a in range(0, T, shard_tokens):
            b = min(a + shard_tokens, T)
            writer.append({info.name: read(info.name, a, b) for info in infos},
                          meta["token_ids"][a:b], meta["sequence_ids"][a:b], meta["positions"][a:b])
        writer.close()
    except BaseException as exc:
        _remove_partial_log(out, created)
        if isinstance(exc, LogError) and capture.get("file"):
            exc.add_note(f"while importing {capture['file']}; no log was left at {out}")
        raise
    return RouterLog.open(out)


def _remove_partial_log(out: Path, created: bool) -> None:
    """Remove the log a failed import was writing (only the files the writer makes)."""
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    (out / (MANIFEST_NAME + TMP_SUFFIX)).unlink(missing_ok=True)
    shutil.rmtree(out / SHARDS_DIR, ignore_errors=True)
    if created:
        try:
            out.rmdir()
        except OSError:
            pass
