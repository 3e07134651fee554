"""selected.<layer> / weights.<layer> for GPT-OSS, Granite-MoE, PhiMoE, Jamba, DBRX and Switch Transformers.

Each is checked exactly against the model's own computation: what its MoE block handed to its experts module
(indices and weights, read by a forward pre-hook on that module), with padding rows dropped. Switch Transformers
is capacity-limited: with a tiny expert capacity, tokens dropped by the capacity have no expert in the log, and the
logged mask is checked against the rows each expert module actually processed.
"""

from __future__ import annotations

import pytest
import torch
from test_capture_families import E, K, padded_batch, tiny_config, tiny_model
from transformers import AutoModelForSeq2SeqLM

from usmoe_lp.logs import RouterLog
from usmoe_lp.logs.capture import capture, find_routers

TOPK_FAMILIES = ["gpt_oss", "granitemoe", "phimoe", "jamba", "dbrx"]


def _experts_of(model, routers):
    return [model.get_submodule(r.path.rsplit(".", 1)[0]).experts for r in routers]


def _hook_inputs(modules):
    seen: dict[int, list[tuple]] = {}
    handles = [m.register_forward_pre_hook(
        lambda mod, args, i=i: seen.setdefault(i, []).append(tuple(a.clone() for a in args)))
        for i, m in enumerate(modules)]
    return seen, handles


@pytest.mark.parametrize("mt", TOPK_FAMILIES)
def test_topk_selections_are_what_the_experts_received(mt, tmp_path):
    model = tiny_model(mt)
    batch = padded_batch(mt)
    with torch.no_grad():
        plain = model(**batch).logits
    cap_routers = find_routers(model)
    seen, handles = _hook_inputs(_experts_of(model, cap_routers))
    try:
        with capture(model, tmp_path / "log", fsync=False) as cap, torch.no_grad():
            captured = model(**batch).logits
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(plain, captured)
    want_source = "experts" if mt == "dbrx" else "router"
    assert all(r.selection is not None and r.selection_source == want_source for r in cap.routers)
    log = RouterLog.open(tmp_path / "log", verify="full")
    assert log.manifest.capture["selections"] == list(log.layers)
    keep = batch["attention_mask"].reshape(-1).bool()
    for i, name in enumerate(log.layers):
        [(_, indices, weights)] = seen[i]  # experts(hidden_states, top_k_index, top_k_weights), once per forward
        chunk = log.read(name, 0, log.num_tokens)
        assert chunk.selected.shape == chunk.weights.shape == (log.num_tokens, K)
        assert chunk.selected.dtype == torch.int64
        assert torch.equal(chunk.selected, indices.reshape(-1, K)[keep].long()), name
        assert torch.equal(chunk.weights, weights.reshape(-1, K)[keep]), name
        if mt != "phimoe":  # top-k of the logits (softmax is monotone); PhiMoE's sparsemixer masks by a threshold
            assert torch.equal(chunk.selected.sort(-1).values, chunk.logits.topk(K, -1).indices.sort(-1).values)


def _switch(capacity: int):
    torch.manual_seed(0)
    config = tiny_config("switch_transformers")
    config.expert_capacity = capacity
    return AutoModelForSeq2SeqLM.from_config(config).eval()


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
def test_switch_dispatch_with_capacity_drops(stack, tmp_path):
    model = _switch(capacity=1)  # at most one token per expert per sequence: most tokens are dropped
    batch = padded_batch("switch_transformers")
    dec_mask = torch.ones_like(batch["decoder_input_ids"])
    dec_mask[0, :2] = 0
    batch["decoder_attention_mask"] = dec_mask
    routers = find_routers(model, layers=stack)
    blocks = _experts_of(model, routers)
    seen, handles = _hook_inputs(blocks)
    processed: dict[tuple[int, int], list[torch.Tensor]] = {}
    for i, block in enumerate(blocks):
        for e in range(E):
            handles.append(block[f"expert_{e}"].register_forward_hook(
                lambda m, args, out, key=(i, e): processed.setdefault(key, []).append(args[0].clone())))
    try:
        with capture(model, tmp_path / "log", layers=stack, fsync=False) as cap, torch.no_grad():
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    assert all(r.selection_source == "dispatch" for r in cap.routers)
    log = RouterLog.open(tmp_path / "log", verify="full")
    assert log.manifest.capture["selections"] == list(log.layers)
    mask = batch["attention_mask"] if stack == "encoder" else dec_mask
    keep = mask.reshape(-1).bool()
    dropped = 0
    for i, name in enumerate(log.layers):
        [(hidden, dispatch, gate)] = seen[i]  # experts(hidden (n, d), one-hot (n, 1, N), weight (n, 1))
        full = dispatch.reshape(-1, E).bool()
        chunk = log.read(name, 0, log.num_tokens)
        assert chunk.selected.dtype == torch.bool and chunk.selected.shape == (log.num_tokens, E)
        assert torch.equal(chunk.selected, full[keep])
        assert torch.equal(chunk.weights, torch.where(full, gate.reshape(-1, 1), 0.0)[keep])
        assert (chunk.selected.sum(-1) <= 1).all()
        # a kept token's one expert is its router's argmax; a dropped token has no expert and zero weight
        has = chunk.selected.any(-1)
        assert torch.equal(chunk.selected[has].long().argmax(-1), chunk.logits[has].argmax(-1))
        assert (chunk.weights[~has] == 0).all()
        dropped += int((~has).sum())
        # the rows each expert actually processed are the tokens the mask dispatches to it (padding included)
        for e in range(E):
            rows = processed.get((i, e), [])
            got = torch.cat(rows) if rows else hidden[:0]
            assert torch.equal(got, hidden[full[:, e]]), (name, e)
    assert dropped > 0


def test_nllb_moe_selections_stay_out(tmp_path):
    model = tiny_model("nllb-moe")
    with capture(model, tmp_path / "log", fsync=False) as cap, torch.no_grad():
        model(**padded_batch("nllb-moe"))
    assert all(r.selection is None for r in cap.routers)
    log = RouterLog.open(tmp_path / "log")
    assert log.manifest.capture["selections"] == [] and not log.has(log.layers[0], "selected")


NEW_ROUTER_FAMILIES = ["qwen3_next", "deepseek_v32", "granitemoeshared", "granitemoe_swa", "minimax_m2",
                       "hunyuan_v1_moe", "glm4_moe", "dots1", "ernie4_5_moe", "flex_olmo", "lfm2_moe", "cohere2_moe",
                       "exaone_moe", "hy_v3", "aria_text", "mellum", "longcat_flash"]


@pytest.mark.parametrize("mt", NEW_ROUTER_FAMILIES)
def test_router_selections_are_what_the_experts_received(mt, tmp_path):
    """The further families whose router returns (logits, weights, indices): the logged selection is what the MoE
    block handed its experts module, experts(hidden_states, top_k_index, top_k_weights)."""
    model = tiny_model(mt)
    batch = padded_batch(mt)
    routers = find_routers(model)
    seen, handles = _hook_inputs(_experts_of(model, routers))
    try:
        with capture(model, tmp_path / "log", fsync=False) as cap, torch.no_grad():
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    assert all(r.selection == (1, 2) and r.selection_source == "router" for r in cap.routers)
    log = RouterLog.open(tmp_path / "log", verify="full")
    keep = batch["attention_mask"].reshape(-1).bool()
    for i, name in enumerate(log.layers):
        [(_, indices, weights)] = seen[i]
        chunk = log.read(name, 0, log.num_tokens)
        assert torch.equal(chunk.selected, indices.reshape(-1, K)[keep].long()), name
        assert torch.equal(chunk.weights, weights.reshape(-1, K)[keep]), name


def test_llama4_dense_and_jetmoe_sorted_selections(tmp_path):
    """Llama-4 (dense (n, N) weights) and JetMoE (pairs sorted by expert): both take the top-k of the logits; the
    logged weights are the sigmoid of the selected logits (Llama-4) and their softmax (JetMoE)."""
    for mt, k in (("llama4_text", 1), ("jetmoe", K)):
        model = tiny_model(mt)
        batch = padded_batch(mt)
        with capture(model, tmp_path / mt, fsync=False) as cap, torch.no_grad():
            model(**batch)
        assert {r.selection_source for r in cap.routers} == {"dense" if mt == "llama4_text" else "sorted"}
        log = RouterLog.open(tmp_path / mt, verify="full")
        assert log.manifest.capture["selections"] == sorted(log.layers)
        for name in log.layers:
            chunk = log.read(name, 0, log.num_tokens)
            top = chunk.logits.topk(k, dim=-1)
            if mt == "llama4_text":
                assert chunk.selected.dtype == torch.bool and chunk.selected.shape == chunk.logits.shape
                want = torch.zeros_like(chunk.selected).scatter_(1, top.indices, True)
                assert torch.equal(chunk.selected, want)
                torch.testing.assert_close(chunk.weights, torch.where(want, chunk.logits.sigmoid(), 0.0))
            else:
                assert chunk.selected.shape == (log.num_tokens, k)
                assert torch.equal(chunk.selected.sort(-1).values, top.indices.sort(-1).values)
                order = chunk.selected.argsort(-1)
                torch.testing.assert_close(chunk.weights.gather(1, order),
                                           top.values.softmax(-1).gather(1, top.indices.argsort(-1)))
