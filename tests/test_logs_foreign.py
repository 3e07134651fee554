"""``usmoe-lp import --format sglang|vllm|megatron|olmoe``: routing dumps built here exactly as each stack
writes them, imported, read back and compared with the source arrays (the oracle: the arrays themselves,
concatenated per layer in request order by plain loops)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from usmoe_lp.logs import FORMATS, RouterLog, import_foreign
from usmoe_lp.logs.cli import import_command, log_app
from usmoe_lp.logs.errors import ImportFailed

app = typer.Typer()
app.add_typer(log_app, name="log")
app.command("import")(import_command)
runner = CliRunner(env={"COLUMNS": "200"})


def _routes(T: int, L: int, k: int, N: int, seed: int) -> np.ndarray:
    """(T, L, k) int32: k distinct experts per token and layer, in a random (rank) order."""
    g = np.random.default_rng(seed)
    return np.array([[g.permutation(N)[:k] for _ in range(L)] for _ in range(T)], dtype=np.int32).reshape(T, L, k)


def _check(log: RouterLog, routes: list[np.ndarray], tokens: list[list[int]], layers=None) -> None:
    """The log holds, layer by layer, the requests' rows in order; sequence s = request s; positions 0.."""
    layers = list(range(routes[0].shape[1])) if layers is None else layers
    assert log.num_tokens == sum(len(r) for r in routes)
    for name, layer in zip(log.layers, layers, strict=True):
        chunk = log.read(name, 0, log.num_tokens)
        expected, rows = [], 0
        for r in routes:
            for t in range(len(r)):
                expected.append(list(r[t, layer]))
                rows += 1
        assert chunk.selected.tolist() == expected
    chunk = log.read(log.layers[0], 0, log.num_tokens)
    seq, pos, ids = [], [], []
    for s, (r, tok) in enumerate(zip(routes, tokens, strict=True)):
        for t in range(len(r)):
            seq.append(s)
            pos.append(t)
            ids.append(tok[t])
    assert chunk.sequence_ids.tolist() == seq and chunk.positions.tolist() == pos and chunk.token_ids.tolist() == ids
    RouterLog.open(log.path, verify="full")


# ----------------------------------------------------------------------------- SGLang
def _sglang_response(routes: np.ndarray, prompt: list[int], output: list[int], *, logprobs=True) -> dict:
    """What SGLang's /generate returns with return_routed_experts (and return_logprob, logprob_start_len=0):
    meta_info.routed_experts = base64 of the int32 [T, L, k] bytes, T = prompt + completion - 1."""
    assert len(routes) == len(prompt) + len(output) - 1
    meta = {"id": "r", "prompt_tokens": len(prompt), "completion_tokens": len(output), "cached_tokens": 0,
            "routed_experts": base64.b64encode(routes.astype(np.int32).tobytes()).decode("utf-8")}
    if logprobs:
        meta["input_token_logprobs"] = [[None if i == 0 else -1.5, t, None] for i, t in enumerate(prompt)]
        meta["output_token_logprobs"] = [[-0.5, t, None] for t in output]
    return {"text": "...", "output_ids": output, "meta_info": meta}


def test_sglang_json_list_and_jsonl(tmp_path):
    routes = [_routes(6, 3, 2, 8, 1), _routes(3, 3, 2, 8, 2)]
    prompts, outputs = [[11, 12, 13, 14], [21, 22]], [[15, 16, 17], [23, 24]]
    responses = [_sglang_response(r, p, o) for r, p, o in zip(routes, prompts, outputs, strict=True)]
    tokens = [p + o for p, o in zip(prompts, outputs, strict=True)]
    (tmp_path / "list.json").write_text(json.dumps(responses))
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in responses) + "\n")
    for name in ("list.json", "r.jsonl"):
        log = import_foreign(tmp_path / name, tmp_path / f"log-{name}", format="sglang", num_experts=8, top_k=2)
        assert not log.has_logits and log.layers == ("layer0", "layer1", "layer2")
        assert {log.layer_info(n).top_k for n in log.layers} == {2} and set(log.num_experts.values()) == {8}
        _check(log, routes, tokens)
    # one response; token ids unknown without logprobs (the prompt's are not in the response)
    (tmp_path / "one.json").write_text(json.dumps(_sglang_response(routes[0], prompts[0], outputs[0],
                                                                   logprobs=False)))
    log = import_foreign(tmp_path / "one.json", tmp_path / "one", format="sglang", num_experts=8, top_k=2)
    _check(log, routes[:1], [[-1] * 4 + outputs[0]])


def test_sglang_dense_layers_left_out(tmp_path):
    routes = _routes(4, 3, 2, 8, 3)
    routes[:, 0] = 0  # SGLang sizes its buffer by num_hidden_layers: a dense first layer stays 0
    (tmp_path / "r.json").write_text(json.dumps(_sglang_response(routes, [1, 2, 3], [4, 5])))
    log = import_foreign(tmp_path / "r.json", tmp_path / "log", format="sglang", num_experts=8, top_k=2)
    assert log.layers == ("layer1", "layer2") and log.manifest.capture["dense_layers_dropped"] == ["layer0"]
    _check(log, [routes], [[1, 2, 3, 4]], layers=[1, 2])


# ----------------------------------------------------------------------------- vLLM
def _npy_b64(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, arr)
    return base64.b64encode(buf.getvalue()).decode()


def test_vllm_server_responses(tmp_path):
    """OpenAI completions with return_token_ids: choices[i].routed_experts = base64 .npy of
    [prompt + completion - 1, L, k]; token_ids (completion) and prompt_token_ids."""
    routes = [_routes(5, 2, 3, 10, 4).astype(np.int16), _routes(4, 2, 3, 10, 5).astype(np.int16)]
    prompt = [7, 8, 9]
    outputs = [[30, 31, 32], [40, 41]]
    resp = {"id": "cmpl", "object": "text_completion", "prompt_token_ids": prompt,
            "choices": [{"index": i, "text": "", "token_ids": o, "routed_experts": _npy_b64(r)}
                        for i, (r, o) in enumerate(zip(routes, outputs, strict=True))],
            "usage": {"prompt_tokens": 3, "completion_tokens": 3}}
    (tmp_path / "r.jsonl").write_text(json.dumps(resp) + "\n")
    log = import_foreign(tmp_path / "r.jsonl", tmp_path / "log", format="vllm", num_experts=10)
    assert log.read("layer0", 0, 1).selected.dtype == torch.int16  # int16 kept as given
    _check(log, routes, [(prompt + o)[:len(r)] for r, o in zip(routes, outputs, strict=True)])


def test_vllm_arrays(tmp_path):
    routes = [_routes(5, 2, 2, 6, 6), _routes(2, 2, 2, 6, 7)]
    np.save(tmp_path / "one.npy", routes[0])
    np.savez(tmp_path / "many.npz", req_a=routes[0], req_b=routes[1], req_b_token_ids=np.array([3, 4]))
    torch.save([torch.from_numpy(r).long() for r in routes], tmp_path / "many.pt")
    log = import_foreign(tmp_path / "one.npy", tmp_path / "a", format="vllm", num_experts=6, top_k=2)
    _check(log, routes[:1], [[-1] * 5])
    log = import_foreign(tmp_path / "many.npz", tmp_path / "b", format="vllm", num_experts=6)
    _check(log, routes, [[-1] * 5, [3, 4]])
    log = import_foreign(tmp_path / "many.pt", tmp_path / "c", format="vllm", num_experts=6)
    _check(log, routes, [[-1] * 5, [-1, -1]])


# ----------------------------------------------------------------------------- Megatron-Core
def _megatron_trace(directory, steps: list[np.ndarray], *, logits: list[torch.Tensor] | None = None, rank=0,
                    layer_ids=(1, 3)) -> None:
    """router_trace_rank{N}.jsonl as RouterTracer writes it: one record per (step, layer), top_indices
    [num_tokens][topk]; with logits, the bfloat16 bytes appended to logits_rank{N}.bin and the record's
    logit_offset / logit_bytes / logit_shape."""
    directory.mkdir(exist_ok=True)
    lines, offset, blob = [], 0, b""
    for step, routes in enumerate(steps):
        for j, layer in enumerate(layer_ids):
            rec = {"step": step, "stage": "pre_dispatch", "block": "decoder", "layer": layer, "rank": rank,
                   "num_tokens": int(routes.shape[0]), "topk": int(routes.shape[2])}
            if logits is not None:
                data = logits[step][:, j].contiguous().view(torch.int16).numpy().tobytes()
                rec.update(logit_offset=offset, logit_bytes=len(data), logit_shape=list(logits[step][:, j].shape))
                offset += len(data)
                blob += data
            rec["top_indices"] = routes[:, j].tolist()
            lines.append(json.dumps(rec))
    lines.append(json.dumps({"step": 0, "stage": "pre_dispatch", "block": "mtp", "layer": 0, "rank": rank,
                             "num_tokens": 1, "topk": 2, "mtp_idx": 0, "top_indices": [[0, 1]]}))
    (directory / f"router_trace_rank{rank}.jsonl").write_text("\n".join(lines) + "\n")
    if logits is not None:
        (directory / f"logits_rank{rank}.bin").write_bytes(blob)


def test_megatron_trace_without_logits_is_a_selection_log(tmp_path):
    steps = [_routes(4, 2, 2, 16, 8), _routes(3, 2, 2, 16, 9)]
    _megatron_trace(tmp_path / "trace", steps)
    log = import_foreign(tmp_path / "trace", tmp_path / "log", format="megatron", num_experts=16)
    assert not log.has_logits and log.layers == ("layer1", "layer3")
    assert log.manifest.capture["skipped_mtp_records"] == 1
    _check(log, steps, [[-1] * 4, [-1] * 3])
    with pytest.raises(ImportFailed, match="dtype= casts router logits; this megatron dump holds none"):
        import_foreign(tmp_path / "trace", tmp_path / "log2", format="megatron", num_experts=16, dtype=torch.float32)


def test_megatron_trace_with_logits_is_a_logits_log(tmp_path):
    steps = [_routes(4, 2, 2, 5, 10), _routes(3, 2, 2, 5, 11)]
    logits = [torch.randn(len(r), 2, 5).bfloat16() for r in steps]
    _megatron_trace(tmp_path / "trace", steps, logits=logits)
    log = import_foreign(tmp_path / "trace" / "router_trace_rank0.jsonl", tmp_path / "log", format="megatron")
    assert log.has_logits and log.dtype == torch.bfloat16 and set(log.num_experts.values()) == {5}
    cast = import_foreign(tmp_path / "trace", tmp_path / "f32", format="megatron", dtype=torch.float32)
    assert cast.dtype == torch.float32 and torch.equal(cast.read("layer1", 0, 7).logits,
                                                       torch.cat([g[:, 0] for g in logits]).float())
    for j, name in enumerate(log.layers):
        chunk = log.read(name, 0, log.num_tokens)
        assert torch.equal(chunk.logits, torch.cat([g[:, j] for g in logits]))  # bit-exact bfloat16
        assert chunk.selected.tolist() == np.concatenate([r[:, j] for r in steps]).tolist()
    RouterLog.open(log.path, verify="full")
    with pytest.raises(ImportFailed, match="num_experts=6 but the dump's router logits are over 5"):
        import_foreign(tmp_path / "trace", tmp_path / "log2", format="megatron", num_experts=6)


def test_megatron_truncated_sidecar(tmp_path):
    steps = [_routes(4, 2, 2, 5, 12)]
    _megatron_trace(tmp_path / "trace", steps, logits=[torch.randn(4, 2, 5).bfloat16()])
    side = tmp_path / "trace" / "logits_rank0.bin"
    side.write_bytes(side.read_bytes()[:-3])
    with pytest.raises(ImportFailed, match="truncated"):
        import_foreign(tmp_path / "trace", tmp_path / "log", format="megatron")
    assert not (tmp_path / "log").exists()


# ----------------------------------------------------------------------------- OLMoE
def test_olmoe_results_jsonl(tmp_path):
    """run_moe_analysis.py: {"input_ids": [T], "predicted_token_ids": [T], "exp_ids": [T][k][L]}."""
    routes = [_routes(6, 4, 3, 12, 13), _routes(6, 4, 3, 12, 14)]
    ids = [list(range(100, 106)), list(range(200, 206))]
    with open(tmp_path / "c4_results.jsonl", "w") as f:
        for r, i in zip(routes, ids, strict=True):
            f.write(json.dumps({"input_ids": i, "predicted_token_ids": i[1:] + [0],
                                "exp_ids": r.transpose(0, 2, 1).tolist()}) + "\n")
    log = import_foreign(tmp_path / "c4_results.jsonl", tmp_path / "log", format="olmoe", num_experts=12)
    assert log.layers == ("layer0", "layer1", "layer2", "layer3")
    _check(log, routes, ids)


# ----------------------------------------------------------------------------- properties
@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=5), shard=st.integers(1, 7),
       seed=st.integers(0, 1000))
def test_any_requests_and_shard_size_round_trip(tmp_path_factory, lengths, shard, seed):
    tmp = tmp_path_factory.mktemp("p")
    routes = [_routes(n, 2, 2, 5, seed + i) for i, n in enumerate(lengths)]
    np.savez(tmp / "r.npz", **{f"r{i:02d}": r for i, r in enumerate(routes)})
    log = import_foreign(tmp / "r.npz", tmp / "log", format="vllm", num_experts=5, shard_tokens=shard)
    _check(log, routes, [[-1] * n for n in lengths])


# ----------------------------------------------------------------------------- refusals, through the CLI
def _sglang_file(tmp_path, routes=None, name="r.json"):
    routes = _routes(4, 2, 2, 8, 15) if routes is None else routes
    (tmp_path / name).write_text(json.dumps(_sglang_response(routes, [1, 2, 3], [4, 5])))
    return tmp_path / name


def _refused(args, *needles):
    result = runner.invoke(app, ["import", *map(str, args)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    for needle in needles:
        assert needle in text, text
    assert "Traceback" not in text
    return text


def test_cli_imports_and_refuses_in_flag_words(tmp_path):
    src = _sglang_file(tmp_path, _routes(4, 2, 2, 8, 16))
    out = tmp_path / "log"
    ok = runner.invoke(app, ["import", str(src), "--out", str(out), "--format", "sglang", "--num-experts", "8",
                             "--top-k", "2"])
    assert ok.exit_code == 0, ok.output
    assert "2 layers x 8 experts, top-2, 4 tokens in 1 sequences" in " ".join(ok.output.split())
    info = runner.invoke(app, ["log", "info", str(out)])
    assert info.exit_code == 0 and "selection (no logits)" in info.output

    fresh = tmp_path / "new"
    highest = int(_routes(4, 2, 2, 8, 16).max())
    _refused([src, "--out", fresh, "--format", "sglang", "--top-k", "2"], "pass --num-experts",
             f"largest id seen is {highest}")
    _refused([src, "--out", fresh, "--format", "sglang", "--top-k", "2", "--num-experts", "5"],
             "but --num-experts 5", "ids must be in [0, 5)")
    _refused([src, "--out", fresh, "--format", "sglang", "--num-experts", "8"], "pass --top-k")
    _refused([src, "--out", fresh, "--format", "sglang", "--num-experts", "8", "--top-k", "3"], "check --top-k")
    _refused([src, "--out", fresh, "--format", "sglang", "--num-experts", "8", "--top-k", "2", "--layout", "ltn"],
             "--layout applies to router-logit files (--format auto)")
    _refused([src, "--out", fresh, "--format", "sglang", "--num-experts", "8", "--top-k", "2", "--dtype",
              "float32"], "--dtype casts router logits")
    _refused([tmp_path / "x.npy", "--out", fresh, "--num-experts", "8"], "--num-experts applies to --format")
    _refused([src, "--out", out, "--format", "sglang", "--num-experts", "8", "--top-k", "2"], "--overwrite")
    assert not fresh.exists()

    bad = json.loads(src.read_text())
    bad["meta_info"]["routed_experts"] = bad["meta_info"]["routed_experts"][:-2] + "!!"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    _refused([tmp_path / "bad.json", "--out", fresh, "--format", "sglang", "--num-experts", "8", "--top-k", "2"],
             "not valid base64")

    # vLLM: mixed k across requests; --top-k against the dump's k
    np.savez(tmp_path / "mixed.npz", a=_routes(3, 2, 2, 8, 17), b=_routes(3, 2, 3, 8, 18))
    _refused([tmp_path / "mixed.npz", "--out", fresh, "--format", "vllm", "--num-experts", "8"],
             "3 experts per token, but earlier requests have 2")
    np.save(tmp_path / "k2.npy", _routes(3, 2, 2, 8, 19))
    _refused([tmp_path / "k2.npy", "--out", fresh, "--format", "vllm", "--num-experts", "8", "--top-k", "4"],
             "holds 2 experts per token but --top-k 4")
    np.save(tmp_path / "flat.npy", np.zeros((3, 2), np.int32))
    _refused([tmp_path / "flat.npy", "--out", fresh, "--format", "vllm", "--num-experts", "8"],
             "has shape (3, 2); expected 3-D")
    dup = _routes(3, 2, 2, 8, 20)
    dup[1, 1] = [4, 4]
    np.save(tmp_path / "dup.npy", dup)
    _refused([tmp_path / "dup.npy", "--out", fresh, "--format", "vllm", "--num-experts", "8"],
             "layer 'layer1' lists an expert twice")
    assert not fresh.exists()


def test_a_refused_import_keeps_the_old_log(tmp_path):
    src = _sglang_file(tmp_path)
    log = import_foreign(src, tmp_path / "log", format="sglang", num_experts=8, top_k=2)
    before = sorted(p.name for p in (tmp_path / "log").rglob("*"))
    with pytest.raises(ImportFailed, match="num_experts="):
        import_foreign(src, tmp_path / "log", format="sglang", num_experts=3, top_k=2, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "log").rglob("*")) == before
    assert RouterLog.open(tmp_path / "log").num_tokens == log.num_tokens
    again = import_foreign(_sglang_file(tmp_path, _routes(4, 2, 2, 8, 21), "r2.json"), tmp_path / "log",
                           format="sglang", num_experts=8, top_k=2, overwrite=True)
    assert again.read("layer0", 0, 4).selected.tolist() == _routes(4, 2, 2, 8, 21)[:, 0].tolist()


def test_registry_is_typed_entries():
    assert set(FORMATS) == {"sglang", "vllm", "megatron", "olmoe"}
    assert all(f.name == name and callable(f.read) for name, f in FORMATS.items())
    assert [name for name, f in FORMATS.items() if f.logits] == ["megatron"]


def test_pretty_printed_json_and_broken_lines(tmp_path):
    routes = _routes(4, 2, 2, 8, 22)
    (tmp_path / "pretty.json").write_text(json.dumps([_sglang_response(routes, [1, 2], [3, 4, 5])], indent=2))
    log = import_foreign(tmp_path / "pretty.json", tmp_path / "log", format="sglang", num_experts=8, top_k=2)
    _check(log, [routes], [[1, 2, 3, 4]])
    good = json.dumps(_sglang_response(routes, [1, 2], [3, 4, 5]))
    (tmp_path / "broken.jsonl").write_text(good + "\n" + good[:-5] + "\n")
    with pytest.raises(ImportFailed, match="broken.jsonl line 2: not JSON"):
        import_foreign(tmp_path / "broken.jsonl", tmp_path / "log2", format="sglang", num_experts=8, top_k=2)
    (tmp_path / "other.jsonl").write_text(json.dumps({"text": "no routing"}) + "\n")
    with pytest.raises(ImportFailed, match="no meta_info.routed_experts; .*--enable-return-routed-experts"):
        import_foreign(tmp_path / "other.jsonl", tmp_path / "log3", format="sglang", num_experts=8, top_k=2)
    assert not (tmp_path / "log2").exists() and not (tmp_path / "log3").exists()


def test_megatron_inconsistent_traces_are_refused(tmp_path):
    steps = [_routes(3, 2, 2, 8, 23), _routes(3, 2, 2, 8, 24)]
    _megatron_trace(tmp_path / "t", steps)
    trace = tmp_path / "t" / "router_trace_rank0.jsonl"
    lines = trace.read_text().splitlines()
    trace.write_text("\n".join(lines[:3] + lines[4:]) + "\n")  # step 1 loses its layer-3 record
    with pytest.raises(ImportFailed, match="step 1 has no record of layer3"):
        import_foreign(trace, tmp_path / "log", format="megatron", num_experts=8)
    rec = json.loads(lines[1])
    rec["top_indices"] = [[0, 1, 2]] * 3
    trace.write_text("\n".join([lines[0], json.dumps(rec), *lines[2:]]) + "\n")
    with pytest.raises(ImportFailed, match="different numbers of experts per token"):
        import_foreign(trace, tmp_path / "log", format="megatron", num_experts=8)
    _megatron_trace(tmp_path / "u", steps, rank=0)
    _megatron_trace(tmp_path / "u", steps, rank=1)
    with pytest.raises(ImportFailed, match="expected one router_trace_rank<N>.jsonl, found router_trace_rank0.jsonl, "
                                           "router_trace_rank1.jsonl"):
        import_foreign(tmp_path / "u", tmp_path / "log", format="megatron", num_experts=8)
    assert not (tmp_path / "log").exists()
