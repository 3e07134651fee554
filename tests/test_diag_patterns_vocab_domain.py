"""Vocabulary and domain specialisation against loops over tokens (dicts of counts)."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usmoe_lp.cluster import tree_merge
from usmoe_lp.diagnostics.domain import DomainPartial
from usmoe_lp.diagnostics.routed import Routed
from usmoe_lp.diagnostics.vocab import VocabPartial, merge_sparse_counts
from usmoe_lp.errors import InvalidParameter, InvalidScores, ShapeMismatch


def make(ranked, N, token_ids, domains=None):
    ranked = np.asarray(ranked, dtype=np.int64)
    n = ranked.shape[0]
    return Routed(ranked, N, token_ids=token_ids, sequence_ids=np.zeros(n, int), positions=np.arange(n),
                  domains=domains)


def random_chunk(rng, n, N, k, vocab, n_dom=3):
    ranked = np.argsort(rng.random((n, N)), axis=1)[:, :k]
    ranked[rng.random((n, k)) < 0.15] = -1
    # token ids with a preferred expert, so specialisation is not trivial
    ids = rng.integers(-1, vocab, n)
    pref = (ids * 7) % N
    swap = (rng.random(n) < 0.6) & (ranked[:, 0] >= 0) & ~(ranked == pref[:, None]).any(1)
    ranked[swap, 0] = pref[swap]
    return make(ranked, N, ids, rng.integers(-1, n_dom, n))


def cut(r, lo, hi):
    return make(r.ranked[lo:hi], r.num_experts, r.token_ids[lo:hi], r.domains[lo:hi])


def brute_vocab(r: Routed, min_count: int):
    N = r.num_experts
    per_id: dict[int, Counter] = defaultdict(Counter)
    unknown = no_expert = 0
    for t in range(r.num_tokens):
        v = int(r.token_ids[t])
        top = [int(e) for e in r.ranked[t] if e >= 0]
        if v < 0:
            unknown += 1
            continue
        if not top:
            no_expert += 1
            continue
        per_id[v][top[0]] += 1
    specs, weights, fav = [], [], []
    for v in sorted(per_id):
        n_v = sum(per_id[v].values())
        if n_v < min_count:
            continue
        best = max(per_id[v].values())
        specs.append(best / n_v)
        weights.append((best, n_v))
        fav.append(min(e for e, c in per_id[v].items() if c == best))
    per_expert: dict[int, Counter] = defaultdict(Counter)
    for v, cnt in per_id.items():
        for e, c in cnt.items():
            per_expert[e][v] += c
    ent = []
    for e in range(N):
        tot = sum(per_expert[e].values())
        ent.append(-sum(c / tot * math.log(c / tot) for c in per_expert[e].values()) if tot else math.nan)
    all_ids = Counter({v: sum(c.values()) for v, c in per_id.items()})
    tot = sum(all_ids.values())
    token_h = -sum(c / tot * math.log(c / tot) for c in all_ids.values()) if tot else math.nan
    return dict(specs=specs, weights=weights, fav=fav, unknown=unknown, no_expert=no_expert, vocab=len(per_id),
                ent=ent, token_h=token_h, usable=tot)


def nan_equal(a, b, rel=1e-12):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return bool((np.isnan(a) == np.isnan(b)).all() and np.allclose(a[~np.isnan(a)], b[~np.isnan(b)], rtol=rel,
                                                                     atol=1e-15))


# ----------------------------------------------------------------------------- vocabulary
def test_vocab_matches_brute_force():
    rng = np.random.default_rng(10)
    r = random_chunk(rng, 2000, 6, 2, vocab=40)
    p = VocabPartial.empty(6, min_count=48)
    p.update(r)
    s = p.result()
    o = brute_vocab(r, 48)
    assert (s.unknown_tokens, s.no_expert_tokens, s.vocab_size, s.usable_tokens) == (o["unknown"], o["no_expert"],
                                                                                     o["vocab"], o["usable"])
    assert s.tokens == 2000 and s.usable_tokens + s.unknown_tokens + s.no_expert_tokens == 2000
    assert 0 < s.eligible_ids == len(o["specs"]) < s.vocab_size
    assert s.specialisation == pytest.approx(np.mean(o["specs"]), rel=1e-12)
    assert s.specialisation_weighted == pytest.approx(sum(b for b, _ in o["weights"]) / sum(n for _, n in o["weights"]))
    assert s.eligible_tokens == sum(n for _, n in o["weights"])
    assert s.expert_ids.tolist() == np.bincount(o["fav"], minlength=6).tolist()
    want = [np.mean([sp for sp, f in zip(o["specs"], o["fav"], strict=True) if f == e]) if e in o["fav"] else math.nan
            for e in range(6)]
    assert nan_equal(s.expert_specialisation, want)
    assert nan_equal(s.expert_token_entropy, o["ent"], rel=1e-10)
    assert nan_equal(s.expert_token_entropy_normalised, np.array(o["ent"]) / math.log(o["vocab"]), rel=1e-10)
    assert s.token_entropy == pytest.approx(o["token_h"], rel=1e-10)


def test_vocab_hand_cases():
    # every id always to one expert: specialisation 1; ties go to the lowest expert
    p = VocabPartial.empty(3, min_count=2)
    p.update(make([[1], [1], [2], [2], [0], [2]], 3, [4, 4, 9, 9, 7, 7]))
    s = p.result()
    assert s.specialisation == pytest.approx((1 + 1 + 0.5) / 3) and s.expert_ids.tolist() == [1, 1, 1]
    assert s.expert_specialisation.tolist() == [0.5, 1.0, 1.0]
    # an expert receiving one id only has entropy 0
    assert s.expert_token_entropy[1] == 0.0
    # unknown ids and no-expert tokens are left out
    p = VocabPartial.empty(3, min_count=1)
    p.update(make([[0], [-1], [1]], 3, [-1, 5, 5]))
    s = p.result()
    assert (s.unknown_tokens, s.no_expert_tokens, s.usable_tokens, s.specialisation) == (1, 1, 1, 1.0)


def test_vocab_empty_large_ids_and_errors():
    s = VocabPartial.empty(4).result()
    assert s.vocab_size == 0 and math.isnan(s.specialisation) and math.isnan(s.token_entropy)
    assert s.to_dict()["specialisation"] is None
    p = VocabPartial.empty(256, min_count=1)
    p.update(make([[255], [3]], 256, [150_000, 2**40]))  # large ids: sparse keys, no dense array
    assert p.keys.tolist() == [150_000 * 256 + 255, 2**40 * 256 + 3] and p.result().vocab_size == 2
    p.update(make(np.zeros((2, 0)), 256, [1, 2]))
    assert p.result().no_expert_tokens == 2
    with pytest.raises(InvalidScores, match="int64"):
        p.update(make([[0]], 256, [2**62]))
    with pytest.raises(ShapeMismatch):
        p.merge(VocabPartial.empty(256, min_count=2))


def test_merge_sparse_counts_sums_repeated_keys():
    k, c = merge_sparse_counts(np.array([1, 5]), np.array([2, 3]), np.array([5, 0, 5]), np.array([1, 1, 1]))
    assert k.tolist() == [0, 1, 5] and c.tolist() == [1, 2, 5]


# ----------------------------------------------------------------------------- domains
def test_domain_matches_brute_force():
    rng = np.random.default_rng(11)
    r = random_chunk(rng, 1500, 5, 3, vocab=10, n_dom=3)
    names = ("arxiv", "github", "web")
    p = DomainPartial.empty(5, names)
    p.update(r)
    s = p.result()
    counts = np.zeros((3, 5), dtype=np.int64)
    tokens = np.zeros(3, dtype=np.int64)
    for t in range(r.num_tokens):
        d = int(r.domains[t])
        if d < 0:
            continue
        tokens[d] += 1
        for e in r.ranked[t]:
            if e >= 0:
                counts[d, e] += 1
    assert (s.counts == counts).all() and (s.domain_tokens == tokens).all()
    assert s.unlabelled_tokens == int((r.domains < 0).sum()) and s.tokens == tokens.sum()
    q = counts.sum(0) / counts.sum()
    for d in range(3):
        k_d = counts[d].sum() / tokens[d]
        assert s.experts_per_token[d] == pytest.approx(k_d)
        for e in range(5):
            assert s.share[d, e] == pytest.approx(k_d * counts[d, e] / counts[d].sum())
        qd = counts[d] / counts[d].sum()
        assert s.tv_distance[d] == pytest.approx(0.5 * np.abs(qd - q).sum())
        assert s.max_share_ratio[d] == pytest.approx(s.share[d].max() / (k_d / 5))
        assert s.uniform_share[d] == pytest.approx(k_d / 5)
    assert s.mean_tv_distance == pytest.approx(s.tv_distance.mean())
    assert s.to_dict()["domain_names"] == list(names)


def test_domain_hand_cases_and_errors():
    # identical use in both domains: TV 0; a domain with no token: NaN
    p = DomainPartial.empty(2, ("a", "b", "c"))
    p.update(make([[0, 1], [0, 1]], 2, [0, 0], domains=[0, 1]))
    s = p.result()
    assert s.tv_distance[:2].tolist() == [0.0, 0.0] and math.isnan(s.tv_distance[2])
    assert s.share[0].tolist() == [1.0, 1.0] and s.uniform_share[0] == 1.0 and s.max_share_ratio[0] == 1.0
    assert s.to_dict()["tv_distance"] == [0.0, 0.0, None]
    with pytest.raises(InvalidParameter, match="domains="):
        p.update(make([[0]], 2, [0]))
    with pytest.raises(InvalidScores, match="only 3 domain names"):
        p.update(make([[0]], 2, [0], domains=[3]))
    with pytest.raises(InvalidParameter, match="distinct"):
        DomainPartial.empty(2, ("a", "a"))
    empty = DomainPartial.empty(2, ("a",)).result()
    assert empty.tokens == 0 and math.isnan(empty.mean_tv_distance)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 80), cuts=st.lists(st.integers(0, 80), max_size=5))
def test_vocab_and_domain_are_invariant_to_cuts(seed, n, cuts):
    rng = np.random.default_rng(seed)
    r = random_chunk(rng, n, 4, 2, vocab=6)
    edges = sorted({0, n, *[c % (n + 1) for c in cuts]})
    pv, pd = [], []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        v, d = VocabPartial.empty(4, min_count=2), DomainPartial.empty(4, ("x", "y", "z"))
        v.update(cut(r, lo, hi))
        d.update(cut(r, lo, hi))
        pv.append(v)
        pd.append(d)
    wv, wd = VocabPartial.empty(4, min_count=2), DomainPartial.empty(4, ("x", "y", "z"))
    wv.update(r)
    wd.update(r)
    mv, md = (tree_merge(pv), tree_merge(pd)) if pv else (wv, wd)
    assert mv.keys.tolist() == wv.keys.tolist() and mv.counts.tolist() == wv.counts.tolist()
    assert mv.result().to_dict() == wv.result().to_dict()
    assert md.result().to_dict() == wd.result().to_dict()
