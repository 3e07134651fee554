"""Counterfactual re-routing (``usmoe_lp.diagnostics.counterfactual``) against independent oracles.

* Brute force: on tiny groups (T*N <= 12) every 0/1 mask is enumerated; the optimum of each
  config's program, stated here from its definition (rows == k; columns == e with
  e = ceil(cf*T*k/N); group total == round_half_up(kbar*T); rows <= k and columns <= C), on
  scores computed here in float64 numpy, must equal the router's objective (TC, EC, USMoE), and
  capacity-TC's LP gap must equal brute-force optimum minus a greedy re-implemented here.
* Hand-computed 3x2 and 2x2 cases for objective, coverage, drops, budget mismatch, agreement.
* Streaming: merge(partial(A), partial(B)) == one partial on A+B == sequential updates.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usmoe_lp.diagnostics.counterfactual import (
    CounterfactualPartial,
    CounterfactualStats,
    RouterConfig,
    counterfactual,
    default_configs,
    reroute,
)
from usmoe_lp.errors import InvalidParameter, InvalidScores, ShapeMismatch
from usmoe_lp.routing import Routing

PROFILE = settings(max_examples=30, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ----------------------------------------------------------------------------- oracles
def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_unified(z: np.ndarray, alpha: float) -> np.ndarray:
    n = z.shape[-1]
    return alpha * 2.0 / n / (1.0 + np.exp(-z)) + (1.0 - alpha) * np_softmax(z)


def all_masks(T: int, N: int) -> np.ndarray:
    """(2^(T*N), T, N) bool: every 0/1 routing of T tokens to N experts."""
    bits = np.array(list(itertools.product([False, True], repeat=T * N)), dtype=bool)
    return bits.reshape(-1, T, N)


def brute_optimum(S: np.ndarray, feasible) -> float:
    M = all_masks(*S.shape)
    ok = feasible(M)
    assert ok.any(), "the oracle found no feasible mask"
    return float((M[ok] * S).sum((1, 2)).max())


def ec_capacity(cf: float, T: int, k: int, N: int) -> int:
    return min(T, math.ceil(cf * T * k / N - 1e-9))


def greedy_capacity_tc(S: np.ndarray, k: int, C: int) -> tuple[float, int]:
    """Capacity TC by hand: rank-major, tokens in position order; (objective, dropped tokens)."""
    T, N = S.shape
    prefs = [sorted(range(N), key=lambda e, t=t: (-S[t, e], e))[:k] for t in range(T)]
    load = [0] * N
    got = [0] * T
    obj = 0.0
    for r in range(k):
        for t in range(T):
            e = prefs[t][r]
            if load[e] < C:
                load[e] += 1
                got[t] += 1
                obj += S[t, e]
    return obj, sum(g == 0 for g in got)


@st.composite
def tiny_case(draw):
    """(B, T, N) float64 logits with T*N <= 12 and a config of each router."""
    N = draw(st.integers(1, 4))
    T = draw(st.integers(1, max(1, 12 // N)))
    B = draw(st.integers(1, 2))
    vals = draw(st.lists(st.integers(-12, 12), min_size=B * T * N, max_size=B * T * N))
    z = np.array(vals, dtype=np.float64).reshape(B, T, N) / 4
    k = draw(st.integers(1, N))
    kbar = draw(st.sampled_from([0.5, 1.0, 1.5, 2.0, float(k)]))
    kbar = min(kbar, float(N))
    alpha = draw(st.sampled_from([0.0, 0.3, 0.5, 1.0]))
    cf = draw(st.sampled_from([0.5, 1.0, 1.25, 2.0]))
    return z, k, kbar, alpha, cf


# ----------------------------------------------------------------------------- brute force
@PROFILE
@given(tiny_case())
def test_objective_equals_brute_force_optimum(case):
    z, k, kbar, alpha, cf = case
    B, T, N = z.shape
    configs = [RouterConfig("tc", k), RouterConfig("ec", k, capacity_factor=cf),
               RouterConfig("usmoe", k, kbar=kbar, alpha=alpha),
               RouterConfig("capacity_tc", k, capacity_factor=cf)]
    stats = counterfactual(torch.from_numpy(z), configs, lp_sample=10)
    P, U = np_softmax(z), np_unified(z, alpha)
    e = ec_capacity(cf, T, k, N)
    c = math.floor(kbar * T + 0.5)
    opt = {"tc": 0.0, "ec": 0.0, "usmoe": 0.0}
    cap_opt = cap_greedy = 0.0
    cap_dropped = 0
    for b in range(B):
        opt["tc"] += brute_optimum(P[b], lambda M: (M.sum(2) == k).all(1))
        opt["ec"] += brute_optimum(P[b], lambda M, e=e: (M.sum(1) == e).all(1))
        opt["usmoe"] += brute_optimum(U[b], lambda M, c=c: M.sum((1, 2)) == c)
        C = math.ceil(cf * T * k / N - 1e-9)
        cap_opt += brute_optimum(P[b], lambda M, C=C: (M.sum(2) <= k).all(1) & (M.sum(1) <= C).all(1))
        g, d = greedy_capacity_tc(P[b], k, C)
        cap_greedy += g
        cap_dropped += d
    for rec in stats.records:
        r = rec.config.router
        assert rec.groups == B
        if r == "capacity_tc":
            assert rec.own_objective == pytest.approx(cap_greedy, abs=1e-9)
            assert rec.dropped_tokens == cap_dropped
            assert rec.lp_checked == B and rec.certified_total == B
            assert rec.lp_relative_gap == pytest.approx((cap_opt - cap_greedy) / cap_opt, abs=1e-9)
            if B == 1:
                assert rec.max_lp_gap == pytest.approx(cap_opt - cap_greedy, abs=1e-9)
                assert rec.certified_optimal == int(cap_opt - cap_greedy < 1e-9)
            continue
        assert rec.own_objective == pytest.approx(opt[r], abs=1e-9), rec.label
        assert rec.certified_optimal == rec.certified_total == B
        assert rec.max_certificate_gap == 0.0
        assert rec.lp_checked == B and rec.lp_failed == 0
        assert rec.max_lp_gap < 1e-9
        if r != "usmoe":  # TC and EC route on the probabilities themselves
            assert rec.objective == rec.own_objective


def test_capacity_tc_gap_hand_case():
    # p = [[0.6, 0.4], [0.9, 0.1]], k = 1, C = ceil(1 * 2 * 1 / 2) = 1. Greedy in position order:
    # token 0 -> e0 (0.6), token 1 -> e0 dropped. The capped optimum: t0 -> e1, t1 -> e0 = 1.3.
    z = torch.log(torch.tensor([[0.6, 0.4], [0.9, 0.1]], dtype=torch.float64))
    rec = counterfactual(z, [RouterConfig("capacity_tc", 1, capacity_factor=1.0)], lp_sample=1).records[0]
    assert rec.objective == pytest.approx(0.6, abs=1e-12)
    assert rec.dropped_tokens == 1 and rec.budget_mismatch == -1
    assert rec.max_lp_gap == pytest.approx(0.7, abs=1e-9)
    assert rec.max_certificate_gap == pytest.approx(0.7, abs=1e-9)
    assert (rec.certified_optimal, rec.certified_total) == (0, 1)
    assert rec.lp_relative_gap == pytest.approx(0.7 / 1.3, abs=1e-9)
    assert rec.certificate == "lp_sample"
    # Without the LP sample capacity-TC is not certified at all.
    rec0 = counterfactual(z, [RouterConfig("capacity_tc", 1, capacity_factor=1.0)], lp_sample=0).records[0]
    assert (rec0.certified_total, rec0.max_certificate_gap, rec0.max_lp_gap) == (0, None, None)


# ----------------------------------------------------------------------------- hand cases
P32 = [[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]]


def logits32():
    return torch.log(torch.tensor(P32, dtype=torch.float64))


def test_three_by_two_hand_case():
    configs = [RouterConfig("tc", 1), RouterConfig("ec", 1), RouterConfig("capacity_tc", 1, capacity_factor=0.5),
               RouterConfig("usmoe", 1, kbar=1, alpha=0.0), RouterConfig("usmoe", 1, kbar=0.5, alpha=0.0)]
    s = counterfactual(logits32(), configs, lp_sample=0)
    tc, ec, cap, u1, u05 = s.records
    # TC k=1: 0.9 + 0.6 + 0.7 over a mass of 3.
    assert tc.objective == pytest.approx(2.2, abs=1e-12)
    assert tc.coverage == pytest.approx(2.2 / 3, abs=1e-12)
    assert tc.experts_per_token.tolist() == [0, 3, 0] and tc.expert_counts.tolist() == [2, 1]
    # EC e = ceil(3/2) = 2: expert 0 takes 0.9, 0.6; expert 1 takes 0.7, 0.4.
    assert ec.objective == pytest.approx(2.6, abs=1e-12)
    assert (ec.pairs, ec.budget_mismatch, ec.dropped_tokens) == (4, 1, 0)
    assert ec.experts_per_token.tolist() == [0, 2, 1] and ec.realised_kbar == pytest.approx(4 / 3)
    # capacity TC, C = ceil(0.5 * 3 / 2) = 1: token 1's e0 is dropped.
    assert cap.objective == pytest.approx(1.6, abs=1e-12)
    assert (cap.dropped_tokens, cap.drop_rate, cap.budget_mismatch) == (1, pytest.approx(1 / 3), -1)
    # USMoE on the softmax (alpha = 0): kbar 1 -> top-3 = TC here; kbar 0.5 -> c = 2: 0.9, 0.7.
    assert u1.objective == pytest.approx(2.2, abs=1e-12) and u1.pairs == 3
    assert u05.objective == pytest.approx(1.6, abs=1e-12) and u05.own_objective == u05.objective
    assert (u05.pairs, u05.dropped_tokens, u05.experts_per_token.tolist()) == (2, 1, [1, 2, 0])
    assert u05.budget_mismatch == -1
    for rec in s.records:
        assert rec.tokens == 3 and rec.probability_mass == pytest.approx(3.0, abs=1e-12)
    assert s["ec cf=1"] is ec


def test_agreement_jaccard_by_hand():
    tc_mask = torch.tensor([[1, 0], [1, 0], [0, 1]], dtype=torch.bool)
    ec_mask = torch.tensor([[1, 0], [1, 1], [0, 1]], dtype=torch.bool)
    configs = [RouterConfig("tc", 1), RouterConfig("ec", 1)]
    s = counterfactual(logits32(), configs, model_mask=tc_mask, lp_sample=0)
    assert s["tc k=1"].agreement == 1.0
    assert s["ec cf=1"].agreement == pytest.approx((1 + 0.5 + 1) / 3, abs=1e-15)
    s = counterfactual(logits32(), configs, model_mask=ec_mask.int(), lp_sample=0)
    assert s["ec cf=1"].agreement == 1.0 and s["tc k=1"].agreement_tokens == 3
    # Empty model set vs a one-expert set: Jaccard 0; no model mask: None.
    assert counterfactual(logits32(), configs[:1], model_mask=torch.zeros(3, 2, dtype=torch.bool),
                          lp_sample=0).records[0].agreement == 0.0
    assert counterfactual(logits32(), configs[:1], lp_sample=0).records[0].agreement is None


def test_agreement_counts_two_empty_sets_as_equal():
    # USMoE kbar = 0.5 on the softmax drops token 1 (hand case above); the model also gives it none.
    model = torch.tensor([[1, 0], [0, 0], [0, 1]], dtype=torch.bool)
    rec = counterfactual(logits32(), [RouterConfig("usmoe", 1, kbar=0.5, alpha=0.0)], model_mask=model,
                         lp_sample=0).records[0]
    assert rec.dropped_tokens == 1 and rec.agreement == 1.0


def test_usmoe_objective_is_in_probabilities_and_own_objective_in_unified_scores():
    z = np.random.default_rng(0).normal(size=(2, 6, 4)) * 2
    cfg = RouterConfig("usmoe", 1, kbar=1.5, alpha=0.7)
    rec = counterfactual(torch.from_numpy(z), [cfg], lp_sample=0).records[0]
    mask = reroute(torch.from_numpy(z), cfg).mask.numpy()
    assert mask.sum() == 2 * 9
    assert rec.objective == pytest.approx(np_softmax(z)[mask].sum(), rel=1e-12)
    assert rec.own_objective == pytest.approx(np_unified(z, 0.7)[mask].sum(), rel=1e-12)
    assert rec.objective != pytest.approx(rec.own_objective, rel=1e-3)


def test_agreement_is_one_with_the_models_own_top_k():
    z = torch.randn(3, 20, 8, generator=torch.Generator().manual_seed(1))
    model = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, torch.topk(z, 2).indices, True)
    rec = counterfactual(z, [RouterConfig("tc", 2)], model_mask=model, lp_sample=0).records[0]
    assert rec.agreement == 1.0 and rec.agreement_tokens == 60


# ----------------------------------------------------------------------------- matched budget
@PROFILE
@given(st.integers(1, 4), st.integers(1, 9), st.integers(2, 6), st.integers(0, 10**6))
def test_tc_and_usmoe_at_kbar_k_select_the_same_pairs_per_sequence(B, T, N, seed):
    rng = np.random.default_rng(seed)
    z = torch.from_numpy(rng.normal(size=(B, T, N)).astype(np.float32))
    pad = torch.from_numpy(rng.random((B, T)) < 0.3)
    k = int(rng.integers(1, N + 1))
    tc = reroute(z, RouterConfig("tc", k), padding_mask=pad)
    us = reroute(z, RouterConfig("usmoe", k, kbar=k, alpha=float(rng.random())), padding_mask=pad)
    real = (~pad).sum(1)
    assert tc.mask.sum((1, 2)).tolist() == us.mask.sum((1, 2)).tolist() == (real * k).tolist()
    s = counterfactual(z, [RouterConfig("tc", k), RouterConfig("usmoe", k, kbar=k)], padding_mask=pad, lp_sample=0)
    assert [r.budget_mismatch for r in s.records] == [0, 0]
    assert s.records[0].pairs == s.records[1].pairs == int(real.sum()) * k


@pytest.mark.parametrize(("T", "N", "k", "mismatch"), [(5, 4, 1, 3), (8, 4, 1, 0), (3, 4, 2, 2), (6, 4, 2, 0)])
def test_ec_budget_mismatch_by_hand(T, N, k, mismatch):
    # e = ceil(T*k/N): (5,4,1) -> 2, 4*2-5 = 3; (3,4,2) -> 2, 8-6 = 2; integer T*k/N -> 0.
    z = torch.randn(2, T, N, generator=torch.Generator().manual_seed(T))
    rec = counterfactual(z, [RouterConfig("ec", k)], lp_sample=0).records[0]
    assert rec.budget_mismatch == 2 * mismatch
    assert rec.pairs == 2 * (T * k + mismatch)


# ----------------------------------------------------------------------------- streaming
SEQ_CONFIGS = (RouterConfig("tc", 2), RouterConfig("ec", 2, capacity_factor=1.5),
               RouterConfig("capacity_tc", 2, capacity_factor=1.0),
               RouterConfig("capacity_tc", 2, capacity_factor=1.0, policy="priority"),
               RouterConfig("usmoe", 2, kbar=1.5, alpha=0.3), RouterConfig("usmoe", 2, kbar=2, alpha=0.7))


def _same(a: CounterfactualStats, b: CounterfactualStats) -> None:
    assert a.tokens == b.tokens and a.labels == b.labels
    for ra, rb in zip(a.records, b.records, strict=True):
        da, db = ra.to_dict(), rb.to_dict()
        assert da.keys() == db.keys()
        for key in da:
            va, vb = da[key], db[key]
            if isinstance(va, float) and isinstance(vb, float):
                assert va == pytest.approx(vb, rel=1e-12, abs=1e-300), (ra.label, key)
            else:
                assert va == vb, (ra.label, key)


@PROFILE
@given(st.integers(2, 5), st.integers(1, 7), st.integers(2, 5), st.integers(0, 10**6), st.data())
def test_merge_equals_one_chunk(B, T, N, seed, data):
    rng = np.random.default_rng(seed)
    z = torch.from_numpy(rng.normal(size=(B, T, N)).astype(np.float32) * 2)
    pad = torch.from_numpy(rng.random((B, T)) < 0.3)
    model = torch.from_numpy(rng.random((B, T, N)) < 0.4)
    cfgs = tuple(c for c in SEQ_CONFIGS if c.k <= N)
    cuts = sorted(data.draw(st.lists(st.integers(1, B - 1), min_size=1, max_size=2, unique=True)))
    parts = []
    for lo, hi in zip([0, *cuts], [*cuts, B], strict=True):
        p = CounterfactualPartial.empty(N, cfgs, lp_sample=0)
        p.update(z[lo:hi], padding_mask=pad[lo:hi], model_mask=model[lo:hi])
        parts.append(p)
    before = parts[0].result().to_dict()
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    assert parts[0].result().to_dict() == before  # merge does not mutate its inputs
    whole = counterfactual(z, cfgs, padding_mask=pad, model_mask=model, lp_sample=0)
    _same(merged.result(), whole)
    # Non-streaming check against the routers themselves.
    for rec in whole.records:
        route = reroute(z, rec.config, padding_mask=pad)
        assert rec.expert_counts.tolist() == route.tokens_per_expert.tolist()
        assert rec.dropped_tokens == route.dropped_tokens
        assert rec.pairs == int(route.mask.sum())


def test_merge_of_batch_coupled_scopes_equals_sequential_updates():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(3, 6, 4, generator=g), torch.randn(2, 6, 4, generator=g)
    cfgs = (RouterConfig("usmoe", 1, kbar=1.5, scope="batch"), RouterConfig("usmoe", 1, kbar=0.5, scope="position"))
    pa, pb = CounterfactualPartial.empty(4, cfgs, lp_sample=1), CounterfactualPartial.empty(4, cfgs, lp_sample=1)
    pa.update(a)
    pb.update(b)
    seq = CounterfactualPartial.empty(4, cfgs, lp_sample=2)
    seq.update(a)
    seq.update(b)
    m = pa.merge(pb).result()
    s = seq.result()
    for rm, rs in zip(m.records, s.records, strict=True):
        assert rm.expert_counts.tolist() == rs.expert_counts.tolist()
        assert rm.objective == pytest.approx(rs.objective, rel=1e-12)
        assert rm.groups == rs.groups and rm.lp_checked == 2  # each partial sampled one group
    assert m.updates == 2 and m["usmoe a=0.5 kbar=1.5 batch"].groups == 2
    assert m["usmoe a=0.5 kbar=0.5 pos"].groups == 12


def test_merge_rejects_incompatible_partials():
    cfgs = (RouterConfig("tc", 1),)
    p = CounterfactualPartial.empty(4, cfgs)
    with pytest.raises(InvalidParameter, match="num_experts"):
        p.merge(CounterfactualPartial.empty(5, cfgs))
    with pytest.raises(InvalidParameter, match="configs"):
        p.merge(CounterfactualPartial.empty(4, (RouterConfig("tc", 2),)))
    with pytest.raises(InvalidParameter, match="lp_max_pairs"):
        p.merge(CounterfactualPartial.empty(4, cfgs, lp_max_pairs=7))
    assert p.merge(CounterfactualPartial.empty(4, cfgs, lp_sample=3)).lp_sample == 3  # LP on some layers only
    q, r = CounterfactualPartial.empty(4, cfgs), CounterfactualPartial.empty(4, cfgs)
    q.update(torch.randn(3, 4))
    r.update(torch.randn(3, 4), score_function="sigmoid")
    with pytest.raises(InvalidParameter, match="score functions"):
        q.merge(r)
    with pytest.raises(InvalidParameter, match="score_function"):
        q.update(torch.randn(3, 4), score_function="sigmoid")


# ----------------------------------------------------------------------------- padding, scopes, certificates
def test_padding_is_excluded_and_never_selected():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(3, 7, 4, generator=g)
    lengths = [7, 4, 2]
    pad = torch.arange(7).unsqueeze(0) >= torch.tensor(lengths).unsqueeze(1)
    z_bad = z.clone()
    z_bad[pad] = float("nan")  # garbage in padded rows is ignored
    model = torch.zeros(3, 7, 4, dtype=torch.bool)
    model[..., 0] = True
    cfgs = tuple(c for c in SEQ_CONFIGS)
    padded = counterfactual(z_bad, cfgs, padding_mask=pad, model_mask=model, lp_sample=0)
    alone = CounterfactualPartial.empty(4, cfgs, lp_sample=0)
    for b, n in enumerate(lengths):
        alone.update(z[b, :n], model_mask=model[b, :n])
    _same(padded, alone.result())
    assert padded.tokens == sum(lengths)
    for c in cfgs:
        assert not reroute(z_bad, c, padding_mask=pad).mask[pad].any()


def test_position_and_batch_scopes_are_certified_per_group():
    g = torch.Generator().manual_seed(7)
    z = torch.randn(4, 9, 6, generator=g).bfloat16()
    pad = torch.zeros(4, 9, dtype=torch.bool)
    pad[1:, 7:] = True  # positions 7, 8 have one real token
    pad[:, 8] = True  # position 8 has none
    cfgs = [RouterConfig("usmoe", 2, kbar=kb, alpha=0.5, scope=sc) for sc in ("position", "batch")
            for kb in (0.5, 1.5, 2)]
    s = counterfactual(z, cfgs, padding_mask=pad, lp_sample=3)
    for rec in s.records:
        groups = 8 if rec.config.scope == "position" else 1
        assert rec.groups == rec.certified_total == rec.certified_optimal == groups
        assert rec.max_certificate_gap == 0.0
        assert rec.lp_checked == min(3, groups) and rec.max_lp_gap < 1e-9
    # position scope: c_t = round_half_up(kbar * real tokens at t); positions 0..6 have 4, position 7 one.
    rec = s["usmoe a=0.5 kbar=1.5 pos"]
    assert rec.pairs == 7 * 6 + 2


def test_lp_sample_skips_groups_above_lp_max_pairs():
    z = torch.randn(3, 8, 4, generator=torch.Generator().manual_seed(2))
    pad = torch.zeros(3, 8, dtype=torch.bool)
    pad[1, 2:] = True  # sequence 1 has 2 tokens = 8 pairs
    p = CounterfactualPartial.empty(4, [RouterConfig("tc", 1)], lp_sample=1, lp_max_pairs=10)
    p.update(z, padding_mask=pad)
    rec = p.result().records[0]
    assert (rec.lp_skipped, rec.lp_checked, rec.certified_total) == (1, 1, 3)


def test_sigmoid_score_function_normalises_per_token():
    z = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    s = counterfactual(z, [RouterConfig("tc", 6), RouterConfig("tc", 1)], score_function="sigmoid",
                       lp_sample=0)
    assert s["tc k=6"].coverage == pytest.approx(1.0, abs=1e-12)
    sig = 1 / (1 + np.exp(-z.numpy()))
    p = sig / sig.sum(-1, keepdims=True)
    assert s["tc k=1"].objective == pytest.approx(p.max(-1).sum(), rel=1e-12)
    assert s.score_function == "sigmoid"


# ----------------------------------------------------------------------------- configs and output
def test_default_configs_grid():
    cfgs = default_configs(2)
    assert [c.label for c in cfgs[:3]] == ["tc k=2", "ec cf=1", "captc cf=1.25"]
    kbars = sorted({c.kbar for c in cfgs if c.router == "usmoe"})
    assert 2.0 in kbars and any(kb != int(kb) for kb in kbars)
    assert {c.alpha for c in cfgs if c.router == "usmoe"} == {0.3, 0.5, 0.7}
    assert len({c.label for c in cfgs}) == len(cfgs)
    assert sorted({c.kbar for c in default_configs(1) if c.router == "usmoe"}) == [0.5, 1.0, 1.5]
    assert max(c.kbar for c in default_configs(2, num_experts=2) if c.router == "usmoe") == 2.0
    scoped = default_configs(1, alphas=(0.5,), kbars=(1,), scopes=("sequence", "batch", "position"))
    assert [c.label for c in scoped[3:]] == ["usmoe a=0.5 kbar=1 seq", "usmoe a=0.5 kbar=1 batch",
                                             "usmoe a=0.5 kbar=1 pos"]


def test_frame_and_dict_are_tidy_and_json_ready():
    z = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0)).bfloat16()
    cfgs = default_configs(2, num_experts=8)
    s = counterfactual(z, cfgs, lp_sample=0)
    df = s.to_frame()
    assert len(df) == len(cfgs) and list(df["label"]) == [c.label for c in cfgs]
    for col in ("router", "label", "k", "kbar", "alpha", "scope", "capacity_factor", "tokens", "realised_kbar",
                "objective", "coverage", "drop_rate", "agreement", "certified_optimal", "certified_total",
                "max_certificate_gap", "lp_checked", "max_lp_gap", "load_entropy", "maxvio", "gini", "cv"):
        assert col in df.columns, col
    json.dumps(s.to_dict(), allow_nan=False)
    assert set(s.expert_counts) == set(s.labels)
    assert all(h.shape == (9,) and h.sum() == 32 for h in s.experts_per_token.values())
    ec = s["ec cf=1"]  # EC gives every expert exactly e tokens: perfect balance
    assert (ec.balance["gini"], ec.balance["maxvio"]) == (0.0, 0.0)
    with pytest.raises(KeyError):
        s["nope"]


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"router": "topk", "k": 1}, "unknown router"),
    ({"router": "usmoe", "k": 1, "alpha": 1.5}, "alpha"),
    ({"router": "usmoe", "k": 1, "alpha": -0.1}, "alpha"),
    ({"router": "usmoe", "k": 1, "kbar": 0}, "kbar"),
    ({"router": "usmoe", "k": 1, "kbar": float("nan")}, "kbar"),
    ({"router": "usmoe", "k": 1, "scope": "layer"}, "scope"),
    ({"router": "tc", "k": 0}, "k"),
    ({"router": "tc", "k": 1, "alpha": 0.5}, "usmoe"),
    ({"router": "tc", "k": 1, "capacity_factor": 1.0}, "capacity_factor"),
    ({"router": "ec", "k": 1, "capacity_factor": 0}, "capacity_factor"),
    ({"router": "capacity_tc", "k": 1, "policy": "random"}, "policy"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(InvalidParameter, match=match):
        RouterConfig(**kwargs)


def test_bad_inputs():
    z = torch.randn(2, 5, 4)
    with pytest.raises(InvalidParameter, match="kbar"):
        CounterfactualPartial.empty(4, [RouterConfig("usmoe", 1, kbar=4.5)])
    with pytest.raises(InvalidParameter, match="kbar"):
        reroute(z, RouterConfig("usmoe", 1, kbar=5))
    with pytest.raises(InvalidParameter, match="k = 5"):
        CounterfactualPartial.empty(4, [RouterConfig("tc", 5)])
    with pytest.raises(InvalidParameter, match="label"):
        CounterfactualPartial.empty(4, [RouterConfig("tc", 1), RouterConfig("tc", 1)])
    with pytest.raises(InvalidParameter, match="empty"):
        CounterfactualPartial.empty(4, [])
    p = CounterfactualPartial.empty(4, [RouterConfig("tc", 1)])
    with pytest.raises(ShapeMismatch, match="model_mask"):
        p.update(z, model_mask=torch.zeros(2, 5, 3, dtype=torch.bool))
    with pytest.raises(ShapeMismatch, match="model_mask"):
        p.update(z, model_mask=torch.zeros(5, 4, dtype=torch.bool))
    with pytest.raises(InvalidParameter, match="model_mask"):
        p.update(z, model_mask=torch.full((2, 5, 4), 2))
    bad = z.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(InvalidScores, match=r"NaN.*\(1, 2, 3\)"):
        p.update(bad)
    with pytest.raises(InvalidScores):
        reroute(bad, RouterConfig("tc", 1))
    with pytest.raises(ShapeMismatch, match="N = 3"):
        p.update(torch.randn(5, 3))
    with pytest.raises(ShapeMismatch, match="padding_mask"):
        p.update(z, padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(InvalidScores, match="shape"):
        p.update(torch.randn(4))
    with pytest.raises(InvalidParameter, match="score_function"):
        p.update(z, score_function="relu")
    assert p.result().tokens == 0  # nothing was accumulated by the failed updates


@pytest.mark.parametrize("router", ["tc", "ec", "usmoe"])
def test_certificate_catches_a_non_optimal_selection(monkeypatch, router):
    """Spoil one router decision in sequence 1: exactly that group fails, with the exact gap."""
    from usmoe_lp.diagnostics import counterfactual as cf

    z = torch.from_numpy(np.random.default_rng(1).normal(size=(3, 6, 4)) * 2)
    real = cf.route_scores
    swapped = {}

    def spoiled(config, scores, ctx, pad, state=None):
        r = real(config, scores, ctx, pad, state)
        m = r.mask.clone()
        t = 0 if router != "ec" else int(torch.nonzero(m[1, :, 0])[0, 0])
        if router == "ec":  # expert 0 swaps a chosen token for an unchosen one (column count kept)
            u = int(torch.nonzero(~m[1, :, 0])[0, 0])
            m[1, t, 0], m[1, u, 0] = False, True
            swapped["gap"] = float(scores[1, t, 0] - scores[1, u, 0])
        else:  # token 0 swaps a chosen expert for an unchosen one (row and group counts kept)
            e_in, e_out = int(torch.nonzero(m[1, t])[0, 0]), int(torch.nonzero(~m[1, t])[0, 0])
            m[1, t, e_in], m[1, t, e_out] = False, True
            swapped["gap"] = float(scores[1, t, e_in] - scores[1, t, e_out])
        return Routing(mask=m, weights=torch.where(m, scores, 0.0), router=r.router, params=r.params,
                       token_mask=r.token_mask)

    monkeypatch.setattr(cf, "route_scores", spoiled)
    cfg = {"tc": RouterConfig("tc", 2), "ec": RouterConfig("ec", 2),
           "usmoe": RouterConfig("usmoe", 2, kbar=2, alpha=0.5)}[router]
    rec = counterfactual(z, [cfg], lp_sample=3).records[0]
    assert (rec.certified_optimal, rec.certified_total) == (2, 3)
    assert swapped["gap"] > 0
    assert rec.max_certificate_gap == pytest.approx(swapped["gap"], abs=1e-12)
    assert rec.max_lp_gap == pytest.approx(swapped["gap"], abs=1e-9)


def test_a_router_without_a_program_reports_no_certificate(monkeypatch):
    """problem=None: the record says so (certificate None, no counts, no LP) instead of faking one."""
    import dataclasses

    from usmoe_lp.routers import config as router_config

    table = dict(router_config.ROUTERS)
    table["tc"] = dataclasses.replace(table["tc"], problem=None)
    monkeypatch.setattr(router_config, "ROUTERS", table)
    s = counterfactual(torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(3)), [RouterConfig("tc", 1)],
                       lp_sample=3)
    rec = s.records[0]
    assert rec.certificate is None and rec.certified_total is None and rec.certified_optimal is None
    assert rec.lp_checked == 0 and rec.max_lp_gap is None and rec.max_certificate_gap is None
    assert rec.pairs == 10 and rec.groups == 2
    d = s.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["configs"][0]["certificate"] is None and d["configs"][0]["certified_total"] is None


def test_parameter_columns_are_the_union_over_routers():
    s = counterfactual(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)),
                       [RouterConfig("tc", 1), RouterConfig("capacity_tc", 1, policy="priority"),
                        RouterConfig("usmoe", 1, kbar=1.5)], lp_sample=0)
    df = s.to_frame()
    assert s.param_names == ("capacity_factor", "policy", "scope", "kbar", "alpha")
    tc, captc, usm = (df.iloc[i] for i in range(3))
    assert tc[["capacity_factor", "policy", "scope", "kbar", "alpha"]].isna().all()
    assert (captc["capacity_factor"], captc["policy"]) == (1.25, "priority") and captc[["scope", "kbar"]].isna().all()
    assert (usm["scope"], usm["kbar"], usm["alpha"]) == ("sequence", 1.5, 0.5) and usm[["policy"]].isna().all()
    assert list(df["group"]) == ["token", "sequence", "sequence"] and list(df["exact"]) == [True, False, True]
    assert all(set(c) >= {"capacity_factor", "policy", "scope", "kbar", "alpha"} for c in s.to_dict()["configs"])
