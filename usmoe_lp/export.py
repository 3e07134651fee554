"""Export a router log's per-token table to Parquet, for pandas, polars and DuckDB users.

The table is *long* (tidy): one row per (layer, token), the form a dataframe groups, filters and
joins without reshaping (``df.groupby("layer")``, ``WHERE layer = '...'``, a join with a token
table on ``token_index``). Columns:

============== ======================================= ==================================================
column         Arrow type                              meaning
============== ======================================= ==================================================
layer_index    int32                                   the layer's place in the log's layer order
layer          dictionary<int32, string>               the layer name (a pandas/polars categorical)
token_index    int64                                   the token's row in the log (0 .. T-1)
sequence_id    int64                                   the sequence the token belongs to
position       int64                                   its position in that sequence
token_id       int64                                   its vocabulary id (-1 where not recorded)
experts        list<int32>                             the model's selected experts, most probable first
probabilities  list<float32>                           their routing probabilities, in the same order
logits         fixed_size_list<float32>[N] (optional)  the raw router logits (float64 for a float64 log;
                                                       a variable-size list when the layers' N differ)
============== ======================================= ==================================================

A *selection log* (``RouterLog.has_logits`` False: the experts a serving or training stack recorded,
:mod:`usmoe_lp.logs.foreign`) has no logits, so its table has no ``probabilities`` nor ``logits``
column: ``experts`` holds the recorded ids in the log's order (empty slots, -1, left out), and a
``weights`` column (list<float32>, the recorded gate weights in the same order) is added when the log
records weights. ``include_logits`` is refused for it.

``experts`` is the model's selection as :func:`usmoe_lp.analyze` defines it
(:func:`usmoe_lp.diagnostics.stream.model_mask`): the selection the log captured, else the registry's
``native`` router replayed on the logits where the layer's routing semantics are recorded, else the
top-k of the routing probabilities (ties to the lowest expert index). A token an expert capacity
dropped has fewer experts (its lists are shorter). ``probabilities`` are the model's routing
distribution (:func:`usmoe_lp.routing.probabilities` with the layer's score function) at those experts;
ties in probability list the lower expert index first.

Rows are sorted by ``(layer_index, token_index)`` (declared as the file's sorting columns), so a
filter on one layer reads only that layer's row groups. The file's key-value metadata ``usmoe_lp``
holds JSON: the source log, its model, and per layer N, k, the score function and where the
selection came from (``captured``, ``recomputed native``, ``recomputed top-k``); read it with
``json.loads(pyarrow.parquet.read_metadata(path).metadata[b"usmoe_lp"])``.

The log is streamed: one chunk of ``chunk_tokens`` tokens of one layer at a time
(:meth:`RouterLog.iter_chunks`, finite logits checked, so a damaged shard names itself), each written
as one row group through ``pyarrow.parquet.ParquetWriter``; memory stays bounded whatever the log's
size. The file is written to a hidden temporary sibling and renamed into place only when complete:
an interrupted export never leaves a half-written file, and an existing file is replaced only with
``overwrite=True`` and only if it is a Parquet file.

Reading the table back::

    pandas.read_parquet("log.parquet")                       # experts/probabilities: arrays per row
    polars.read_parquet("log.parquet")                       # list columns
    duckdb.sql("SELECT layer, unnest(experts) AS e, count(*) FROM 'log.parquet' GROUP BY ALL")

The export computes the model's selection with the analysis layer's definition, which sits above
:mod:`usmoe_lp.logs`; it is imported when an export runs, never when :mod:`usmoe_lp.logs` is.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from usmoe_lp._validate import check_int
from usmoe_lp.errors import InvalidParameter, OutputExists, UsmoeLpError
from usmoe_lp.logs.errors import MissingLayer
from usmoe_lp.logs.reader import RouterLog
from usmoe_lp.staging import STAGING_MARK, STAGING_PREFIX, fsync_dir

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["COLUMNS", "ExportResult", "ParquetUnavailable", "export_parquet", "parquet_schema"]

COLUMNS = ("layer_index", "layer", "token_index", "sequence_id", "position", "token_id", "experts",
           "probabilities", "logits")
"""The columns of the exported table, in order (``logits`` only with ``include_logits``; a selection log's
table ends with ``experts`` and, where it records weights, ``weights``)."""

METADATA_KEY = b"usmoe_lp"
TABLE_FORMAT = "usmoe-lp per-token routing table"
TABLE_VERSION = 1
_PARQUET_MAGIC = b"PAR1"


class ParquetUnavailable(UsmoeLpError, ImportError):
    """pyarrow, which writes Parquet, is not installed."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_parquet` wrote.

    Attributes:
        path: the Parquet file.
        rows: rows written (layers x tokens).
        layers: the exported layers, in order.
        num_tokens: tokens per layer.
        row_groups: row groups written (one per chunk of one layer).
        bytes: the file's size.
        selection_source: layer -> ``captured``, ``recomputed native`` or ``recomputed top-k``.
    """

    path: Path
    rows: int
    layers: tuple[str, ...]
    num_tokens: int
    row_groups: int
    bytes: int
    selection_source: dict[str, str]


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ParquetUnavailable("exporting to Parquet needs pyarrow, which is not installed: pip install pyarrow") \
            from None
    return pa, pq


def parquet_schema(layers: Sequence[str], num_experts: Sequence[int], *, include_logits: bool = False,
                   float64_logits: bool = False, selection: bool = False, weights: bool = False) -> pa.Schema:
    """The Arrow schema of the table (module docstring) for layers with ``num_experts`` experts each.

    ``logits`` is a fixed-size list of N when every layer has the same N, else a list; float64 for a
    float64 log (``float64_logits``), float32 otherwise (exact for bfloat16 and float16 logs).
    ``selection``: the table of a selection log (no ``probabilities`` / ``logits``; a ``weights`` list
    column with ``weights``).
    """
    pa, _ = _pyarrow()
    fields = [
        pa.field("layer_index", pa.int32(), nullable=False),
        pa.field("layer", pa.dictionary(pa.int32(), pa.string()), nullable=False),
        pa.field("token_index", pa.int64(), nullable=False),
        pa.field("sequence_id", pa.int64(), nullable=False),
        pa.field("position", pa.int64(), nullable=False),
        pa.field("token_id", pa.int64(), nullable=False),
        pa.field("experts", pa.list_(pa.field("item", pa.int32(), nullable=False)), nullable=False),
    ]
    floats = pa.list_(pa.field("item", pa.float32(), nullable=False))
    if selection:
        return pa.schema(fields + ([pa.field("weights", floats, nullable=False)] if weights else []))
    fields.append(pa.field("probabilities", floats, nullable=False))
    if include_logits:
        value = pa.field("item", pa.float64() if float64_logits else pa.float32(), nullable=False)
        sizes = set(num_experts)
        kind = pa.list_(value, sizes.pop()) if len(sizes) == 1 else pa.list_(value)
        fields.append(pa.field("logits", kind, nullable=False))
    return pa.schema(fields)


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse a destination that is not a new file or (with ``overwrite``) an earlier Parquet file."""
    if out.is_symlink():
        raise OutputExists(f"{out} is a symbolic link; choose a real path for the Parquet file")
    if out.is_dir():
        raise OutputExists(f"{out} is a directory; give the path of the Parquet file to write (e.g. "
                           f"{out.with_name(out.name + '.parquet')})")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise OutputExists(f"{parent} is a file, so {out} cannot be created; choose another path")
    if not out.exists():
        return
    if not overwrite:
        raise OutputExists(f"{out} exists; refusing to overwrite it: choose another path or pass overwrite=True "
                           "to replace it")
    if not _is_parquet(out):
        raise OutputExists(f"{out} exists and is not a Parquet file; refusing to replace it even with "
                           "overwrite=True: choose another path")


def _is_parquet(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            if f.seek(0, os.SEEK_END) < 12:
                return False
            f.seek(-4, os.SEEK_END)
            return head == _PARQUET_MAGIC and f.read(4) == _PARQUET_MAGIC
    except OSError:
        return False


def _ranked(mask: torch.Tensor, probs: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets (n+1,) int32, experts int32, probabilities float32): each row's selected experts,
    most probable first (ties: lower index first)."""
    m = mask.numpy()
    p = probs.numpy().astype(np.float32, copy=False)
    n = m.shape[0]
    counts = m.sum(axis=1)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    width = int(counts.max()) if counts.size else 0
    if width == 0:
        return offsets, np.empty(0, np.int32), np.empty(0, np.float32)
    if np.all(counts == width):  # the usual case: k experts per token; sort the k, not the N
        cols = np.nonzero(m)[1].reshape(n, width)  # ascending expert index within each row
        vals = np.take_along_axis(p, cols, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")  # stable: ties keep the lower index first
        return (offsets, np.take_along_axis(cols, order, axis=1).astype(np.int32).reshape(-1),
                np.take_along_axis(vals, order, axis=1).reshape(-1))
    key = np.where(m, p, -np.inf)
    order = np.argsort(-key, axis=1, kind="stable")[:, :width]
    keep = np.arange(width)[None, :] < counts[:, None]
    return offsets, order[keep].astype(np.int32), np.take_along_axis(p, order, axis=1)[keep]


def _logits_array(pa, logits: torch.Tensor, kind):
    """(n, N) logits as the ``logits`` column of Arrow type ``kind`` (float32, or float64 for a float64 log)."""
    float64 = kind.value_type == pa.float64()
    values = logits.to(torch.float64 if float64 else torch.float32).numpy()
    n, N = values.shape
    flat = pa.array(values.reshape(-1))
    if isinstance(kind, pa.FixedSizeListType):
        return pa.FixedSizeListArray.from_arrays(flat, type=kind)
    return pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * N, N, dtype=np.int32)), flat, type=kind)


def export_parquet(log: RouterLog | str | os.PathLike, out: str | os.PathLike, *,
                   layers: Sequence[str] | None = None, include_logits: bool = False, top_k: int | None = None,
                   chunk_tokens: int = 65536, overwrite: bool = False, compression: str = "zstd",
                   progress: Callable[[int], None] | None = None) -> ExportResult:
    """Write the per-token table of a router log to the Parquet file ``out`` (module docstring).

    Args:
        log: a :class:`RouterLog` or the path of one (opened with lazy verification).
        out: the ``.parquet`` file to write.
        layers: the layers to export, in this order (default: all, in the log's order).
        include_logits: add the raw router logits as a fixed-size list column (N values per row).
        top_k: the model's experts per token, for a log that does not record it (an error where the
            log records another k; :func:`usmoe_lp.diagnostics.analyze.resolve_top_k`).
        chunk_tokens: tokens per chunk of one layer, and rows per row group.
        overwrite: replace an existing Parquet file at ``out``.
        compression: a Parquet codec (``zstd``, ``snappy``, ``gzip``, ``none``...).
        progress: called with the number of (layer, token) rows written after each chunk.

    Returns:
        An :class:`ExportResult`.

    Raises:
        OutputExists: ``out`` exists (without ``overwrite``), is a directory, or is not a Parquet file.
        MissingLayer: a layer the log does not have.
        InvalidParameter: no model top-k for a layer, bad ``chunk_tokens``.
        CorruptLog / NonFiniteLog: a damaged shard (the message names it).
        ParquetUnavailable: pyarrow is not installed.
    """
    # The analysis layer's definitions of the model's top-k and selection (module docstring).
    from usmoe_lp.diagnostics.analyze import resolve_top_k

    pa, pq = _pyarrow()
    out = Path(out)
    chunk_tokens = check_int(chunk_tokens, "chunk_tokens", low=1)
    if not isinstance(include_logits, bool):
        raise InvalidParameter(f"include_logits must be True or False, got {include_logits!r}")
    _check_out(out, overwrite)
    if not isinstance(log, RouterLog):
        log = RouterLog.open(log)
    if include_logits and not log.has_logits:
        raise InvalidParameter(f"{log.path} is a selection log (the recorded experts, no router logits); "
                               "include_logits=True has no logits to export")
    names = tuple(log.layers if layers is None else layers)
    if not names:
        raise InvalidParameter("layers is empty: name at least one layer to export")
    for name in names:
        if name not in log.layers:
            raise MissingLayer(f"{log.path}: no layer {name!r}; the log's layers are {', '.join(log.layers)}")
    if len(set(names)) != len(names):
        raise InvalidParameter(f"layers names a layer twice: {', '.join(names)}")
    infos = [log.layer_info(n) for n in names]
    ks = resolve_top_k(infos, top_k)
    experts = [info.num_experts for info in infos]
    weights = not log.has_logits and all(f"weights.{n}" in log.manifest.tensors for n in names)
    schema = parquet_schema(names, experts, include_logits=include_logits, float64_logits=log.dtype == torch.float64,
                            selection=not log.has_logits, weights=weights)
    dictionary = pa.array(list(log.layers), pa.string())
    order = {n: i for i, n in enumerate(log.layers)}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{STAGING_PREFIX}{out.name}{STAGING_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    sources: dict[str, str] = {}
    rows = groups = 0
    try:
        sorting = pq.SortingColumn.from_ordering(schema, [("layer_index", "ascending"), ("token_index", "ascending")])
        with pq.ParquetWriter(tmp, schema, compression=compression, sorting_columns=sorting) as writer:
            for name, info in zip(names, infos, strict=True):
                k = ks[name]
                if info.top_k is None:
                    info = replace(info, top_k=k)
                for chunk in log.iter_chunks(name, chunk_tokens, check_finite=True):
                    if log.has_logits:
                        batch = _batch(pa, chunk, info, k, order[name], dictionary, schema, include_logits, sources)
                    else:
                        batch = _selection_batch(pa, chunk, order[name], dictionary, schema)
                        sources[name] = "captured"
                    writer.write_batch(batch)
                    rows += batch.num_rows
                    groups += 1
                    if progress is not None:
                        progress(batch.num_rows)
            writer.add_key_value_metadata({METADATA_KEY: json.dumps(_metadata(log, names, ks, sources),
                                                                    sort_keys=True)})
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ExportResult(path=out, rows=rows, layers=names, num_tokens=log.num_tokens, row_groups=groups,
                        bytes=out.stat().st_size, selection_source=sources)


def _token_columns(pa, chunk, layer_index: int, dictionary) -> list:
    """The columns every table has before ``experts``: layer, token index and token metadata."""
    n = chunk.num_tokens
    return [
        pa.array(np.full(n, layer_index, dtype=np.int32)),
        pa.DictionaryArray.from_arrays(pa.array(np.full(n, layer_index, dtype=np.int32)), dictionary),
        pa.array(np.arange(chunk.token_start, chunk.token_stop, dtype=np.int64)),
        pa.array(chunk.sequence_ids.numpy().astype(np.int64, copy=False)),
        pa.array(chunk.positions.numpy().astype(np.int64, copy=False)),
        pa.array(chunk.token_ids.numpy().astype(np.int64, copy=False)),
    ]


def _selection_batch(pa, chunk, layer_index: int, dictionary, schema) -> Any:
    """One chunk of one layer of a selection log: the recorded (n, k) ids in their order, -1 slots left out,
    and the recorded weights at the same slots where the table has a ``weights`` column."""
    ids = chunk.selected.numpy()
    keep = ids >= 0
    offsets = np.zeros(ids.shape[0] + 1, dtype=np.int32)
    np.cumsum(keep.sum(axis=1), out=offsets[1:])
    offsets = pa.array(offsets)
    columns = _token_columns(pa, chunk, layer_index, dictionary)
    columns.append(pa.ListArray.from_arrays(offsets, pa.array(ids[keep].astype(np.int32)),
                                            type=schema.field("experts").type))
    if "weights" in schema.names:
        values = chunk.weights.float().numpy()[keep]
        columns.append(pa.ListArray.from_arrays(offsets, pa.array(values), type=schema.field("weights").type))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _batch(pa, chunk, info, k: int, layer_index: int, dictionary, schema, include_logits: bool,
           sources: dict[str, str]) -> Any:
    """One chunk of one layer as a record batch (the same steps as the analysis's LayerStream.update)."""
    from usmoe_lp.diagnostics.stream import model_mask, selection_scores
    from usmoe_lp.routing import probabilities

    logits = chunk.logits.float()
    probs = probabilities(logits, info.score_function)
    mask, sources[info.name] = model_mask(chunk, selection_scores(logits, info), k, None, info)
    offsets, experts, values = _ranked(mask, probs)
    offsets = pa.array(offsets)
    columns = [
        *_token_columns(pa, chunk, layer_index, dictionary),
        pa.ListArray.from_arrays(offsets, pa.array(experts), type=schema.field("experts").type),
        pa.ListArray.from_arrays(offsets, pa.array(values), type=schema.field("probabilities").type),
    ]
    if include_logits:
        columns.append(_logits_array(pa, chunk.logits, schema.field("logits").type))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _metadata(log: RouterLog, names: Sequence[str], ks: dict[str, int], sources: dict[str, str]) -> dict:
    from usmoe_lp import __version__

    m = log.manifest
    return {
        "format": TABLE_FORMAT, "version": TABLE_VERSION, "usmoe_lp": __version__,
        "log": str(log.path), "num_tokens": log.num_tokens, "dtype": m.dtype, "content": log.content,
        "model": {"name": m.model.name, "family": m.model.family, "revision": m.model.revision},
        "row_order": ["layer_index", "token_index"],
        "layers": {name: {"index": list(log.layers).index(name), "num_experts": log.num_experts[name],
                          "top_k": ks[name], "score_function": log.layer_info(name).score_function,
                          "selection_source": sources.get(name)} for name in names},
    }
