"""capture() inside model.generate() with a KV cache (greedy, batch of 2, left padding).

Decode steps continue their prompt's sequence (same sequence id, positions after the prompt's real
tokens); the logged logits of prompt + generated tokens equal one full forward over the final
sequences with the same attention mask, matched token by token via (sequence id, position).
"""

from __future__ import annotations

import pytest
import torch
from test_capture_families import PAD, B, K, T, padded_batch, reference_logits, tiny_model

from usmoe_lp.logs import RouterLog
from usmoe_lp.logs.capture import capture

GENERATE_FAMILIES = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v3"]
NEW = 4


def _generate(model, batch):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)


def _logged(log):
    """layer -> {(sequence id, position): logits row}, plus {(sequence id, position): token id}."""
    rows, tokens = {}, {}
    for name in log.layers:
        chunk = log.read(name, 0, log.num_tokens)
        keys = list(zip(chunk.sequence_ids.tolist(), chunk.positions.tolist(), strict=True))
        assert len(set(keys)) == len(keys), "each (sequence, position) logged once"
        rows[name] = dict(zip(keys, chunk.logits, strict=True))
        tokens = dict(zip(keys, chunk.token_ids.tolist(), strict=True))
    return rows, tokens


@pytest.mark.parametrize("mt", GENERATE_FAMILIES)
def test_generate_logs_prompt_and_decode_steps_as_one_sequence(mt, tmp_path):
    model = tiny_model(mt)
    if mt == "deepseek_v3":
        for layer in model.model.layers:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(layer.mlp.gate.e_score_correction_bias.shape))
    batch = padded_batch(mt)
    plain = _generate(model, batch)
    with capture(model, tmp_path / "log", fsync=False) as cap:
        out = _generate(model, batch)
    assert torch.equal(out, plain)  # capturing does not change generation
    assert out.shape == (B, T + NEW)
    assert cap.sequences == B

    # one full forward over the final sequences, with the same attention mask
    full_mask = torch.cat([batch["attention_mask"], torch.ones(B, NEW, dtype=torch.long)], dim=1)
    expected = reference_logits(model, {"input_ids": out, "attention_mask": full_mask}, mt)
    keep = full_mask.bool()
    positions = torch.cumsum(full_mask, 1) - 1

    log = RouterLog.open(tmp_path / "log", verify="full")
    assert log.complete and log.validate().ok
    rows, tokens = _logged(log)
    # every real token but the last generated one (generate() returns it without a forward over it)
    want = {(b, int(positions[b, t])): (b, t) for b in range(B) for t in range(T + NEW - 1) if keep[b, t]}
    assert log.num_tokens == B * (T + NEW - 1) - PAD
    assert set(tokens) == set(want)
    for key, (b, t) in want.items():
        assert tokens[key] == int(out[b, t]), key  # prompt and generated token ids
    for name, ref in zip(log.layers, expected, strict=True):
        ref = ref.reshape(B, T + NEW, -1)
        for key, (b, t) in want.items():
            torch.testing.assert_close(rows[name][key], ref[b, t], atol=1e-5, rtol=0, msg=f"{name} {key}")
    # generated tokens continue their prompt's sequence: row 1 (PAD left-padding tokens) ends at T - PAD + NEW - 2
    assert max(p for s, p in tokens if s == 1) == T - PAD + NEW - 2
    assert max(p for s, p in tokens if s == 0) == T + NEW - 2


def test_two_generate_calls_get_new_sequence_ids(tmp_path):
    model = tiny_model("mixtral")
    with capture(model, tmp_path / "log", fsync=False) as cap:
        _generate(model, padded_batch("mixtral", seed=1))
        _generate(model, padded_batch("mixtral", seed=2))
        with torch.no_grad():
            model(**padded_batch("mixtral", seed=3))  # a plain forward after generate: new sequences too
    assert cap.sequences == 3 * B
    log = RouterLog.open(tmp_path / "log")
    chunk = log.read(log.layers[0], 0, log.num_tokens)
    per_seq = torch.bincount(chunk.sequence_ids).tolist()
    assert per_seq == [T + NEW - 1, T - PAD + NEW - 1] * 2 + [T, T - PAD]
    for s in range(3 * B):
        pos = chunk.positions[chunk.sequence_ids == s]
        assert pos.tolist() == list(range(len(pos)))


@pytest.mark.parametrize("mt", ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"])
def test_selected_and_weights_are_what_the_experts_received(mt, tmp_path):
    """selected.<layer> / weights.<layer> equal the (top_k_index, top_k_weights) each MoE block passed to its
    experts; for DeepSeek-V3 with a random non-zero correction bias, which changes the selection."""
    model = tiny_model(mt)
    if mt == "deepseek_v3":
        for layer in model.model.layers:
            bias = layer.mlp.gate.e_score_correction_bias
            bias.copy_(torch.randn(bias.shape))
    used: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    handles = [layer.mlp.experts.register_forward_hook(
        lambda m, args, out, i=i: used.setdefault(i, []).append((args[1].clone(), args[2].clone())))
        for i, layer in enumerate(model.model.layers)]
    batch = padded_batch(mt)
    try:
        with capture(model, tmp_path / "log", fsync=False) as cap:
            _generate(model, batch)
    finally:
        for h in handles:
            h.remove()
    assert all(r.selection == (1, 2) for r in cap.routers)
    log = RouterLog.open(tmp_path / "log", verify="full")
    assert log.manifest.capture["selections"] == list(log.layers)
    mask = torch.cat([batch["attention_mask"], torch.ones(B, NEW - 1, dtype=torch.long)], dim=1)
    for i, name in enumerate(log.layers):
        assert log.has(name, "selected") and log.has(name, "weights")
        # the forwards of generate(): the prompt, then one column per decode step; padding rows dropped
        steps = used[i]
        idx = torch.cat([x.reshape(B, -1, K) for x, _ in steps], dim=1)
        w = torch.cat([y.reshape(B, -1, K) for _, y in steps], dim=1)
        keep = mask.bool()
        # log order: the prompt's rows (row-major), then each decode step's rows
        order = [(b, t) for b in range(B) for t in range(T) if keep[b, t]]
        order += [(b, T + s) for s in range(NEW - 1) for b in range(B)]
        chunk = log.read(name, 0, log.num_tokens)
        assert chunk.selected.shape == chunk.weights.shape == (log.num_tokens, K)
        assert torch.equal(chunk.selected, torch.stack([idx[b, t] for b, t in order]).long())
        assert torch.equal(chunk.weights, torch.stack([w[b, t] for b, t in order]))
        if mt == "deepseek_v3":  # sigmoid + bias, group-limited (2 groups, best 1): the bias changes the choice
            bias = model.model.layers[i].mlp.gate.e_score_correction_bias
            chosen = chunk.selected.sort(-1).values
            assert torch.equal(chosen, _v3_select(chunk.logits, bias))
            assert not torch.equal(chosen, _v3_select(chunk.logits, torch.zeros_like(bias)))


def _v3_select(logits, bias, n_group=2, topk_group=1):
    scores = logits.sigmoid() + bias
    groups = scores.view(len(scores), n_group, -1)
    best = groups.topk(2, dim=-1).values.sum(-1).topk(topk_group, dim=-1).indices
    allowed = torch.zeros_like(groups[..., 0], dtype=torch.bool).scatter_(1, best, True)
    masked = scores.masked_fill(~allowed.repeat_interleave(groups.shape[-1], dim=1), float("-inf"))
    return masked.topk(K, dim=-1).indices.sort(-1).values


def test_selections_off(tmp_path):
    model = tiny_model("mixtral")
    with capture(model, tmp_path / "log", fsync=False, selections=False), torch.no_grad():
        model(**padded_batch("mixtral"))
    log = RouterLog.open(tmp_path / "log")
    assert not log.has(log.layers[0], "selected") and log.manifest.capture["selections"] == []
