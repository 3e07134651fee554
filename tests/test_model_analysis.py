"""analyze_model(): capture + analyze in one call, on the embedded tiny model and a random-weight Mixtral.

Oracles: the token counts are the texts' UTF-8 byte counts (the byte-level tokenizer), cut by hand at max_length;
the expert loads are recounted from the top-k of each text's router logits, each text run alone without padding
through ``output_router_logits=True`` (so neither the batching nor the capture is trusted).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM

from usmoe_lp.diagnostics import AnalyzeConfig
from usmoe_lp.errors import InvalidParameter
from usmoe_lp.logs import LogExists, RouterLog
from usmoe_lp.logs.capture import RouterNotFound
from usmoe_lp.model_analysis import analyze_model
from usmoe_lp.tiny import load_tiny
from usmoe_lp.tiny.tokenizer import byte_level_tokenizer

TEXTS = ["def f(x):\n    return 2 * x\n", "import os", "héllo wörld, a longer line of text than the others", "z"]
FAST = AnalyzeConfig(routers=("tc",), leakage=False, lp_sample=0)



pytestmark = pytest.mark.usefixtures("one_torch_thread_module")   # small forwards on one torch thread

@pytest.fixture(scope="module")
def tiny():
    return load_tiny()


def mixtral(vocab=300):
    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, vocab_size=vocab, num_local_experts=4,
                        num_experts_per_tok=2, max_position_embeddings=256, pad_token_id=256)
    return MixtralForCausalLM(cfg).eval()


def expected_counts(model, texts, max_length, k):
    """Per layer, tokens routed to each expert by the model's own top-k, each text run alone (no padding)."""
    counts = None
    for text in texts:
        ids = torch.tensor([list(text.encode())[:max_length]])
        with torch.no_grad():
            logits = model(input_ids=ids, output_router_logits=True).router_logits
        per_layer = [np.bincount(lg.float().topk(k, dim=-1).indices.reshape(-1).numpy(), minlength=lg.shape[-1])
                     for lg in logits]
        counts = per_layer if counts is None else [a + b for a, b in zip(counts, per_layer, strict=True)]
    return counts


@pytest.mark.parametrize("batch_size", [1, 3])
def test_tiny_model_counts_match_unpadded_forwards(tiny, batch_size):
    model, tok = tiny
    res = analyze_model(model, tok, TEXTS, config=FAST, max_length=20, batch_size=batch_size)
    assert res.layer_names == ("layer0", "layer1", "layer2", "layer3")
    want_tokens = sum(min(len(t.encode()), 20) for t in TEXTS)  # byte-level: one token per UTF-8 byte
    expected = expected_counts(model, TEXTS, 20, 2)
    for la, counts in zip(res.layers, expected, strict=True):
        assert la.num_tokens == want_tokens
        assert la.top_k == 2 and la.num_experts == 8
        np.testing.assert_array_equal(np.asarray(la.load.counts), counts)
    assert not model.training


def test_log_dir_is_kept_and_holds_one_sequence_per_text(tiny, tmp_path):
    model, tok = tiny
    res = analyze_model(model, tok, TEXTS, config=FAST, log_dir=tmp_path / "log", max_length=8, batch_size=2,
                        hidden=True, model_name="tiny")
    log = RouterLog.open(tmp_path / "log")
    assert log.num_tokens == sum(min(len(t.encode()), 8) for t in TEXTS) == res.layers[0].num_tokens
    assert len(log.sequences) == len(TEXTS)
    assert log.manifest.model.name == "tiny"
    assert res.layers[0].collapse.span_energy is not None  # hidden states were captured
    # token ids are the texts' bytes, in order, padding dropped
    ids = log.read("layer0", 0, log.num_tokens).token_ids.tolist()
    assert ids == [b for t in TEXTS for b in list(t.encode())[:8]]


def test_existing_log_dir_refused_before_the_model_runs(tiny, tmp_path):
    model, tok = tiny
    analyze_model(model, tok, TEXTS[:1], config=FAST, log_dir=tmp_path / "log")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(LogExists):
            analyze_model(model, tok, TEXTS, config=FAST, log_dir=tmp_path / "log")
    finally:
        handle.remove()
    assert calls == []
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    res = analyze_model(model, tok, TEXTS, config=FAST, log_dir=tmp_path / "log", overwrite=True)
    assert RouterLog.open(tmp_path / "log").num_tokens == res.layers[0].num_tokens


def test_temporary_log_removed_and_nothing_else(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    (scratch / "keep.txt").write_text("the user's")
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    res = analyze_model(model, tok, TEXTS, config=FAST)
    assert sorted(os.listdir(scratch)) == ["keep.txt"]
    assert not os.path.exists(res.source)
    # and on a failure inside the run
    with pytest.raises(RuntimeError, match="boom"):
        handle = model.register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
        try:
            analyze_model(model, tok, TEXTS, config=FAST)
        finally:
            handle.remove()
    assert sorted(os.listdir(scratch)) == ["keep.txt"]


def test_random_mixtral_counts_and_training_mode_restored():
    model = mixtral()
    model.train()
    tok = byte_level_tokenizer()
    res = analyze_model(model, tok, TEXTS, config=FAST, max_length=16, batch_size=2)
    assert model.training
    model.eval()
    expected = expected_counts(model, TEXTS, 16, 2)
    assert len(res.layers) == 2
    for la, counts in zip(res.layers, expected, strict=True):
        assert la.num_experts == 4
        np.testing.assert_array_equal(np.asarray(la.load.counts), counts)


def test_token_id_texts_equal_str_texts(tiny):
    model, tok = tiny
    a = analyze_model(model, tok, TEXTS, config=FAST, max_length=12, batch_size=2)
    b = analyze_model(model, tok, [list(t.encode()) for t in TEXTS], config=FAST, max_length=12, batch_size=2)
    for la, lb in zip(a.layers, b.layers, strict=True):
        np.testing.assert_array_equal(np.asarray(la.load.counts), np.asarray(lb.load.counts))


@pytest.mark.parametrize(("texts", "kwargs", "match"), [
    ([], {}, "texts is empty"),
    ("just one string", {}, "single str"),
    (["fine", ""], {}, r"texts\[1\] gives no token"),
    (["fine", 3.5], {}, r"texts\[1\] must be a str"),
    (TEXTS, {"max_length": 0}, "max_length"),
    (TEXTS, {"batch_size": 0}, "batch_size"),
    (TEXTS, {"config": {"routers": ("tc",)}}, "AnalyzeConfig"),
])
def test_bad_input_named(tiny, texts, kwargs, match):
    model, tok = tiny
    with pytest.raises(InvalidParameter, match=match):
        analyze_model(model, tok, texts, **kwargs)


def test_tokenizer_without_pad_token(tiny):
    model, _ = tiny
    tok = byte_level_tokenizer()
    tok.pad_token = None
    with pytest.raises(InvalidParameter, match="no pad token.*batch_size=1"):
        analyze_model(model, tok, TEXTS, config=FAST, batch_size=2)
    res = analyze_model(model, tok, TEXTS, config=FAST, batch_size=1, max_length=8)  # nothing to pad
    assert res.layers[0].num_tokens == sum(min(len(t.encode()), 8) for t in TEXTS)


def test_model_without_moe_layers():
    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(300, 8)
            self.mlp = nn.Linear(8, 8)

        def forward(self, input_ids, attention_mask=None):
            return self.mlp(self.embed(input_ids))

    with pytest.raises(RouterNotFound, match="no router found in Dense"):
        analyze_model(Dense(), byte_level_tokenizer(), TEXTS)
