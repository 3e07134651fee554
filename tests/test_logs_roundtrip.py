"""Router log round-trips: what the writer is given is what the reader gives back, bit for bit."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from usmoe_lp.errors import InvalidParameter, UsmoeLpError
from usmoe_lp.logs import (
    Chunk,
    InvalidLogInput,
    LayerInfo,
    LogExists,
    Manifest,
    MissingLayer,
    NonFiniteLogits,
    RouterLog,
    RouterLogWriter,
)
from usmoe_lp.logs.format import CONTENT_VERSIONS, MANIFEST_NAME, shard_file

LAYERS = (LayerInfo("l0", num_experts=8, top_k=2, module_path="model.layers.0.mlp.gate", score_function="softmax"),
          LayerInfo("l1", num_experts=8, top_k=2, score_function="sigmoid", selection_bias=[0.5] * 8),
          LayerInfo("l2", num_experts=6, top_k=1))


def make_data(T: int, layers=LAYERS, dtype=torch.float32, seed: int = 0, seq_len: int = 7):
    g = torch.Generator().manual_seed(seed)
    logits = {layer.name: (torch.randn(T, layer.num_experts, generator=g) * 3).to(dtype) for layer in layers}
    token_ids = torch.randint(0, 50_000, (T,), generator=g)
    sequence_ids = torch.arange(T) // seq_len
    positions = torch.arange(T) % seq_len
    return logits, token_ids, sequence_ids, positions


def write(path, data, pieces, layers=LAYERS, **kwargs):
    """Append ``data`` to a new log in pieces of the given sizes."""
    logits, token_ids, sequence_ids, positions = data
    with RouterLogWriter(path, layers, **kwargs) as w:
        a = 0
        for n in pieces:
            w.append({k: v[a:a + n] for k, v in logits.items()}, token_ids[a:a + n], sequence_ids[a:a + n],
                     positions[a:a + n])
            a += n
    return w


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point:
        view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.view(view), b.view(view))
    return torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_round_trip_bit_exact(tmp_path, dtype):
    data = make_data(100, dtype=dtype)
    data[0]["l0"][3, 2] = torch.finfo(dtype).max          # extremes survive too
    data[0]["l0"][4, 1] = torch.finfo(dtype).tiny
    data[0]["l0"][5, 0] = -0.0
    write(tmp_path / "log", data, [30, 30, 40], shard_tokens=32)
    log = RouterLog.open(tmp_path / "log", verify="full")
    assert log.dtype == dtype and log.manifest.dtype == str(dtype).removeprefix("torch.")
    assert log.num_tokens == 100 and log.layers == ("l0", "l1", "l2")
    assert log.num_experts == {"l0": 8, "l1": 8, "l2": 6} and log.top_k == {"l0": 2, "l1": 2, "l2": 1}
    assert [(s.token_start, s.token_stop) for s in log.shards] == [(0, 32), (32, 64), (64, 96), (96, 100)]
    for name in log.layers:
        whole = log.read(name, 0, 100)
        assert same_bits(whole.logits, data[0][name])
        assert torch.equal(whole.token_ids, data[1]) and torch.equal(whole.sequence_ids, data[2])
        assert torch.equal(whole.positions, data[3])
        assert whole.positions.dtype == whole.token_ids.dtype == whole.sequence_ids.dtype == torch.int64
    assert log.sequences.tolist() == list(range(15))
    assert log.complete


def test_manifest_content(tmp_path):
    write(tmp_path / "log", make_data(20), [20], shard_tokens=8, model={"name": "tiny", "family": "mixtral"},
          capture={"batch_size": 2, "prompts": ["a", "b"]})
    m = json.loads((tmp_path / "log" / MANIFEST_NAME).read_text())
    assert m["format_version"] == CONTENT_VERSIONS["logits"] and m["model"] == {"name": "tiny", "family": "mixtral",
                                                                    "revision": None}
    assert [layer["name"] for layer in m["layers"]] == ["l0", "l1", "l2"]
    assert m["layers"][0]["module_path"] == "model.layers.0.mlp.gate" and m["layers"][1]["selection_bias"] == [0.5] * 8
    assert m["num_tokens"] == 20 and m["dtype"] == "float32" and m["complete"] is True
    assert [s["file"] for s in m["shards"]] == [shard_file(i) for i in range(3)]
    assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in m["shards"])
    assert m["capture"] == {"batch_size": 2, "prompts": ["a", "b"]} and m["device"] == "cpu"
    assert {"python", "torch", "safetensors"} <= set(m["versions"])
    assert m["tensors"]["logits.l2"] == {"dtype": "float32", "row_shape": [6]}
    assert Manifest.from_json((tmp_path / "log" / MANIFEST_NAME).read_text()).to_dict() == m


def test_random_access_across_shards_equals_concatenation(tmp_path):
    data = make_data(103)
    write(tmp_path / "log", data, [50, 3, 50], shard_tokens=10)
    log = RouterLog.open(tmp_path / "log")
    rng = np.random.default_rng(0)
    for _ in range(40):
        a, b = sorted(int(v) for v in rng.integers(0, 104, size=2))
        chunk = log.read("l1", a, b)
        assert chunk.token_start == a and chunk.token_stop == b and len(chunk) == b - a
        assert torch.equal(chunk.logits, data[0]["l1"][a:b]) and torch.equal(chunk.positions, data[3][a:b])
    assert log.read("l2", 10, 10).logits.shape == (0, 6)
    for bad in [(-1, 3), (5, 4), (0, 104), (0.0, 3)]:
        with pytest.raises(InvalidParameter):
            log.read("l0", *bad)
    with pytest.raises(MissingLayer, match="no layer 'l9'.*'l0', 'l1', 'l2'"):
        log.read("l9", 0, 1)


def test_iter_chunks_covers_every_token_once_in_order(tmp_path):
    data = make_data(95)
    write(tmp_path / "log", data, [95], shard_tokens=20)
    log = RouterLog.open(tmp_path / "log")
    chunks = list(log.iter_chunks("l0", chunk_tokens=13))
    assert all(isinstance(c, Chunk) for c in chunks)
    assert [c.token_start for c in chunks] == list(range(0, 95, 13))
    assert [len(c) for c in chunks] == [13] * 7 + [4]
    assert torch.equal(torch.cat([c.logits for c in chunks]), data[0]["l0"])
    assert torch.equal(torch.cat([c.token_ids for c in chunks]), data[1])
    part = list(log.iter_chunks("l2", chunk_tokens=100, start=17, stop=61))
    assert len(part) == 1 and torch.equal(part[0].logits, data[0]["l2"][17:61])
    with pytest.raises(InvalidParameter):
        log.iter_chunks("l0", chunk_tokens=0)     # checked at the call, not at the first next()
    with pytest.raises(MissingLayer):
        log.iter_chunks("nope")


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 60), shard_tokens=st.integers(1, 25), chunk_tokens=st.integers(1, 30),
       cuts=st.lists(st.integers(0, 60), max_size=6), dtype=st.sampled_from([torch.float16, torch.bfloat16]))
def test_any_shard_and_chunk_sizes_give_the_same_data_back(tmp_path_factory, T, shard_tokens, chunk_tokens, cuts,
                                                           dtype):
    layers = (LayerInfo("a", num_experts=3), LayerInfo("b", num_experts=5))
    data = make_data(T, layers=layers, dtype=dtype, seed=T)
    bounds = sorted({0, T, *(c for c in cuts if c <= T)})
    pieces = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
    path = tmp_path_factory.mktemp("h") / "log"
    w = write(path, data, pieces, layers=layers, shard_tokens=shard_tokens, fsync=False)
    assert w.buffered_tokens == 0 and w.closed
    log = RouterLog.open(path, verify="full")
    assert [s.num_tokens for s in log.shards] == [shard_tokens] * (T // shard_tokens) + (
        [T % shard_tokens] if T % shard_tokens else [])
    for name in ("a", "b"):
        got = list(log.iter_chunks(name, chunk_tokens=chunk_tokens))
        assert same_bits(torch.cat([c.logits for c in got]), data[0][name])
        assert torch.equal(torch.cat([c.sequence_ids for c in got]), data[2])


def test_selected_weights_hidden_and_router_weights(tmp_path):
    layers = (LayerInfo("a", num_experts=4, top_k=2), LayerInfo("b", num_experts=4, top_k=2))
    logits, tok, seq, pos = make_data(30, layers=layers, dtype=torch.bfloat16)
    top = {k: torch.topk(v.float(), 2) for k, v in logits.items()}
    hidden = torch.randn(30, 16, dtype=torch.bfloat16)
    router = {"a": torch.randn(4, 16), "b": torch.randn(4, 16)}
    with RouterLogWriter(tmp_path / "log", layers, shard_tokens=7) as w:
        for a in range(0, 30, 9):
            w.append({k: v[a:a + 9] for k, v in logits.items()}, tok[a:a + 9], seq[a:a + 9], pos[a:a + 9],
                     selected={k: t.indices[a:a + 9] for k, t in top.items()},
                     weights={k: t.values[a:a + 9].softmax(-1) for k, t in top.items()},
                     hidden={"a": hidden[a:a + 9]})
        w.write_router_weights(router)
    log = RouterLog.open(tmp_path / "log", verify="full")
    chunk = log.read("a", 5, 23, with_hidden=True)
    assert torch.equal(chunk.selected, top["a"].indices[5:23]) and chunk.selected.dtype == torch.int64
    assert torch.equal(chunk.weights, top["a"].values[5:23].softmax(-1))
    assert same_bits(chunk.hidden, hidden[5:23])
    assert log.read("a", 0, 3).hidden is None and log.has("a", "hidden") and not log.has("b", "hidden")
    with pytest.raises(MissingLayer, match="no hidden states"):
        log.read("b", 0, 3, with_hidden=True)
    assert all(torch.equal(log.router_weights()[k], router[k]) for k in router)


def test_empty_log_and_flush(tmp_path):
    with RouterLogWriter(tmp_path / "empty", LAYERS):
        pass
    log = RouterLog.open(tmp_path / "empty", verify="full")
    assert log.num_tokens == 0 and log.dtype is None and log.sequences.numel() == 0
    assert list(log.iter_chunks("l0")) == [] and log.read("l2", 0, 0).logits.shape == (0, 6)
    logits, tok, seq, pos = make_data(5)
    w = RouterLogWriter(tmp_path / "flushed", LAYERS, shard_tokens=100)
    w.append(logits, tok, seq, pos)
    w.flush()                                    # a short shard now; the log is readable before close()
    log = RouterLog.open(tmp_path / "flushed")
    assert log.num_tokens == 5 and not log.complete
    w.close()
    w.close()                                    # idempotent
    assert RouterLog.open(tmp_path / "flushed").complete


def test_caller_may_reuse_its_buffers(tmp_path):
    logits, tok, seq, pos = make_data(12)
    expected = {k: v.clone() for k, v in logits.items()}
    with RouterLogWriter(tmp_path / "log", LAYERS, shard_tokens=100) as w:
        w.append(logits, tok, seq, pos)
        for v in logits.values():
            v.zero_()                                   # still buffered: the writer holds its own copy
    log = RouterLog.open(tmp_path / "log")
    assert all(torch.equal(log.read(k, 0, 12).logits, v) for k, v in expected.items())


def test_memory_stays_bounded(tmp_path):
    """200k tokens x 64 experts x 4 layers in 5,000-token appends: the buffer never exceeds two shards."""
    layers = [LayerInfo(f"l{i}", num_experts=64, top_k=8) for i in range(4)]
    shard_tokens, step, T = 16384, 5000, 200_000
    shard_bytes = shard_tokens * (4 * 64 * 2 + 3 * 8)    # bf16 logits of 4 layers + three int64 metadata
    base = torch.randn(step, 64).to(torch.bfloat16)
    with RouterLogWriter(tmp_path / "big", layers, shard_tokens=shard_tokens) as w:
        for a in range(0, T, step):
            meta = torch.arange(a, a + step)         # sequences of 100 tokens, each token once
            w.append({layer.name: base for layer in layers}, meta, meta // 100, meta % 100)
            assert w.buffered_tokens < shard_tokens and w.buffered_bytes < shard_bytes
    assert 0 < w.max_buffered_bytes <= 2 * shard_bytes
    log = RouterLog.open(tmp_path / "big")
    assert log.num_tokens == T and len(log.shards) == -(-T // shard_tokens)
    assert torch.equal(log.read("l3", T - step, T).logits, base)


def test_overwrite_refused_and_nothing_lost(tmp_path):
    data = make_data(20)
    write(tmp_path / "log", data, [20], shard_tokens=8)
    before = {p.name: p.read_bytes() for p in (tmp_path / "log").rglob("*") if p.is_file()}
    with pytest.raises(LogExists, match="not empty.*overwrite=True"):
        RouterLogWriter(tmp_path / "log", LAYERS)
    assert {p.name: p.read_bytes() for p in (tmp_path / "log").rglob("*") if p.is_file()} == before
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "paper.tex").write_text("precious")
    with pytest.raises(LogExists, match="no earlier router log wrote \\(paper.tex\\)"):
        RouterLogWriter(tmp_path / "notes", LAYERS, overwrite=True)
    assert (tmp_path / "notes" / "paper.tex").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(LogExists, match="not a directory"):
        RouterLogWriter(tmp_path / "file", LAYERS, overwrite=True)
    new = make_data(9, seed=1)
    write(tmp_path / "log", new, [9], shard_tokens=4, overwrite=True)
    log = RouterLog.open(tmp_path / "log", verify="full")
    assert log.num_tokens == 9 and torch.equal(log.read("l0", 0, 9).logits, new[0]["l0"])
    assert log.validate().warnings == ()


def test_writer_rejects_bad_input_with_clear_errors(tmp_path):
    logits, tok, seq, pos = make_data(6)
    w = RouterLogWriter(tmp_path / "log", LAYERS, shard_tokens=4)
    bad_nan = dict(logits, l1=logits["l1"].clone())
    bad_nan["l1"][2, 3] = float("nan")
    with pytest.raises(NonFiniteLogits, match="layer 'l1'.*1 NaN.*token 2.*expert 3"):
        w.append(bad_nan, tok, seq, pos)
    bad_inf = dict(logits, l2=logits["l2"].clone())
    bad_inf["l2"][0, 0] = -float("inf")
    with pytest.raises(NonFiniteLogits, match="layer 'l2'.*1 Inf"):
        w.append(bad_inf, tok, seq, pos)
    cases = [
        ({k: v for k, v in logits.items() if k != "l2"}, tok, seq, pos, "missing \\['l2'\\]"),
        (dict(logits, l0=logits["l0"][:5]), tok, seq, pos, "'l1' have 6 tokens but layer 'l0' has 5"),
        (dict(logits, l2=logits["l2"][:, :5]), tok, seq, pos, "N=6"),
        (dict(logits, l0=logits["l0"].to(torch.int64)), tok, seq, pos, "must be floating"),
        (logits, tok[:5], seq, pos, "token_ids must be \\(6,\\)"),
        (logits, tok, seq.float(), pos, "sequence_ids must be integers"),
        (dict(logits, l0=logits["l0"].half()), tok, seq, pos, "one dtype"),
    ]
    for lg, t, s, p, message in cases:
        with pytest.raises(InvalidLogInput, match=message):
            w.append(lg, t, s, p)
    w.append(logits, tok.numpy(), seq.tolist(), pos)     # numpy and lists are fine
    with pytest.raises(InvalidLogInput, match="changed.*float32.*float16"):
        w.append({k: v.half() for k, v in logits.items()}, tok, seq, pos)
    with pytest.raises(InvalidLogInput, match="new \\['selected.l0'\\]"):
        w.append(logits, tok, seq, pos, selected={"l0": torch.zeros(6, 2, dtype=torch.int64)})
    w.close()
    with pytest.raises(InvalidLogInput, match="closed"):
        w.append(logits, tok, seq, pos)
    assert RouterLog.open(tmp_path / "log", verify="full").num_tokens == 6
    for kwargs, message in [({"shard_tokens": 0}, "shard_tokens"), ({"dtype": torch.int32}, "floating"),
                            ({"capture": {"f": object()}}, "JSON"), ({"model": {"nme": "x"}}, "unknown keys")]:
        with pytest.raises(InvalidLogInput, match=message):
            RouterLogWriter(tmp_path / "other", LAYERS, **kwargs)
    with pytest.raises(InvalidLogInput, match="distinct"):
        RouterLogWriter(tmp_path / "other", [LAYERS[0], LAYERS[0]])
    for kwargs in [{"num_experts": 0}, {"num_experts": 4, "top_k": 5}, {"num_experts": 4, "score_function": "relu"},
                   {"num_experts": 2, "selection_bias": [1.0]}]:
        with pytest.raises(InvalidLogInput):
            LayerInfo("x", **kwargs)
    with pytest.raises(InvalidLogInput, match="name"):
        LayerInfo("a/b", num_experts=2)
    assert issubclass(NonFiniteLogits, UsmoeLpError)


def test_dtype_cast_and_exception_inside_with_keeps_data(tmp_path):
    logits, tok, seq, pos = make_data(10)
    with RouterLogWriter(tmp_path / "cast", LAYERS, dtype=torch.bfloat16) as w:
        w.append(logits, tok, seq, pos)
    log = RouterLog.open(tmp_path / "cast")
    assert log.dtype == torch.bfloat16 and torch.equal(log.read("l0", 0, 10).logits, logits["l0"].bfloat16())
    big = dict(logits, l0=logits["l0"] * 1e6)
    with pytest.raises(NonFiniteLogits, match="after casting to float16"):
        RouterLogWriter(tmp_path / "half", LAYERS, dtype=torch.float16).append(big, tok, seq, pos)
    with pytest.raises(RuntimeError, match="capture failed"):
        with RouterLogWriter(tmp_path / "partial", LAYERS, shard_tokens=100) as w:
            w.append(logits, tok, seq, pos)
            raise RuntimeError("capture failed")
    log = RouterLog.open(tmp_path / "partial", verify="full")
    assert log.num_tokens == 10 and not log.complete        # buffered tokens kept, log marked incomplete


SHARED = ("usmoe_lp.errors", "usmoe_lp.staging", "usmoe_lp._validate", "usmoe_lp.cli_errors")


def test_layer_rule_logs_imports_no_sibling_or_upper_layer():
    """usmoe_lp/logs may import itself and the shared low-level modules (usmoe_lp.errors, usmoe_lp.staging,
    usmoe_lp._validate, and the CLI's usmoe_lp.cli_errors, which imports no usmoe_lp module), never lp, routing,
    verify or report."""
    package = Path(__file__).resolve().parents[1] / "usmoe_lp" / "logs"
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                if name.startswith("usmoe_lp"):
                    assert name in SHARED or name.startswith("usmoe_lp.logs"), f"{source.name}: {name}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_copied_to_the_cpu_bit_exact(tmp_path):
    logits, tok, seq, pos = make_data(40, dtype=torch.bfloat16)
    on_gpu = {k: v.cuda() for k, v in logits.items()}
    with RouterLogWriter(tmp_path / "log", LAYERS, shard_tokens=16) as w:
        w.append(on_gpu, tok.cuda(), seq.cuda(), pos.cuda())
        for v in on_gpu.values():
            v.zero_()                                  # the caller reuses its buffers: the log must not change
    log = RouterLog.open(tmp_path / "log", verify="full")
    assert log.manifest.device.startswith("cuda")
    assert all(same_bits(log.read(k, 0, 40).logits, v) for k, v in logits.items())
