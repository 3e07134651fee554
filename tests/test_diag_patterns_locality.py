"""Locality: expert reuse and LRU hit rates against a plain per-sequence LRU simulation (OrderedDict), for every
cache size and any cut of the log into ranges merged in tree order."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usmoe_lp.cluster import tree_merge
from usmoe_lp.diagnostics.locality import LocalityPartial
from usmoe_lp.diagnostics.routed import Routed
from usmoe_lp.errors import InvalidScores, ShapeMismatch


def make(ranked, N, seq, pos=None):
    seq = np.asarray(seq, dtype=np.int64)
    if pos is None:
        pos = np.zeros(seq.size, dtype=np.int64)
        for s in np.unique(seq):
            pos[seq == s] = np.arange(int((seq == s).sum()))
    ranked = np.asarray(ranked, dtype=np.int64)
    return Routed(ranked if ranked.ndim == 2 else ranked.reshape(seq.size, -1), N, token_ids=np.zeros(seq.size, int),
                  sequence_ids=seq, positions=pos)


def random_log(rng, n, N, k, n_seq, holes=0.15, sticky=0.5):
    """Ranked selections with some locality: each token keeps each expert of its sequence's previous token with
    probability ``sticky`` (then fills up at random); -1 holes; sequences interleaved at random."""
    seq = rng.integers(0, n_seq, n)
    prev: dict[int, list[int]] = {}
    ranked = np.full((n, k), -1, dtype=np.int64)
    for t in range(n):
        keep = [e for e in prev.get(int(seq[t]), []) if rng.random() < sticky][:k]
        rest = [int(e) for e in rng.permutation(N) if e not in keep][: k - len(keep)]
        row = list(rng.permutation(keep + rest))
        row = [e if rng.random() >= holes else -1 for e in row]
        ranked[t] = row
        prev[int(seq[t])] = [e for e in row if e >= 0]
    return make(ranked, N, seq)


def oracle(r: Routed):
    """(hits per m = 1..N, accesses, reuse rate, pairs, skipped, baseline) by direct simulation."""
    N = r.num_experts
    hits = np.zeros(N, dtype=np.int64)
    accesses = 0
    for m in range(1, N + 1):
        caches: dict[int, OrderedDict] = {}
        for t in range(r.num_tokens):
            cache = caches.setdefault(int(r.sequence_ids[t]), OrderedDict())
            sel = [int(e) for e in r.ranked[t] if e >= 0]
            hits[m - 1] += sum(e in cache for e in sel)
            if m == 1:
                accesses += len(sel)
            for e in reversed(sel):  # ranked[t, 0] ends up the most recent
                cache[e] = None
                cache.move_to_end(e)
            while len(cache) > m:
                cache.popitem(last=False)
    ratios, skipped, last = [], 0, {}
    for t in range(r.num_tokens):
        s = int(r.sequence_ids[t])
        cur = {int(e) for e in r.ranked[t] if e >= 0}
        if s in last:
            if cur:
                ratios.append(len(cur & last[s]) / len(cur))
            else:
                skipped += 1
        last[s] = cur
    c = np.zeros(N)
    for row in r.ranked:
        for e in row[row >= 0]:
            c[e] += 1
    baseline = (c**2).sum() / (r.num_tokens * c.sum()) if c.sum() else math.nan
    return hits, accesses, (np.mean(ratios) if ratios else math.nan), len(ratios), skipped, baseline


def cut(r: Routed, lo: int, hi: int) -> Routed:
    return Routed(r.ranked[lo:hi], r.num_experts, token_ids=r.token_ids[lo:hi], sequence_ids=r.sequence_ids[lo:hi],
                  positions=r.positions[lo:hi])


def check(stats, r):
    hits, accesses, rate, pairs, skipped, baseline = oracle(r)
    assert stats.accesses == accesses
    assert (np.cumsum(stats.recency_histogram) == hits).all()
    if accesses:
        assert np.allclose(stats.lru_hit_rate, hits / accesses, rtol=0, atol=1e-15)
        assert stats.cold_misses == accesses - hits[-1]
    else:
        assert np.isnan(stats.lru_hit_rate).all()
    assert stats.reuse_pairs == pairs and stats.reuse_skipped == skipped
    assert (math.isnan(rate) and math.isnan(stats.expert_reuse_rate)) or stats.expert_reuse_rate == pytest.approx(
        rate, rel=1e-12)
    assert (math.isnan(baseline) and math.isnan(stats.reuse_baseline)) or stats.reuse_baseline == pytest.approx(
        baseline, rel=1e-12)


def test_hand_computed_sequence():
    # one sequence, N = 4: tokens [0,1], [1,2], [0,-], [3,0]
    r = make([[0, 1], [1, 2], [0, -1], [3, 0]], 4, [0, 0, 0, 0])
    p = LocalityPartial.empty(4)
    p.update(r)
    s = p.result()
    # recency before each token: t1: 0,1 -> 1 at rank 1, 2 cold; t2: 1,2,0 -> 0 at rank 2; t3: 0,1,2 -> 3 cold, 0 rank 0
    assert s.recency_histogram.tolist() == [1, 1, 1, 0] and s.cold_misses == 4 and s.accesses == 7
    assert s.lru_hit_rate.tolist() == [1 / 7, 2 / 7, 3 / 7, 3 / 7]
    assert s.expert_reuse_rate == pytest.approx((1 / 2 + 0 + 1 / 2) / 3)
    check(s, r)


def test_partial_matches_the_simulation_on_a_long_interleaved_log():
    rng = np.random.default_rng(3)
    r = random_log(rng, 3000, 12, 3, n_seq=7)
    p = LocalityPartial.empty(12)
    p.update(r)
    check(p.result(), r)
    assert p.result().sequences == 7


def test_block_boundaries_inside_a_chunk(monkeypatch):
    import usmoe_lp.diagnostics.locality as loc

    monkeypatch.setattr(loc, "_BLOCK", 7)
    monkeypatch.setattr(loc, "_PAIR_CELLS", 1)
    rng = np.random.default_rng(4)
    r = random_log(rng, 200, 6, 3, n_seq=4)
    parts = []
    for lo in range(0, 200, 37):
        p = LocalityPartial.empty(6)
        p.update(cut(r, lo, min(200, lo + 37)))
        parts.append(p)
    check(tree_merge(parts).result(), r)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 80), N=st.integers(1, 7), k=st.integers(0, 4),
       n_seq=st.integers(1, 4), cuts=st.lists(st.integers(0, 80), max_size=6), chunked=st.booleans())
def test_every_cut_merged_in_tree_order_matches_the_simulation(seed, n, N, k, n_seq, cuts, chunked):
    rng = np.random.default_rng(seed)
    r = random_log(rng, n, N, min(k, N), n_seq)
    edges = sorted({0, n, *[c % (n + 1) for c in cuts]})
    ranges = list(zip(edges[:-1], edges[1:], strict=True))
    if chunked:  # one partial fed chunk by chunk
        p = LocalityPartial.empty(N)
        for lo, hi in ranges:
            p.update(cut(r, lo, hi))
        merged = p
    else:
        parts = []
        for lo, hi in ranges:
            p = LocalityPartial.empty(N)
            p.update(cut(r, lo, hi))
            parts.append(p)
        merged = tree_merge(parts) if parts else LocalityPartial.empty(N)
    check(merged.result(), r)


def test_merge_does_not_modify_its_inputs():
    rng = np.random.default_rng(5)
    r = random_log(rng, 60, 5, 2, n_seq=2)
    a, b = LocalityPartial.empty(5), LocalityPartial.empty(5)
    a.update(cut(r, 0, 30))
    b.update(cut(r, 30, 60))
    before = {k: np.copy(v) for k, v in {**a.__dict__}.items()}
    a.merge(b)
    a.merge(b)
    for k, v in before.items():
        assert np.array_equal(getattr(a, k), v)


def test_independent_balanced_selections_reuse_at_k_over_n():
    rng = np.random.default_rng(6)
    n, N, k = 20_000, 16, 4
    r = make(np.argsort(rng.random((n, N)), axis=1)[:, :k], N, np.zeros(n, int))
    p = LocalityPartial.empty(N)
    p.update(r)
    s = p.result()
    assert s.reuse_baseline == pytest.approx(k / N, rel=0.01)
    assert s.expert_reuse_rate == pytest.approx(k / N, abs=0.01)
    assert s.lru_hit_rate[k - 1] == pytest.approx(k / N, abs=0.01)   # a cache of the last token's experts
    assert s.lru_hit_rate[-1] == pytest.approx(1.0, abs=1e-3)        # only N cold misses


def test_empty_and_errors():
    s = LocalityPartial.empty(3).result()
    assert s.accesses == 0 and math.isnan(s.expert_reuse_rate) and math.isnan(s.reuse_baseline)
    assert s.to_dict()["lru_hit_rate"] == [None] * 3
    p = LocalityPartial.empty(3)
    p.update(make(np.zeros((0, 2)), 3, []))
    p.update(make([[-1, -1], [-1, -1]], 3, [0, 0]))
    s = p.result()
    assert s.tokens == 2 and s.accesses == 0 and s.reuse_skipped == 1 and math.isnan(s.reuse_baseline)
    with pytest.raises(ShapeMismatch, match="N = 4"):
        p.update(make([[0]], 4, [0]))
    with pytest.raises(InvalidScores, match="positions of sequence 0"):
        p.update(make([[0, 1]], 3, [0], pos=[1]))
