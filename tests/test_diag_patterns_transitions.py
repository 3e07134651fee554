"""Layer transitions: the joint distribution and its mutual information against exact loops over tokens."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usmoe_lp.cluster import tree_merge
from usmoe_lp.diagnostics.routed import Routed
from usmoe_lp.diagnostics.transitions import TransitionPartial
from usmoe_lp.errors import ShapeMismatch


def routed(ranked, N, n=None):
    ranked = np.asarray(ranked, dtype=np.int64)
    n = ranked.shape[0]
    return Routed(ranked, N, token_ids=np.zeros(n, int), sequence_ids=np.zeros(n, int), positions=np.arange(n))


def random_ranked(rng, n, N, kmax, holes=0.2):
    k = min(kmax, N)
    r = np.argsort(rng.random((n, N)), axis=1)[:, :k]
    r[rng.random((n, k)) < holes] = -1
    return r


def brute(a: Routed, b: Routed):
    """Exact joint (Fractions), tokens, skipped, MI (float from the exact joint), top-1 counts."""
    Na, Nb = a.num_experts, b.num_experts
    joint = [[Fraction(0)] * Nb for _ in range(Na)]
    used = skipped = 0
    top1 = np.zeros((Na, Nb), dtype=np.int64)
    for t in range(a.num_tokens):
        sa = [int(e) for e in a.ranked[t] if e >= 0]
        sb = [int(e) for e in b.ranked[t] if e >= 0]
        if sa and sb:
            top1[sa[0], sb[0]] += 1
        if not sa or not sb:
            skipped += 1
            continue
        used += 1
        for e in sa:
            for f in sb:
                joint[e][f] += Fraction(1, len(sa) * len(sb))
    if used:
        joint = [[x / used for x in row] for row in joint]
    return joint, used, skipped, top1


def mi_of(p):
    p = np.asarray(p, dtype=float)
    pa, pb = p.sum(1), p.sum(0)
    mi = sum(p[i, j] * math.log(p[i, j] / (pa[i] * pb[j])) for i in range(p.shape[0]) for j in range(p.shape[1])
             if p[i, j] > 0)
    ha = -sum(x * math.log(x) for x in pa if x > 0)
    hb = -sum(x * math.log(x) for x in pb if x > 0)
    return mi, ha, hb


def test_matches_exact_loops():
    rng = np.random.default_rng(7)
    a, b = routed(random_ranked(rng, 400, 5, 3), 5), routed(random_ranked(rng, 400, 4, 2), 4)
    p = TransitionPartial.empty(5, 4)
    p.update(a, b)
    s = p.result()
    joint, used, skipped, top1 = brute(a, b)
    assert s.tokens == used and s.skipped_tokens == skipped and used + skipped == 400
    assert np.allclose(s.joint, np.array(joint, dtype=float), rtol=1e-14, atol=0)
    mi, ha, hb = mi_of(np.array(joint, dtype=float))
    assert s.mutual_information == pytest.approx(mi, rel=1e-10, abs=1e-15)
    assert (s.entropy_a, s.entropy_b) == (pytest.approx(ha, rel=1e-12), pytest.approx(hb, rel=1e-12))
    assert s.mi_normalised == pytest.approx(mi / min(ha, hb), rel=1e-10)
    assert (s.top1_joint == top1).all() and s.top1_tokens == top1.sum()
    mi1, ha1, hb1 = mi_of(top1 / top1.sum())
    assert s.top1_mutual_information == pytest.approx(mi1, rel=1e-10)
    assert s.top1_mi_normalised == pytest.approx(mi1 / min(ha1, hb1), rel=1e-10)


def test_deterministic_map_gives_mi_equal_to_entropy():
    rng = np.random.default_rng(8)
    ea = rng.integers(0, 6, 500)
    perm = np.array([3, 5, 0, 1, 4, 2])
    p = TransitionPartial.empty(6, 6)
    p.update(routed(ea[:, None], 6), routed(perm[ea][:, None], 6))
    s = p.result()
    counts = np.bincount(ea, minlength=6) / 500
    h = -sum(x * math.log(x) for x in counts if x > 0)
    assert s.mutual_information == pytest.approx(h, rel=1e-12) and s.mi_normalised == pytest.approx(1.0, rel=1e-12)
    assert s.top1_mutual_information == pytest.approx(h, rel=1e-12)
    # blocks: layer a picks a pair in {0,1} or {2,3}, layer b the matching pair: I = H(block) = log 2
    blk = rng.integers(0, 2, 400)
    p = TransitionPartial.empty(4, 4)
    p.update(routed(np.stack([2 * blk, 2 * blk + 1], 1), 4), routed(np.stack([2 * blk + 1, 2 * blk], 1), 4))
    assert p.result().mutual_information == pytest.approx(-sum(x * math.log(x) for x in np.bincount(blk) / 400))


def test_independent_layers_give_mi_near_zero():
    rng = np.random.default_rng(9)
    n, N = 50_000, 8
    p = TransitionPartial.empty(N, N)
    p.update(routed(random_ranked(rng, n, N, 2, holes=0), N), routed(random_ranked(rng, n, N, 2, holes=0), N))
    s = p.result()
    assert 0 <= s.mutual_information < 5 * (N - 1) ** 2 / (2 * n)  # plug-in bias ~ (N-1)^2 / 2T
    assert s.top1_mutual_information < 5 * (N - 1) ** 2 / (2 * n)


def test_empty_skipped_and_errors():
    s = TransitionPartial.empty(3, 2).result()
    assert s.tokens == 0 and math.isnan(s.mutual_information) and math.isnan(s.top1_mutual_information)
    assert s.to_dict()["mutual_information"] is None and "joint" not in s.to_dict()
    p = TransitionPartial.empty(3, 2)
    p.update(routed([[-1], [0], [1]], 3), routed([[0], [-1], [1]], 2))
    s = p.result()
    assert s.tokens == 1 and s.skipped_tokens == 2 and s.mutual_information == 0.0 and math.isnan(s.mi_normalised)
    p.update(routed(np.zeros((0, 0)), 3), routed(np.zeros((0, 2)), 2))
    with pytest.raises(ShapeMismatch, match="same tokens"):
        p.update(routed([[0]], 3), routed([[0], [1]], 2))
    other = Routed(np.array([[0]]), 2, token_ids=[0], sequence_ids=[4], positions=[0])
    with pytest.raises(ShapeMismatch, match="same tokens"):
        p.update(routed([[0]], 3), other)
    with pytest.raises(ShapeMismatch, match="N = 2 and 2"):
        p.update(routed([[0]], 2), routed([[0]], 2))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 60), cuts=st.lists(st.integers(0, 60), max_size=5))
def test_cuts_merged_in_tree_order_give_the_same_bits(seed, n, cuts):
    rng = np.random.default_rng(seed)
    a, b = random_ranked(rng, n, 4, 3), random_ranked(rng, n, 5, 2)
    whole = TransitionPartial.empty(4, 5)
    whole.update(routed(a, 4), routed(b, 5))
    edges = sorted({0, n, *[c % (n + 1) for c in cuts]})
    parts = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        p = TransitionPartial.empty(4, 5)
        p.update(routed(a[lo:hi], 4), routed(b[lo:hi], 5))
        parts.append(p)
    x, y = whole.result(), (tree_merge(parts) if parts else TransitionPartial.empty(4, 5)).result()
    assert np.array_equal(x.joint, y.joint) and (x.tokens, x.skipped_tokens) == (y.tokens, y.skipped_tokens)
    assert x.mutual_information == y.mutual_information or (math.isnan(x.mutual_information)
                                                             and math.isnan(y.mutual_information))
