"""usmoe_lp.live.evaluate: quality against cost, checked against independent oracles.

* native's cross-entropy equals what the model's own loss gives (``model(input_ids, labels=...)``, transformers'
  shifted mean CE) on the same windows, with and without input corruption (the corrupted inputs rebuilt here from
  the public corruption function, the labels clean), and its bits per byte equal the tiny model's own evaluation
  (``usmoe_lp.tiny.evaluate.evaluate``) document by document;
* the bootstrap on hand-made per-document sums: an exactly known interval, numpy resampling with the stated draw,
  the paired difference;
* corruption: the rate honoured, rate 0 the identity, nested rates, the vocabulary respected;
* FLOPs from parameter shapes by hand (fused OLMoE, DBRX's row-stacked matrices), native's pairs per token = k;
* generation: native's KV-cache greedy continuation equals greedy decoding recomputed without a cache; Token
  Choice (the model's own top-k on OLMoE) agrees with native; the decode mismatch of token-local routers is 0.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_capture_families import tiny_model

from usmoe_lp.errors import InvalidParameter
from usmoe_lp.live.corrupt import corrupt_tokens
from usmoe_lp.live.evaluate import EvaluateResult, bootstrap_ci, evaluate, pareto_front, settings_grid
from usmoe_lp.live.flops import expert_multiply_adds
from usmoe_lp.routers import RouterConfig
from usmoe_lp.tiny import load_tiny
from usmoe_lp.tiny.data import document_ids
from usmoe_lp.tiny.evaluate import eval_windows
from usmoe_lp.tiny.evaluate import evaluate as tiny_evaluate

DOCS = ["def f(x):\n    return x + 1\n" * 3, "The quick brown fox jumps over the lazy dog. " * 4,
        "Expressions\n***********\n\nThis chapter explains the meaning of the elements of expressions."]
SEQ = 48


pytestmark = pytest.mark.usefixtures("one_torch_thread_module")   # small forwards on one torch thread


@pytest.fixture(scope="module")
def tiny():
    return load_tiny()[0]


def hf_ce(model, clean: list[torch.Tensor], inputs: list[torch.Tensor], seq_len: int, bos: int | None = None):
    """Pooled nats per target from the model's own loss on each window (labels: the clean window; BOS labels
    ignored), weighted by the window's targets."""
    total, n = 0.0, 0
    with torch.no_grad():
        for c, x in zip(clean, inputs, strict=True):
            for wc, wx in zip(eval_windows(c, seq_len), eval_windows(x, seq_len), strict=True):
                labels = wc.clone()
                if bos is not None:
                    labels[labels == bos] = -100
                m = int((labels[1:] != -100).sum())
                if m:
                    total += float(model(input_ids=wx[None], labels=labels[None]).loss) * m
                    n += m
    return total / n


def test_native_ce_is_the_models_own_loss_and_bpb_the_tiny_evaluation(tiny):
    res = evaluate(tiny, DOCS, [], seq_len=SEQ, batch_size=3, bootstrap=0, progress=False)
    native = res.quality.iloc[0]
    streams = [document_ids([d]) for d in DOCS]
    assert native["label"] == "native" and native["documents"] == len(DOCS)
    assert native["ce"] == pytest.approx(hf_ce(tiny, streams, streams, SEQ), rel=1e-5)
    per_doc = [tiny_evaluate(tiny, s, seq_len=SEQ)[0] for s in streams]
    assert native["tokens"] == sum(h.tokens for h in per_doc)
    bpb = sum(h.bits_per_byte * h.bytes for h in per_doc) / sum(h.bytes for h in per_doc)
    assert native["bpb"] == pytest.approx(bpb, rel=1e-5)
    assert np.isnan(native["ce_low"]) and native["delta_ce"] == 0.0


def test_corrupted_inputs_clean_targets(tiny):
    rate, seed = 0.3, 4
    res = evaluate(tiny, DOCS, [], seq_len=SEQ, batch_size=2, corrupt=(0.0, rate), seed=seed, bootstrap=0,
                   progress=False)
    clean = [document_ids([d]) for d in DOCS]
    noisy = [corrupt_tokens(s, rate, 256, seed=seed, stream=i)[0] for i, s in enumerate(clean)]
    q = res.quality.set_index("corrupt")
    assert q.loc[rate, "ce"] == pytest.approx(hf_ce(tiny, clean, noisy, SEQ), rel=1e-5)
    assert q.loc[0.0, "ce"] == pytest.approx(hf_ce(tiny, clean, clean, SEQ), rel=1e-5)
    assert q.loc[rate, "ce"] > q.loc[0.0, "ce"] + 0.1  # the inputs really changed
    assert q.loc[rate, "tokens"] == q.loc[0.0, "tokens"]


def test_generic_family_token_ids_bos_not_scored():
    model = tiny_model("mixtral")
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (30, 17, 41)]
    docs[2][20] = 1  # a BOS target inside a document: not scored
    res = evaluate(model, docs, ["tc"], seq_len=16, batch_size=4, bootstrap=50, progress=False)
    q = res.quality.set_index("label")
    streams = [torch.tensor(d) for d in docs]
    assert q.loc["native", "ce"] == pytest.approx(hf_ce(model, streams, streams, 16, bos=1), rel=1e-5)
    assert q.loc["native", "tokens"] == 29 + 16 + 39
    assert np.isnan(q.loc["native", "bpb"])
    assert q.loc["tc k=2", "kbar"] == 2.0


def test_flops_from_parameter_shapes_and_native_pairs(tiny):
    cfg = tiny.config
    d, i = cfg.hidden_size, cfg.intermediate_size
    res = evaluate(tiny, DOCS[:2], [RouterConfig("usmoe", 2, kbar=1.0)], seq_len=SEQ, bootstrap=0, progress=False)
    per_pair = 2 * (2 * i * d + d * i)
    assert (res.layers["flops_per_pair"] == per_pair).all()
    q = res.quality.set_index("label")
    k, layers = cfg.num_experts_per_tok, cfg.num_hidden_layers
    assert q.loc["native", "pairs_per_token"] == k and q.loc["native", "kbar"] == k
    assert q.loc["native", "moe_flops_per_token"] == layers * k * per_pair
    usmoe = q.loc["usmoe a=0.5 kbar=1 seq"]
    assert usmoe["kbar"] == 1.0 and usmoe["flops_vs_native"] == 0.5
    native_layers = res.layers[res.layers["label"] == "native"]
    assert (native_layers["pairs"] == k * native_layers["tokens"]).all()


def test_flops_of_row_stacked_experts():
    model = tiny_model("dbrx")  # w1, v1, w2 stored as (N * I, d)
    experts = model.transformer.blocks[0].ffn.experts
    ffn = model.config.ffn_config
    assert expert_multiply_adds(experts, ffn.moe_num_experts) == 3 * ffn.ffn_hidden_size * model.config.d_model


def test_bootstrap_exact_and_numpy_oracle():
    # two documents: replicates {both doc 0, one each, both doc 1} -> ratios 1, 2, 3 (prob. 1/4, 1/2, 1/4)
    est, low, high = bootstrap_ci([1.0, 3.0], [1, 1], replicates=4000, confidence=0.9, seed=7)
    assert (est, low, high) == (2.0, 1.0, 3.0)
    rng = np.random.default_rng(11)
    sums, counts = rng.gamma(2.0, 50.0, 9), rng.integers(20, 90, 9).astype(float)
    idx = np.random.default_rng(5).integers(0, 9, (300, 9))
    ratios = sums[idx].sum(1) / counts[idx].sum(1)
    expect = np.quantile(ratios, [0.1, 0.9])
    est, low, high = bootstrap_ci(sums, counts, replicates=300, confidence=0.8, seed=5)
    assert est == pytest.approx(sums.sum() / counts.sum())
    assert (low, high) == pytest.approx(tuple(expect), rel=1e-12)
    ref = sums * 0.9
    diffs = (sums[idx] - ref[idx]).sum(1) / counts[idx].sum(1)
    _, dlow, dhigh = bootstrap_ci(sums, counts, reference=ref, replicates=300, confidence=0.8, seed=5)
    assert (dlow, dhigh) == pytest.approx(tuple(np.quantile(diffs, [0.1, 0.9])), rel=1e-12)
    assert np.isnan(bootstrap_ci(sums, counts, replicates=0)[1])
    with pytest.raises(InvalidParameter, match="counts"):
        bootstrap_ci([1.0], [0])


def test_corruption_rate_identity_and_vocabulary():
    ids = torch.randint(0, 259, (100_000,), generator=torch.Generator().manual_seed(0))
    before = ids.clone()
    same, replaced = corrupt_tokens(ids, 0.0, 256, seed=3)
    assert same.equal(ids) and not replaced.any()
    for rate in (0.05, 0.5, 1.0):
        out, replaced = corrupt_tokens(ids, rate, 256, seed=3, stream=2)
        assert abs(float(replaced.double().mean()) - rate) < 0.006
        assert out[~replaced].equal(ids[~replaced])  # untouched where not drawn
        assert int(out[replaced].max()) < 256 and int(out[replaced].min()) >= 0
        changed = float((out != ids).double().mean())  # a draw may give the token back: rate * (1 - 1/256) ...
        assert abs(changed - rate * (1 - float((ids < 256).double().mean()) / 256)) < 0.006
    assert ids.equal(before)  # the input is not modified
    a, _ = corrupt_tokens(ids, 0.5, 256, seed=3, stream=0)
    b, _ = corrupt_tokens(ids, 0.5, 256, seed=3, stream=1)
    assert a.equal(corrupt_tokens(ids, 0.5, 256, seed=3, stream=0)[0]) and not a.equal(b)
    with pytest.raises(InvalidParameter, match="corrupt rate"):
        corrupt_tokens(ids, 1.5, 256)


def greedy_without_cache(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    return seq[:, prompt.shape[1]:]


def test_generation_native_tc_and_decode_mismatch(tiny, monkeypatch):
    new, prompt = 8, 24
    settings = [RouterConfig("tc", 2), RouterConfig("usmoe", 2, kbar=1.5)]
    captured = {}
    from usmoe_lp.live import evaluate as module

    real = module._generate

    def spy(model, config, *args, **kwargs):
        gen, mismatch = real(model, config, *args, **kwargs)
        captured[config.label] = gen
        return gen, mismatch
    monkeypatch.setattr(module, "_generate", spy)
    res = evaluate(tiny, DOCS, settings, seq_len=SEQ, generate=new, prompt_tokens=prompt, batch_size=2,
                   bootstrap=0, progress=False)
    gen = res.generation.set_index("label")
    prompts = torch.stack([document_ids([d])[:prompt] for d in DOCS[:2]])
    assert captured["native"].equal(greedy_without_cache(tiny, prompts, new))
    assert gen.loc["native", "sequences"] == 2 and gen.loc["native", "new_tokens"] == new
    # OLMoE's own router is Token Choice on the softmax: the same continuation
    assert gen.loc["tc k=2", "token_agreement"] == 1.0 and gen.loc["tc k=2", "first_divergence"] == new
    assert gen.loc["native", "decode_mismatch"] == 0.0 and gen.loc["tc k=2", "decode_mismatch"] == 0.0
    u = gen.loc["usmoe a=0.5 kbar=1.5 seq"]
    assert 0.0 <= u["decode_mismatch"] <= 1.0 and 0.0 <= u["token_agreement"] <= 1.0
    assert 0 <= u["first_divergence"] <= new


def test_result_frames_json_and_checks(tiny):
    res = evaluate(tiny, DOCS, settings_grid(2, ["tc", "usmoe"], kbar=(1.0, 2.0), alpha=0.5), seq_len=SEQ,
                   corrupt=(0.0, 0.1), bootstrap=100, progress=True)
    assert isinstance(res, EvaluateResult)
    assert res.quality["label"].tolist()[:4] == ["native", "tc k=2", "usmoe a=0.5 kbar=1 seq", "usmoe a=0.5 kbar=2 seq"]
    assert len(res.quality) == 8 and len(res.layers) == 8 * tiny.config.num_hidden_layers
    assert res.generation is None
    assert set(res.quality.columns) | set(res.layers.columns) <= set(res.definitions)
    q = res.quality
    assert ((q["ce_low"] <= q["ce"]) & (q["ce"] <= q["ce_high"])).all()
    assert (q.loc[q["label"] == "native", ["delta_ce", "delta_low", "delta_high"]] == 0).all().all()
    assert (q["wall_s"] > 0).all()
    doc = json.loads(json.dumps(res.to_json(), allow_nan=False))
    assert set(doc) == {"model", "settings", "quality", "layers", "generation", "documents", "definitions",
                        "config"}
    docs = res.documents  # per-document sums add up to the pooled cross-entropy of each row
    assert set(docs.columns) <= set(res.definitions)
    for _, row in q.iterrows():
        mine = docs[(docs["label"] == row["label"]) & (docs["corrupt"] == row["corrupt"])]
        assert len(mine) == row["documents"] and mine["tokens"].sum() == row["tokens"]
        assert mine["nll"].sum() / mine["tokens"].sum() == pytest.approx(row["ce"], rel=1e-12)
    assert doc["model"]["family"] == "olmoe" and doc["model"]["k"] == 2 and doc["model"]["num_experts"] == 8
    assert doc["settings"][0] == {"router": "native", "label": "native", "k": 2, "weights": "model"}
    front = pareto_front(q)
    assert set(front["corrupt"]) == {0.0, 0.1}
    for rate, rows in q.groupby("corrupt"):  # brute force: a front row is dominated by no row of its rate
        for _, f in front[front["corrupt"] == rate].iterrows():
            assert not ((rows["moe_flops_per_token"] <= f["moe_flops_per_token"]) & (rows["ce"] <= f["ce"])
                        & ((rows["moe_flops_per_token"] < f["moe_flops_per_token"]) | (rows["ce"] < f["ce"]))).any()
    with pytest.raises(InvalidParameter, match="repeat"):
        evaluate(tiny, DOCS, ["tc", RouterConfig("tc", 2)], progress=False)
    with pytest.raises(InvalidParameter, match="corrupt"):
        evaluate(tiny, DOCS, [], corrupt=(0.0, 2.0), progress=False)
    with pytest.raises(InvalidParameter, match="k = 2"):
        evaluate(tiny, DOCS, [RouterConfig("native", 1)], progress=False)
    with pytest.raises(InvalidParameter, match="tokenizer"):
        evaluate(tiny_model("olmoe"), ["text"], [], progress=False)


def test_text_through_the_tokenizer_is_the_byte_stream(tiny):
    tokenizer = load_tiny()[1]
    a = evaluate(tiny, DOCS, [], seq_len=SEQ, bootstrap=0, progress=False, max_tokens=150)
    b = evaluate(tiny, DOCS, [], tokenizer=tokenizer, seq_len=SEQ, bootstrap=0, progress=False, max_tokens=150)
    c = evaluate(tiny, [document_ids([d]).tolist() for d in DOCS], [], seq_len=SEQ, bootstrap=0, progress=False,
                 max_tokens=150)
    assert a.quality["tokens"].iloc[0] == 150 - 2  # 150 tokens: a first document of 83, a second cut to 67
    for other in (b, c):
        assert other.quality["ce"].iloc[0] == a.quality["ce"].iloc[0]
        assert other.quality["tokens"].iloc[0] == a.quality["tokens"].iloc[0]
