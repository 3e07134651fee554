"""Decision margins: brute force on tiny matrices, loop oracles for fragility, the streaming merge."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usmoe_lp.diagnostics.margins import (
    MarginPartial,
    default_margin_edges,
    fragile_counts,
    margin_stats,
    topc_margin,
    topk_margins,
)
from usmoe_lp.errors import InvalidParameter, InvalidScores, ShapeMismatch

EPS = (0.0, 1e-3, 0.125, 0.3)


def _oracle_margins(s: np.ndarray, k: int) -> list[float]:
    """min over the selected top-k minus max over the rest, selecting by sorting by hand."""
    out = []
    for row in s.tolist():
        order = sorted(range(len(row)), key=lambda e: (-row[e], e))
        chosen, rest = order[:k], order[k:]
        out.append(min(row[e] for e in chosen) - max(row[e] for e in rest) if rest else math.nan)
    return out


def _oracle_fragile(s: np.ndarray, k: int, eps) -> dict[float, int]:
    counts = dict.fromkeys(eps, 0)
    for row in s.tolist():
        if k == len(row):
            continue
        desc = sorted(row, reverse=True)
        b = (desc[k - 1] + desc[k]) / 2
        for v in row:
            for e in eps:
                if abs(v - b) <= e:
                    counts[e] += 1
    return counts


@st.composite
def _matrix(draw, max_t=6, max_n=5):
    t = draw(st.integers(1, max_t))
    n = draw(st.integers(1, max_n))
    # values on a grid of 1/8 so that ties and exact-eps distances happen
    vals = draw(st.lists(st.integers(-8, 8), min_size=t * n, max_size=t * n))
    k = draw(st.integers(1, n))
    return np.array(vals, dtype=np.float64).reshape(t, n) / 8, k


@settings(max_examples=60, deadline=None)
@given(_matrix())
def test_topk_margins_brute_force(data):
    s, k = data
    got = topk_margins(s, k)
    ref = np.array(_oracle_margins(s, k))
    np.testing.assert_array_equal(got, ref)  # NaN where k == N
    assert got.dtype == np.float64 and got.shape == (s.shape[0],)
    rel = topk_margins(s, k, relative=True)
    for t in range(s.shape[0]):
        kth = sorted(s[t], reverse=True)[k - 1]
        if k == s.shape[1] or kth <= 0:
            assert math.isnan(rel[t])
        else:
            assert rel[t] == ref[t] / kth


@settings(max_examples=60, deadline=None)
@given(_matrix())
def test_fragility_loop_oracle(data):
    s, k = data
    assert fragile_counts(s, k, EPS) == _oracle_fragile(s, k, EPS)


def test_margins_hand_cases():
    s = np.array([[0.5, 0.3, 0.2], [0.4, 0.4, 0.2], [0.1, 0.2, 0.7]])
    np.testing.assert_allclose(topk_margins(s, 1), [0.2, 0.0, 0.5], atol=1e-15)
    np.testing.assert_allclose(topk_margins(s, 2), [0.1, 0.2, 0.1], atol=1e-15)
    np.testing.assert_allclose(topk_margins(s, 1, relative=True), [0.4, 0.0, 0.5 / 0.7], atol=1e-15)
    assert np.isnan(topk_margins(s, 3)).all()  # k == N: no boundary
    # k = 1 boundaries: 0.4, 0.4, 0.45. Distances: (.1, .1, .2), (0, 0, .2), (.35, .25, .25)
    assert fragile_counts(s, 1, (0.0, 0.1 + 1e-12, 0.25 + 1e-12)) == {0.0: 2, 0.1 + 1e-12: 4, 0.25 + 1e-12: 8}
    assert fragile_counts(s, 3, (1.0,)) == {1.0: 0}
    # batched input is flattened
    np.testing.assert_array_equal(topk_margins(s.reshape(1, 3, 3), 1), topk_margins(s, 1))


@settings(max_examples=60, deadline=None)
@given(_matrix(max_t=4, max_n=4), st.data())
def test_topc_margin_brute_force(data, extra):
    s, _ = data
    total = s.size
    c = extra.draw(st.integers(1, total))
    g = topc_margin(s, c, eps=EPS)
    flat = sorted(s.reshape(-1).tolist(), reverse=True)
    assert g.threshold == flat[c - 1] and g.num_entries == total and g.c == c
    assert g.ties_at_threshold == sum(v == flat[c - 1] for v in flat)
    assert g.within_eps == {e: sum(abs(v - flat[c - 1]) <= e for v in flat) for e in EPS}
    if c < total:
        b = (flat[c - 1] + flat[c]) / 2
        assert g.next_value == flat[c] and g.margin == flat[c - 1] - flat[c] and g.boundary == b
        assert g.fragile_share == {e: sum(abs(v - b) <= e for v in flat) / total for e in EPS}
    else:
        assert math.isnan(g.margin) and math.isnan(g.next_value) and g.fragile_share == dict.fromkeys(EPS, 0.0)
    json.dumps(g.to_dict(), allow_nan=False)


def test_topc_margin_hand_case():
    g = topc_margin(np.array([[0.9, 0.1], [0.6, 0.5]]), c=2, eps=(0.06, 0.31, 0.4))
    assert (g.threshold, g.next_value) == (0.6, 0.5)
    assert g.margin == pytest.approx(0.1) and g.boundary == pytest.approx(0.55)
    assert g.within_eps == {0.06: 1, 0.31: 3, 0.4: 3}  # |s - 0.6|: .3, .5, 0, .1
    assert g.fragile_share == {0.06: 0.5, 0.31: 0.5, 0.4: 0.75}  # |s - 0.55|: .35, .45, .05, .05
    assert g.ties_at_threshold == 1


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------


@st.composite
def _chunked(draw):
    n = draw(st.integers(1, 6))
    k = draw(st.integers(1, n))
    t = draw(st.integers(0, 20))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    s = rng.dirichlet(np.ones(n), size=t) if t else np.zeros((0, n))
    if draw(st.booleans()):
        s = np.round(s * 8) / 8  # ties
    cuts = sorted(draw(st.lists(st.integers(0, t), min_size=1, max_size=2)))
    return s, k, [0, *cuts, t]


def _same(a, b, rtol=1e-12):
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, float):
        return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-14)
    return a == b


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_chunked())
def test_margin_merge_equals_whole(data):
    s, k, bounds = data
    n = s.shape[1]
    eps = (1e-3, 0.05, 0.2)
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        p = MarginPartial.empty(k, eps, num_experts=n)
        p.update(s[lo:hi], k)
        parts.append(p)
    hist0 = parts[0].hist.copy()
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    assert (parts[0].hist == hist0).all()  # inputs untouched
    whole = MarginPartial.empty(k, eps, num_experts=n)
    whole.update(s)
    a, b = merged.result(), whole.result()
    for key, va in a.__dict__.items():
        vb = b.__dict__[key]
        if key in ("fragile_pairs", "histogram", "num_tokens", "boundary_tokens", "relative_tokens"):
            assert va == vb, key
        elif key == "fragile_share":
            assert all(_same(va[e], vb[e]) for e in eps), key
        else:
            assert _same(va, vb), (key, va, vb)
    if s.shape[0]:
        ref = topk_margins(s, k)
        one = margin_stats(s, k, eps)
        assert one.fragile_pairs == a.fragile_pairs == _oracle_fragile(s, k, eps)
        if k < n:
            assert _same(a.mean_margin, float(np.mean(ref)), 1e-9)
            assert a.min_margin == ref.min() and a.max_margin == ref.max()
            assert sum(a.histogram[1]) == s.shape[0]
            rel = topk_margins(s, k, relative=True)
            assert _same(a.mean_relative_margin, float(np.nanmean(rel)), 1e-9)
        else:
            assert math.isnan(a.mean_margin) and a.boundary_tokens == 0
    json.dumps(a.to_dict(), allow_nan=False)


def test_median_from_histogram_resolution():
    rng = np.random.default_rng(5)
    n, t = 8, 301
    s = rng.dirichlet(np.ones(n) * 0.5, size=t)
    m = np.sort(topk_margins(s, 2))
    true_median = m[(t - 1) // 2]
    got = margin_stats(s, 2).median_margin
    assert true_median / 10 ** (1 / 40) <= got * (1 + 1e-12) and got <= true_median * 10 ** (1 / 40) * (1 + 1e-12)
    # ties (margin 0) go to the first bin and give median 0; huge margins go to the overflow bin
    ties = np.array([[1.0, 1.0, 0.0]] * 3)
    r = margin_stats(ties, 1)
    assert r.median_margin == 0.0 and r.histogram[1][0] == 3
    big = np.array([[5000.0, 0.0]] * 3)
    r = margin_stats(big, 1)
    assert r.median_margin == default_margin_edges()[-1] and r.histogram[1][-1] == 3


def test_margin_stats_hand_case_and_custom_bins():
    s = np.array([[0.5, 0.3, 0.2], [0.4, 0.4, 0.2]])
    r = margin_stats(s, 1, eps=(0.05,), bins=[0.1, 1.0])
    assert r.num_tokens == 2 and r.num_experts == 3 and r.boundary_tokens == 2
    assert r.mean_margin == pytest.approx(0.1) and r.min_margin == 0.0 and r.max_margin == pytest.approx(0.2)
    assert r.mean_relative_margin == pytest.approx((0.2 / 0.5 + 0.0) / 2)
    assert r.fragile_pairs == {0.05: 2} and r.fragile_share == {0.05: 2 / 6}
    assert r.histogram == ((0.1, 1.0), (1, 1, 0))  # 0 -> [0, .1); 0.2 -> [.1, 1)
    assert r.median_margin == 0.0  # lower median of (0, 0.2)
    e = MarginPartial.empty(2).result()
    assert e.num_tokens == 0 and math.isnan(e.mean_margin) and math.isnan(e.median_margin)
    json.dumps(e.to_dict(), allow_nan=False)


def test_torch_bf16_input():
    s = torch.tensor([[0.5, 0.25, 0.25], [0.125, 0.75, 0.125]], dtype=torch.bfloat16)
    np.testing.assert_array_equal(topk_margins(s, 1), [0.25, 0.625])
    assert topc_margin(s, 2).threshold == 0.5


def test_bad_input():
    s = np.zeros((3, 4))
    with pytest.raises(InvalidScores):
        topk_margins(np.array([[0.0, np.nan]]), 1)
    with pytest.raises(InvalidScores):
        topk_margins(np.array([[0.0, np.inf]]), 1)
    with pytest.raises(InvalidScores):
        topk_margins(np.zeros(4), 1)  # 1-D
    with pytest.raises(InvalidScores):
        topk_margins(np.zeros((1, 2, 3, 4)), 1)  # 4-D
    with pytest.raises(InvalidParameter):
        topk_margins(s, 5)  # k > N
    with pytest.raises(InvalidParameter):
        topk_margins(s, 0)
    with pytest.raises(InvalidParameter):
        fragile_counts(s, 1, eps=(-0.1,))
    with pytest.raises(InvalidParameter):
        topc_margin(s, 13)  # c > T*N
    with pytest.raises(InvalidParameter):
        topc_margin(s, 0)
    with pytest.raises(InvalidScores):
        topc_margin(np.zeros((0, 4)), 1)
    p = MarginPartial.empty(2)
    with pytest.raises(InvalidParameter):
        p.update(np.zeros((2, 1)))  # k > N
    p.update(s)
    with pytest.raises(ShapeMismatch):
        p.update(np.zeros((2, 5)))
    with pytest.raises(InvalidParameter):
        p.update(s, k=3)
    q = MarginPartial.empty(2)
    q.update(np.zeros((2, 5)))
    with pytest.raises(InvalidParameter):
        p.merge(q)  # different N
    with pytest.raises(InvalidParameter):
        p.merge(MarginPartial.empty(1))
    with pytest.raises(InvalidParameter):
        p.merge(MarginPartial.empty(2, eps=(0.5,)))
    with pytest.raises(InvalidParameter):
        p.merge(MarginPartial.empty(2, bins=[1.0, 2.0]))
    with pytest.raises(InvalidParameter):
        MarginPartial.empty(2, bins=[1.0, 0.5])
    with pytest.raises(InvalidParameter):
        MarginPartial.empty(3, num_experts=2)


def test_float32_fragility_decided_like_exact_arithmetic():
    """float32 scores at and next to b +- eps (eps = 0.1, not a float32): the float32 comparison against the
    bound rounded to float32 decides as the exact rational |s - b| <= eps, and as the float64 rows do."""
    from fractions import Fraction

    from usmoe_lp.diagnostics.margins import fragile_sorted

    f32 = np.float32
    kth, nxt, e = f32(0.3), f32(0.2), 0.1
    b = (float(kth) + float(nxt)) / 2
    up, down = f32(b + e), f32(b - e)
    rows = []
    for i in range(-2, 3):
        t1 = up
        for _ in range(abs(i)):
            t1 = np.nextafter(t1, f32(np.inf) if i > 0 else f32(-np.inf))
        u1 = down
        for _ in range(abs(i)):
            u1 = np.nextafter(u1, f32(np.inf) if i > 0 else f32(-np.inf))
        rows.append([kth, t1, f32(0.9), nxt, u1, f32(0.0)])  # k = 3: 0.9, t1, kth | nxt, u1, 0
    s = np.array(rows, dtype=np.float32)
    exact = 0
    for row in s.tolist():
        srt = sorted(row, reverse=True)
        bb = (Fraction(srt[2]) + Fraction(srt[3])) / 2
        exact += sum(abs(Fraction(v) - bb) <= Fraction(e) for v in row)
    srt32 = np.sort(s, axis=1)
    assert fragile_sorted(srt32, 3, (e,)) == {e: exact}
    assert fragile_sorted(srt32.astype(np.float64), 3, (e,)) == {e: exact}
    assert fragile_counts(s, 3, (e,)) == {e: exact}
    assert 5 < exact < 5 * 6  # some of the neighbours are in, some out


def test_directed_float32_rounding_of_the_bounds():
    """The bounds b +- eps are rounded to the float32 on their side through the integer view (fast): the same
    values as numpy's nextafter after a round-to-nearest, across zero, subnormals and the float32 range."""
    from usmoe_lp.diagnostics.margins import _round_down, _round_up

    f32 = np.float32
    rng = np.random.default_rng(1)
    special = [0.0, -0.0, 1e-300, -1e-300, 1e-45, -1e-45, 7e-46, -7e-46, 1.0, -1.0, 3.5e38, -3.5e38, 3.4e38,
               -3.4e38, float(f32(0.1)), -float(f32(0.1)), 2.0**-149, -(2.0**-149), 2.0**-126, 1.5 * 2.0**-149]
    x = np.concatenate([special, rng.standard_normal(3000) * 10.0 ** rng.integers(-45, 38, 3000)]).reshape(-1, 2)
    with np.errstate(over="ignore"):
        down, up = _round_down(x, np.dtype(f32)), _round_up(x, np.dtype(f32))
        for v, d, u in zip(x.reshape(-1).tolist(), down.reshape(-1), up.reshape(-1), strict=True):
            r = f32(v)
            want_d = np.nextafter(r, f32(-np.inf)) if float(r) > v else r
            want_u = np.nextafter(r, f32(np.inf)) if float(r) < v else r
            assert d == want_d and u == want_u, v
            assert float(d) <= v <= float(u)
    assert _round_down(x, np.dtype(np.float64)) is x
