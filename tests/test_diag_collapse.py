"""Collapse diagnostics against independent oracles: numpy SVD, brute-force cosines, an explicit projector."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from usmoe_lp.diagnostics.collapse import (
    CollapsePartial,
    collapse_stats,
    cosine_matrix,
    effective_rank,
    router_row_similarity,
    singular_spectrum,
    span_energy,
)
from usmoe_lp.errors import InvalidParameter, InvalidScores, ShapeMismatch

# ----------------------------------------------------------------------------------------------- oracles


def svd_erank(x: np.ndarray) -> float:
    """Roy & Vetterli effective rank from numpy's SVD, with numpy's matrix_rank tolerance."""
    s = np.linalg.svd(np.asarray(x, dtype=np.float64), compute_uv=False)
    if s.max() == 0:
        return 0.0
    s = s[s > s.max() * max(x.shape) * np.finfo(np.float64).eps]
    q = s / s.sum()
    return float(np.exp(-np.sum(q * np.log(q))))


def brute_cosine(rows: np.ndarray) -> np.ndarray:
    n = rows.shape[0]
    out = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            a, b = rows[i], rows[j]
            out[i, j] = float(np.dot(a, b)) / (np.sqrt(np.dot(a, a)) * np.sqrt(np.dot(b, b)))
    return out


def pinv_span_energy(h: np.ndarray, w: np.ndarray) -> float:
    proj = np.linalg.pinv(w) @ w  # (d, d) orthogonal projector onto the row space of w
    return float(np.sum((h @ proj) ** 2) / np.sum(h**2))


def row_centre(z: np.ndarray) -> np.ndarray:
    return z - z.mean(axis=1, keepdims=True)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def assert_spectrum_close(got, want, rtol=1e-9):
    want = np.asarray(want)
    assert np.asarray(got).shape == want.shape
    atol = 1e-7 * (want[0] if want.size else 1.0)  # Gram-based values below sqrt(eps) * sigma_max are unresolved
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def random_logits(rng, t, n, scale=1.0, shift=0.0):
    return rng.standard_normal((t, n)) * scale + shift


# ------------------------------------------------------------------------------------ one-shot functions


def test_effective_rank_hand_cases():
    assert effective_rank(np.eye(5)) == pytest.approx(5.0, rel=1e-12)
    assert effective_rank(np.eye(3, 7)) == pytest.approx(3.0, rel=1e-12)
    assert effective_rank(np.outer(np.arange(1.0, 7.0), [2.0, -1.0, 0.5])) == 1.0
    assert effective_rank(np.zeros((4, 3))) == 0.0
    # sigma = (2, 1, 1): q = (1/2, 1/4, 1/4), H = 1.5 log 2
    assert effective_rank(np.diag([2.0, 1.0, 1.0])) == pytest.approx(2.0**1.5, rel=1e-12)
    # a constant matrix has column-centred effective rank 0 (the zero matrix)
    assert effective_rank(np.ones((6, 4)), center=True) == 0.0


@settings(max_examples=40, deadline=None)
@given(t=st.integers(1, 12), n=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
def test_effective_rank_matches_svd(t, n, seed):
    x = random_logits(np.random.default_rng(seed), t, n, shift=2.0)
    got = effective_rank(x)
    assert got == pytest.approx(svd_erank(x), rel=1e-12)
    assert 1.0 <= got <= min(t, n) + 1e-12
    xc = x - x.mean(axis=0, keepdims=True)
    assert effective_rank(x, center=True) == pytest.approx(svd_erank(xc), rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(singular_spectrum(x), np.linalg.svd(x, compute_uv=False), rtol=1e-12)


def test_singular_spectrum_descending_float64_and_torch():
    x = torch.tensor([[1.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
    s = singular_spectrum(x)
    assert s.dtype == np.float64
    np.testing.assert_allclose(s, [3.0, 1.0])


def test_cosine_matrix_against_loops():
    rows = np.random.default_rng(0).standard_normal((5, 3))
    np.testing.assert_allclose(cosine_matrix(rows), brute_cosine(rows), rtol=1e-12, atol=1e-15)


def test_router_row_similarity_hand_cases():
    assert router_row_similarity(np.eye(4)) == 0.0
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((6, 6)))
    assert router_row_similarity(q[:4]) == pytest.approx(0.0, abs=1e-12)  # orthogonal rows
    assert router_row_similarity(np.tile([1.0, -2.0, 3.0], (4, 1))) == pytest.approx(1.0, rel=1e-12)
    assert router_row_similarity(np.array([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(1.0)  # |cos|


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 6), d=st.integers(1, 5), seed=st.integers(0, 2**32 - 1))
def test_router_row_similarity_matches_loops(n, d, seed):
    w = np.random.default_rng(seed).standard_normal((n, d))
    c = np.abs(brute_cosine(w))
    want = (c.sum() - np.trace(c)) / (n * (n - 1))
    assert router_row_similarity(w) == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_span_energy_hand_cases():
    w = np.array([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    rng = np.random.default_rng(2)
    in_span = rng.standard_normal((7, 2)) @ w
    assert span_energy(in_span, w) == pytest.approx(1.0, rel=1e-12)
    orth = np.concatenate([np.zeros((7, 2)), rng.standard_normal((7, 2))], axis=1)
    assert span_energy(orth, w) == pytest.approx(0.0, abs=1e-15)
    assert span_energy(np.eye(4), w) == pytest.approx(2 / 4)  # isotropic: rank(W) / d
    # a rank-deficient W (repeated row) spans a line only
    assert span_energy(np.eye(4), np.array([[1.0, 1.0, 0, 0], [2.0, 2.0, 0, 0]])) == pytest.approx(1 / 4)


@settings(max_examples=30, deadline=None)
@given(t=st.integers(1, 10), n=st.integers(1, 5), d=st.integers(1, 7), seed=st.integers(0, 2**32 - 1))
def test_span_energy_matches_pinv(t, n, d, seed):
    rng = np.random.default_rng(seed)
    h, w = rng.standard_normal((t, d)), rng.standard_normal((n, d))
    assert span_energy(h, w) == pytest.approx(pinv_span_energy(h, w), rel=1e-9, abs=1e-12)


# ------------------------------------------------------------------------------------------- streaming


def check_against_oracles(stats, z, p=None, h=None, w=None):
    t, n = z.shape
    assert stats.num_tokens == t and stats.num_experts == n and stats.max_rank == min(t, n)
    assert_spectrum_close(stats.logit_spectrum, np.linalg.svd(z, compute_uv=False))
    assert_spectrum_close(stats.logit_spectrum_centered, np.linalg.svd(row_centre(z), compute_uv=False))
    assert stats.logit_effective_rank == pytest.approx(svd_erank(z), rel=1e-9)
    assert stats.logit_effective_rank_centered == pytest.approx(svd_erank(row_centre(z)), rel=1e-6, abs=1e-9)
    assert stats.logit_effective_rank_column_centered == pytest.approx(
        svd_erank(z - z.mean(axis=0, keepdims=True)), rel=1e-6, abs=1e-9)
    probs = softmax(z) if p is None else p
    np.testing.assert_allclose(stats.expert_cosine, brute_cosine(probs.T), rtol=1e-9, atol=1e-12)
    off = brute_cosine(probs.T)[~np.eye(n, dtype=bool)]
    assert stats.mean_expert_cosine == pytest.approx(off.mean() if n > 1 else 0.0, rel=1e-9)
    if h is not None:
        assert_spectrum_close(stats.hidden_spectrum, np.linalg.svd(h, compute_uv=False))
        assert stats.hidden_effective_rank == pytest.approx(svd_erank(h), rel=1e-6)
    if w is not None:
        c = np.abs(brute_cosine(w))
        assert stats.router_row_similarity == pytest.approx((c.sum() - n) / (n * (n - 1)), rel=1e-10)
        if h is not None:
            assert stats.span_energy == pytest.approx(pinv_span_energy(h, w), rel=1e-9, abs=1e-12)
            assert stats.span_energy_isotropic == pytest.approx(np.linalg.matrix_rank(w) / w.shape[1])


def test_one_chunk_matches_oracles_float64():
    rng = np.random.default_rng(3)
    z = random_logits(rng, 40, 6, scale=2.0, shift=5.0) + rng.standard_normal((40, 1)) * 10  # big common logit
    h = rng.standard_normal((40, 9)) + 3.0
    w = rng.standard_normal((6, 9))
    check_against_oracles(collapse_stats(z, hidden=h, router_weights=w), z, h=h, w=w)
    p = rng.random((40, 6))
    stats = collapse_stats(torch.from_numpy(z), probs=torch.from_numpy(p))
    check_against_oracles(stats, z, p=p)
    assert stats.probs_source == "given"


def test_fewer_tokens_than_experts():
    z = np.random.default_rng(4).standard_normal((3, 8))
    stats = collapse_stats(z)
    assert stats.max_rank == 3 and stats.logit_spectrum.shape == (3,)
    check_against_oracles(stats, z)


@st.composite
def split_data(draw):
    t = draw(st.integers(2, 30))
    n = draw(st.integers(2, 6))
    d = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**32 - 1))
    cuts = sorted(draw(st.lists(st.integers(0, t), min_size=1, max_size=2)))
    rank = draw(st.integers(1, n))  # low-rank logits too
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((t, rank)) @ rng.standard_normal((rank, n)) + rng.standard_normal((t, 1)) * 3
    h = rng.standard_normal((t, d)) + rng.standard_normal(d)
    w = rng.standard_normal((n, d))
    return z, h, w, [0, *cuts, t]


@settings(max_examples=40, deadline=None)
@given(split_data())
def test_merge_of_chunks_equals_whole(data):
    z, h, w, bounds = data
    n, d = z.shape[1], h.shape[1]
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        part = CollapsePartial.empty(n, hidden_dim=d)
        part.update(z[a:b], hidden=h[a:b])
        parts.append(part)
    before = [p.result(w).to_dict() for p in parts]
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    assert [p.result(w).to_dict() for p in parts] == before  # merge mutates neither input
    whole = CollapsePartial.empty(n, hidden_dim=d)
    whole.update(z, hidden=h)
    got, want = merged.result(w), whole.result(w)
    assert got.num_tokens == want.num_tokens == z.shape[0]
    for name in ("logit_spectrum", "logit_spectrum_centered", "hidden_spectrum"):
        assert_spectrum_close(getattr(got, name), getattr(want, name))
    for name in ("logit_effective_rank", "logit_effective_rank_centered", "logit_effective_rank_column_centered",
                 "hidden_effective_rank", "mean_expert_cosine", "router_row_similarity", "span_energy"):
        assert getattr(got, name) == pytest.approx(getattr(want, name), rel=1e-9, abs=1e-12), name
    np.testing.assert_allclose(got.expert_cosine, want.expert_cosine, rtol=1e-9, atol=1e-12)
    # and both equal the non-streaming oracles
    check_against_oracles(got, z, h=h, w=w)


def test_float32_chunks_are_accurate_and_exact_ranks_survive():
    rng = np.random.default_rng(5)
    t, n = 20000, 16
    z = (rng.standard_normal((t, n)) * np.linspace(0.05, 1.0, n) + rng.standard_normal((t, 1)) * 30
         + rng.standard_normal(n) * 10).astype(np.float32)
    part = CollapsePartial.empty(n)
    for a in range(0, t, 7000):
        part.update(z[a : a + 7000])
    stats = part.result()
    z64 = z.astype(np.float64)
    assert stats.logit_effective_rank == pytest.approx(svd_erank(z64), rel=1e-5)
    assert stats.logit_effective_rank_centered == pytest.approx(svd_erank(row_centre(z64)), rel=1e-5)
    assert stats.logit_effective_rank_column_centered == pytest.approx(svd_erank(z64 - z64.mean(0)), rel=1e-5)
    # exactly low-rank structures: float32 round-off must not show up as extra singular values
    u, v = rng.standard_normal(t), rng.standard_normal(n)
    m, c = rng.standard_normal(t) * 30, rng.standard_normal(n) * 10
    cases = {  # logits -> (rank raw, rank row-centred)
        "uv": (np.outer(u, v), (1, 1)),
        "uv + m 1^T": (np.outer(u, v) + m[:, None], (2, 1)),
        "uv + 1 c^T": (np.outer(u, v) + c, (2, 2)),
        "m 1^T + 1 c^T": (m[:, None] + c, (2, 1)),
    }
    for name, (zz, (r_raw, r_row)) in cases.items():
        s = collapse_stats(zz.astype(np.float32))
        assert (int((s.logit_spectrum > 0).sum()), int((s.logit_spectrum_centered > 0).sum())) == (r_raw, r_row), name
    assert collapse_stats(np.outer(u, v).astype(np.float32)).logit_effective_rank == 1.0


def test_bfloat16_input():
    rng = np.random.default_rng(6)
    zb = torch.from_numpy(rng.standard_normal((50, 8)) * 3).to(torch.bfloat16)
    hb = torch.from_numpy(rng.standard_normal((50, 5))).to(torch.bfloat16)
    w = rng.standard_normal((8, 5))
    part = CollapsePartial.empty(8, hidden_dim=5)
    part.update(zb, hidden=hb)
    stats = part.result(torch.from_numpy(w).to(torch.bfloat16))
    z, h = zb.double().numpy(), hb.double().numpy()
    wb = torch.from_numpy(w).to(torch.bfloat16).double().numpy()
    assert stats.logit_effective_rank == pytest.approx(svd_erank(z), rel=1e-5)
    assert stats.logit_effective_rank_centered == pytest.approx(svd_erank(row_centre(z)), rel=1e-5)
    assert stats.hidden_effective_rank == pytest.approx(svd_erank(h), rel=1e-5)
    assert stats.span_energy == pytest.approx(pinv_span_energy(h, wb), rel=1e-5)
    np.testing.assert_allclose(stats.expert_cosine, brute_cosine(softmax(z).T), rtol=1e-5)
    assert effective_rank(zb) == pytest.approx(svd_erank(z), rel=1e-12)


def test_empty_partial_and_empty_chunk():
    part = CollapsePartial.empty(4)
    part.update(np.zeros((0, 4)))  # a no-op
    stats = part.result(np.eye(4))
    assert stats.num_tokens == 0 and stats.max_rank == 0 and stats.logit_spectrum.shape == (0,)
    assert stats.logit_effective_rank == 0.0 and stats.mean_expert_cosine == 0.0
    assert stats.router_row_similarity == 0.0 and stats.span_energy is None


def test_zero_probability_expert_has_cosine_zero_and_to_dict_is_json():
    p = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    stats = collapse_stats(np.zeros((2, 3)), probs=p)
    assert stats.expert_cosine[2].tolist() == [0.0, 0.0, 0.0]
    assert stats.expert_cosine[0, 1] == pytest.approx(brute_cosine(p.T[:2])[0, 1])
    assert stats.logit_effective_rank == 0.0
    d = json.loads(json.dumps(stats.to_dict()))
    assert d["expert_cosine"][2] == [0.0, 0.0, 0.0] and d["logit_spectrum"] == [0.0, 0.0]
    assert d["hidden_spectrum"] is None and d["probs_source"] == "given"


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rejected(bad):
    z = np.ones((3, 4))
    z[1, 2] = bad
    for call in (lambda: effective_rank(z), lambda: singular_spectrum(z), lambda: cosine_matrix(z),
                 lambda: span_energy(z, np.eye(4)), lambda: CollapsePartial.empty(4).update(z),
                 lambda: CollapsePartial.empty(4).update(np.ones((3, 4)), probs=z),
                 lambda: CollapsePartial.empty(4, hidden_dim=4).update(np.ones((3, 4)), hidden=z)):
        with pytest.raises(InvalidScores, match="NaN"):
            call()


def test_wrong_ndim_and_empty_rejected():
    for call in (lambda: effective_rank(np.ones(4)), lambda: effective_rank(np.ones((2, 2, 2))),
                 lambda: CollapsePartial.empty(4).update(np.ones((2, 2, 4))),
                 lambda: effective_rank(np.ones((0, 3))), lambda: effective_rank(np.ones((3, 0))),
                 lambda: effective_rank(np.array([["a"]]))):
        with pytest.raises(InvalidScores):
            call()


def test_mismatched_shapes_rejected():
    part = CollapsePartial.empty(4, hidden_dim=3)
    with pytest.raises(ShapeMismatch, match="N = 5"):
        part.update(np.ones((2, 5)), hidden=np.ones((2, 3)))
    with pytest.raises(ShapeMismatch):
        part.update(np.ones((2, 4)), hidden=np.ones((2, 4)))  # d
    with pytest.raises(ShapeMismatch):
        part.update(np.ones((2, 4)), hidden=np.ones((3, 3)))  # rows
    with pytest.raises(ShapeMismatch):
        part.update(np.ones((2, 4)), probs=np.ones((2, 3)), hidden=np.ones((2, 3)))
    with pytest.raises(InvalidParameter, match="hidden"):
        part.update(np.ones((2, 4)))  # hidden expected
    with pytest.raises(InvalidParameter, match="hidden_dim"):
        CollapsePartial.empty(4).update(np.ones((2, 4)), hidden=np.ones((2, 3)))
    assert part.num_tokens == 0  # nothing was accumulated by the failed updates
    part.update(np.ones((2, 4)), hidden=np.ones((2, 3)))
    with pytest.raises(ShapeMismatch, match="d = 5"):
        part.result(router_weights=np.ones((4, 5)))  # hidden dim vs router weights
    with pytest.raises(ShapeMismatch, match="rows"):
        part.result(router_weights=np.ones((3, 3)))
    with pytest.raises(ShapeMismatch):
        span_energy(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(InvalidParameter):
        part.update(np.ones((2, 4)), probs=np.ones((2, 4)), hidden=np.ones((2, 3)))  # probs mixed with softmax


def test_incompatible_merges_and_parameters_rejected():
    with pytest.raises(InvalidParameter):
        CollapsePartial.empty(4).merge(CollapsePartial.empty(5))
    with pytest.raises(InvalidParameter):
        CollapsePartial.empty(4, hidden_dim=2).merge(CollapsePartial.empty(4))
    a, b = CollapsePartial.empty(2), CollapsePartial.empty(2)
    a.update(np.ones((1, 2)))
    b.update(np.ones((1, 2)), probs=np.ones((1, 2)))
    with pytest.raises(InvalidParameter):
        a.merge(b)
    for bad in (0, -1, 2.5, None):
        with pytest.raises(InvalidParameter):
            CollapsePartial.empty(bad)
    with pytest.raises(InvalidParameter):
        router_row_similarity(np.ones((1, 3)))
    with pytest.raises(InvalidScores, match="zero"):
        router_row_similarity(np.array([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(InvalidScores, match="zero"):
        span_energy(np.zeros((2, 2)), np.eye(2))


def test_blocked_float32_grams_of_wide_chunks_and_the_checked_path():
    """N = 40 experts and d = 36 hidden features (the Grams are taken by column blocks) over 9000 tokens (two
    row blocks): float32 results against the float64 oracles, and ``checked=True`` (the streaming analysis)
    gives exactly the numbers of the validated update."""
    rng = np.random.default_rng(8)
    t, n, d = 9000, 40, 36
    z = (rng.standard_normal((t, n)) * np.linspace(0.1, 2.0, n) + rng.standard_normal((t, 1)) * 20
         + rng.standard_normal(n)).astype(np.float32)
    h = (rng.standard_normal((t, d)) + 2.0).astype(np.float32)
    p = softmax(z.astype(np.float64)).astype(np.float32)
    part = CollapsePartial.empty(n, hidden_dim=d)
    part.update(z, p, h)
    fast = CollapsePartial.empty(n, hidden_dim=d)
    fast.update(torch.from_numpy(z), torch.from_numpy(p), torch.from_numpy(h), checked=True)
    a, b = part.result(), fast.result()
    assert a.to_dict() == b.to_dict()
    z64, h64 = z.astype(np.float64), h.astype(np.float64)
    assert a.logit_effective_rank == pytest.approx(svd_erank(z64), rel=1e-5)
    assert a.logit_effective_rank_centered == pytest.approx(svd_erank(row_centre(z64)), rel=1e-5)
    assert a.logit_effective_rank_column_centered == pytest.approx(svd_erank(z64 - z64.mean(0)), rel=1e-5)
    assert a.hidden_effective_rank == pytest.approx(svd_erank(h64), rel=1e-5)
    assert_spectrum_close(a.hidden_spectrum, np.linalg.svd(h64, compute_uv=False), rtol=1e-5)
    np.testing.assert_allclose(a.expert_cosine, brute_cosine(p.astype(np.float64).T), atol=1e-6)
