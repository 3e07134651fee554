"""The validating, lazy router-log reader: open a log, iterate it in chunks, read any token range.

Nothing is loaded at open but ``manifest.json``; shards are memory-mapped (safetensors) and only
the rows asked for are read. Every error names the file and the problem.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open

from usmoe_lp.errors import InvalidParameter
from usmoe_lp.logs.errors import CorruptLog, LogNotFound, MissingLayer
from usmoe_lp.logs.format import (
    HIDDEN,
    LOGITS,
    MANIFEST_NAME,
    METADATA_TENSORS,
    ROUTER_WEIGHTS_NAME,
    SAFETENSORS_DTYPES,
    SELECTED,
    SHARD_SUFFIX,
    SHARDS_DIR,
    TMP_SUFFIX,
    WEIGHTS,
    LayerInfo,
    Manifest,
    ShardInfo,
    sha256_file,
    torch_dtype,
)

Verify = Literal["lazy", "full", "none"]
_VERIFY_MODES = ("lazy", "full", "none")


@dataclass(frozen=True)
class Chunk:
    """Tokens ``[token_start, token_start + n)`` of one layer.

    ``logits``: (n, N) in the captured dtype (bf16 included). ``token_ids``, ``sequence_ids``,
    ``positions``: (n,) int64. ``selected`` / ``weights``: what the model used, (n, k) or (n, N),
    when captured. ``hidden``: (n, d) pre-router hidden states, when captured and asked for.
    """

    logits: torch.Tensor
    token_ids: torch.Tensor
    sequence_ids: torch.Tensor
    positions: torch.Tensor
    token_start: int
    selected: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    layer: str = ""

    @property
    def num_tokens(self) -> int:
        return int(self.logits.shape[0])

    @property
    def token_stop(self) -> int:
        return self.token_start + self.num_tokens

    def __len__(self) -> int:
        return self.num_tokens


@dataclass(frozen=True)
class ValidationReport:
    """What :meth:`RouterLog.validate` checked: shards (existence, size, sha256, tensor names,
    shapes, dtypes), tokens covered, and warnings that are not errors (files on disk the
    manifest does not list, a log whose writer did not close). Errors raise instead."""

    path: Path
    shards_checked: int
    num_tokens: int
    checksums: bool
    router_weights_checked: bool
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return True


class RouterLog:
    """A router log opened for reading (see :mod:`usmoe_lp.logs.format` for the layout).

    Open with :meth:`open`. ``layers``: layer names in capture order; ``num_experts`` and
    ``top_k``: dicts layer -> int (top_k None when unknown); ``num_tokens``: tokens in completed
    shards; ``sequences``: (S,) int64 sorted distinct sequence ids.

    >>> import tempfile, torch
    >>> from usmoe_lp.logs import LayerInfo, RouterLog, RouterLogWriter
    >>> path = tempfile.mkdtemp() + "/log"
    >>> with RouterLogWriter(path, [LayerInfo("l0", num_experts=4, top_k=2)], shard_tokens=3) as w:
    ...     w.append({"l0": torch.arange(20.0).reshape(5, 4).to(torch.bfloat16)},
    ...              token_ids=[7, 8, 9, 10, 11], sequence_ids=[0, 0, 0, 1, 1], positions=[0, 1, 2, 0, 1])
    >>> log = RouterLog.open(path)
    >>> log.layers, log.num_experts, log.top_k, log.num_tokens, log.sequences.tolist()
    (('l0',), {'l0': 4}, {'l0': 2}, 5, [0, 1])
    >>> chunk = log.read("l0", 2, 4)      # tokens 2 and 3, across the shard boundary at 3
    >>> chunk.logits
    tensor([[ 8.,  9., 10., 11.],
            [12., 13., 14., 15.]], dtype=torch.bfloat16)
    >>> chunk.sequence_ids.tolist(), chunk.positions.tolist()
    ([0, 1], [2, 0])
    >>> [len(c) for c in log.iter_chunks("l0", chunk_tokens=2)]
    [2, 2, 1]
    """

    def __init__(self, path: Path, manifest: Manifest, verify: Verify) -> None:
        self._path = path
        self._manifest = manifest
        self._verify = verify
        self._verified: set[int] = set()
        self._starts = [s.token_start for s in manifest.shards]
        self._layer_info = {layer.name: layer for layer in manifest.layers}

    @classmethod
    def open(cls, path: str | os.PathLike, verify: Verify = "lazy") -> RouterLog:
        """Open the log at ``path``; reads only ``manifest.json``.

        ``verify="lazy"`` (default): check the manifest now and that every shard exists with the
        recorded size; check each shard's sha256, tensor names, shapes and dtypes when it is
        first read. ``"full"``: run :meth:`validate` now. ``"none"``: trust the files.
        Raises :class:`LogNotFound`, :class:`CorruptLog`, :class:`UnsupportedVersion`.
        """
        if verify not in _VERIFY_MODES:
            raise InvalidParameter(f"verify must be one of {_VERIFY_MODES}, got {verify!r}")
        path = Path(path)
        if not path.is_dir():
            raise LogNotFound(f"{path}: no such router log (not a directory)")
        manifest_path = path / MANIFEST_NAME
        if not manifest_path.is_file():
            if (path / SHARDS_DIR).is_dir():
                raise CorruptLog(f"{manifest_path} is missing but {path / SHARDS_DIR} exists: the manifest was deleted")
            raise LogNotFound(f"{path} is not a router log: it has no {MANIFEST_NAME}")
        try:
            text = manifest_path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptLog(f"{manifest_path}: not UTF-8 text; the manifest is damaged") from None
        except OSError as exc:
            raise CorruptLog(f"{manifest_path}: cannot be read ({exc.strerror})") from None
        log = cls(path, Manifest.from_json(text, source=str(manifest_path)), verify)
        if verify == "lazy":
            for shard in log._manifest.shards:
                log._check_size(shard.file, shard.bytes)
            if log._manifest.router_weights is not None:
                log._check_size(log._manifest.router_weights.file, log._manifest.router_weights.bytes)
        elif verify == "full":
            log.validate()
        return log

    # ------------------------------------------------------------------ properties
    @property
    def path(self) -> Path:
        return self._path

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def layers(self) -> tuple[str, ...]:
        """Layer names, in capture order."""
        return tuple(self._layer_info)

    @property
    def num_experts(self) -> dict[str, int]:
        """Layer name -> N."""
        return {name: info.num_experts for name, info in self._layer_info.items()}

    @property
    def top_k(self) -> dict[str, int | None]:
        """Layer name -> experts per token the model uses (None when unknown)."""
        return {name: info.top_k for name, info in self._layer_info.items()}

    @property
    def num_tokens(self) -> int:
        return self._manifest.num_tokens

    @property
    def dtype(self) -> torch.dtype | None:
        """The logits dtype (None for a log without tokens)."""
        return None if self._manifest.dtype is None else torch_dtype(self._manifest.dtype)

    @property
    def shards(self) -> tuple[ShardInfo, ...]:
        return self._manifest.shards

    @property
    def complete(self) -> bool:
        """True when the writer closed cleanly; False after a crash (the log is still readable)."""
        return self._manifest.complete

    @property
    def sequences(self) -> torch.Tensor:
        """(S,) int64 sorted distinct sequence ids. Reads the ``sequence_ids`` of every shard."""
        parts = [torch.unique(self._read_rows("sequence_ids", i, 0, s.num_tokens))
                 for i, s in enumerate(self._manifest.shards)]
        return torch.unique(torch.cat(parts)) if parts else torch.empty(0, dtype=torch.int64)

    def layer_info(self, layer: str) -> LayerInfo:
        self._check_layer(layer)
        return self._layer_info[layer]

    def has(self, layer: str, kind: Literal["selected", "weights", "hidden"]) -> bool:
        """Whether the log holds ``selected``, ``weights`` or ``hidden`` for ``layer``."""
        self._check_layer(layer)
        prefix = {"selected": SELECTED, "weights": WEIGHTS, "hidden": HIDDEN}[kind]
        return prefix + layer in self._manifest.tensors

    def __repr__(self) -> str:
        return (f"RouterLog({str(self._path)!r}, layers={len(self._layer_info)}, num_tokens={self.num_tokens}, "
                f"shards={len(self._manifest.shards)}, dtype={self._manifest.dtype}, complete={self.complete})")

    # ------------------------------------------------------------------ reading
    def read(self, layer: str, start: int, stop: int, *, with_hidden: bool = False) -> Chunk:
        """Tokens ``[start, stop)`` of ``layer`` as a :class:`Chunk` (logits (stop-start, N)),
        read from whichever shards hold them; only those rows are loaded."""
        self._check_layer(layer)
        start, stop = self._check_range(start, stop)
        names = {"logits": LOGITS + layer, "selected": SELECTED + layer, "weights": WEIGHTS + layer}
        if with_hidden:
            names["hidden"] = HIDDEN + layer
        names = {k: v for k, v in names.items() if k == "logits" or v in self._manifest.tensors}
        names.update({m: m for m in METADATA_TENSORS})
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in names}
        first = max(bisect.bisect_right(self._starts, start) - 1, 0)
        for i in range(first, len(self._manifest.shards)):
            shard = self._manifest.shards[i]
            if shard.token_start >= stop:
                break
            lo, hi = max(start, shard.token_start) - shard.token_start, min(stop, shard.token_stop) - shard.token_start
            with self._open_shard(i) as f:
                for key, name in names.items():
                    parts[key].append(self._slice(f, i, name, lo, hi))
        out = {key: self._concat(names[key], chunks) for key, chunks in parts.items()}
        if with_hidden and "hidden" not in out:
            raise MissingLayer(f"{self._path}: layer {layer!r} has no hidden states (not captured)")
        return Chunk(token_start=start, layer=layer, **out)

    def iter_chunks(self, layer: str, chunk_tokens: int = 65536, *, start: int = 0, stop: int | None = None,
                    with_hidden: bool = False) -> Iterator[Chunk]:
        """Yield :class:`Chunk` s of ``chunk_tokens`` tokens (the last may be shorter) covering
        ``[start, stop)`` of ``layer`` once, in order, crossing shard boundaries freely.
        Memory: one chunk at a time. Arguments are checked now, not at the first ``next()``."""
        self._check_layer(layer)
        start, stop = self._check_range(start, self.num_tokens if stop is None else stop)
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise InvalidParameter(f"chunk_tokens must be an integer >= 1, got {chunk_tokens!r}")
        if with_hidden and not self.has(layer, "hidden"):
            raise MissingLayer(f"{self._path}: layer {layer!r} has no hidden states (not captured)")

        def chunks() -> Iterator[Chunk]:
            for a in range(start, stop, chunk_tokens):
                yield self.read(layer, a, min(a + chunk_tokens, stop), with_hidden=with_hidden)

        return chunks()

    def router_weights(self) -> dict[str, torch.Tensor] | None:
        """Layer name -> (N, d) router weight, or None when not captured."""
        info = self._manifest.router_weights
        if info is None:
            return None
        if self._verify != "none":
            self._check_file(info.file, info.bytes, info.sha256)
        return self._load_router_weights()

    def _load_router_weights(self) -> dict[str, torch.Tensor]:
        path = self._path / ROUTER_WEIGHTS_NAME
        with self._safe_open(path) as f:
            out = {name: f.get_tensor(name) for name in f.keys()}
        for name, w in out.items():
            if name not in self._layer_info or w.ndim != 2 or w.shape[0] != self._layer_info[name].num_experts:
                raise CorruptLog(f"{path}: tensor {name!r} of shape {tuple(w.shape)} is not the (N, d) router weight "
                                 f"of a layer of this log")
        return out

    # ------------------------------------------------------------------ validation
    def validate(self, checksums: bool = True) -> ValidationReport:
        """Check every shard listed in the manifest (exists, size, sha256, tensor names, shapes,
        dtypes) and the router weights; raise :class:`CorruptLog` / :class:`MissingLayer` naming
        the file on the first problem. Files on disk that the manifest does not list (a shard in
        flight at a crash, ``*.tmp``) are ignored and reported as warnings. ``checksums=False``
        skips the sha256 (which reads every byte of the log)."""
        warnings: list[str] = []
        for i in range(len(self._manifest.shards)):
            warnings += self._verify_shard(i, checksum=checksums)
        rw = self._manifest.router_weights
        if rw is not None:
            if checksums:
                self._check_file(rw.file, rw.bytes, rw.sha256)
            else:
                self._check_size(rw.file, rw.bytes)
            self._load_router_weights()
        listed = {s.file for s in self._manifest.shards}
        shards_dir = self._path / SHARDS_DIR
        if shards_dir.is_dir():
            for p in sorted(shards_dir.iterdir()):
                rel = f"{SHARDS_DIR}/{p.name}"
                if rel in listed:
                    continue
                if p.name.endswith(SHARD_SUFFIX + TMP_SUFFIX):
                    warnings.append(f"{p}: a shard still being written (or in flight at a crash); not part of the log")
                elif p.name.endswith(SHARD_SUFFIX):
                    warnings.append(f"{p}: a shard the manifest does not list (written just before a crash?); ignored")
                else:
                    warnings.append(f"{p}: not a router-log file; ignored")
        for name in (MANIFEST_NAME + TMP_SUFFIX, ROUTER_WEIGHTS_NAME + TMP_SUFFIX):
            if (self._path / name).exists():
                warnings.append(f"{self._path / name}: a temporary file left by an interrupted write; ignored")
        if not self._manifest.complete:
            warnings.append(f"{self._path / MANIFEST_NAME}: the writer did not close this log (it crashed or is still "
                            f"running); it holds the {self.num_tokens} tokens of its "
                            f"{len(self._manifest.shards)} completed shards")
        return ValidationReport(self._path, len(self._manifest.shards), self.num_tokens, checksums, rw is not None,
                                tuple(warnings))

    # ------------------------------------------------------------------ internals
    def _check_layer(self, layer: str) -> None:
        if layer not in self._layer_info:
            raise MissingLayer(f"{self._path}: no layer {layer!r} in this router log; its layers are "
                               f"{list(self._layer_info)}")

    def _check_range(self, start: int, stop: int) -> tuple[int, int]:
        for name, v in (("start", start), ("stop", stop)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise InvalidParameter(f"{name} must be an integer token index, got {v!r}")
        if not 0 <= start <= stop <= self.num_tokens:
            raise InvalidParameter(f"token range [{start}, {stop}) is outside [0, {self.num_tokens}) of {self._path}")
        return start, stop

    def _check_size(self, file: str, expected: int) -> int:
        path = self._path / file
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CorruptLog(f"{path}: missing, but {MANIFEST_NAME} lists it; the log lost this file") from None
        if size < expected:
            raise CorruptLog(f"{path}: truncated shard ({size} of {expected} bytes)" if file != ROUTER_WEIGHTS_NAME
                             else f"{path}: truncated ({size} of {expected} bytes)")
        if size > expected:
            raise CorruptLog(f"{path}: {size} bytes but {MANIFEST_NAME} records {expected}; the file was changed")
        return size

    def _check_file(self, file: str, size: int, sha256: str) -> None:
        self._check_size(file, size)
        actual = sha256_file(self._path / file)
        if actual != sha256:
            raise CorruptLog(f"{self._path / file}: checksum mismatch (sha256 {actual[:16]}..., {MANIFEST_NAME} "
                             f"records {sha256[:16]}...); the file is damaged")

    def _verify_shard(self, i: int, checksum: bool = True) -> list[str]:
        shard = self._manifest.shards[i]
        path = self._path / shard.file
        if checksum:
            self._check_file(shard.file, shard.bytes, shard.sha256)
        else:
            self._check_size(shard.file, shard.bytes)
        warnings = []
        n = shard.num_tokens
        with self._safe_open(path) as f:
            keys = set(f.keys())
            meta = f.metadata() or {}
            for name, spec in self._manifest.tensors.items():
                if name not in keys:
                    if name.startswith(LOGITS):
                        raise MissingLayer(f"{path}: layer {name.removeprefix(LOGITS)!r} is missing (no tensor "
                                           f"{name!r}); the shard does not match {MANIFEST_NAME}")
                    raise CorruptLog(f"{path}: tensor {name!r} is missing; the shard does not match {MANIFEST_NAME}")
                sl = f.get_slice(name)
                shape, dtype = tuple(sl.get_shape()), SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype())
                if shape != (n, *spec.row_shape) or dtype != spec.dtype:
                    raise CorruptLog(f"{path}: tensor {name!r} is {shape} {dtype}; {MANIFEST_NAME} expects "
                                     f"{(n, *spec.row_shape)} {spec.dtype}")
            for key in ("token_start", "token_stop"):
                if key in meta and meta[key] != str(getattr(shard, key)):
                    raise CorruptLog(f"{path}: header says {key}={meta[key]} but {MANIFEST_NAME} says "
                                     f"{getattr(shard, key)}; the shard is in the wrong place")
            extra = sorted(keys - set(self._manifest.tensors))
            if extra:
                warnings.append(f"{path}: tensors not in the manifest's schema, ignored: {extra}")
        if checksum:
            self._verified.add(i)
        return warnings

    def _safe_open(self, path: Path):
        try:
            return safe_open(str(path), framework="pt")
        except FileNotFoundError:
            raise CorruptLog(f"{path}: missing, but {MANIFEST_NAME} lists it; the log lost this file") from None
        except Exception as exc:  # safetensors raises its own SafetensorError for a damaged header
            raise CorruptLog(f"{path}: not a readable safetensors file ({exc}); the file is damaged") from None

    def _open_shard(self, i: int):
        if self._verify != "none" and i not in self._verified:
            self._verify_shard(i)
        return self._safe_open(self._path / self._manifest.shards[i].file)

    def _slice(self, f, i: int, name: str, lo: int, hi: int) -> torch.Tensor:
        path = self._path / self._manifest.shards[i].file
        try:
            t = f.get_slice(name)[lo:hi]
        except Exception as exc:  # a tensor missing from an unverified shard, or a damaged file
            if name.startswith(LOGITS) and "does not contain" in str(exc).lower():
                raise MissingLayer(f"{path}: layer {name.removeprefix(LOGITS)!r} is missing (no tensor {name!r})") \
                    from None
            raise CorruptLog(f"{path}: cannot read tensor {name!r} ({exc})") from None
        spec = self._manifest.tensors.get(name)
        if spec is not None and (tuple(t.shape) != (hi - lo, *spec.row_shape) or str(t.dtype) != f"torch.{spec.dtype}"):
            raise CorruptLog(f"{path}: tensor {name!r} rows {lo}:{hi} are {tuple(t.shape)} {t.dtype}; "
                             f"{MANIFEST_NAME} expects {(hi - lo, *spec.row_shape)} {spec.dtype}")
        return t

    def _read_rows(self, name: str, i: int, lo: int, hi: int) -> torch.Tensor:
        with self._open_shard(i) as f:
            return self._slice(f, i, name, lo, hi)

    def _concat(self, name: str, chunks: list[torch.Tensor]) -> torch.Tensor:
        if len(chunks) == 1:
            return chunks[0]
        if chunks:
            return torch.cat(chunks)
        spec = self._manifest.tensors.get(name)
        if spec is not None:
            return torch.empty((0, *spec.row_shape), dtype=torch_dtype(spec.dtype))
        if name in METADATA_TENSORS:
            return torch.empty(0, dtype=torch.int64)
        layer = self._layer_info[name.removeprefix(LOGITS)]  # a log without tokens: no schema yet
        return torch.empty((0, layer.num_experts), dtype=torch.float32)
