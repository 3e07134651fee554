"""The crash-safe router-log writer: buffer tokens on the CPU, write a shard every ``shard_tokens``.

Each shard is written as ``shards/NNNNN.safetensors.tmp``, fsynced, renamed, and only then listed in
``manifest.json`` (rewritten atomically with the shard's sha256). A process killed at any moment
leaves a log that opens and validates, holding every shard completed before the kill, marked
incomplete. A new log is written in place; replacing an existing one (``overwrite=True``) builds
the new log in a hidden sibling directory and swaps it in only when the writer closes cleanly
(:mod:`usmoe_lp.staging`), so a refused or interrupted run never loses the old log. Every file
gets the permissions of a normally created file (0o666 less the umask).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from usmoe_lp.logs.errors import OVERWRITE_FLAG, InvalidLogInput, LogExists, NonFiniteLogits
from usmoe_lp.logs.format import (
    CONTENT_VERSIONS,
    CONTENTS,
    HIDDEN,
    LOGITS,
    MANIFEST_NAME,
    METADATA_TENSORS,
    ROUTER_LOG_OWNED,
    ROUTER_WEIGHTS_NAME,
    SELECTED,
    SELECTION_DTYPES,
    SHARDS_DIR,
    TMP_SUFFIX,
    WEIGHTS,
    FileInfo,
    LayerInfo,
    Manifest,
    ModelInfo,
    ShardInfo,
    TensorSpec,
    TokenOrder,
    atomic_write_text,
    dtype_name,
    fsync_dir,
    fsync_file,
    library_versions,
    non_finite,
    sha256_file,
    shard_file,
)
from usmoe_lp.staging import check_destination, foreign_entries, staging_path, swap_in


class RouterLogWriter:
    """Write a router log shard by shard, with bounded memory.

    ``layers``: the MoE layers (:class:`LayerInfo`, N experts each). ``model``: a :class:`ModelInfo`
    or a mapping with keys name/family/revision. ``capture``: JSON-serialisable capture settings,
    stored verbatim. ``shard_tokens``: tokens per shard (the last shard may be shorter).
    ``dtype``: cast logits and hidden states to this dtype (None keeps the captured dtype, bf16
    included). ``device``: recorded in the manifest (None: inferred from the first logits).
    ``overwrite``: replace an existing router log at ``path`` (never anything else); without it a
    non-empty ``path`` is refused (:class:`LogExists`; for an incomplete log left by an interrupted
    run the message says so: there is no resume, the run starts again with ``overwrite=True``).
    The replacement is written aside and swapped in by :meth:`close`; until then, and for good if
    the run fails, ``path`` keeps the old log. ``overwrite_flag``: how the caller's interface spells
    ``overwrite=True`` in messages (the CLI passes ``"--overwrite"``). ``fsync=False`` skips fsync
    (tests only: not crash-safe). ``content``: ``"logits"`` (default) or ``"selection"``, a log of the
    selected experts without logits (format version 2; :mod:`usmoe_lp.logs.format`).

    Token metadata follows :class:`~usmoe_lp.logs.format.TokenOrder` (positions and sequence ids
    >= 0, each sequence's positions increasing through the log); :meth:`append` refuses a batch
    that breaks it.

    The buffer holds fewer than ``shard_tokens`` tokens between calls, plus whatever one
    :meth:`append` brings: appending chunks of at most ``shard_tokens`` tokens keeps it under two
    shards (see :attr:`buffered_bytes` and :attr:`max_buffered_bytes`).

    >>> import tempfile, torch
    >>> from usmoe_lp.logs import LayerInfo, RouterLog, RouterLogWriter
    >>> path = tempfile.mkdtemp() + "/log"
    >>> with RouterLogWriter(path, [LayerInfo("l0", num_experts=4, top_k=2)], shard_tokens=3) as w:
    ...     w.append({"l0": torch.arange(20.0).reshape(5, 4)}, token_ids=[7, 8, 9, 10, 11],
    ...              sequence_ids=[0, 0, 0, 1, 1], positions=[0, 1, 2, 0, 1])
    >>> [(s.file, s.token_start, s.token_stop) for s in RouterLog.open(path).manifest.shards]
    [('shards/00000.safetensors', 0, 3), ('shards/00001.safetensors', 3, 5)]
    """

    def __init__(
        self,
        path: str | os.PathLike,
        layers: Sequence[LayerInfo],
        *,
        model: ModelInfo | Mapping[str, Any] | None = None,
        capture: Mapping[str, Any] | None = None,
        shard_tokens: int = 65536,
        dtype: torch.dtype | None = None,
        device: str | None = None,
        overwrite: bool = False,
        fsync: bool = True,
        overwrite_flag: str = OVERWRITE_FLAG,
        content: str = "logits",
    ) -> None:
        layers = tuple(layers)
        if content not in CONTENTS:
            raise InvalidLogInput(f"content must be one of {', '.join(CONTENTS)}, got {content!r}")
        if content == "selection" and dtype is not None:
            raise InvalidLogInput("dtype casts logits; a selection log has none (leave dtype=None)")
        if not layers or not all(isinstance(layer, LayerInfo) for layer in layers):
            raise InvalidLogInput("layers must be a non-empty sequence of LayerInfo")
        names = [layer.name for layer in layers]
        if len(set(names)) != len(names):
            raise InvalidLogInput(f"layer names must be distinct, got {names}")
        if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
            raise InvalidLogInput(f"shard_tokens must be an integer >= 1, got {shard_tokens!r}")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise InvalidLogInput(f"dtype must be a floating torch dtype or None, got {dtype!r}")
        if dtype is not None:
            dtype_name(dtype)
        if model is None:
            model = ModelInfo()
        elif isinstance(model, Mapping):
            unknown = set(model) - {"name", "family", "revision"}
            if unknown:
                raise InvalidLogInput(f"model has unknown keys {sorted(unknown)}; use name, family, revision")
            model = ModelInfo(**model)
        elif not isinstance(model, ModelInfo):
            raise InvalidLogInput(f"model must be a ModelInfo or a mapping, got {type(model).__name__}")
        capture = dict(capture or {})
        try:
            json.dumps(capture, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidLogInput(f"capture settings must be JSON-serialisable: {exc}") from None

        self._path = Path(path)
        self._overwrite_flag = overwrite_flag
        self._layers = layers
        self._shard_tokens = shard_tokens
        self._dtype = dtype
        self._fsync = fsync
        self._buffers: dict[str, list[torch.Tensor]] = {}
        self._buffered_tokens = 0
        self._buffered_bytes = 0
        self._max_buffered_bytes = 0
        self._closed = False
        self._order = TokenOrder()
        self._file_mode: int | None = None       # that of the first manifest, a normally created file
        self._dir = self._prepare_directory(overwrite)   # where the files go: path, or a sibling to swap in
        self._manifest = Manifest(
            model=model, layers=layers, capture=capture, versions=library_versions(), device=device,
            created=datetime.now(UTC).isoformat(timespec="seconds"), format_version=CONTENT_VERSIONS[content],
            content=content)
        try:
            (self._dir / SHARDS_DIR).mkdir()
            self._write_manifest()
            self._file_mode = stat.S_IMODE(os.stat(self._dir / MANIFEST_NAME).st_mode)
        except BaseException:
            self.discard()
            raise

    # ------------------------------------------------------------------ properties
    @property
    def path(self) -> Path:
        """Where the log is (and, when replacing one, will be once :meth:`close` succeeds)."""
        return self._path

    @property
    def staged(self) -> bool:
        """True when replacing an existing log: the new one is written aside and swapped in by :meth:`close`."""
        return self._dir != self._path

    @property
    def manifest(self) -> Manifest:
        """The manifest as last written to disk."""
        return self._manifest

    @property
    def shard_tokens(self) -> int:
        return self._shard_tokens

    @property
    def tokens_written(self) -> int:
        """Tokens in completed shards (listed in the manifest)."""
        return self._manifest.num_tokens

    @property
    def buffered_tokens(self) -> int:
        """Tokens appended but not yet in a shard."""
        return self._buffered_tokens

    @property
    def buffered_bytes(self) -> int:
        """Bytes of the tensors held in the buffer now."""
        return self._buffered_bytes

    @property
    def max_buffered_bytes(self) -> int:
        """The largest :attr:`buffered_bytes` seen so far (the writer's own memory high-water mark)."""
        return self._max_buffered_bytes

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ writing
    def append(
        self,
        logits: Mapping[str, Any] | None,
        token_ids: Any,
        sequence_ids: Any,
        positions: Any,
        selected: Mapping[str, Any] | None = None,
        weights: Mapping[str, Any] | None = None,
        hidden: Mapping[str, Any] | None = None,
    ) -> None:
        """Buffer n tokens; write every shard that fills up.

        ``logits``: layer name -> (n, N) floating tensor, every layer of the log, finite (None for a
        selection log, ``content="selection"``: then ``selected`` holds every layer, (n, k) integer expert
        ids in [-1, N), -1 = an empty slot, and ``hidden`` is None).
        ``token_ids``, ``sequence_ids``, ``positions``: (n,) integers (token id -1 if unknown).
        ``selected``: layer -> what the model used, (n, k) expert indices or an (n, N) bool mask.
        ``weights``: layer -> (n, k) or (n, N) gate weights. ``hidden``: layer -> (n, d) pre-router
        hidden states. Tensors may live on any device and be numpy arrays; they are copied to the
        CPU (the caller may reuse its buffers). The tensors of the first append fix the schema
        (names, dtypes, row shapes); later appends must match it.
        """
        if self._closed:
            raise InvalidLogInput(f"append() on a closed writer of {self._path}")
        batch, n = self._validate(logits, token_ids, sequence_ids, positions, selected, weights, hidden)
        if n == 0:
            return
        for name, tensor in batch.items():
            self._buffers.setdefault(name, []).append(
                tensor.detach().to("cpu", memory_format=torch.contiguous_format, copy=True))
            self._buffered_bytes += tensor.numel() * tensor.element_size()
        self._buffered_tokens += n
        self._max_buffered_bytes = max(self._max_buffered_bytes, self._buffered_bytes)
        while self._buffered_tokens >= self._shard_tokens:
            self._flush(self._shard_tokens)

    def write_router_weights(self, weights: Mapping[str, Any]) -> None:
        """Store router weights once: layer name -> (N, d) floating tensor, in ``router_weights.safetensors``.

        Written atomically (temporary file, fsync, rename) and checksummed in the manifest; a
        second call replaces the first.
        """
        if self._closed:
            raise InvalidLogInput(f"write_router_weights() on a closed writer of {self._path}")
        if not isinstance(weights, Mapping) or not weights:
            raise InvalidLogInput("router weights must be a non-empty mapping layer -> (N, d) tensor")
        layers = {layer.name: layer for layer in self._layers}
        tensors = {}
        for name, w in weights.items():
            if name not in layers:
                raise InvalidLogInput(f"router weights for unknown layer {name!r}; layers: {sorted(layers)}")
            t = _as_tensor(w, f"router weights of layer {name!r}")
            if t.ndim != 2 or t.shape[0] != layers[name].num_experts or not t.dtype.is_floating_point:
                raise InvalidLogInput(f"router weights of layer {name!r} must be a floating "
                                      f"(N={layers[name].num_experts}, d) tensor, got {tuple(t.shape)} {t.dtype}")
            tensors[name] = t.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        final = self._dir / ROUTER_WEIGHTS_NAME
        sha, size = self._write_safetensors(tensors, final, {"format": "pt"})
        self._manifest = dataclasses.replace(self._manifest, router_weights=FileInfo(ROUTER_WEIGHTS_NAME, sha, size))
        self._write_manifest()

    def flush(self) -> None:
        """Write the buffered tokens as a (possibly short) shard now."""
        if self._buffered_tokens:
            self._flush(self._buffered_tokens)

    def close(self) -> None:
        """Write the remaining tokens and mark the log complete (then swap it in, when replacing a
        log). Idempotent. If it fails, a log written in place stays marked incomplete and a
        replacement is discarded (the old log stays)."""
        if self._closed:
            return
        try:
            self._finish(complete=True)
            if self.staged:
                check_destination(self._path, what="router log", overwrite=True, foreign=_foreign_entries,
                                  overwrite_flag=self._overwrite_flag, error=LogExists)
                swap_in(self._dir, self._path)
                self._dir = self._path
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Give up after a failure: a replacement being written aside is removed (the old log stays as
        it was); a log written in place keeps its completed shards and stays marked incomplete."""
        if self.staged:
            self._closed = True
            shutil.rmtree(self._dir, ignore_errors=True)
            return
        if not self._closed:
            self._closed = True
            self._buffers.clear()

    def __enter__(self) -> RouterLogWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
            return
        if self.staged:  # a failed replacement: the old log stays, the new one goes
            self.discard()
            return
        try:  # keep what was captured before the error; the log stays marked incomplete
            self._finish(complete=False)
        except Exception as flush_exc:  # the original exception matters more
            exc.add_note(f"router log {self._path}: buffered tokens could not be written: {flush_exc}")

    def __repr__(self) -> str:
        return (f"RouterLogWriter({str(self._path)!r}, layers={len(self._layers)}, "
                f"tokens_written={self.tokens_written}, buffered_tokens={self._buffered_tokens}, "
                f"closed={self._closed})")

    # ------------------------------------------------------------------ internals
    def _finish(self, complete: bool) -> None:
        if self._closed:
            return
        self.flush()
        self._closed = True
        self._manifest = dataclasses.replace(self._manifest, complete=complete)
        self._write_manifest()

    def _validate(self, logits, token_ids, sequence_ids, positions, selected, weights, hidden):
        if self._manifest.content == "selection":
            return self._validate_selection(logits, token_ids, sequence_ids, positions, selected, weights, hidden)
        expected = self._check_every_layer(logits, "logits", "(n, N) tensor")
        batch: dict[str, torch.Tensor] = {}
        n = None
        for layer in self._layers:
            t = _as_tensor(logits[layer.name], f"logits of layer {layer.name!r}")
            if t.ndim != 2 or t.shape[1] != layer.num_experts:
                raise InvalidLogInput(f"logits of layer {layer.name!r} must be (n, N={layer.num_experts}), "
                                      f"got {tuple(t.shape)}")
            if not t.dtype.is_floating_point:
                raise InvalidLogInput(f"logits of layer {layer.name!r} must be floating, got {t.dtype}")
            if n is None:
                n = t.shape[0]
            elif t.shape[0] != n:
                raise InvalidLogInput(f"logits of layer {layer.name!r} have {t.shape[0]} tokens but layer "
                                      f"{self._layers[0].name!r} has {n}; every layer must cover the same tokens")
            _check_finite(t, layer.name, "")
            if self._dtype is not None and t.dtype != self._dtype:
                t = t.to(self._dtype)
                _check_finite(t, layer.name, f" after casting to {dtype_name(self._dtype)}")
            batch[LOGITS + layer.name] = t
        batch.update(_token_metadata((token_ids, sequence_ids, positions), n, "logits"))
        layer_names = set(expected)
        for prefix, group, kind in ((SELECTED, selected, "selected"), (WEIGHTS, weights, "weights"),
                                    (HIDDEN, hidden, "hidden")):
            if group is None:
                continue
            if not isinstance(group, Mapping):
                raise InvalidLogInput(f"{kind} must be a mapping layer name -> tensor, got {type(group).__name__}")
            for name, value in group.items():
                if name not in layer_names:
                    raise InvalidLogInput(f"{kind} for unknown layer {name!r}; layers: {expected}")
                t = _as_tensor(value, f"{kind} of layer {name!r}")
                if t.ndim != 2 or t.shape[0] != n:
                    raise InvalidLogInput(f"{kind} of layer {name!r} must be ({n}, ...) to match the logits, "
                                          f"got {tuple(t.shape)}")
                if kind == "selected" and t.dtype.is_floating_point:
                    raise InvalidLogInput(f"selected of layer {name!r} must be integer expert indices or a bool mask, "
                                          f"got {t.dtype}")
                if kind != "selected" and not t.dtype.is_floating_point:
                    raise InvalidLogInput(f"{kind} of layer {name!r} must be floating, got {t.dtype}")
                if kind == "hidden" and self._dtype is not None:
                    t = t.to(self._dtype)
                batch[prefix + name] = t
        dtypes = sorted({dtype_name(batch[LOGITS + name].dtype) for name in expected})
        if not self._manifest.tensors and n and len(dtypes) > 1:
            raise InvalidLogInput(f"every layer's logits must have one dtype, got {dtypes}; "
                                  "pass dtype= to the writer to cast them")
        return self._accept(batch, n, dtype=dtypes[0], device_of=LOGITS + expected[0])

    def _accept(self, batch: dict[str, torch.Tensor], n: int, *, dtype: str | None,
                device_of: str) -> tuple[dict[str, torch.Tensor], int]:
        """The checked batch against the log's schema (the first batch with tokens fixes it, with the logits
        ``dtype`` and the device of tensor ``device_of``), then against the token order: last of the checks, as
        it remembers the tokens it accepts."""
        schema = {name: TensorSpec(dtype_name(t.dtype), tuple(t.shape[1:])) for name, t in batch.items()}
        first = not self._manifest.tensors and n
        if self._manifest.tensors and schema != self._manifest.tensors:
            raise InvalidLogInput(_schema_difference(self._manifest.tensors, schema, self._path))
        problem = self._order.check(batch["sequence_ids"].cpu().numpy(), batch["positions"].cpu().numpy())
        if problem is not None:
            row, what = problem
            raise InvalidLogInput(f"token {row} of this batch {what}; a router log holds each token of a sequence "
                                  f"once, in order ({self._path})")
        if first:
            self._manifest = dataclasses.replace(
                self._manifest, tensors=schema, dtype=dtype,
                device=self._manifest.device or _device_name(batch[device_of].device))
        return batch, n

    def _check_every_layer(self, group: Any, kind: str, what: str) -> list[str]:
        """The log's layer names, once ``group`` (``logits`` or ``selected``) is a mapping with exactly those keys."""
        if not isinstance(group, Mapping):
            raise InvalidLogInput(f"{kind} must be a mapping layer name -> {what}, got {type(group).__name__}")
        expected = [layer.name for layer in self._layers]
        missing = [name for name in expected if name not in group]
        extra = [name for name in group if name not in expected]
        if missing or extra:
            raise InvalidLogInput(f"{kind} must hold exactly the log's layers {expected}; missing {missing}, "
                                  f"unknown {extra}")
        return expected

    def _validate_selection(self, logits, token_ids, sequence_ids, positions, selected, weights, hidden):
        """:meth:`_validate` for a selection log: ``selected`` of every layer, (n, k) integer ids in [-1, N)."""
        if logits is not None:
            raise InvalidLogInput("this is a selection log (content='selection'): pass logits=None and the experts "
                                  "in selected=")
        if hidden is not None:
            raise InvalidLogInput("a selection log holds no hidden states (hidden must be None)")
        expected = self._check_every_layer(selected, "selected", "(n, k) expert ids")
        batch: dict[str, torch.Tensor] = {}
        n = None
        for layer in self._layers:
            t = _as_tensor(selected[layer.name], f"selected of layer {layer.name!r}")
            if t.ndim != 2 or t.shape[1] < 1:
                raise InvalidLogInput(f"selected of layer {layer.name!r} must be (n, k) expert ids, got "
                                      f"{tuple(t.shape)}")
            if layer.top_k is not None and t.shape[1] != layer.top_k:
                raise InvalidLogInput(f"selected of layer {layer.name!r} has {t.shape[1]} experts per token but the "
                                      f"layer says top_k = {layer.top_k}")
            if str(t.dtype).removeprefix("torch.") not in SELECTION_DTYPES:
                raise InvalidLogInput(f"selected of layer {layer.name!r} must be integer expert ids "
                                      f"({', '.join(SELECTION_DTYPES)}), got {t.dtype}")
            if n is None:
                n = t.shape[0]
            elif t.shape[0] != n:
                raise InvalidLogInput(f"selected of layer {layer.name!r} has {t.shape[0]} tokens but layer "
                                      f"{self._layers[0].name!r} has {n}; every layer must cover the same tokens")
            if t.numel():
                lo, hi = int(t.min()), int(t.max())
                if lo < -1 or hi >= layer.num_experts:
                    bad = lo if lo < -1 else hi
                    raise InvalidLogInput(f"selected of layer {layer.name!r} holds expert id {bad}; ids must be in "
                                          f"[0, {layer.num_experts}) or -1 for an empty slot")
            batch[SELECTED + layer.name] = t
        batch.update(_token_metadata((token_ids, sequence_ids, positions), n, "selections"))
        for name, value in (weights or {}).items():
            if name not in expected:
                raise InvalidLogInput(f"weights for unknown layer {name!r}; layers: {expected}")
            t = _as_tensor(value, f"weights of layer {name!r}")
            shape = tuple(batch[SELECTED + name].shape)
            if tuple(t.shape) != shape or not t.dtype.is_floating_point:
                raise InvalidLogInput(f"weights of layer {name!r} must be floating {shape} like its selection, "
                                      f"got {tuple(t.shape)} {t.dtype}")
            batch[WEIGHTS + name] = t
        return self._accept(batch, n, dtype=None, device_of=SELECTED + expected[0])

    def _flush(self, n: int) -> None:
        tensors: dict[str, torch.Tensor] = {}
        remaining_bytes = 0
        for name, parts in self._buffers.items():
            whole = parts[0] if len(parts) == 1 else torch.cat(parts)
            tensors[name] = whole[:n]
            rest = whole[n:].clone()
            self._buffers[name] = [rest] if rest.shape[0] else []
            remaining_bytes += rest.numel() * rest.element_size()
        index = len(self._manifest.shards)
        start = self._manifest.num_tokens
        relative = shard_file(index)
        meta = {"format": "pt", "usmoe_lp_format_version": str(self._manifest.format_version),
                "shard_index": str(index), "token_start": str(start), "token_stop": str(start + n)}
        sha, size = self._write_safetensors(tensors, self._dir / relative, meta)
        del tensors
        self._buffered_tokens -= n
        self._buffered_bytes = remaining_bytes
        shard = ShardInfo(relative, start, start + n, sha, size)
        self._manifest = dataclasses.replace(self._manifest, shards=(*self._manifest.shards, shard),
                                             num_tokens=start + n)
        self._write_manifest()

    def _write_safetensors(self, tensors: dict[str, torch.Tensor], final: Path, meta: dict[str, str]):
        tmp = final.with_name(final.name + TMP_SUFFIX)
        save_file(tensors, str(tmp), metadata=meta)
        os.chmod(tmp, self._file_mode)    # safetensors creates its files 0600
        if self._fsync:
            fsync_file(tmp)
        sha, size = sha256_file(tmp), tmp.stat().st_size
        os.replace(tmp, final)
        if self._fsync:
            fsync_dir(final.parent)
        return sha, size

    def _write_manifest(self) -> None:
        path = self._dir / MANIFEST_NAME
        if self._fsync:
            atomic_write_text(path, self._manifest.to_json(), self._file_mode)
        else:
            tmp = path.with_name(path.name + TMP_SUFFIX)
            tmp.write_text(self._manifest.to_json())
            if self._file_mode is not None:
                os.chmod(tmp, self._file_mode)
            os.replace(tmp, path)

    def _prepare_directory(self, overwrite: bool) -> Path:
        """The directory to write into: ``path`` itself when it is new or empty (created as needed), else a
        fresh sibling to swap in on :meth:`close` (``path`` must then hold a router log and ``overwrite``)."""
        path = self._path
        if not overwrite:
            _refuse_incomplete_log(path, self._overwrite_flag)
        replacing = check_destination(path, what="router log", overwrite=overwrite, foreign=_foreign_entries,
                                      overwrite_flag=self._overwrite_flag, error=LogExists)
        target = staging_path(path) if replacing else path
        try:
            target.mkdir(parents=True, exist_ok=not replacing)
        except OSError as exc:
            raise LogExists(f"cannot write the router log {path}: {exc.strerror or exc}") from None
        return target


# ----------------------------------------------------------------------------- helpers
def _foreign_entries(path: Path) -> list[str]:
    """Entries of ``path`` that no router-log writer makes (what an overwrite must never delete)."""
    return foreign_entries(path, ROUTER_LOG_OWNED)


def _refuse_incomplete_log(path: Path, overwrite_flag: str) -> None:
    """Raise :class:`LogExists` if ``path`` holds a router log its writer never closed (an interrupted run)."""
    manifest = path / MANIFEST_NAME
    if manifest.is_symlink() or not manifest.is_file():
        return
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(data, dict) and data.get("complete") is not True:
        tokens = data.get("num_tokens")
        raise LogExists(incomplete_log_message(path, tokens if isinstance(tokens, int) else None, overwrite_flag))


def incomplete_log_message(path: Path, tokens: int | None, overwrite_flag: str = OVERWRITE_FLAG) -> str:
    """What :class:`LogExists` says about an incomplete log at ``path`` (``overwrite_flag``: the interface's
    spelling of ``overwrite=True``)."""
    held = f" of {tokens} tokens" if tokens is not None else ""
    return (f"{path} holds an incomplete router log{held} (from an interrupted run: its writer never closed it); "
            f"there is no resume: pass {overwrite_flag} to start the run again from the beginning (it replaces "
            f"this log), or choose another directory")


def _token_metadata(values: tuple[Any, Any, Any], n: int, against: str) -> dict[str, torch.Tensor]:
    """token_ids, sequence_ids, positions as (n,) int64 tensors, checked (``against``: what fixes n, for messages)."""
    out = {}
    for name, value in zip(METADATA_TENSORS, values, strict=True):
        t = _as_tensor(value, name)
        if t.ndim != 1 or t.shape[0] != n:
            raise InvalidLogInput(f"{name} must be ({n},) to match the {against}, got {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise InvalidLogInput(f"{name} must be integers, got {t.dtype}")
        out[name] = t.to(torch.int64)
    return out


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise TypeError("object arrays are not supported")
            return torch.from_numpy(np.ascontiguousarray(value))
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidLogInput(f"{what}: cannot make a tensor of {type(value).__name__} ({exc})") from None


def _check_finite(t: torch.Tensor, layer: str, after: str) -> None:
    found = non_finite(t)
    if found is None:
        return
    n_nan, n_inf, row, col = found
    raise NonFiniteLogits(f"logits of layer {layer!r} have {n_nan} NaN and {n_inf} Inf entries{after} (first at "
                          f"token {row} of this batch, expert {col}); raw router logits must be finite — drop or "
                          "mask padding instead of writing -inf")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            return f"{device} ({torch.cuda.get_device_name(device)})"
        except (RuntimeError, AssertionError):
            return str(device)
    return str(device)


def _schema_difference(old: Mapping[str, TensorSpec], new: Mapping[str, TensorSpec], path: Path) -> str:
    missing = sorted(set(old) - set(new))
    extra = sorted(set(new) - set(old))
    changed = [f"{k}: {old[k].dtype} {old[k].row_shape} -> {new[k].dtype} {new[k].row_shape}"
               for k in sorted(set(old) & set(new)) if old[k] != new[k]]
    parts = [f"missing {missing}" if missing else "", f"new {extra}" if extra else "",
             f"changed {changed}" if changed else ""]
    return (f"this append does not match the tensors of the first append to {path} "
            f"({'; '.join(p for p in parts if p)}); every append must give the same tensors, dtypes and row shapes")
