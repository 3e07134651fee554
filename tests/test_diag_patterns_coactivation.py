"""Routed (validation, from_mask) and the co-activation partial against loops over tokens."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usmoe_lp.cluster import tree_merge
from usmoe_lp.diagnostics.coactivation import CoactivationPartial
from usmoe_lp.diagnostics.partial import Partial
from usmoe_lp.diagnostics.routed import Routed
from usmoe_lp.errors import InvalidParameter, InvalidScores, ShapeMismatch


def random_routed(rng, n, N, k, n_seq=3, holes=0.1):
    """n tokens of k distinct experts each (a share ``holes`` of slots -1), sequences interleaved at random."""
    ranked = np.argsort(rng.random((n, N)), axis=1)[:, :k].astype(np.int64)
    ranked[rng.random((n, k)) < holes] = -1
    seq = rng.integers(0, n_seq, n)
    pos = np.zeros(n, dtype=np.int64)
    for s in range(n_seq):
        pos[seq == s] = np.arange(int((seq == s).sum()))
    return Routed(ranked, N, token_ids=rng.integers(-1, 5, n), sequence_ids=seq, positions=pos)


def cut(r: Routed, lo: int, hi: int) -> Routed:
    dom = None if r.domains is None else r.domains[lo:hi]
    return Routed(r.ranked[lo:hi], r.num_experts, token_ids=r.token_ids[lo:hi], sequence_ids=r.sequence_ids[lo:hi],
                  positions=r.positions[lo:hi], domains=dom)


def brute_coactivation(r: Routed):
    N = r.num_experts
    C = np.zeros((N, N), dtype=np.int64)
    for row in r.ranked:
        sel = sorted(int(e) for e in row if e >= 0)
        for e in sel:
            C[e, e] += 1
        for i, j in itertools.combinations(sel, 2):
            C[i, j] += 1
            C[j, i] += 1
    return C


# ----------------------------------------------------------------------------- Routed
def test_routed_compacts_empty_slots_and_builds_masks():
    r = Routed(np.array([[-1, 3, -1, 1], [-1, -1, -1, -1]]), 4, token_ids=[1, 2], sequence_ids=[0, 0],
               positions=[0, 1])
    assert r.ranked.tolist() == [[3, 1, -1, -1], [-1, -1, -1, -1]]
    assert r.mask().astype(int).tolist() == [[0, 1, 0, 1], [0, 0, 0, 0]]


@pytest.mark.parametrize("kwargs, err, words", [
    (dict(ranked=np.array([[0, 4]])), InvalidScores, "[-1, 4)"),
    (dict(ranked=np.array([[1, 1]])), InvalidScores, "twice"),
    (dict(ranked=np.array([0, 1])), ShapeMismatch, "(n, k)"),
    (dict(ranked=np.array([[0.5, 1]])), InvalidScores, "integer"),
    (dict(token_ids=[1, 2]), ShapeMismatch, "token_ids"),
    (dict(sequence_ids=[-1]), InvalidScores, "sequence_ids must be >= 0"),
    (dict(token_ids=[-2]), InvalidScores, "token_ids must be >= -1"),
    (dict(num_experts=0), InvalidParameter, "num_experts"),
])
def test_routed_rejects_bad_input(kwargs, err, words):
    args = dict(ranked=np.array([[0, 1]]), num_experts=4, token_ids=[1], sequence_ids=[0], positions=[0])
    args.update(kwargs)
    with pytest.raises(err, match=None) as info:
        Routed(**args)
    assert words in str(info.value)


def test_routed_rejects_positions_going_back_within_a_sequence():
    with pytest.raises(InvalidScores, match="positions of sequence 5"):
        Routed(np.zeros((3, 1), dtype=int), 2, token_ids=[0, 0, 0], sequence_ids=[5, 6, 5], positions=[3, 0, 3])


def test_from_mask_ranks_by_score_ties_to_lowest_index():
    rng = np.random.default_rng(0)
    mask = rng.random((50, 7)) < 0.4
    scores = rng.integers(0, 3, (50, 7)).astype(float)  # many ties
    r = Routed.from_mask(mask, scores, token_ids=np.zeros(50, int), sequence_ids=np.zeros(50, int),
                         positions=np.arange(50))
    assert r.ranked.shape[1] == mask.sum(1).max()
    for t in range(50):
        want = sorted(np.flatnonzero(mask[t]), key=lambda e: (-scores[t, e], e))
        got = [int(e) for e in r.ranked[t] if e >= 0]
        assert got == want
    plain = Routed.from_mask(mask, token_ids=np.zeros(50, int), sequence_ids=np.zeros(50, int),
                             positions=np.arange(50))
    assert [[int(e) for e in row if e >= 0] for row in plain.ranked] == [list(np.flatnonzero(m)) for m in mask]
    assert (plain.mask() == mask).all()


def test_from_mask_rejects_non_finite_scores_and_misaligned_shapes():
    m = np.ones((2, 3), dtype=bool)
    kw = dict(token_ids=[0, 0], sequence_ids=[0, 0], positions=[0, 1])
    with pytest.raises(InvalidScores, match="NaN"):
        Routed.from_mask(m, np.full((2, 3), np.nan), **kw)
    with pytest.raises(ShapeMismatch, match="aligned"):
        Routed.from_mask(m, np.zeros((2, 2)), **kw)
    empty = Routed.from_mask(np.zeros((0, 3), bool), np.zeros((0, 3)), token_ids=[], sequence_ids=[], positions=[])
    assert empty.ranked.shape == (0, 0)


# ----------------------------------------------------------------------------- co-activation
def test_coactivation_matches_brute_force_and_definitions():
    rng = np.random.default_rng(1)
    r = random_routed(rng, 300, 6, 3)
    p = CoactivationPartial.empty(6)
    p.update(r)
    s = p.result()
    C = brute_coactivation(r)
    assert (s.counts == C).all() and s.tokens == 300
    for i, j in itertools.product(range(6), repeat=2):
        if i == j:
            assert math.isnan(s.lift[i, j]) and math.isnan(s.conditional[i, j])
            continue
        assert s.lift[i, j] == pytest.approx(C[i, j] / 300 / (C[i, i] / 300 * C[j, j] / 300), rel=1e-12)
        assert s.conditional[i, j] == pytest.approx(C[i, j] / C[i, i], rel=1e-12)
    assert s.pairs == sum(C[i, j] for i in range(6) for j in range(i + 1, 6))
    w = sum(C[i, j] * s.lift[i, j] for i in range(6) for j in range(i + 1, 6))
    assert s.mean_lift == pytest.approx(w / s.pairs, rel=1e-12)
    i, j = s.max_lift_pair
    assert s.max_lift == np.nanmax(s.lift) and i < j
    for e in range(6):
        row = [s.conditional[e, x] if x != e else -1 for x in range(6)]
        assert s.top_partner[e] == int(np.argmax(row)) and s.top_partner_conditional[e] == max(row)


def test_two_experts_always_together_have_lift_t_over_c():
    # experts 0 and 1 on 40 of 100 tokens, the others on single experts 2..4
    ranked = np.full((100, 2), -1)
    ranked[:40] = [0, 1]
    ranked[40:, 0] = 2 + np.arange(60) % 3
    r = Routed(ranked, 5, token_ids=np.zeros(100, int), sequence_ids=np.zeros(100, int), positions=np.arange(100))
    p = CoactivationPartial.empty(5)
    p.update(r)
    s = p.result()
    assert s.lift[0, 1] == 100 / 40 and s.conditional[0, 1] == 1.0 and s.counts[0, 1] == 40
    assert s.lift[0, 2] == 0.0
    assert math.isnan(s.lift[0, 0])
    assert s.top_partner[0] == 1 and s.top_partner[2] == 0  # ties (all 0) to the lowest index


def test_independent_selections_have_lift_near_one():
    rng = np.random.default_rng(2)
    n, N, q = 40_000, 8, 0.4   # every expert chosen independently with probability q
    kw = dict(token_ids=np.zeros(n, int), sequence_ids=np.zeros(n, int), positions=np.arange(n))
    p = CoactivationPartial.empty(N)
    p.update(Routed.from_mask(rng.random((n, N)) < q, **kw))
    s = p.result()
    off = ~np.eye(N, dtype=bool)
    # lift of a fixed pair: sd ~ 1/sqrt(E C) with E C = n q^2 = 6400 -> ~0.0125
    assert np.abs(s.lift[off] - 1.0).max() < 0.07
    assert s.mean_lift == pytest.approx(1.0, abs=0.01)
    assert s.mean_top_conditional == pytest.approx(q, abs=0.03)
    # k of N drawn without replacement: P(i, j) = k(k-1)/(N(N-1)), so lift = N(k-1)/(k(N-1)) < 1
    k = 3
    p = CoactivationPartial.empty(N)
    p.update(Routed(np.argsort(rng.random((n, N)), axis=1)[:, :k], N, **kw))
    assert np.abs(p.result().lift[off] - N * (k - 1) / (k * (N - 1))).max() < 0.07


def test_coactivation_empty_and_undefined():
    p = CoactivationPartial.empty(3)
    s = p.result()
    assert s.tokens == 0 and s.pairs == 0 and math.isnan(s.mean_lift) and s.max_lift_pair is None
    assert (s.top_partner == -1).all()
    d = s.to_dict()
    assert d["mean_lift"] is None and "lift" not in d and s.to_dict(matrices=True)["lift"][0] == [None] * 3
    one = CoactivationPartial.empty(1)
    one.update(Routed(np.zeros((2, 1), int), 1, token_ids=[0, 0], sequence_ids=[0, 0], positions=[0, 1]))
    assert one.result().counts.tolist() == [[2]] and one.result().top_partner.tolist() == [-1]
    with pytest.raises(ShapeMismatch, match="N = 1"):
        p.update(Routed(np.zeros((1, 1), int), 1, token_ids=[0], sequence_ids=[0], positions=[0]))
    with pytest.raises(ShapeMismatch):
        p.merge(one)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 60), cuts=st.lists(st.integers(0, 60), max_size=5))
def test_coactivation_is_invariant_to_range_cuts(seed, n, cuts):
    rng = np.random.default_rng(seed)
    r = random_routed(rng, n, 5, 3)
    edges = sorted({0, n, *[c % (n + 1) for c in cuts]})
    parts = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        p = CoactivationPartial.empty(5)
        p.update(cut(r, lo, hi))
        parts.append(p)
    whole = CoactivationPartial.empty(5)
    whole.update(r)
    merged = tree_merge(parts) if parts else CoactivationPartial.empty(5)
    assert isinstance(merged, Partial)
    assert (merged.result().counts == whole.result().counts).all() and merged.tokens == n
