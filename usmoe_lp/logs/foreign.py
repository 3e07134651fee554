"""Import what serving and training stacks record about routing, as router logs.

Serving engines and training frameworks record the experts each token was routed to, not the router
logits (docs/importing.md describes each dump, where in the stack it is written and the version read):

- ``sglang``: SGLang's ``return_routed_experts`` (``meta_info["routed_experts"]`` of a ``/generate``
  response or an ``Engine.generate`` result: int32 ``[tokens, layers, top_k]``, base64 of the raw bytes);
- ``vllm``: vLLM's routed-experts recording (``CompletionOutput.routed_experts``, ``[tokens, layers,
  top_k]``; the OpenAI server's ``choices[i]["routed_experts"]``, base64 of a ``.npy``), as arrays or JSON;
- ``megatron``: Megatron-Core's router trace (``router_trace_rank{N}.jsonl``, with the optional
  ``logits_rank{N}.bin`` sidecar of bfloat16 router logits);
- ``olmoe``: the JSONL the OLMoE analysis script writes (``c4_results*.jsonl``: per sequence
  ``input_ids`` and ``exp_ids`` ``[tokens, top_k, layers]``).

Each format is one :class:`ForeignFormat` of :data:`FORMATS`: a small reader that turns the dump into a
:class:`ForeignDump` (layer names and a re-iterable stream of :class:`ForeignSequence`), over one engine,
:func:`import_foreign`, which checks the whole dump (a first pass: shapes, integer ids, equal k, the same
layers everywhere, ids in [-1, N), no expert twice in a token) and only then writes it through
:class:`~usmoe_lp.logs.writer.RouterLogWriter` (a second pass). The result is a *selection log*
(``content="selection"``: (n, k) ``selected.<layer>`` ids per layer) -- or, for a Megatron trace with
its logits sidecar, an ordinary logits log that also keeps the recorded selection.

Every request (SGLang, vLLM), step (Megatron) or line (OLMoE) is one sequence, with positions 0.. in
the order of its rows. N, the number of experts, is taken from the dump where it says it (Megatron's
logits) and otherwise must be given (``num_experts=``): it is never guessed from the largest id seen.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from usmoe_lp._validate import check_int
from usmoe_lp.logs.errors import ImportFailed, LogError
from usmoe_lp.logs.format import SCORE_FUNCTIONS, SELECTION_DTYPES, LayerInfo, ModelInfo
from usmoe_lp.logs.importers import check_log_destination
from usmoe_lp.logs.reader import RouterLog
from usmoe_lp.logs.writer import RouterLogWriter

__all__ = ["FORMATS", "ForeignDump", "ForeignFormat", "ForeignSequence", "import_foreign"]


@dataclass(frozen=True)
class ForeignSequence:
    """One request / step / line of a dump.

    ``experts``: (T, L, k) integer expert ids, token-major, the L layers of :attr:`ForeignDump.layers`,
    each token's k ids in the order the stack gives them (-1 = an empty slot). ``token_ids``: (T,) int64,
    -1 where the dump does not say. ``logits``: (T, L, N) floating router logits where the dump holds
    them (Megatron's sidecar), else None. ``where``: the place in the file, for messages.
    """

    experts: np.ndarray
    token_ids: np.ndarray
    where: str
    logits: torch.Tensor | None = None


@dataclass(frozen=True)
class ForeignDump:
    """A dump as its reader sees it: ``layers`` names the L axis; ``sequences()`` yields the
    :class:`ForeignSequence` in file order, anew at each call (the engine reads twice: check, write).
    ``num_experts``: N where the dump says it, else None. ``capture``: what the manifest records."""

    layers: tuple[str, ...]
    sequences: Callable[[], Iterator[ForeignSequence]]
    num_experts: int | None = None
    capture: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ForeignFormat:
    """One importable format: ``name`` (``format=``), what it is, the file types accepted, and its reader
    ``read(src: Path, top_k: int | None) -> ForeignDump``. ``logits``: whether it can carry router logits
    (then ``dtype=`` applies)."""

    name: str
    summary: str
    accepts: str
    read: Callable[[Path, int | None], ForeignDump]
    logits: bool = False


# ----------------------------------------------------------------------------- shared helpers
def _json_items(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, object) for each record of JSONL (one object, or a list of them, per line; read line by line)
    or of a JSON file (one object, or a list of them, over any number of lines)."""
    try:
        with open(path, encoding="utf-8") as f:
            first = True
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    if first:  # not JSONL: one JSON document over several lines
                        break
                    raise ImportFailed(f"{path} line {n}: not JSON ({exc.msg}); expected one JSON object per "
                                       "line") from None
                first = False
                for i, item in enumerate(obj if isinstance(obj, list) else [obj]):
                    yield (f"{path} line {n}" + (f" item {i}" if isinstance(obj, list) else "")), item
            else:
                return
        whole = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ImportFailed(f"{path}: not UTF-8 text; expected JSON or JSONL") from None
    except json.JSONDecodeError as exc:
        raise ImportFailed(f"{path}: not JSON or JSONL ({exc.msg} at line {exc.lineno})") from None
    items = whole if isinstance(whole, list) else [whole]
    for i, item in enumerate(items):
        yield (f"{path} item {i}" if isinstance(whole, list) else str(path)), item


def _b64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise ImportFailed(f"{where}: routed_experts is not valid base64 ({exc})") from None


def _int_array(value: Any, where: str, ndim: int, what: str) -> np.ndarray:
    """``value`` (nested lists, an array or a tensor) as an integer numpy array of ``ndim`` dimensions."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except ValueError:
        raise ImportFailed(f"{where}: {what} is ragged (rows of different lengths); expected {ndim}-D") from None
    if arr.dtype.kind not in "iu" and not (arr.size == 0 and arr.dtype.kind == "f"):
        raise ImportFailed(f"{where}: {what} must hold integer expert ids, got {arr.dtype}")
    if arr.ndim != ndim:
        raise ImportFailed(f"{where}: {what} has shape {arr.shape}; expected {ndim}-D")
    return arr.astype(arr.dtype.newbyteorder("=")) if arr.dtype.byteorder == ">" else arr


def _ids(value: Any, where: str, what: str) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor | np.ndarray):
        value = value.tolist()
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ImportFailed(f"{where}: {what} must be a list of integer token ids")
    return value


def _token_ids(rows: int, prompt: list[int] | None, output: list[int] | None, where: str) -> np.ndarray:
    """(rows,) int64 token ids: the prompt's then the output's, the first ``rows`` of them (-1 unknown)."""
    if prompt is None and output is None:
        return np.full(rows, -1, dtype=np.int64)
    if prompt is None:  # the output's place is unknown without the prompt's length
        return np.full(rows, -1, dtype=np.int64)
    full = prompt + (output if output is not None else [])
    if output is not None and rows > len(full):
        raise ImportFailed(f"{where}: {rows} rows of routed experts but the request has only {len(prompt)} prompt + "
                           f"{len(output)} output tokens")
    ids = np.full(rows, -1, dtype=np.int64)
    ids[:min(rows, len(full))] = full[:rows]
    return ids


def _layer_names(count: int) -> tuple[str, ...]:
    return tuple(f"layer{i}" for i in range(count))


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors alike
        raise ImportFailed(f"{path}: cannot be read with torch.load(weights_only=True) ({type(exc).__name__}); "
                           "save tensors (not numpy arrays or other objects), or save the arrays as .npy/.npz") \
            from None


# ----------------------------------------------------------------------------- SGLang
_SGLANG_HINT = ("expected SGLang /generate responses (text, output_ids, meta_info) with meta_info.routed_experts: "
                "launch the server with --enable-return-routed-experts and send return_routed_experts=true")


def _sglang_sequence(obj: Any, where: str, top_k: int | None) -> ForeignSequence:
    meta = obj.get("meta_info") if isinstance(obj, dict) else None
    if not isinstance(meta, dict) or meta.get("routed_experts") is None:
        raise ImportFailed(f"{where}: no meta_info.routed_experts; {_SGLANG_HINT}")
    raw = meta["routed_experts"]
    prompt_n, output_n = meta.get("prompt_tokens"), meta.get("completion_tokens")
    counted = isinstance(prompt_n, int) and isinstance(output_n, int)
    if isinstance(raw, str):
        if top_k is None:
            raise ImportFailed(f"{where}: SGLang sends the routed experts as flat int32 bytes without their shape; "
                               "pass top_k= (the model's num_experts_per_tok) to split them")
        if not counted:
            raise ImportFailed(f"{where}: meta_info lacks prompt_tokens / completion_tokens, which give the number "
                               "of tokens the routed experts cover")
        data = _b64(raw, where)
        if len(data) % 4:
            raise ImportFailed(f"{where}: routed_experts decodes to {len(data)} bytes, not whole int32 values")
        flat = np.frombuffer(data, dtype="<i4").astype(np.int32)
        rows = prompt_n + output_n - 1
        if rows <= 0:
            experts = np.zeros((0, 0, top_k), np.int32) if flat.size == 0 else None
        elif flat.size % (rows * top_k) == 0 and flat.size:
            experts = flat.reshape(rows, flat.size // (rows * top_k), top_k)
        else:
            experts = None
        if experts is None:
            raise ImportFailed(f"{where}: routed_experts holds {flat.size} int32 values, not [tokens, layers, top_k] "
                               f"with tokens = prompt_tokens + completion_tokens - 1 = {rows} and top_k={top_k}; "
                               "check top_k=")
    else:
        experts = _int_array(raw, where, 3, "meta_info.routed_experts")
    rows = experts.shape[0]
    prompt = output = None
    if counted:
        logprobs = meta.get("input_token_logprobs")
        if isinstance(logprobs, list) and len(logprobs) == prompt_n:
            prompt = _ids([_logprob_token(e) for e in logprobs], where, "meta_info.input_token_logprobs")
        out = obj.get("output_ids")
        if isinstance(out, list) and len(out) == output_n:
            output = _ids(out, where, "output_ids")
        elif isinstance(meta.get("output_token_logprobs"), list) and len(meta["output_token_logprobs"]) == output_n:
            output = _ids([_logprob_token(e) for e in meta["output_token_logprobs"]], where,
                          "meta_info.output_token_logprobs")
        if prompt is None and output is not None:  # the prompt's length is known: its ids are not
            prompt = [-1] * prompt_n
    return ForeignSequence(experts, _token_ids(rows, prompt, output, where), where)


def _logprob_token(entry: Any) -> Any:
    """The token id of an SGLang logprob entry ``(logprob, token_id, text_or_None)``."""
    return entry[1] if isinstance(entry, list | tuple) and len(entry) >= 2 else None


def _layer_count(sequences: Iterator[ForeignSequence], src: Path) -> int:
    """L of the first request with tokens (0-token requests carry no layer axis)."""
    for seq in sequences:
        if seq.experts.shape[0]:
            return int(seq.experts.shape[1])
    raise ImportFailed(f"{src}: no request in the file has tokens")


def read_sglang(src: Path, top_k: int | None) -> ForeignDump:
    """SGLang responses: a JSON file of one response or a list of them, or JSONL (one per line).

    Each response is one sequence: ``meta_info["routed_experts"]``, base64 of int32 ``[T, L, k]`` with
    T = prompt_tokens + completion_tokens - 1 (the last generated token is never run through the model),
    split with ``top_k`` (the bytes carry no shape); a nested list ``[T][L][k]`` is taken as it is.
    Token ids: the prompt's from ``meta_info["input_token_logprobs"]`` (``return_logprob`` with
    ``logprob_start_len=0``), the output's from ``output_ids``; -1 where absent."""
    def sequences() -> Iterator[ForeignSequence]:
        for where, obj in _json_items(src):
            yield _sglang_sequence(obj, where, top_k)

    return ForeignDump(_layer_names(_layer_count(sequences(), src)), sequences,
                       capture={"order": "as SGLang's top-k returns them (topk_ids)"})


# ----------------------------------------------------------------------------- vLLM
_NPY_MAGIC = b"\x93NUMPY"


def _vllm_experts(raw: Any, where: str) -> np.ndarray:
    if isinstance(raw, str):
        data = _b64(raw, where)
        if not data.startswith(_NPY_MAGIC):
            raise ImportFailed(f"{where}: routed_experts decodes to bytes that are no .npy array (vLLM's server sends "
                               "base64 of np.save's bytes)")
        try:
            raw = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as exc:
            raise ImportFailed(f"{where}: routed_experts is a damaged .npy payload ({exc})") from None
    return _int_array(raw, where, 3, "routed_experts")


def _vllm_json_sequences(obj: Any, where: str) -> Iterator[ForeignSequence]:
    if not isinstance(obj, dict):
        raise ImportFailed(f"{where}: expected a JSON object (a vLLM response or request output), got "
                           f"{type(obj).__name__}")
    choices = obj.get("choices", obj.get("outputs"))
    entries = [(f"{where} choice {i}", c) for i, c in enumerate(choices)] if isinstance(choices, list) else \
        [(where, obj)]
    for at, choice in entries:
        if not isinstance(choice, dict) or choice.get("routed_experts") is None:
            raise ImportFailed(f"{at}: no routed_experts; expected vLLM output with routed experts (serve with "
                               "--enable-return-routed-experts)")
        experts = _vllm_experts(choice["routed_experts"], at)
        prompt = _ids(choice.get("prompt_token_ids", obj.get("prompt_token_ids")), at, "prompt_token_ids")
        output = _ids(choice.get("token_ids", choice.get("output_token_ids")), at, "token_ids")
        yield ForeignSequence(experts, _token_ids(experts.shape[0], prompt, output, at), at)


def _vllm_array_sequences(src: Path) -> Iterator[ForeignSequence]:
    suffix = src.suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(src, allow_pickle=False)
        except ValueError as exc:
            raise ImportFailed(f"{src}: not a readable .npy array ({exc})") from None
        yield ForeignSequence(_int_array(arr, str(src), 3, "the array"), np.full(len(arr), -1, np.int64), str(src))
        return
    if suffix == ".npz":
        try:
            with np.load(src, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except ValueError as exc:
            raise ImportFailed(f"{src}: not a readable .npz file ({exc})") from None
        for key, arr in arrays.items():
            if key.endswith("_token_ids"):
                if key.removesuffix("_token_ids") not in arrays:
                    raise ImportFailed(f"{src}: {key!r} names no request array {key.removesuffix('_token_ids')!r}")
                continue
            at = f"{src} array {key!r}"
            experts = _int_array(arr, at, 3, "the array")
            ids = arrays.get(f"{key}_token_ids")
            tokens = np.full(len(experts), -1, np.int64) if ids is None else \
                _token_ids(len(experts), _ids(ids, at, f"{key}_token_ids"), [], at)
            yield ForeignSequence(experts, tokens, at)
        return
    obj = _torch_load(src)
    items = list(obj.items()) if isinstance(obj, Mapping) else \
        list(enumerate(obj)) if isinstance(obj, list | tuple) else [(None, obj)]
    for key, value in items:
        at = str(src) if key is None else f"{src} entry {key!r}"
        experts = _int_array(value, at, 3, "the tensor")
        yield ForeignSequence(experts, np.full(len(experts), -1, np.int64), at)


def read_vllm(src: Path, top_k: int | None) -> ForeignDump:
    """vLLM's routed experts, ``[T, L, k]`` integers per request.

    Arrays: ``.npy`` (one request), ``.npz`` (one 3-D array per request, in file order, with optional
    ``<name>_token_ids`` (T,) ids), ``.pt`` (``torch.save`` of a tensor, a list of tensors or a dict of
    them; read with ``weights_only=True``). JSON / JSONL: OpenAI-server responses (each of
    ``choices`` one request: ``routed_experts``, base64 of a ``.npy`` or nested lists, ``token_ids``
    and ``prompt_token_ids`` with ``return_token_ids``), or records of a ``RequestOutput`` (keys
    ``prompt_token_ids`` and ``outputs`` (or the output's ``routed_experts`` / ``token_ids`` directly))."""
    suffix = src.suffix.lower()

    def sequences() -> Iterator[ForeignSequence]:
        if suffix in (".npy", ".npz", ".pt", ".pth"):
            yield from _vllm_array_sequences(src)
            return
        for where, obj in _json_items(src):
            yield from _vllm_json_sequences(obj, where)

    return ForeignDump(_layer_names(_layer_count(sequences(), src)), sequences,
                       capture={"order": "as vLLM's top-k returns them (topk_ids)"})


# ----------------------------------------------------------------------------- Megatron-Core
def _megatron_trace(src: Path) -> Path:
    if src.is_dir():
        traces = sorted(src.glob("router_trace_rank*.jsonl"))
        if len(traces) != 1:
            found = ", ".join(p.name for p in traces) or "none"
            raise ImportFailed(f"{src}: expected one router_trace_rank<N>.jsonl, found {found}; import one rank's file "
                               "(ranks may see the same tokens, under tensor parallelism, or different ones)")
        return traces[0]
    return src


def _megatron_records(trace: Path) -> Iterator[tuple[str, dict]]:
    for where, rec in _json_items(trace):
        if not isinstance(rec, dict) or not {"step", "layer", "top_indices"} <= set(rec):
            raise ImportFailed(f"{where}: not a Megatron router-trace record (step, block, layer, top_indices)")
        yield where, rec


def _megatron_logits(trace: Path, rec: dict, where: str) -> torch.Tensor:
    shape = rec.get("logit_shape")
    sidecar = trace.parent / f"logits_rank{rec.get('rank', 0)}.bin"
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ImportFailed(f"{where}: logit_shape {shape!r} is not [num_tokens, num_experts]")
    nbytes = shape[0] * shape[1] * 2
    if rec.get("logit_bytes") != nbytes:
        raise ImportFailed(f"{where}: logit_bytes {rec.get('logit_bytes')} disagrees with logit_shape {shape} of "
                           "bfloat16 values")
    try:
        with open(sidecar, "rb") as f:
            f.seek(int(rec["logit_offset"]))
            data = f.read(nbytes)
    except OSError as exc:
        raise ImportFailed(f"{where}: cannot read the logits sidecar {sidecar}: {exc.strerror or exc}") from None
    if len(data) != nbytes:
        raise ImportFailed(f"{where}: the logits sidecar {sidecar} ends before this record's {nbytes} bytes "
                           "(truncated)")
    bits = torch.from_numpy(np.frombuffer(data, dtype="<i2").astype(np.int16))
    return bits.view(torch.bfloat16).reshape(shape)


def read_megatron(src: Path, top_k: int | None) -> ForeignDump:
    """Megatron-Core's router trace: ``router_trace_rank{N}.jsonl`` (or its directory, holding one such
    file), one record per (step, block, layer): ``top_indices`` [num_tokens][topk]. A step is one sequence
    (its rows in record order; the trace does not say which request or position a row is). Decoder
    layers only (MTP records are counted and skipped). When every record points into the
    ``logits_rank{N}.bin`` sidecar (bfloat16 [num_tokens, N] pre-top-k logits), the log is a logits log
    (N from the sidecar) that keeps the recorded selection; when none does, a selection log."""
    trace = _megatron_trace(src)
    layers: set[int] = set()
    with_logits = without = mtp = 0
    for where, rec in _megatron_records(trace):
        if rec.get("block", "decoder") != "decoder":
            mtp += 1
            continue
        if not isinstance(rec["layer"], int) or isinstance(rec["layer"], bool):
            raise ImportFailed(f"{where}: layer {rec['layer']!r} is not an integer")
        layers.add(rec["layer"])
        if "logit_offset" in rec:
            with_logits += 1
        else:
            without += 1
    if not layers:
        raise ImportFailed(f"{trace}: no decoder records in the trace")
    if with_logits and without:
        raise ImportFailed(f"{trace}: {with_logits} records have router logits in the sidecar and {without} do not; "
                           "a log holds logits for every token or for none")
    order = sorted(layers)
    names = tuple(f"layer{i}" for i in order)

    def sequences() -> Iterator[ForeignSequence]:
        step_key, group, where0 = None, {}, ""

        def emit():
            missing = [f"layer{i}" for i in order if i not in group]
            if missing:
                raise ImportFailed(f"{where0}: step {step_key} has no record of {', '.join(missing)}; every step must "
                                   "cover every MoE layer")
            counts = {len(group[i][0]) for i in order}
            if len(counts) > 1:
                raise ImportFailed(f"{where0}: step {step_key}: the layers route different numbers of tokens "
                                   f"({sorted(counts)})")
            per_layer = [_int_array(group[i][0], group[i][1], 2, "top_indices") if len(group[i][0]) else
                         np.zeros((0, 1), np.int64) for i in order]
            ks = {a.shape[1] for a in per_layer}
            if len(ks) > 1:
                raise ImportFailed(f"{where0}: step {step_key}: the layers record different numbers of experts per "
                                   f"token ({sorted(ks)}); k must be equal")
            experts = np.stack(per_layer, axis=1)
            logits = None
            if with_logits:
                logits = torch.stack([_megatron_logits(trace, group[i][2], group[i][1]) for i in order], dim=1)
            return ForeignSequence(experts, np.full(experts.shape[0], -1, np.int64), f"{where0} (step {step_key})",
                                   logits)

        for where, rec in _megatron_records(trace):
            if rec.get("block", "decoder") != "decoder":
                continue
            if rec["step"] != step_key and group:
                yield emit()
                group = {}
            if not group:
                step_key, where0 = rec["step"], where
            if rec["layer"] in group:
                raise ImportFailed(f"{where}: step {step_key} has two records of layer {rec['layer']}")
            group[rec["layer"]] = (rec["top_indices"], where, rec)
        if group:
            yield emit()

    capture = {"order": "as recorded (ascending expert id where the router returned a routing map)",
               "skipped_mtp_records": mtp, "trace": str(trace)}
    num_experts = None
    if with_logits:
        first = next(sequences())
        num_experts = int(first.logits.shape[2])
    return ForeignDump(names, sequences, num_experts=num_experts, capture=capture)


# ----------------------------------------------------------------------------- OLMoE
def read_olmoe(src: Path, top_k: int | None) -> ForeignDump:
    """The OLMoE analysis script's ``c4_results*.jsonl``: one sequence per line, ``input_ids`` (T,) and
    ``exp_ids`` [T][k][L] (each layer's top-k experts by descending router logit, best first)."""

    def sequences() -> Iterator[ForeignSequence]:
        for where, obj in _json_items(src):
            if not isinstance(obj, dict) or "exp_ids" not in obj:
                raise ImportFailed(f"{where}: no exp_ids; expected the lines run_moe_analysis.py writes "
                                   "(input_ids, predicted_token_ids, exp_ids)")
            experts = _int_array(obj["exp_ids"], where, 3, "exp_ids [tokens][top_k][layers]")
            ids = _ids(obj.get("input_ids"), where, "input_ids")
            if ids is not None and len(ids) != experts.shape[0]:
                raise ImportFailed(f"{where}: {len(ids)} input_ids but exp_ids covers {experts.shape[0]} tokens")
            tokens = np.full(experts.shape[0], -1, np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
            yield ForeignSequence(np.ascontiguousarray(experts.transpose(0, 2, 1)), tokens, where)

    return ForeignDump(_layer_names(_layer_count(sequences(), src)), sequences,
                       capture={"order": "best first (descending router logit)"})


FORMATS: Mapping[str, ForeignFormat] = {f.name: f for f in (
    ForeignFormat("sglang", "SGLang return_routed_experts responses", "JSON / JSONL", read_sglang),
    ForeignFormat("vllm", "vLLM routed experts per request", ".npy / .npz / .pt / JSON / JSONL", read_vllm),
    ForeignFormat("megatron", "Megatron-Core router trace (and its logits sidecar)",
                  "router_trace_rank<N>.jsonl or its directory", read_megatron, logits=True),
    ForeignFormat("olmoe", "OLMoE run_moe_analysis.py results", "JSONL (c4_results*.jsonl)", read_olmoe),
)}
"""The importable formats by name (``format=``)."""


# ----------------------------------------------------------------------------- the engine
@dataclass
class _Survey:
    """What the check pass learns about a dump."""

    k: int | None = None
    tokens: int = 0
    sequences: int = 0
    empty: int = 0
    max_id: int = -1
    max_at: str = ""
    num_logit_experts: int | None = None
    zero: np.ndarray | None = None           # (L,) bool: the layer's ids are all 0 so far
    duplicate: dict[int, str] = field(default_factory=dict)   # layer -> where an expert repeats in a token


def _survey(dump: ForeignDump, top_k: int | None) -> _Survey:
    L = len(dump.layers)
    s = _Survey(zero=np.ones(L, dtype=bool))
    for seq in dump.sequences():
        e, where = seq.experts, seq.where
        s.sequences += 1
        if e.ndim == 3 and e.shape[0] == 0:
            s.empty += 1
            continue
        if e.ndim != 3 or e.shape[1] != L:
            raise ImportFailed(f"{where}: routed experts of shape {e.shape}; the dump's first request has {L} layers, "
                               "every request must have the same")
        if seq.token_ids.shape != (e.shape[0],):
            raise ImportFailed(f"{where}: {seq.token_ids.shape[0]} token ids for {e.shape[0]} rows")
        k = e.shape[2]
        if s.k is None:
            s.k = k
            if top_k is not None and k != top_k:
                raise ImportFailed(f"{where}: the dump holds {k} experts per token but top_k={top_k}")
        elif k != s.k:
            raise ImportFailed(f"{where}: {k} experts per token, but earlier requests have {s.k}; k must be equal")
        low, high = int(e.min()), int(e.max())
        if low < -1:
            raise ImportFailed(f"{where}: expert id {low}; ids are >= 0 (or -1 for an empty slot)")
        if high > s.max_id:
            s.max_id, s.max_at = high, where
        s.zero &= ~e.any(axis=(0, 2))
        if k > 1:
            ordered = np.sort(e, axis=2)
            repeat = ((ordered[:, :, 1:] == ordered[:, :, :-1]) & (ordered[:, :, 1:] >= 0)).any(axis=(0, 2))
            for layer in np.flatnonzero(repeat).tolist():
                s.duplicate.setdefault(layer, where)
        if seq.logits is not None:
            if tuple(seq.logits.shape[:2]) != e.shape[:2]:
                raise ImportFailed(f"{where}: logits of shape {tuple(seq.logits.shape)} for {e.shape[:2]} tokens x "
                                   "layers")
            n = int(seq.logits.shape[2])
            if s.num_logit_experts not in (None, n):
                raise ImportFailed(f"{where}: logits over {n} experts, earlier ones over {s.num_logit_experts}")
            s.num_logit_experts = n
            if not bool(torch.isfinite(seq.logits.float()).all()):
                raise ImportFailed(f"{where}: the router logits hold NaN or Inf")
        s.tokens += e.shape[0]
    return s


def _dense_layers(dump: ForeignDump, s: _Survey) -> list[int]:
    """Layers whose every id is 0 with k > 1: rows a stack keeps for a dense (non-MoE) layer (SGLang and vLLM
    size their buffers by the model's hidden layers); no top-k picks one expert k times."""
    if s.k is None or s.k < 2 or dump.num_experts is not None:
        return []
    return np.flatnonzero(s.zero).tolist()


def import_foreign(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str,
    num_experts: int | None = None,
    top_k: int | None = None,
    model_name: str | None = None,
    family: str | None = None,
    score_function: str = "unknown",
    shard_tokens: int = 65536,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> RouterLog:
    """Import a serving or training stack's routing dump (``format``: a name of :data:`FORMATS`) as a router log.

    ``num_experts``: N, required where the dump does not say it (every format but a Megatron trace
    with logits), and checked against the dump where it does. ``top_k``: the model's experts per token;
    checked against the dump's k (and needed to split SGLang's flat bytes). ``dtype``: cast the logits of a
    Megatron trace with logits (nothing else holds logits). The whole dump is read and checked before
    anything is written (see the module docstring); layers whose every id is 0 (a dense layer's rows,
    k > 1) are left out and listed in ``manifest.capture["dense_layers_dropped"]``. Returns the log.

    Raises :class:`ImportFailed` for a dump that is unreadable, inconsistent or out of range, and
    :class:`~usmoe_lp.logs.errors.LogExists` for a destination that cannot take the log.
    """
    if format not in FORMATS:
        raise ImportFailed(f"format={format!r} is not one of {', '.join(FORMATS)}")
    fmt = FORMATS[format]
    src = Path(src)
    if num_experts is not None:
        num_experts = check_int(num_experts, "num_experts", low=1)
    if top_k is not None:
        top_k = check_int(top_k, "top_k", low=1)
    shard_tokens = check_int(shard_tokens, "shard_tokens", low=1)
    if score_function not in SCORE_FUNCTIONS:
        raise ImportFailed(f"score_function={score_function!r} is not one of {', '.join(SCORE_FUNCTIONS)}")
    if dtype is not None and not fmt.logits:
        raise ImportFailed(f"dtype= casts router logits; a {format} dump holds none (leave dtype out)")
    if not src.exists():
        raise ImportFailed(f"{src}: no such file")
    if src.is_dir() and format != "megatron":
        raise ImportFailed(f"{src} is a directory; a {format} dump is a file ({fmt.accepts})")
    check_log_destination(out, overwrite=overwrite)

    dump = fmt.read(src, top_k)
    survey = _survey(dump, top_k)
    if survey.tokens == 0:
        raise ImportFailed(f"{src}: no tokens to import ({survey.sequences} requests, all empty)")
    logits = survey.num_logit_experts is not None
    if dtype is not None and not logits:
        raise ImportFailed(f"{src}: dtype= casts router logits; this {format} dump holds none (leave dtype out)")
    N, keep, dense = _resolve(dump, survey, num_experts, src, format)
    infos = [LayerInfo(dump.layers[i], num_experts=N, top_k=survey.k, score_function=score_function) for i in keep]
    capture = {"source": f"import {format}", "file": str(src), "format": format, **dump.capture,
               "sequences": "one per request" if format in ("sglang", "vllm") else
               "one per step" if format == "megatron" else "one per line",
               "empty_sequences_skipped": survey.empty,
               "dense_layers_dropped": [dump.layers[i] for i in dense]}
    _write_dump(dump, out, infos, keep, capture, logits=logits, model=ModelInfo(model_name, family),
                shard_tokens=shard_tokens, dtype=dtype, overwrite=overwrite)
    return RouterLog.open(out)


def _resolve(dump: ForeignDump, survey: _Survey, num_experts: int | None, src: Path,
             format: str) -> tuple[int, list[int], list[int]]:
    """(N, indices of the layers to keep, indices of the dense layers left out), or :class:`ImportFailed`:
    N from the dump or ``num_experts`` (never from the ids), every id below it, no repeated expert in a
    token of a kept layer."""
    N = dump.num_experts
    if N is not None and num_experts is not None and num_experts != N:
        raise ImportFailed(f"{src}: num_experts={num_experts} but the dump's router logits are over {N} experts")
    N = N if N is not None else num_experts
    if N is None:
        raise ImportFailed(f"{src}: a {format} dump does not say how many experts the model has; pass num_experts= "
                           f"(the model config's number of routed experts; the largest id seen is {survey.max_id})")
    if survey.max_id >= N:
        raise ImportFailed(f"{survey.max_at}: expert id {survey.max_id} but num_experts={N}; ids must be in [0, {N})")
    dense = _dense_layers(dump, survey)
    for layer, where in sorted(survey.duplicate.items()):
        if layer not in dense:
            raise ImportFailed(f"{where}: layer {dump.layers[layer]!r} lists an expert twice in one token; a top-k "
                               "selection names k distinct experts")
    keep = [i for i in range(len(dump.layers)) if i not in dense]
    if not keep:
        raise ImportFailed(f"{src}: every layer's ids are all 0: no MoE layer recorded")
    return N, keep, dense


def _write_dump(dump: ForeignDump, out, infos: list[LayerInfo], keep: list[int], capture: dict, *, logits: bool,
                model: ModelInfo, shard_tokens: int, dtype: torch.dtype | None, overwrite: bool) -> None:
    """The write pass: each sequence in pieces of at most ``shard_tokens`` rows, sequence id = its index in
    the dump, positions 0.. (layers ``keep`` of the dump, named by ``infos``)."""
    try:
        with RouterLogWriter(out, infos, model=model, capture=capture, shard_tokens=shard_tokens,
                             dtype=dtype if logits else None, overwrite=overwrite,
                             content="logits" if logits else "selection") as writer:
            for s, seq in enumerate(dump.sequences()):
                T = seq.experts.shape[0]
                for a in range(0, T, shard_tokens):
                    b = min(a + shard_tokens, T)
                    pairs = list(zip(infos, keep, strict=True))
                    selected = {info.name: _selection_dtype(seq.experts[a:b, i]) for info, i in pairs}
                    logit_part = {info.name: seq.logits[a:b, i] for info, i in pairs} if logits else None
                    writer.append(logit_part, seq.token_ids[a:b], np.full(b - a, s, dtype=np.int64),
                                  np.arange(a, b, dtype=np.int64), selected=selected)
    except LogError as exc:
        exc.add_note(f"while importing {capture['file']} into {out}")
        raise


def _selection_dtype(ids: np.ndarray) -> np.ndarray:
    """(n, k) ids in a dtype a selection log stores (int16/int32/int64 kept; other integers as int32)."""
    ids = np.ascontiguousarray(ids)
    return ids if ids.dtype.name in SELECTION_DTYPES else ids.astype(np.int32)
