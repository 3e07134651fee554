"""The validating, lazy router-log reader: open a log, iterate it in chunks, read any token range.

Nothing is loaded at open but ``manifest.json``; shards are memory-mapped (safetensors) and only
the rows asked for are read. Every error names the file and the problem.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open

from usmoe_lp.errors import InvalidParameter
from usmoe_lp.logs.errors import CorruptLog, LogError, LogNotFound, MissingLayer, NonFiniteLog
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
    TokenOrder,
    non_finite,
    sha256_stream,
    torch_dtype,
)

Verify = Literal["lazy", "full", "none"]
_VERIFY_MODES = ("lazy", "full", "none")

# Files are opened relative to the log directory, one component at a time, never following a link
# (O_NOFOLLOW) and without blocking on a FIFO (O_NONBLOCK); what is opened must be a regular file.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_BY_DIR_FD = bool(_NOFOLLOW) and os.open in os.supports_dir_fd
_FD_DIR = next((d for d in ("/proc/self/fd", "/dev/fd") if os.path.isdir(d)), None)
_KINDS = {stat.S_IFREG: "a regular file", stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO",
          stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFLNK: "a symbolic link"}


def _refuse(path: Path, mode: int, expected: str) -> CorruptLog:
    kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
    if stat.S_ISLNK(mode):
        return CorruptLog(f"{path}: a symbolic link; a router log never follows links (one can point outside the "
                          f"log): replace it with the {expected} itself")
    return CorruptLog(f"{path}: {kind}, not a {expected}; a router log holds only regular files and directories")


def _open_in_log(root: Path, rel: str) -> int:
    """A read-only descriptor of the regular file ``rel`` ('/'-separated, inside the log ``root``).

    No component below ``root`` may be a symbolic link, and the file must be a regular file: checked
    on the very objects opened (openat with O_NOFOLLOW, then fstat), before a byte is read. Raises
    :class:`CorruptLog` naming the path otherwise, and for a missing file.
    """
    parts = rel.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise CorruptLog(f"{root / rel}: not a path inside the router log")
    where = root
    if not _BY_DIR_FD:                       # no openat: check each component with lstat, then open the path
        for k, part in enumerate(parts):
            where = where / part
            try:
                st = os.lstat(where)
            except FileNotFoundError:
                raise CorruptLog(f"{root / rel}: missing, but {MANIFEST_NAME} lists it; the log lost this file") \
                    from None
            last = k == len(parts) - 1
            if not (stat.S_ISREG(st.st_mode) if last else stat.S_ISDIR(st.st_mode)):
                raise _refuse(where, st.st_mode, "file" if last else "directory")
        fd = os.open(root / rel, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    else:
        dir_fd = os.open(root, os.O_RDONLY | _DIRECTORY)
        try:
            for k, part in enumerate(parts):
                where = where / part
                last = k == len(parts) - 1
                flags = os.O_RDONLY | _NOFOLLOW | (os.O_NONBLOCK if last else _DIRECTORY)
                try:
                    fd = os.open(part, flags, dir_fd=dir_fd)
                except OSError as exc:
                    if exc.errno == errno.ENOENT:
                        raise CorruptLog(f"{root / rel}: missing, but {MANIFEST_NAME} lists it; the log lost this "
                                         f"file") from None
                    if exc.errno in (errno.ELOOP, errno.EMLINK, errno.ENOTDIR):
                        raise _refuse(where, os.lstat(where).st_mode, "file" if last else "directory") from None
                    raise CorruptLog(f"{where}: cannot be read ({exc.strerror})") from None
                if not last:
                    os.close(dir_fd)
                    dir_fd = fd
        finally:
            os.close(dir_fd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _refuse(root / rel, st.st_mode, "file")
    return fd


class _LogFile:
    """``with _LogFile(root, rel) as f``: the regular file ``rel`` of the log, opened by :func:`_open_in_log`,
    as a binary file; ``f.size`` is its size (from fstat)."""

    def __init__(self, root: Path, rel: str) -> None:
        fd = _open_in_log(root, rel)
        self.size = os.fstat(fd).st_size
        self.file = os.fdopen(fd, "rb")

    def __enter__(self):
        return self.file

    def __exit__(self, *exc) -> None:
        self.file.close()


@dataclass(frozen=True)
class Chunk:
    """Tokens ``[token_start, token_start + n)`` of one layer.

    ``logits``: (n, N) in the captured dtype (bf16 included); None in a selection log (then
    ``selected`` is (n, k) integer expert ids, -1 = an empty slot). ``token_ids``, ``sequence_ids``,
    ``positions``: (n,) int64. ``selected`` / ``weights``: what the model used, (n, k) or (n, N),
    when captured. ``hidden``: (n, d) pre-router hidden states, when captured and asked for.
    """

    logits: torch.Tensor | None
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
        return int(self.token_ids.shape[0])

    @property
    def token_stop(self) -> int:
        return self.token_start + self.num_tokens

    def __len__(self) -> int:
        return self.num_tokens


@dataclass(frozen=True)
class ValidationReport:
    """What :meth:`RouterLog.validate` checked and found.

    Attributes:
        path: the log directory. shards_checked: shards of the manifest checked (count).
        num_tokens: tokens in the log's completed shards. checksums: whether sha256 and finiteness
            were checked (``validate(checksums=True)``). router_weights_checked: whether the log has
            router weights and they were checked.
        warnings: what is not an error: files on disk the manifest does not list (a shard in flight
            at a crash, ``*.tmp``), a log whose writer did not close (its completed shards are valid).
        problems: the errors found, one message each (naming the file), when validation was asked to
            collect them (``validate(collect=True)``) instead of raising on the first.

    ``ok`` is True when no problem was found. By default :meth:`RouterLog.validate` raises on the
    first problem, so a report it returns has ``ok`` True; ``validate(collect=True)`` checks every
    shard and returns a report whose ``ok`` is False when any was damaged.
    """

    path: Path
    shards_checked: int
    num_tokens: int
    checksums: bool
    router_weights_checked: bool
    warnings: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when validation found no problem (warnings are not problems)."""
        return not self.problems


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
        self._order = TokenOrder()     # the token rule across shards, for shards checked in log order
        self._order_upto = 0           # shards [0, _order_upto) went through self._order
        self._fingerprints: dict[str, int] = {}   # sha256 of a shard's token metadata -> shard index
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
        if not path.is_dir():      # the log directory itself may be a link the user made; nothing inside it may
            raise LogNotFound(f"{path}: no such router log (not a directory)")
        manifest_path = path / MANIFEST_NAME
        if not os.path.lexists(manifest_path):
            if os.path.lexists(path / SHARDS_DIR):
                raise CorruptLog(f"{manifest_path} is missing but {path / SHARDS_DIR} exists: the manifest was deleted")
            raise LogNotFound(f"{path} is not a router log: it has no {MANIFEST_NAME}")
        with _LogFile(path, MANIFEST_NAME) as f:
            try:
                text = f.read().decode("utf-8")
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
    def verify(self) -> Verify:
        """The mode this log was opened with (``"lazy"``, ``"full"`` or ``"none"``, see :meth:`open`): what a
        task re-opening the log by its path (on a Dask worker) must check too."""
        return self._verify

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
    def content(self) -> str:
        """``"logits"``, or ``"selection"`` for a log of selected experts without logits
        (:mod:`usmoe_lp.logs.format`)."""
        return self._manifest.content

    @property
    def has_logits(self) -> bool:
        """False for a selection log: its chunks have ``logits=None`` and (n, k) ``selected`` ids."""
        return self._manifest.has_logits

    @property
    def dtype(self) -> torch.dtype | None:
        """The logits dtype (None for a log without tokens, and for a selection log)."""
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
        required = "logits" if self.has_logits else "selected"
        names = {k: v for k, v in names.items() if k == required or v in self._manifest.tensors}
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
        if not self.has_logits:
            out["logits"] = None
        return Chunk(token_start=start, layer=layer, **out)

    def iter_chunks(self, layer: str, chunk_tokens: int = 65536, *, start: int = 0, stop: int | None = None,
                    with_hidden: bool = False, check_finite: bool = False) -> Iterator[Chunk]:
        """Yield :class:`Chunk` s of ``chunk_tokens`` tokens (the last may be shorter) covering
        ``[start, stop)`` of ``layer`` once, in order, crossing shard boundaries freely.
        Memory: one chunk at a time. Arguments are checked now, not at the first ``next()``.
        ``check_finite``: pass each chunk through :meth:`check_finite` (raise on NaN/Inf logits)."""
        self._check_layer(layer)
        start, stop = self._check_range(start, self.num_tokens if stop is None else stop)
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise InvalidParameter(f"chunk_tokens must be an integer >= 1, got {chunk_tokens!r}")
        if with_hidden and not self.has(layer, "hidden"):
            raise MissingLayer(f"{self._path}: layer {layer!r} has no hidden states (not captured)")

        def chunks() -> Iterator[Chunk]:
            for a in range(start, stop, chunk_tokens):
                chunk = self.read(layer, a, min(a + chunk_tokens, stop), with_hidden=with_hidden)
                yield self.check_finite(chunk) if check_finite else chunk

        return chunks()

    def check_finite(self, chunk: Chunk) -> Chunk:
        """Return ``chunk`` (read from this log) if its logits are finite; else raise :class:`NonFiniteLog`
        naming the shard file, the layer and the first bad token. Every consumer that needs finite
        logits (the analysis driver) checks through this, so the message is the same everywhere.
        A chunk without logits (a selection log) passes as it is."""
        if chunk.logits is None:
            return chunk
        self._raise_non_finite(chunk.layer, chunk.token_start, chunk.logits)
        return chunk

    def _raise_non_finite(self, layer: str, token_start: int, logits: torch.Tensor) -> None:
        """Raise :class:`NonFiniteLog` if ``logits`` (rows = tokens ``token_start, ...`` of ``layer``) has a NaN
        or an Inf: the one place the reader words this error."""
        found = non_finite(logits)
        if found is None:
            return
        n_nan, n_inf, row, col = found
        token = token_start + row
        shard = self._manifest.shards[bisect.bisect_right(self._starts, token) - 1]
        stop = token_start + logits.shape[0]
        raise NonFiniteLog(f"{self._path / shard.file}: logits of layer {layer!r} have {n_nan} NaN and {n_inf} Inf "
                           f"entries in tokens [{token_start}, {stop}), the first at token {token} of the log (row "
                           f"{token - shard.token_start} of this shard), expert {col}; raw router logits are finite, "
                           f"so this log is damaged (or was not written by usmoe-lp)")

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
        with self._safe_open(ROUTER_WEIGHTS_NAME) as f:
            out = {name: f.get_tensor(name) for name in f.keys()}
        for name, w in out.items():
            if name not in self._layer_info or w.ndim != 2 or w.shape[0] != self._layer_info[name].num_experts:
                raise CorruptLog(f"{path}: tensor {name!r} of shape {tuple(w.shape)} is not the (N, d) router weight "
                                 f"of a layer of this log")
        return out

    # ------------------------------------------------------------------ validation
    def validate(self, checksums: bool = True, *, collect: bool = False) -> ValidationReport:
        """Check every shard listed in the manifest (a regular file, not a link; size, sha256, tensor
        names, shapes, dtypes; token metadata: positions and sequence ids >= 0, each sequence's
        positions increasing through the log, no shard a copy of another; finite logits) and the router
        weights; raise :class:`CorruptLog` (:class:`NonFiniteLog` for NaN/Inf logits, naming shard,
        layer and token) / :class:`MissingLayer` naming the file on the first problem. Files on disk
        that the manifest does not list (a shard in flight at a crash, ``*.tmp``) are ignored and
        reported as warnings. ``checksums=False`` skips the sha256 and the finiteness check (which
        read every byte of the log).

        ``collect=True``: do not raise; check every shard and the router weights, and return every
        problem found in :attr:`ValidationReport.problems` (one message per damaged file; ``ok`` is
        then False). A shard after a damaged one is checked on its own (the token order across the
        damaged shard is not checked).
        """
        if not isinstance(collect, bool):
            raise InvalidParameter(f"collect must be True or False, got {collect!r}")
        warnings: list[str] = []
        problems: list[str] = []

        def attempt(check, *args, **kwargs):
            if not collect:
                return check(*args, **kwargs)
            try:
                return check(*args, **kwargs)
            except LogError as exc:
                problems.append(str(exc))
                return None

        self._order, self._order_upto, self._fingerprints = TokenOrder(), 0, {}
        for i in range(len(self._manifest.shards)):
            warnings += attempt(self._verify_shard, i, checksum=checksums, finite=checksums) or []
        rw = self._manifest.router_weights
        if rw is not None:
            attempt(self._check_router_weights, rw, checksums)
        listed = {s.file for s in self._manifest.shards}
        shards_dir = self._path / SHARDS_DIR
        mode = os.lstat(shards_dir).st_mode if os.path.lexists(shards_dir) else None
        if mode is not None and not stat.S_ISDIR(mode):     # a link is not listed: its names are not the log's
            refused = _refuse(shards_dir, mode, "directory")
            if not collect:
                raise refused
            problems.append(str(refused))
        elif mode is not None:
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
            if os.path.lexists(self._path / name):
                warnings.append(f"{self._path / name}: a temporary file left by an interrupted write; ignored")
        if not self._manifest.complete:
            warnings.append(f"{self._path / MANIFEST_NAME}: the writer did not close this log (it crashed or is still "
                            f"running); it holds the {self.num_tokens} tokens of its "
                            f"{len(self._manifest.shards)} completed shards")
        return ValidationReport(self._path, len(self._manifest.shards), self.num_tokens, checksums, rw is not None,
                                tuple(warnings), tuple(problems))

    def _check_router_weights(self, rw, checksums: bool) -> None:
        if checksums:
            self._check_file(rw.file, rw.bytes, rw.sha256)
        else:
            self._check_size(rw.file, rw.bytes)
        self._load_router_weights()

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
        fd = _open_in_log(self._path, file)
        try:
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        self._compare_size(file, size, expected)
        return size

    def _compare_size(self, file: str, size: int, expected: int) -> None:
        path = self._path / file
        if size < expected:
            raise CorruptLog(f"{path}: truncated shard ({size} of {expected} bytes)" if file != ROUTER_WEIGHTS_NAME
                             else f"{path}: truncated ({size} of {expected} bytes)")
        if size > expected:
            raise CorruptLog(f"{path}: {size} bytes but {MANIFEST_NAME} records {expected}; the file was changed")

    def _check_file(self, file: str, size: int, sha256: str) -> None:
        opened = _LogFile(self._path, file)
        with opened as f:
            self._compare_size(file, opened.size, size)
            actual = sha256_stream(f)
        if actual != sha256:
            raise CorruptLog(f"{self._path / file}: checksum mismatch (sha256 {actual[:16]}..., {MANIFEST_NAME} "
                             f"records {sha256[:16]}...); the file is damaged")

    def _verify_shard(self, i: int, checksum: bool = True, finite: bool = False) -> list[str]:
        shard = self._manifest.shards[i]
        path = self._path / shard.file
        if checksum:
            self._check_file(shard.file, shard.bytes, shard.sha256)
        else:
            self._check_size(shard.file, shard.bytes)
        warnings = []
        n = shard.num_tokens
        with self._safe_open(shard.file) as f:
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
            if self._manifest.tensors:
                self._check_tokens(i, *(self._slice(f, i, name, 0, n) for name in METADATA_TENSORS))
            if finite and self.has_logits:
                for layer in self._layer_info:
                    self._raise_non_finite(layer, shard.token_start, self._slice(f, i, LOGITS + layer, 0, n))
            extra = sorted(keys - set(self._manifest.tensors))
            if extra:
                warnings.append(f"{path}: tensors not in the manifest's schema, ignored: {extra}")
        if checksum:
            self._verified.add(i)
        return warnings

    def _check_tokens(self, i: int, token_ids: torch.Tensor, sequence_ids: torch.Tensor,
                      positions: torch.Tensor) -> None:
        """Shard ``i``'s token metadata: not a copy of another shard's, and following :class:`TokenOrder`
        (across shards too when the shards are checked in log order, as :meth:`validate` and a sequential
        read do; otherwise within the shard)."""
        shard = self._manifest.shards[i]
        path = self._path / shard.file
        h = hashlib.sha256()
        for t in (token_ids, sequence_ids, positions):
            h.update(t.numpy().tobytes())
        other = self._fingerprints.setdefault(h.hexdigest(), i)
        if other != i:
            raise CorruptLog(f"{path}: holds the same tokens (token ids, sequence ids, positions) as "
                             f"{self._path / self._manifest.shards[other].file}; a duplicated shard")
        in_order = i == self._order_upto
        problem = (self._order if in_order else TokenOrder()).check(sequence_ids.numpy(), positions.numpy())
        if problem is not None:
            row, what = problem
            raise CorruptLog(f"{path}: token {shard.token_start + row} of the log (row {row} of this shard) {what}; "
                             "the token metadata is damaged")
        if in_order:
            self._order_upto += 1

    def _safe_open(self, rel: str):
        path = self._path / rel
        fd = _open_in_log(self._path, rel)
        try:
            return safe_open(f"{_FD_DIR}/{fd}" if _FD_DIR else str(path), framework="pt")
        except Exception as exc:  # safetensors raises its own SafetensorError for a damaged header
            raise CorruptLog(f"{path}: not a readable safetensors file ({exc}); the file is damaged") from None
        finally:
            os.close(fd)

    def _open_shard(self, i: int):
        if self._verify != "none" and i not in self._verified:
            self._verify_shard(i)
        return self._safe_open(self._manifest.shards[i].file)

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
        if name.startswith(SELECTED):  # a selection log without tokens: no schema yet
            return torch.empty((0, self._layer_info[name.removeprefix(SELECTED)].top_k or 1), dtype=torch.int64)
        layer = self._layer_info[name.removeprefix(LOGITS)]  # a log without tokens: no schema yet
        return torch.empty((0, layer.num_experts), dtype=torch.float32)
