"""usmoe_lp.live.route on CUDA: native is the unpatched model bitwise (fp32 and bf16), usmoe on CUDA equals usmoe on the
CPU, replay reproduces a CUDA capture bitwise, and generate() routes its decode steps by the router's decode rule."""

from __future__ import annotations

import math

import pytest
import torch
from test_capture_families import PAD, B, K, T, V, padded_batch, tiny_model

from usmoe_lp.live import route

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda"
NEW = 4
# fp32: no TF32 for matmuls by default
TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}


def _on(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_native_on_cuda_is_the_unpatched_model_bitwise(dtype):
    model = tiny_model("mixtral", dtype).to(DEVICE)
    batch = _on(padded_batch("mixtral"), DEVICE)
    with torch.no_grad():
        plain = model(**batch).logits
        with route(model, "native") as r:
            native = model(**batch).logits
    assert torch.equal(plain, native)
    for s in r.stats.layers:
        assert s.tokens == B * T - PAD and s.pairs == K * (B * T - PAD)
        assert s.rows_computed == K * B * T and s.native_mismatches is not None
        if dtype == torch.float32:
            assert s.native_mismatches == 0


@pytest.mark.parametrize("scope,weights", [("sequence", "model"), ("batch", "reference")])
def test_usmoe_on_cuda_equals_usmoe_on_cpu(scope, weights):
    batch = padded_batch("mixtral")
    outs, stats = [], []
    for device in ("cpu", DEVICE):
        model = tiny_model("mixtral").to(device)
        with torch.no_grad(), route(model, "usmoe", kbar=1.5, alpha=0.3, scope=scope, weights=weights) as r:
            outs.append(model(**_on(batch, device)).logits.cpu())
        stats.append(r.stats)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(outs[1][real], outs[0][real], **TOLERANCE)
    for a, b in zip(stats[0].layers, stats[1].layers, strict=True):
        assert (a.tokens, a.pairs, a.rows_computed) == (b.tokens, b.pairs, b.rows_computed)
        assert a.histogram.tolist() == b.histogram.tolist()


def test_usmoe_in_bf16_on_cuda_spends_its_budget():
    model = tiny_model("mixtral", torch.bfloat16).to(DEVICE)
    batch = _on(padded_batch("mixtral"), DEVICE)
    with torch.no_grad(), route(model, "usmoe", kbar=1.5, weights="score") as r:
        out = model(**batch).logits
    assert bool(torch.isfinite(out[batch["attention_mask"].bool()]).all())
    for s in r.stats.layers:
        assert s.pairs == _round_half_up(1.5 * T) + _round_half_up(1.5 * (T - PAD))


def test_replay_of_a_cuda_capture_is_bitwise(tmp_path):
    from usmoe_lp.logs.capture import capture

    model = tiny_model("mixtral").to(DEVICE)
    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(3, V, (B, T), generator=g).to(DEVICE),
                "attention_mask": torch.ones(B, T, dtype=torch.long, device=DEVICE)} for _ in range(2)]
    with torch.no_grad(), capture(model, tmp_path / "log", fsync=False):
        plain = [model(**b).logits for b in batches]
    with torch.no_grad(), route(model, "replay", log=tmp_path / "log") as r:
        replayed = [model(**b).logits for b in batches]
    assert all(torch.equal(a, b) for a, b in zip(plain, replayed, strict=True))
    assert r.stats.tokens == 2 * B * T


@pytest.mark.parametrize("router,params", [("usmoe", {"kbar": 2.6}), ("causal_topc", {"kbar": 1.5})])
def test_generate_on_cuda_routes_like_the_cpu(router, params):
    batch = padded_batch("mixtral")
    tokens, stats = [], []
    for device in ("cpu", DEVICE):
        model = tiny_model("mixtral").to(device)
        with torch.no_grad(), route(model, router, **params) as r:
            out = model.generate(**_on(batch, device), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                 pad_token_id=0)
        tokens.append(out.cpu())
        stats.append(r.stats)
    assert tokens[1].shape == (B, T + NEW)
    assert torch.equal(tokens[1], tokens[0])
    for a, b in zip(stats[0].layers, stats[1].layers, strict=True):
        assert b.decode_tokens == B * (NEW - 1) and b.tokens == B * (T + NEW - 1) - PAD
        assert (a.pairs, a.histogram.tolist()) == (b.pairs, b.histogram.tolist())
    if router == "usmoe":  # decode steps: round_half_up(2.6) = 3 experts each
        for s in stats[1].layers:
            assert s.pairs == _round_half_up(2.6 * T) + _round_half_up(2.6 * (T - PAD)) + 3 * B * (NEW - 1)
