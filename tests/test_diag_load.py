"""Load-balance diagnostics: hand-computed cases, transformers' own losses as oracles, the
quirks of other tools (moewatch, plumb-moe, Megatron-LM, the OLMoE scripts) as regression tests,
and the streaming merge property."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func

from usmoe_lp.diagnostics.load import (
    LoadPartial,
    LoadStats,
    aux_loss,
    balance_metrics,
    load_stats,
    mask_counts,
    router_z_loss,
    softmax_token_stats,
)
from usmoe_lp.errors import InvalidParameter, InvalidScores, ShapeMismatch


def _hf_aux(layers, n, k, attention_mask=None) -> float:
    return float(load_balancing_loss_func(tuple(layers), n, k, attention_mask))


def _topk_mask(p: np.ndarray, k: int) -> np.ndarray:
    m = np.zeros(p.shape, dtype=bool)
    for t in range(p.shape[0]):  # explicit per-row oracle
        for e in sorted(range(p.shape[1]), key=lambda j: (-p[t, j], j))[:k]:
            m[t, e] = True
    return m


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _close(a, b, rtol=1e-12) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, rtol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-13)
    return a == b


def _assert_stats_equal(a: LoadStats, b: LoadStats, rtol=1e-12) -> None:
    da, db = a.__dict__, b.__dict__
    for key in da:
        if key in ("counts", "experts_per_token"):
            assert da[key].dtype == db[key].dtype == np.int64, key  # one type for per-expert vectors
            np.testing.assert_array_equal(da[key], db[key], err_msg=key)  # integer counts: exact
        elif key == "load_share":
            assert da[key].dtype == np.float64
            np.testing.assert_allclose(da[key], db[key], rtol=rtol, atol=1e-13, err_msg=key)
        elif isinstance(da[key], int):
            assert da[key] == db[key], key
        else:
            assert _close(da[key], db[key], rtol), (key, da[key], db[key])


# ---------------------------------------------------------------------------------------------
# balance_metrics: hand-computed cases
# ---------------------------------------------------------------------------------------------


def test_perfect_balance_exact_values():
    m = balance_metrics([5, 5, 5, 5])
    assert m["load_entropy"] == 1.0
    assert m["load_entropy_nats"] == pytest.approx(math.log(4))
    assert m["maxvio"] == 0.0 and m["max_over_mean"] == 1.0 and m["cv"] == 0.0
    assert m["gini"] == 0.0  # exactly, not 1e-17
    assert (m["dead_experts"], m["cold_experts"], m["utilisation"]) == (0, 0, 1.0)


@pytest.mark.parametrize("n", [2, 3, 4, 8, 64])
def test_total_collapse(n):
    c = np.zeros(n, dtype=np.int64)
    c[n // 2] = 12 * n
    m = balance_metrics(c)
    assert m["load_entropy"] == 0.0 and m["load_entropy_nats"] == 0.0
    assert m["max_over_mean"] == pytest.approx(n)  # max = total, mean = total / n
    assert m["maxvio"] == pytest.approx(n - 1)
    assert m["gini"] == pytest.approx((n - 1) / n, abs=1e-15)
    # population std of one value T and n-1 zeros: mean T/n, std = (T/n) sqrt(n-1)  ->  cv = sqrt(n-1)
    assert m["cv"] == pytest.approx(math.sqrt(n - 1))
    assert m["dead_experts"] == n - 1 and m["utilisation"] == pytest.approx(1 / n)


def test_small_asymmetric_case_by_hand():
    m = balance_metrics([3, 1, 0, 0])
    # shares (0.75, 0.25, 0, 0); H = -(0.75 ln 0.75 + 0.25 ln 0.25) nats
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert m["load_entropy_nats"] == pytest.approx(h, rel=1e-14)
    assert m["load_entropy"] == pytest.approx(h / math.log(4), rel=1e-14)
    # mean = 4/4 = 1 (zeros counted), max = 3
    assert m["max_over_mean"] == 3.0 and m["maxvio"] == 2.0
    # deviations (2, 0, -1, -1): population variance 6/4, mean 1
    assert m["cv"] == pytest.approx(math.sqrt(1.5), rel=1e-14)
    # sorted (0, 0, 1, 3), cumulative (0, 0, 1, 4), sum 5: G = 1 + 1/4 - 2*5/(4*4) = 0.625
    assert m["gini"] == 0.625
    assert (m["dead_experts"], m["cold_experts"], m["utilisation"]) == (2, 2, 0.5)


def test_single_expert_and_cold_threshold():
    m = balance_metrics([7])
    assert (m["load_entropy"], m["gini"], m["maxvio"], m["cv"]) == (1.0, 0.0, 0.0, 0.0)
    # share 1/2001 <= 0.001 is cold (moewatch) but not dead (c > 0); 0 is both
    m = balance_metrics([1, 0, 2000])
    assert (m["dead_experts"], m["cold_experts"]) == (1, 2)
    m = balance_metrics([1, 0, 998])  # share 1/999 > 0.001: not cold
    assert m["cold_experts"] == 1


def test_all_zero_counts_is_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = balance_metrics(np.zeros(4, dtype=np.int64))
    for key in ("load_entropy", "load_entropy_nats", "maxvio", "max_over_mean", "cv", "gini"):
        assert math.isnan(m[key]), key
    assert (m["dead_experts"], m["cold_experts"], m["utilisation"]) == (4, 4, 0.0)


def test_float_and_torch_counts():
    ref = balance_metrics([3, 1, 0, 0])
    assert balance_metrics(np.array([3.0, 1.0, 0.0, 0.0])) == pytest.approx(ref)
    assert balance_metrics(torch.tensor([3, 1, 0, 0])) == pytest.approx(ref)
    assert balance_metrics(torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=torch.bfloat16)) == pytest.approx(ref)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=9).filter(lambda c: sum(c) > 0))
def test_balance_metrics_against_independent_formulas(c):
    m = balance_metrics(c)
    x = np.array(c, dtype=np.float64)
    n, mu = len(c), x.mean()
    # Gini via the mean absolute difference: sum_ij |x_i - x_j| / (2 n^2 mu)
    gini = np.abs(x[:, None] - x[None, :]).sum() / (2 * n * n * mu)
    assert m["gini"] == pytest.approx(gini, abs=1e-12)
    share = x / x.sum()
    h = sum(-s * math.log(s) for s in share if s > 0)
    assert m["load_entropy_nats"] == pytest.approx(h, abs=1e-12)
    assert m["load_entropy"] == pytest.approx(h / math.log(n) if n > 1 else 1.0, abs=1e-12)
    assert m["cv"] == pytest.approx(np.std(x, ddof=0) / mu, abs=1e-12)
    assert m["max_over_mean"] == pytest.approx(x.max() / mu) and m["maxvio"] == pytest.approx(x.max() / mu - 1)
    assert 0.0 <= m["gini"] <= (n - 1) / n + 1e-12 and 0.0 <= m["load_entropy"] <= 1.0 + 1e-12


@pytest.mark.parametrize(
    "bad",
    [[1.0, float("nan")], [1.0, float("inf")], [1, -1], [[1, 2], [3, 4]], [], "abc"],
)
def test_balance_metrics_bad_input(bad):
    with pytest.raises(InvalidScores):
        balance_metrics(bad)


# ---------------------------------------------------------------------------------------------
# Quirks of other tools: moewatch, plumb-moe, Megatron-LM routing_diagnostics, OLMoE scripts
# ---------------------------------------------------------------------------------------------


def test_quirk_plumb_moe_max_over_mean_counts_zero_load_experts():
    m = balance_metrics([4, 4, 0, 0])
    assert m["max_over_mean"] == 2.0  # mean over all 4 experts = 2
    plumb = 4 / np.mean([4, 4])  # plumb-moe leaves the never-selected experts out: 1.0
    assert plumb == 1.0 and m["max_over_mean"] != plumb


@pytest.mark.parametrize("n", [2, 5, 16])
def test_quirk_megatron_gini_missing_plus_one_over_n(n):
    c = np.full(n, 3)
    srt = np.sort(c)
    megatron = 1 - 2 * np.cumsum(srt).sum() / (n * srt.sum())  # no +1/N: -1/N at balance
    assert megatron == pytest.approx(-1 / n)
    assert balance_metrics(c)["gini"] == 0.0


def test_quirk_cv_is_population_not_sample():
    m = balance_metrics([0, 2])
    assert m["cv"] == 1.0  # population std 1, mean 1
    assert float(torch.tensor([0.0, 2.0]).std()) == pytest.approx(math.sqrt(2))  # torch's sample default


def test_quirk_topk_not_top1_counting():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(40, 6))
    p = _softmax(z)
    s2 = load_stats(_topk_mask(p, 2), p, top_k=2)
    assert sum(s2.counts) == 80 and s2.experts_per_token.tolist() == [0, 0, 40, 0, 0, 0, 0]
    expected = np.zeros(6, dtype=np.int64)
    for t in range(40):  # brute-force top-2 counting
        for e in np.argsort(-p[t])[:2]:
            expected[e] += 1
    assert s2.counts.tolist() == [int(v) for v in expected]
    top1 = np.bincount(p.argmax(axis=1), minlength=6)  # moewatch's top-1 count
    assert s2.counts.tolist() != [int(v) for v in top1]
    # and the aux loss with k=2 is transformers' k=2 loss, not the k=1 loss
    layers = (torch.tensor(z),)
    assert aux_loss(layers, 2) == pytest.approx(_hf_aux(layers, 6, 2), rel=1e-5)
    assert aux_loss(layers, 2) != pytest.approx(aux_loss(layers, 1), rel=1e-3)


def test_quirk_three_entropies_differ():
    # two tokens, two experts, both top-1 on expert 0
    probs = np.array([[0.9, 0.1], [0.6, 0.4]])
    mask = np.array([[True, False], [True, False]])
    s = load_stats(mask, probs)
    ln2 = math.log(2)

    def h(a):
        return -(a * math.log(a) + (1 - a) * math.log(1 - a))

    assert s.entropy == 0.0  # load: all on expert 0
    assert s.token_entropy == pytest.approx((h(0.9) + h(0.6)) / 2, rel=1e-14)  # 0.4989 nats
    assert s.token_entropy_normalised == pytest.approx((h(0.9) + h(0.6)) / 2 / ln2, rel=1e-14)
    assert s.mean_prob_entropy_nats == pytest.approx(h(0.75), rel=1e-14)  # mean prob (0.75, 0.25): 0.5623
    assert s.mean_prob_entropy == pytest.approx(h(0.75) / ln2, rel=1e-14)
    values = [s.entropy, s.token_entropy, s.mean_prob_entropy_nats]
    assert len({round(v, 6) for v in values}) == 3


def test_quirk_pooled_vs_per_layer_aux_loss():
    # layer A sends both tokens to expert 0, layer B to expert 1: each layer alone is collapsed
    # (loss ~ 2 = N), but pooled over both layers the load is balanced (loss ~ 1).
    a = torch.tensor([[10.0, 0.0], [10.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 10.0], [0.0, 10.0]], dtype=torch.float64)
    sig = 1 / (1 + math.exp(-10))  # softmax([10, 0])[0]
    per_layer_hand = 2 * (1.0 * sig)  # f = (1, 0), P = (sig, 1 - sig)
    pooled_hand = 2 * (0.5 * 0.5 + 0.5 * 0.5)  # f = (1/2, 1/2), P = (1/2, 1/2)
    pooled = aux_loss((a, b), 1)
    per_layer = aux_loss((a, b), 1, pooled=False)
    assert pooled == pytest.approx(pooled_hand, rel=1e-12)
    assert per_layer == pytest.approx(per_layer_hand, rel=1e-12)
    assert pooled == pytest.approx(_hf_aux((a, b), 2, 1), rel=1e-6)  # transformers pools
    olmoe = np.mean([_hf_aux((x,), 2, 1) for x in (a, b)])  # OLMoE scripts: mean of per-layer losses
    assert per_layer == pytest.approx(olmoe, rel=1e-6)
    assert abs(pooled - per_layer) > 0.9


# ---------------------------------------------------------------------------------------------
# load_stats: hand case, bad input
# ---------------------------------------------------------------------------------------------


def test_load_stats_hand_case_all_fields():
    probs = np.array([[0.9, 0.1], [0.6, 0.4]])
    logits = np.array([[0.0, 0.0], [1.0, 1.0]])
    mask = np.array([[True, False], [True, False]])
    s = load_stats(mask, probs, logits=logits, top_k=1)
    assert (s.num_tokens, s.num_experts, s.top_k) == (2, 2, 1)
    assert s.counts.tolist() == [2, 0] and s.load_share.tolist() == [1.0, 0.0]
    assert s.experts_per_token.tolist() == [0, 2, 0] and s.zero_expert_rate == 0.0 and s.mean_experts_per_token == 1.0
    # f = (2/2, 0/2) = (1, 0); P = (0.75, 0.25): L = 2 * (1 * 0.75) = 1.5
    assert s.aux_loss == pytest.approx(1.5, rel=1e-14)
    # Imp = (1.5, 0.5): mean 1, population variance 0.25 -> 0.25
    assert s.importance_cv2 == pytest.approx(0.25, rel=1e-14)
    # lse of (0, 0) = ln 2; of (1, 1) = 1 + ln 2
    assert s.z_loss == pytest.approx((math.log(2) ** 2 + (1 + math.log(2)) ** 2) / 2, rel=1e-14)
    assert s.maxvio == 1.0 and s.gini == 0.5 and s.dead_experts == 1
    assert json.loads(json.dumps(s.to_dict(), allow_nan=False))["counts"] == [2, 0]


def test_load_stats_zero_expert_tokens_and_batched_input():
    mask = np.array([[1, 1, 1], [0, 0, 0], [1, 0, 0], [0, 0, 0]], dtype=bool)
    s = load_stats(mask)
    assert s.experts_per_token.tolist() == [2, 1, 0, 1]
    assert s.zero_expert_rate == 0.5 and s.mean_experts_per_token == 1.0
    assert s.token_entropy is None and s.aux_loss is None and s.z_loss is None and s.importance_cv2 is None
    s3 = load_stats(mask.reshape(2, 2, 3))
    _assert_stats_equal(s3, s, rtol=0.0)


def test_load_stats_torch_bf16():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 8, 4)).astype(np.float32)
    p = _softmax(z)
    mask = _topk_mask(p.reshape(-1, 4), 2).reshape(p.shape)
    ref = load_stats(mask, p, logits=z)
    got = load_stats(torch.tensor(mask), torch.tensor(p, dtype=torch.bfloat16), logits=torch.tensor(z))
    np.testing.assert_array_equal(got.counts, ref.counts)
    assert got.token_entropy == pytest.approx(ref.token_entropy, rel=1e-2)
    assert got.z_loss == pytest.approx(ref.z_loss, rel=1e-6)


def test_all_empty_result_serialises():
    s = LoadPartial.empty(3).result()
    assert s.num_tokens == 0 and math.isnan(s.entropy) and s.aux_loss is None
    d = s.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["gini"] is None and d["counts"] == [0, 0, 0]


def test_load_stats_bad_input():
    mask = np.ones((3, 4), dtype=bool)
    with pytest.raises(ShapeMismatch):
        load_stats(mask, np.full((3, 5), 0.2))
    with pytest.raises(ShapeMismatch):
        load_stats(mask, logits=np.zeros((2, 4)))
    with pytest.raises(InvalidScores):
        load_stats(np.ones(4, dtype=bool))  # 1-D
    with pytest.raises(InvalidScores):
        load_stats(np.ones((1, 2, 3, 4), dtype=bool))  # 4-D
    with pytest.raises(InvalidScores):
        load_stats(np.full((3, 4), 2))  # not 0/1
    probs = np.full((3, 4), 0.25)
    probs[1, 2] = np.nan
    with pytest.raises(InvalidScores, match="NaN"):
        load_stats(mask, probs)
    with pytest.raises(InvalidScores, match="Inf"):
        load_stats(mask, logits=np.array([[0, 0, 0, np.inf]] * 3))
    with pytest.raises(InvalidScores, match=">= 0"):
        load_stats(mask, np.full((3, 4), -0.25))
    with pytest.raises(InvalidScores, match="sums to 0"):
        load_stats(mask, np.zeros((3, 4)))
    with pytest.raises(InvalidParameter):
        load_stats(mask, top_k=5)  # k > N


def test_partial_bad_input_and_mixing():
    a = LoadPartial.empty(4)
    with pytest.raises(ShapeMismatch):
        a.update(np.ones((2, 3), dtype=bool))
    with pytest.raises(InvalidParameter):
        a.merge(LoadPartial.empty(5))
    with pytest.raises(InvalidParameter):
        LoadPartial.empty(4, top_k=1).merge(LoadPartial.empty(4, top_k=2))
    with pytest.raises(InvalidParameter):
        LoadPartial.empty(0)
    # probs in one chunk and not in the other: probability fields become None
    a.update(np.eye(4, dtype=bool), np.full((4, 4), 0.25), logits=np.zeros((4, 4)))
    assert a.result().token_entropy is not None and a.result().z_loss is not None
    a.update(np.eye(4, dtype=bool))
    r = a.result()
    assert r.token_entropy is None and r.aux_loss is None and r.z_loss is None and r.counts.tolist() == [2, 2, 2, 2]


# ---------------------------------------------------------------------------------------------
# Streaming: merge property
# ---------------------------------------------------------------------------------------------


@st.composite
def _chunks(draw):
    n = draw(st.integers(1, 6))
    t = draw(st.integers(0, 14))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    mask = rng.random((t, n)) < draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    probs = rng.dirichlet(np.ones(n), size=t) if t else np.zeros((0, n))
    logits = rng.normal(scale=3.0, size=(t, n))
    cuts = sorted(draw(st.lists(st.integers(0, t), min_size=1, max_size=2)))
    return n, mask, probs, logits, [0, *cuts, t]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_chunks())
def test_merge_equals_whole(data):
    n, mask, probs, logits, bounds = data
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        p = LoadPartial.empty(n)
        p.update(mask[lo:hi], probs[lo:hi], logits[lo:hi])
        parts.append(p)
    before = parts[0].counts.copy(), parts[0].token_entropy_sum
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    assert (parts[0].counts == before[0]).all() and parts[0].token_entropy_sum == before[1]  # inputs untouched
    whole = LoadPartial.empty(n)
    whole.update(mask, probs, logits)
    _assert_stats_equal(merged.result(), whole.result())
    if mask.shape[0]:
        _assert_stats_equal(merged.result(), load_stats(mask, probs, logits=logits))


def test_merging_layers_is_pooled_and_equals_transformers():
    rng = np.random.default_rng(7)
    n, k, t = 5, 2, 12
    layers = [rng.normal(size=(t, n)) for _ in range(3)]
    parts = []
    for z in layers:
        p = _softmax(z)
        acc = LoadPartial.empty(n, top_k=k)
        acc.update(_topk_mask(p, k), p, logits=z)
        parts.append(acc)
    merged = parts[0].merge(parts[1]).merge(parts[2]).result()
    pooled_z = np.concatenate(layers)
    pooled_p = _softmax(pooled_z)
    _assert_stats_equal(merged, load_stats(_topk_mask(pooled_p, k), pooled_p, logits=pooled_z, top_k=k))
    assert merged.num_tokens == 3 * t
    tl = tuple(torch.tensor(z) for z in layers)
    assert merged.aux_loss == pytest.approx(_hf_aux(tl, n, k), rel=1e-6)
    assert merged.aux_loss == pytest.approx(aux_loss(tl, k), rel=1e-12)
    assert merged.z_loss == pytest.approx(router_z_loss(tl), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# aux_loss / router_z_loss against transformers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_aux_loss_matches_transformers(k, masked, dtype):
    g = torch.Generator().manual_seed(10 * k + masked)
    b, t, n = 3, 7, 8
    layers = tuple(torch.randn(b * t, n, generator=g, dtype=dtype) * 2 for _ in range(4))
    am = pm = None
    if masked:
        am = torch.ones(b, t, dtype=torch.long)
        am[0, 4:] = 0
        am[2, :2] = 0  # left padding too
        pm = am == 0  # the package's padding convention: True = padding
    ref = _hf_aux(layers, n, k, am)
    assert aux_loss(layers, k, pm) == pytest.approx(ref, rel=2e-6)
    assert aux_loss(list(layers), k, padding_mask=pm) == pytest.approx(ref, rel=2e-6)
    if masked:  # padding rows do not matter at all
        changed = tuple(x.clone() for x in layers)
        for x in changed:
            x.view(b, t, n)[0, 4:] = 100.0
        assert aux_loss(changed, k, pm) == pytest.approx(aux_loss(layers, k, pm), rel=1e-12)
    per_layer_ref = np.mean([_hf_aux((x,), n, k, am) for x in layers])
    assert aux_loss(layers, k, pm, pooled=False) == pytest.approx(per_layer_ref, rel=2e-6)


def test_aux_loss_single_tensor_and_3d_layers():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 5, 4, generator=g)
    assert aux_loss(z, 2) == pytest.approx(aux_loss((z.reshape(10, 4),), 2), rel=1e-12)
    assert aux_loss(z.reshape(10, 4), 2) == pytest.approx(_hf_aux((z.reshape(10, 4),), 4, 2), rel=2e-6)


def test_aux_loss_bad_input():
    z = torch.zeros(6, 4)
    with pytest.raises(InvalidParameter):
        aux_loss((z,), 5)  # k > N
    with pytest.raises(InvalidParameter):
        aux_loss((z,), 0)
    with pytest.raises(ShapeMismatch):
        aux_loss((z, torch.zeros(6, 3)), 1)
    with pytest.raises(ShapeMismatch):
        aux_loss((z,), 1, padding_mask=torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(InvalidParameter, match="every token"):
        aux_loss((z,), 1, padding_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(InvalidParameter, match="True where the token is padding"):
        aux_loss((z,), 1, padding_mask=torch.zeros(2, 3, dtype=torch.long))  # an int mask is ambiguous
    with pytest.raises(InvalidParameter, match="attention_mask == 0"):
        aux_loss((z,), 1, attention_mask=torch.ones(2, 3))
    with pytest.raises(InvalidScores):
        aux_loss((), 1)
    with pytest.raises(InvalidScores):
        aux_loss((torch.tensor([[0.0, float("nan")]]),), 1)
    with pytest.raises(InvalidScores):
        router_z_loss(torch.tensor([[0.0, float("-inf")]]))
    with pytest.raises(InvalidScores):
        router_z_loss(torch.zeros(2, 3, 4, 5))


def test_router_z_loss_matches_switch_transformers():
    g = torch.Generator().manual_seed(2)
    layers = tuple(torch.randn(3, 6, 8, generator=g, dtype=torch.float64) * 4 for _ in range(3))
    ref = float(router_z_loss_func(torch.cat(layers, dim=1)))  # as SwitchTransformers pools its layers
    assert router_z_loss(layers) == pytest.approx(ref, rel=1e-12)
    assert router_z_loss(tuple(x.reshape(-1, 8) for x in layers)) == pytest.approx(ref, rel=1e-12)
    assert router_z_loss(layers[0]) == pytest.approx(float(router_z_loss_func(layers[0])), rel=1e-12)
    # hand case: all-zero logits, lse = ln N
    assert router_z_loss(np.zeros((5, 4))) == pytest.approx(math.log(4) ** 2, rel=1e-14)


# ---------------------------------------------------------------------------------------------
# The streaming analysis' softmax path: float32, one exp per entry, against float64
# ---------------------------------------------------------------------------------------------


def _hard_softmax_logits(t: int = 3000, n: int = 16, seed: int = 11) -> np.ndarray:
    """float32 logits: gaussian rows with a large common offset per token (softmax-invariant), rows whose
    small probabilities underflow in float32, near-uniform rows and one-hot-like rows."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=2.0, size=(t, n)) + rng.normal(scale=40.0, size=(t, 1))
    z[::7, : n // 2] -= 120.0  # probabilities below float32's smallest normal
    z[1::7] = 0.25 * rng.normal(size=(len(z[1::7]), n))  # near-uniform
    z[2::7, 0] += 60.0  # one expert takes (almost) everything
    return z.astype(np.float32)


def test_softmax_token_stats_against_float64():
    z32 = _hard_softmax_logits()
    zt = torch.from_numpy(z32)
    p = torch.softmax(zt, dim=1)
    entropy, lse, r = softmax_token_stats(zt, p)
    z = z32.astype(np.float64)
    lse64 = z.max(axis=1) + np.log(np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1))
    q = _softmax(z)
    h64 = -(q * np.log(np.where(q > 0, q, 1.0))).sum(axis=1)
    np.testing.assert_allclose(lse.numpy(), lse64, rtol=2e-7, atol=1e-6)
    np.testing.assert_allclose(entropy.numpy(), h64, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(r.numpy(), 1.0, atol=1e-5)
    assert entropy.dtype == lse.dtype == torch.float32
    # the caller's row maximum gives the same numbers
    e2, l2, _ = softmax_token_stats(zt, p, p.amax(dim=1))
    assert torch.equal(e2, entropy) and torch.equal(l2, lse)


def test_update_softmax_equals_update_within_float32():
    """The stream's path (float32 sums of blocks, entropies from the softmax) against the general update
    (float64 sums, entropies from log q) and a float64 reference: counts exact, the rest within 1e-6."""
    z32 = _hard_softmax_logits(t=9000, n=16)
    zt = torch.from_numpy(z32)
    p = torch.softmax(zt, dim=1)
    mask = _topk_mask(p.numpy(), 3)
    fast, slow = LoadPartial.empty(16, top_k=3), LoadPartial.empty(16, top_k=3)
    for a in range(0, 9000, 4096):  # blocks as the stream cuts them
        fast.update_softmax(mask[a : a + 4096], zt[a : a + 4096], p[a : a + 4096])
    slow.update(mask, p.numpy(), z32)
    z = z32.astype(np.float64)
    ref = load_stats(mask, _softmax(z), logits=z, top_k=3)
    for other in (slow.result(), ref):
        got = fast.result()
        np.testing.assert_array_equal(got.counts, other.counts)
        np.testing.assert_array_equal(got.experts_per_token, other.experts_per_token)
        for key in ("token_entropy", "mean_prob_entropy", "aux_loss", "z_loss", "importance_cv2"):
            assert getattr(got, key) == pytest.approx(getattr(other, key), rel=1e-6), key
    np.testing.assert_allclose(fast.prob_sum, _softmax(z).sum(axis=0), rtol=1e-6)


def test_mask_counts_against_sums():
    rng = np.random.default_rng(2)
    m = rng.random((1000, 9)) < 0.3
    per_token, per_expert = mask_counts(m)
    np.testing.assert_array_equal(per_token, m.sum(axis=1))
    np.testing.assert_array_equal(per_expert, m.sum(axis=0))
    assert per_token.dtype == per_expert.dtype == np.int64
