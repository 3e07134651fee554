"""capture(): dtypes, run() over batches, hidden states, layer choice, module_pattern, fallback, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM

from usmoe_lp.logs import LogError, LogExists, RouterLog
from usmoe_lp.logs.capture import CaptureFailed, RouterNotFound, capture, find_routers

H, N, K, V = 64, 8, 2, 1000


def mixtral(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=H, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, vocab_size=V, num_local_experts=N,
                        num_experts_per_tok=K, max_position_embeddings=512, pad_token_id=0)
    return MixtralForCausalLM(cfg).to(dtype).eval()


def batch(b=2, t=8, pad=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    ids[-1, :pad] = 0
    mask[-1, :pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


class ToyMoE(nn.Module):
    """A plain torch MoE block: a Linear router and N expert MLPs (no transformers)."""

    def __init__(self, d=16, n=4, experts_attr="experts"):
        super().__init__()
        self.router = nn.Linear(d, n)
        setattr(self, experts_attr, nn.ModuleList(nn.Linear(d, d) for _ in range(n)))
        self._experts_attr = experts_attr

    def forward(self, x):
        probs = self.router(x).softmax(-1)
        outs = torch.stack([e(x) for e in getattr(self, self._experts_attr)], -1)
        return (outs * probs.unsqueeze(-2)).sum(-1)


class ToyModel(nn.Module):
    def __init__(self, experts_attr="experts"):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(ToyMoE(experts_attr=experts_attr) for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def test_bf16_model_logs_bf16_logits(tmp_path):
    model = mixtral(torch.bfloat16)
    inputs = batch()
    with torch.no_grad():
        ref = model(**inputs, output_router_logits=True).router_logits
    with capture(model, tmp_path / "log", fsync=False), torch.no_grad():
        model(**inputs)
    log = RouterLog.open(tmp_path / "log")
    assert log.dtype == torch.bfloat16 and log.manifest.dtype == "bfloat16"
    keep = inputs["attention_mask"].reshape(-1).bool()
    for name, r in zip(log.layers, ref, strict=True):
        logits = log.read(name, 0, log.num_tokens).logits
        assert logits.dtype == torch.bfloat16
        assert torch.equal(logits, r[keep])


def test_run_streams_batches_with_running_sequence_ids_and_shards(tmp_path):
    model = mixtral()
    batches = [batch(seed=s) for s in range(3)]
    with capture(model, tmp_path / "log", shard_tokens=10, fsync=False) as cap:
        assert cap.run(batches) == 3 * (16 - 3)
    log = RouterLog.open(tmp_path / "log", verify="full")
    assert log.num_tokens == 39 and len(log.shards) == 4 and log.complete
    chunk = log.read("layer0", 0, 39)
    assert chunk.sequence_ids.tolist() == [0] * 8 + [1] * 5 + [2] * 8 + [3] * 5 + [4] * 8 + [5] * 5
    assert chunk.positions.tolist() == (list(range(8)) + list(range(5))) * 3
    assert log.manifest.capture["padding"].startswith("excluded")


def test_hidden_states_and_router_weights(tmp_path):
    model = mixtral()
    inputs = batch()
    with capture(model, tmp_path / "log", hidden=True, fsync=False), torch.no_grad():
        model(**inputs)
    log = RouterLog.open(tmp_path / "log")
    weights = log.router_weights()
    for i, name in enumerate(log.layers):
        chunk = log.read(name, 0, log.num_tokens, with_hidden=True)
        assert chunk.hidden.shape == (13, H)
        gate = model.model.layers[i].mlp.gate.weight
        assert torch.equal(weights[name], gate.detach())
        # the stored hidden states are the gate's input (a matmul over fewer rows may differ in the last bit)
        torch.testing.assert_close(chunk.logits, nn.functional.linear(chunk.hidden, gate.detach()),
                                   rtol=1e-6, atol=1e-6)


def test_router_weights_off_and_layer_subset(tmp_path):
    model = mixtral()
    with capture(model, tmp_path / "log", layers=["layer1"], router_weights=False, fsync=False) as cap:
        cap.run([batch()])
    log = RouterLog.open(tmp_path / "log")
    assert log.layers == ("layer1",)
    assert log.layer_info("layer1").module_path == "model.layers.1.mlp.gate"
    assert log.router_weights() is None
    with pytest.raises(RouterNotFound, match="not routers"):
        find_routers(model, layers=["layer7"])
    with pytest.raises(RouterNotFound, match="encoder-decoder"):
        find_routers(model, layers="decoder")


def test_set_batch_gives_mask_and_ids_for_inputs_embeds(tmp_path):
    model = mixtral()
    inputs = batch()
    embeds = model.model.embed_tokens(inputs["input_ids"]).detach()
    with capture(model, tmp_path / "log", fsync=False) as cap, torch.no_grad():
        model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])  # no ids: token ids -1
        cap.set_batch(inputs["input_ids"], inputs["attention_mask"])
        model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
    chunk = RouterLog.open(tmp_path / "log").read("layer0", 0, 26)
    keep = inputs["attention_mask"].reshape(-1).bool()
    assert chunk.token_ids[:13].tolist() == [-1] * 13
    assert torch.equal(chunk.token_ids[13:], inputs["input_ids"].reshape(-1)[keep])
    assert torch.equal(chunk.logits[:13], chunk.logits[13:])


def test_hooks_removed_and_log_incomplete_on_error(tmp_path):
    model = mixtral()
    with pytest.raises(ValueError, match="boom"), capture(model, tmp_path / "log", fsync=False) as cap:
        cap.run([batch()])
        raise ValueError("boom")
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert all(not m._forward_hooks for m in model.modules())
    log = RouterLog.open(tmp_path / "log")
    assert not log.complete and log.num_tokens == 13
    with pytest.raises(LogExists):
        capture(model, tmp_path / "log").__enter__()
    with capture(model, tmp_path / "log", overwrite=True, fsync=False) as cap:
        cap.run([batch()])
    assert RouterLog.open(tmp_path / "log").complete


def test_module_without_router_is_a_clear_error():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    with pytest.raises(RouterNotFound, match="module_pattern=") as info:
        capture(model, "unused")
    assert isinstance(info.value, LogError)
    assert "named_modules" in str(info.value)
    with pytest.raises(RouterNotFound, match="matches no module"):
        find_routers(model, module_pattern=r"gate")


def test_module_pattern_on_a_plain_torch_moe(tmp_path):
    model = ToyModel(experts_attr="ffns")  # no `experts` child: only module_pattern finds the routers
    with pytest.raises(RouterNotFound):
        find_routers(model)
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        plain = model(x)
    with capture(model, tmp_path / "log", module_pattern=r"blocks\.\d+\.router", fsync=False) as cap:
        assert [r.name for r in cap.routers] == ["layer0", "layer1"]
        assert all(r.source == "module_pattern" and r.num_experts == 4 for r in cap.routers)
        cap.set_batch(attention_mask=mask)
        with torch.no_grad():
            captured = model(x)
    assert torch.equal(plain, captured)
    log = RouterLog.open(tmp_path / "log")
    assert log.num_tokens == 8
    keep = mask.reshape(-1).bool()
    chunk = log.read("layer0", 0, 8)
    router = model.blocks[0].router
    assert torch.equal(chunk.logits, router(x).detach().reshape(-1, 4)[keep])
    assert chunk.positions.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert chunk.token_ids.tolist() == [-1] * 8
    assert torch.equal(log.router_weights()["layer0"], router.weight.detach())


def test_structural_fallback_finds_linear_gate_next_to_experts(tmp_path):
    model = ToyModel()
    routers = find_routers(model)
    assert [(r.path, r.source, r.num_experts) for r in routers] == [
        ("blocks.0.router", "structural", 4), ("blocks.1.router", "structural", 4)]
    x = torch.randn(7, 16)  # 2-D input: one sequence of 7 tokens
    with capture(model, tmp_path / "log", fsync=False), torch.no_grad():
        model(x)
    chunk = RouterLog.open(tmp_path / "log").read("layer1", 0, 7)
    assert chunk.sequence_ids.tolist() == [0] * 7 and chunk.positions.tolist() == list(range(7))


def test_batch_that_does_not_match_router_rows_is_an_error(tmp_path):
    model = ToyModel()
    with capture(model, tmp_path / "log", fsync=False) as cap, pytest.raises(CaptureFailed, match="rows"):
        cap.set_batch(attention_mask=torch.ones(3, 3))
        with torch.no_grad():
            model(torch.randn(2, 5, 16))
