"""capture() on tiny random-weight models of every supported transformers MoE family.

For each family: the logged logits equal, bitwise and token by token, what the model itself
returns with ``output_router_logits=True`` once padding rows are dropped; capturing leaves the
model's outputs bitwise unchanged; the manifest has the family's router metadata.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from usmoe_lp.logs import RouterLog
from usmoe_lp.logs.capture import capture, find_routers

H, L, E, K, V = 64, 2, 8, 2, 1000
B, T, PAD = 2, 10, 3  # row 1 has PAD left-padding tokens

GENERIC = dict(
    hidden_size=H, d_model=H, intermediate_size=128, moe_intermediate_size=64, expert_intermediate_size=64,
    shared_expert_intermediate_size=64, d_ff=128, encoder_ffn_dim=128, decoder_ffn_dim=128,
    num_hidden_layers=L, num_layers=L, num_decoder_layers=L, encoder_layers=L, decoder_layers=L,
    n_layers=L, num_attention_heads=4, num_key_value_heads=2, num_heads=4, n_heads=4,
    encoder_attention_heads=4, decoder_attention_heads=4, head_dim=16, d_kv=16, vocab_size=V,
    num_local_experts=E, num_experts=E, n_routed_experts=E, moe_num_experts=E, num_experts_per_tok=K,
    moe_k=K, moe_topk=K, top_k=K, n_shared_experts=1, max_position_embeddings=512,
    kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=0,
    encoder_sparse_step=1, decoder_sparse_step=1, num_experts_per_token=K,
)
# per-family overrides that make each tiny config build (after the generic ones above)
FAMILIES = {
    "mixtral": {},
    "olmoe": {},
    "qwen2_moe": {"decoder_sparse_step": 1, "mlp_only_layers": []},
    "qwen3_moe": {"decoder_sparse_step": 1, "mlp_only_layers": []},
    "deepseek_v2": {"first_k_dense_replace": 0, "n_group": 1, "topk_group": 1, "num_key_value_heads": 4},
    "deepseek_v3": {"first_k_dense_replace": 0, "n_group": 2, "topk_group": 1, "num_key_value_heads": 4},
    "gpt_oss": {"layer_types": ["sliding_attention", "full_attention"]},
    "granitemoe": {},
    "phimoe": {},
    "jamba": {"expert_layer_period": 1, "expert_layer_offset": 0, "attn_layer_period": 2, "attn_layer_offset": 1},
    "dbrx": {},
    "switch_transformers": {},
    "nllb-moe": {},
}
# further MoE families of transformers 5.x, auto-detected the same way (checked for equality, not metadata)
OTHER_FAMILIES = {
    "qwen3_next": {"decoder_sparse_step": 1, "mlp_only_layers": [], "layer_types": ["linear_attention",
                                                                                    "full_attention"]},
    "deepseek_v32": {"first_k_dense_replace": 0, "n_group": 2, "topk_group": 1, "num_key_value_heads": 4,
                     "mlp_layer_types": ["sparse", "sparse"]},
    "granitemoeshared": {}, "granitemoe_swa": {}, "jetmoe": {},
    "llama4_text": {"interleave_moe_layer_step": 1, "num_experts_per_tok": 1},
    "minimax_m2": {}, "hunyuan_v1_moe": {}, "glm4_moe": {"first_k_dense_replace": 0, "n_group": 1, "topk_group": 1},
    "dots1": {"first_k_dense_replace": 0, "n_group": 1, "topk_group": 1},
    "ernie4_5_moe": {"moe_layer_start_index": 0, "moe_layer_interval": 1}, "flex_olmo": {},
    "lfm2_moe": {"num_dense_layers": 0, "layer_types": ["conv", "full_attention"]}, "cohere2_moe": {},
    "exaone_moe": {}, "hy_v3": {}, "aria_text": {}, "mellum": {},
    "longcat_flash": {"zero_expert_num": 4, "num_key_value_heads": 4},  # N + 4 zero-computation expert columns
}
SEQ2SEQ = {"switch_transformers", "nllb-moe"}
EXPECTED_SCORE = {"deepseek_v3": "sigmoid", "gpt_oss": "softmax_topk", "granitemoe": "softmax_topk",
                  "phimoe": "softmax_topk"}  # PhiMoE: top-2 of the logits in eval, its own sparsemixer weights
EXPECTED_TOP_K = {"switch_transformers": 1}


def tiny_config(mt: str):
    if mt == "dbrx":  # nested configs; default attn_config lacks rope_theta and clip_qkv=None crashes
        return AutoConfig.for_model(
            mt, d_model=H, n_heads=4, n_layers=L, vocab_size=V, max_seq_len=512,
            attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
            ffn_config={"ffn_hidden_size": 128, "moe_num_experts": E, "moe_top_k": K},
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    d = AutoConfig.for_model(mt).to_dict()
    kw = {k: v for k, v in GENERIC.items() if k in d}
    if "qk_rope_head_dim" in d and "head_dim" in kw:
        kw["head_dim"] = kw["qk_rope_head_dim"]  # MLA models tie head_dim to the rope dim
    kw.update({**FAMILIES, **OTHER_FAMILIES}[mt])
    for k, v in d.items():  # per-layer lists of the default length: let the config regenerate them
        if k not in kw and isinstance(v, list) and len(v) == d.get("num_hidden_layers", -1) and len(v) != L:
            kw[k] = None
    return AutoConfig.for_model(mt, **kw)


def tiny_model(mt: str, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    cls = AutoModelForSeq2SeqLM if mt in SEQ2SEQ else AutoModelForCausalLM
    return cls.from_config(tiny_config(mt)).to(dtype).eval()


def padded_batch(mt: str, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    ids[1, :PAD] = 0
    mask[1, :PAD] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if mt in SEQ2SEQ:
        batch["decoder_input_ids"] = torch.randint(3, V, (B, 6), generator=g)
    return batch


def reference_logits(model, batch, mt: str, stack: str = "encoder") -> list[torch.Tensor]:
    """What the model returns with output_router_logits=True, per MoE layer as (B*T, N), plus its mask."""
    with torch.no_grad():
        out = model(**batch, output_router_logits=True)
    if mt in SEQ2SEQ:
        per_layer = getattr(out, f"{stack}_router_logits")
    else:
        per_layer = out.router_logits
    layers = []
    for x in per_layer:
        if isinstance(x, tuple):  # (logits, expert_index) pairs in some versions
            x = x[0]
        if x is not None:
            layers.append(x.reshape(-1, x.shape[-1]))
    return layers


@pytest.mark.parametrize("mt", list(FAMILIES))
def test_logged_logits_equal_model_router_logits(mt, tmp_path):
    model = tiny_model(mt)
    if mt == "deepseek_v3":  # a non-trivial selection bias (random init leaves it zero)
        for layer in model.model.layers:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(E))
    batch = padded_batch(mt)
    with torch.no_grad():
        plain = model(**batch)
    out = tmp_path / "log"
    with capture(model, out, fsync=False) as cap, torch.no_grad():
        captured = model(**batch)
    assert not model._forward_hooks and not model._forward_pre_hooks  # removed on exit
    # outputs bitwise unchanged by the hooks
    assert torch.equal(plain.logits, captured.logits)

    expected = reference_logits(model, batch, mt)
    log = RouterLog.open(out, verify="full")
    assert log.complete
    assert len(log.layers) == len(expected) == len(cap.routers) >= L
    keep = batch["attention_mask"].reshape(-1).bool()
    n_real = int(keep.sum())
    assert log.num_tokens == n_real == B * T - PAD
    for name, ref in zip(log.layers, expected, strict=True):
        chunk = log.read(name, 0, n_real)
        assert chunk.logits.dtype == torch.float32
        assert torch.equal(chunk.logits, ref[keep]), name
        info = log.layer_info(name)
        assert info.num_experts == E
        assert info.top_k == EXPECTED_TOP_K.get(mt, K)
        assert info.score_function == EXPECTED_SCORE.get(mt, "softmax")
    chunk = log.read(log.layers[0], 0, n_real)
    assert torch.equal(chunk.token_ids, batch["input_ids"].reshape(-1)[keep])
    assert chunk.sequence_ids.tolist() == [0] * T + [1] * (T - PAD)
    assert chunk.positions.tolist() == list(range(T)) + list(range(T - PAD))
    manifest = log.manifest
    assert manifest.model.family == model.config.model_type
    if mt == "deepseek_v3":
        bias = [float(b) for b in model.model.layers[0].mlp.gate.e_score_correction_bias]
        assert log.layer_info(log.layers[0]).selection_bias == tuple(bias)
        assert any(b != 0 for b in bias)
    else:
        assert all(log.layer_info(n).selection_bias is None for n in log.layers)
    # router weights: (N, d) per layer, the gate's own weight
    weights = log.router_weights()
    assert set(weights) == set(log.layers)
    for r in cap.routers:
        assert weights[r.name].shape == (E, H)


@pytest.mark.parametrize("mt", sorted(SEQ2SEQ))
def test_decoder_routers_of_encoder_decoder_models(mt, tmp_path):
    model = tiny_model(mt)
    batch = padded_batch(mt)
    dec_mask = torch.ones_like(batch["decoder_input_ids"])
    dec_mask[0, :2] = 0
    batch["decoder_attention_mask"] = dec_mask
    with capture(model, tmp_path / "dec", layers="decoder", fsync=False) as cap, torch.no_grad():
        model(**batch)
    assert all(r.stack == "decoder" and r.name.startswith("decoder.") for r in cap.routers)
    expected = reference_logits(model, batch, mt, stack="decoder")
    log = RouterLog.open(tmp_path / "dec")
    keep = dec_mask.reshape(-1).bool()
    assert log.num_tokens == int(keep.sum())
    for name, ref in zip(log.layers, expected, strict=True):
        chunk = log.read(name, 0, log.num_tokens)
        assert torch.equal(chunk.logits, ref[keep])
        assert torch.equal(chunk.token_ids, batch["decoder_input_ids"].reshape(-1)[keep])


def test_every_family_is_auto_detected():
    for mt in FAMILIES:
        model = tiny_model(mt)
        routers = find_routers(model)
        assert len(routers) == L, mt
        assert all(r.source == "transformers" and r.num_experts == E for r in routers), mt
        if mt in SEQ2SEQ:
            assert [r.name for r in routers] == ["encoder.layer0", "encoder.layer1"]
        else:
            assert [r.name for r in routers] == ["layer0", "layer1"]


@pytest.mark.parametrize("mt", list(OTHER_FAMILIES))
def test_other_families_log_what_the_model_returns(mt, tmp_path):
    model = tiny_model(mt)
    batch = padded_batch(mt)
    with torch.no_grad():
        plain = model(**batch).logits
    with capture(model, tmp_path / "log", fsync=False), torch.no_grad():
        captured = model(**batch).logits
    assert torch.equal(plain, captured)
    expected = reference_logits(model, batch, mt)
    keep = batch["attention_mask"].reshape(-1).bool()
    log = RouterLog.open(tmp_path / "log")
    logged = [log.read(name, 0, log.num_tokens).logits for name in log.layers]
    assert log.num_tokens == B * T - PAD and logged
    # JetMoE returns its attention routers' logits twice; the log holds each router once
    assert all(any(torch.equal(x, r[keep]) for r in expected) for x in logged)
    assert all(any(torch.equal(x, r[keep]) for x in logged) for r in expected)
