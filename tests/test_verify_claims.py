"""Matrix families and the claim registry of ``usmoe_lp.verify``, checked against brute force.

Every optimum used as a reference here is computed independently: by enumerating all 0/1 masks
of tiny matrices (at most 12 entries, 4096 masks), or by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from usmoe_lp import UsmoeLpError
from usmoe_lp.verify import CLAIMS, FAMILIES, Batch, Context, get_claims, get_families
from usmoe_lp.verify.claims import capped_bounds, ec_capacity, greedy_capped

FAST = Context(backends=("closed_form", "highs"))
WITH_ILP = Context(backends=("closed_form", "highs", "milp"))
WITH_CBC = Context(backends=("closed_form", "highs", "cbc"))

HOLDING_CLAIMS = ("topc_optimal_eq", "usmoe_ge_tc", "greedy_tc_eq_lp", "greedy_ec_eq_lp",
                  "lp_integral_tc", "lp_integral_ec", "lp_integral_budget", "lp_integral_capped",
                  "ilp_eq_lp")
TINY_SIZES = ((3, 3), (2, 4), (4, 3), (2, 5), (1, 4))


def close(a: float, b: float, tol: float = 1e-9) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


# ----------------------------------------------------------------------------- brute force
_MASKS: dict[tuple[int, int], np.ndarray] = {}


def all_masks(T: int, N: int) -> np.ndarray:
    """(2**(T*N), T, N) bool: every 0/1 routing of a T x N matrix."""
    if (T, N) not in _MASKS:
        n = T * N
        assert n <= 12, "brute force only on tiny matrices"
        bits = (np.arange(2 ** n)[:, None] >> np.arange(n)) & 1
        _MASKS[(T, N)] = bits.astype(bool).reshape(-1, T, N)
    return _MASKS[(T, N)]


def brute_optimum(S: np.ndarray, program: str, k: int) -> float:
    """max <S, X> over 0/1 masks X feasible for ``program``, by enumeration."""
    T, N = S.shape
    M = all_masks(T, N)
    rows, cols, total = M.sum(axis=2), M.sum(axis=1), M.sum(axis=(1, 2))
    c = T * k
    if program == "tc":
        ok = np.all(rows == k, axis=1)
    elif program == "ec":
        e = math.ceil(T * k / N)  # papers/routing-as-lp.md §1: capacity rounded up
        ok = np.all(cols == e, axis=1)
    elif program == "budget_eq":
        ok = total == c
    elif program == "budget_le":
        ok = total <= c
    elif program == "capped":  # budget c, <= k+1 experts per token, <= ceil(1.25 T k / N) per expert
        tmax, emax = min(N, k + 1), min(T, math.ceil(1.25 * T * k / N))
        ok = (total <= c) & np.all(rows <= tmax, axis=1) & np.all(cols <= emax, axis=1)
    else:
        raise AssertionError(program)
    assert ok.any(), f"{program} infeasible"
    return float(np.max(np.einsum("mtn,tn->m", M[ok], S)))


def tiny_instances(seed: int = 0, per_family: int = 2):
    """(family, S, k) over every family, tiny sizes and k = 1, 2."""
    rng = np.random.default_rng(seed)
    out = []
    for fam in FAMILIES.values():
        for T, N in TINY_SIZES[:per_family + 1]:
            for k in (1, 2):
                if k <= N:
                    out.append((fam.name, fam.generate(rng, T, N), k))
    return out


TINY = tiny_instances()


# ----------------------------------------------------------------------------- families
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_shape_dtype_finite_and_sign(name):
    fam = FAMILIES[name]
    for seed, (T, N) in enumerate([(1, 1), (1, 5), (7, 1), (8, 4), (64, 8), (5, 16)]):
        S = fam.generate(np.random.default_rng(seed), T, N)
        assert isinstance(S, np.ndarray)
        assert S.shape == (T, N)
        assert S.dtype == np.float64
        assert np.all(np.isfinite(S))
        if not fam.signed:
            assert np.all(S >= 0), f"{name} is marked positive but produced {S.min()}"


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if f.signed])
def test_signed_families_do_produce_negative_scores(name):
    fam = FAMILIES[name]
    assert any(np.any(fam.generate(np.random.default_rng(s), 8, 4) < 0) for s in range(20))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_is_a_function_of_the_generator(name):
    a = FAMILIES[name].generate(np.random.default_rng(123), 6, 5)
    b = FAMILIES[name].generate(np.random.default_rng(123), 6, 5)
    c = FAMILIES[name].generate(np.random.default_rng(124), 6, 5)
    np.testing.assert_array_equal(a, b)
    if name != "all_equal":  # one constant drawn to 3 decimals: collisions are possible
        assert not np.array_equal(a, c)


def test_family_specific_properties():
    rng = np.random.default_rng(7)
    soft = FAMILIES["softmax"].generate(rng, 16, 8)
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, rtol=1e-12)
    sig = FAMILIES["sigmoid"].generate(rng, 16, 8)
    assert np.all((sig > 0) & (sig < 1))
    uni = FAMILIES["unified"].generate(rng, 16, 8)
    # 0.5 * softmax row (sums to 1) + 0.5 * 2 sigmoid / N (each in (0, 1/N)) -> row sum in (0.5, 1.5)
    assert np.all(uni > 0) and np.all((uni.sum(axis=1) > 0.5) & (uni.sum(axis=1) < 1.5))
    low = FAMILIES["low_rank"].generate(rng, 32, 8)
    assert np.linalg.matrix_rank(low) <= 2  # d = N / 4
    near = FAMILIES["near_ties"].generate(rng, 16, 8)
    assert np.max(np.abs(near - np.round(near, 1))) < 1e-8


def test_bf16_family_is_bfloat16_valued_with_ties():
    S = FAMILIES["bf16"].generate(np.random.default_rng(0), 32, 8)
    # bfloat16 is float32 with the low 16 mantissa bits zero
    bits = S.astype(np.float32).view(np.uint32)
    assert np.all(S.astype(np.float32) == S) and np.all(bits & 0xFFFF == 0)
    assert len(np.unique(S)) < S.size  # ties
    for seed in range(5):  # ties show up in every instance of a moderate size
        S = FAMILIES["bf16"].generate(np.random.default_rng(seed), 16, 8)
        assert len(np.unique(S)) < S.size


def test_all_equal_is_constant():
    for seed in range(10):
        S = FAMILIES["all_equal"].generate(np.random.default_rng(seed), 5, 3)
        assert np.all(S == S[0, 0])


def test_registry_lookup():
    assert [f.name for f in get_families("all")] == list(FAMILIES)
    assert [f.name for f in get_families(["sigmoid", "gaussian"])] == ["sigmoid", "gaussian"]
    assert [c.id for c in get_claims("all")] == list(CLAIMS)
    with pytest.raises(UsmoeLpError, match="nope"):
        get_families(["gaussian", "nope"])
    with pytest.raises(UsmoeLpError, match="nope"):
        get_claims(["nope"])
    for claim in CLAIMS.values():
        assert claim.statement and claim.source and claim.expectation and callable(claim.check)


# ----------------------------------------------------------------------------- hand-built
def test_topc_optimal_le_fails_on_the_theory_counterexample():
    S = np.array([[0.5, -1.0], [-2.0, -0.2]])  # sign caveat (papers/routing-as-lp.md §3), c = T k = 2
    for ctx in (FAST, Context(), WITH_CBC):  # in-process (the default) and with CBC
        chk = CLAIMS["topc_optimal_le"].check_one(S, 1, ctx)
        assert not chk.passed
        # top-2 = 0.5 + (-0.2) = 0.3; the '<= 2' optimum keeps 0.5 alone
        assert chk.gap == pytest.approx(0.2, abs=1e-12)
        assert chk.values["greedy"] == pytest.approx(0.3)
        assert chk.values["negative_picks"] == 1
        for key, v in chk.values.items():
            if key.startswith("opt_"):
                assert v == pytest.approx(0.5)
        assert "negative" in chk.note
    assert brute_optimum(S, "budget_le", 1) == pytest.approx(0.5)
    # the '== c' statement holds on the same matrix
    assert CLAIMS["topc_optimal_eq"].check_one(S, 1, FAST).passed


def test_topc_optimal_le_holds_on_positive_scores():
    positive = [n for n, f in FAMILIES.items() if not f.signed]
    rng = np.random.default_rng(1)
    for name in positive:
        for T, N in ((3, 3), (2, 5), (8, 4)):
            for k in (1, 2):
                S = FAMILIES[name].generate(rng, T, N)
                chk = CLAIMS["topc_optimal_le"].check_one(S, k, FAST)
                assert chk.passed and chk.gap <= 1e-9, (name, chk.note)
    S = np.abs(np.random.default_rng(2).standard_normal((3, 4))) + 0.01
    for k in (1, 2, 3, 4):
        chk = CLAIMS["topc_optimal_le"].check_one(S, k, FAST)
        assert chk.passed
        assert chk.values["greedy"] == pytest.approx(brute_optimum(S, "budget_le", k))


def test_topc_optimal_le_verdict_matches_brute_force():
    for fam, S, k in TINY:
        chk = CLAIMS["topc_optimal_le"].check_one(S, k, FAST)
        le, eq = brute_optimum(S, "budget_le", k), brute_optimum(S, "budget_eq", k)
        assert chk.passed == close(le, eq), (fam, S, k)
        assert chk.gap == pytest.approx(le - eq, abs=1e-9)


def test_usmoe_ge_ec_fails_with_budget_mismatch():
    S = np.array([[0.2, 0.4]])  # T=1, N=2, k=1: c = 1 but e = ceil(1/2) = 1 gives EC 2 pairs
    chk = CLAIMS["usmoe_ge_ec"].check_one(S, 1, Context())
    assert not chk.passed
    assert chk.values["budget_mismatch"] == 1
    assert chk.values["usmoe"] == pytest.approx(0.4)
    assert chk.gap == pytest.approx(0.2)
    assert "mismatch" in chk.note


def test_usmoe_ge_ec_holds_when_budgets_match():
    rng = np.random.default_rng(3)
    sizes_k = [(4, 2, 1), (6, 3, 1), (4, 4, 2), (3, 3, 2), (6, 4, 2), (8, 4, 3), (2, 2, 1)]
    n = 0
    for fam in FAMILIES.values():
        for T, N, k in sizes_k:
            assert (T * k) % N == 0
            for _ in range(3):
                S = fam.generate(rng, T, N)
                chk = CLAIMS["usmoe_ge_ec"].check_one(S, k, FAST)
                assert chk.passed, (fam.name, T, N, k, chk.note)
                assert chk.values["budget_mismatch"] == 0
                assert chk.values["usmoe_minus_ec"] >= -1e-9
                n += 1
    assert n == len(FAMILIES) * len(sizes_k) * 3


def test_usmoe_ge_ec_verdict_matches_brute_force():
    for fam, S, k in TINY:
        T, N = S.shape
        chk = CLAIMS["usmoe_ge_ec"].check_one(S, k, FAST)
        usmoe, ec = brute_optimum(S, "budget_eq", k), brute_optimum(S, "ec", k)
        assert chk.values["usmoe"] == pytest.approx(usmoe)
        assert chk.values["budget_mismatch"] == N * math.ceil(T * k / N) - T * k
        assert chk.passed == (usmoe >= ec or close(usmoe, ec)), (fam, S, k)


# ----------------------------------------------------------------------------- capped greedy
def _capped_caps(T, N, k):
    return T * k, min(N, k + 1), min(T, math.ceil(1.25 * T * k / N))


def test_capped_greedy_suboptimal_hand_built():
    # T=3, N=4, k=1: c = 3, at most 2 experts per token, at most 1 token per expert.
    # Greedy takes both 5s of token 0, which blocks the 4.9s of tokens 1 and 2: 5 + 5 = 10.
    # The optimum swaps one 5 for a 4.9 and adds a 1: 5 + 4.9 + 1 = 10.9.
    S = np.array([[5.0, 5.0, 1.0, 1.0],
                  [4.9, 0.0, 0.0, 0.0],
                  [0.0, 4.9, 0.0, 0.0]])
    assert _capped_caps(3, 4, 1) == (3, 2, 1)
    g = greedy_capped(S, 3, 2, 1)
    np.testing.assert_array_equal(g, [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert brute_optimum(S, "capped", 1) == pytest.approx(10.9)
    chk = CLAIMS["capped_greedy_optimal"].check_one(S, 1, Context())
    assert not chk.passed
    assert chk.values["greedy"] == pytest.approx(10.0)
    assert chk.gap == pytest.approx(0.9)
    assert chk.values["relative_gap"] == pytest.approx(0.9 / 10.9)
    for key, v in chk.values.items():
        if key.startswith("opt_"):
            assert v == pytest.approx(10.9)


def test_capped_greedy_optimal_hand_built():
    S = np.array([[0.9, 0.1], [0.2, 0.8]])  # caps do not bind: greedy = top-2 = 1.7
    chk = CLAIMS["capped_greedy_optimal"].check_one(S, 1, Context())
    assert chk.passed and chk.gap <= 1e-12
    assert chk.values["greedy"] == pytest.approx(1.7) == brute_optimum(S, "capped", 1)


def test_greedy_capped_against_brute_force():
    rng = np.random.default_rng(11)
    cases = [(3, 4, 1), (3, 4, 2), (2, 5, 2), (2, 6, 2), (3, 3, 1), (4, 3, 2), (2, 4, 1)]
    suboptimal = 0
    for trial in range(140):
        T, N, k = cases[trial % len(cases)]
        S = [rng.uniform(0, 1, (T, N)), rng.standard_normal((T, N)),
             np.round(rng.standard_normal((T, N)), 1)][trial % 3]
        c, tmax, emax = _capped_caps(T, N, k)
        g = greedy_capped(S, c, tmax, emax)
        assert g.shape == (T, N) and g.dtype == bool
        # feasible for the capped program, positive picks only
        assert g.sum() <= c and np.all(g.sum(axis=1) <= tmax) and np.all(g.sum(axis=0) <= emax)
        assert np.all(S[g] > 0)
        if (S > 0).any():
            assert g.flat[np.argmax(S)]  # the largest positive score is always taken
        # maximal: no positive entry can be added without breaking a cap or the budget
        rows, cols = g.sum(axis=1), g.sum(axis=0)
        for i, j in zip(*np.nonzero((S > 0) & ~g), strict=True):
            assert g.sum() == c or rows[i] == tmax or cols[j] == emax
        opt = brute_optimum(S, "capped", k)
        got = float(S[g].sum())
        assert got <= opt + 1e-9
        assert got >= opt / 2 - 1e-9  # greedy is a 1/2-approximation (truncated 2-system)
        suboptimal += not close(got, opt)
        chk = CLAIMS["capped_greedy_optimal"].check_one(S, k, FAST)
        assert chk.values["greedy"] == pytest.approx(got)
        assert chk.passed == close(got, opt)
        assert chk.gap == pytest.approx(max(0.0, opt - got), abs=1e-9)
    assert suboptimal > 0  # the claim really is false on some tiny instance


# ----------------------------------------------------------------------------- holding claims
@pytest.mark.parametrize("claim_id", HOLDING_CLAIMS)
def test_holding_claims_hold_on_every_family(claim_id):
    claim = CLAIMS[claim_id]
    for fam, S, k in TINY:
        chk = claim.check_one(S, k, WITH_ILP)
        assert chk is not None
        assert chk.passed, (claim_id, fam, S.tolist(), k, chk.note)
        assert chk.gap <= 1e-9  # rounding-level differences only
        assert chk.note == ""


def test_holding_claims_report_the_brute_force_optima():
    for fam, S, k in TINY:
        inst = Batch.one(S, k, WITH_ILP)
        opt = {p: brute_optimum(S, p, k) for p in ("tc", "ec", "budget_eq", "budget_le", "capped")}
        v = CLAIMS["topc_optimal_eq"].check(inst)[0].values
        assert v["greedy"] == pytest.approx(opt["budget_eq"])
        assert v["certificate_optimal"] == 1
        v = CLAIMS["usmoe_ge_tc"].check(inst)[0].values
        assert v["usmoe"] == pytest.approx(opt["budget_eq"])
        assert v["usmoe_minus_tc"] == pytest.approx(opt["budget_eq"] - opt["tc"], abs=1e-9)
        assert v["usmoe_minus_tc"] >= -1e-9
        for claim_id, program in (("greedy_tc_eq_lp", "tc"), ("greedy_ec_eq_lp", "ec")):
            v = CLAIMS[claim_id].check(inst)[0].values
            assert v["greedy"] == pytest.approx(opt[program])
            assert {"opt_highs", "opt_milp"} <= set(v)
            for key, val in v.items():
                if key.startswith("opt_"):
                    assert val == pytest.approx(opt[program]), (fam, claim_id, key)
        for claim_id, program in (("lp_integral_tc", "tc"), ("lp_integral_ec", "ec"),
                                  ("lp_integral_budget", "budget_le"),
                                  ("lp_integral_capped", "capped")):
            v = CLAIMS[claim_id].check(inst)[0].values
            assert v["frac_simplex"] <= 1e-9 and v["frac_ipm"] <= 1e-9
            assert v["lp_simplex"] == pytest.approx(opt[program])
            assert v["ilp_milp"] == pytest.approx(opt[program])
        v = CLAIMS["ilp_eq_lp"].check(inst)[0].values
        for program in ("tc", "ec", "budget_le", "capped"):
            assert v[f"{program}_lp"] == pytest.approx(opt[program])
            assert v[f"{program}_milp"] == pytest.approx(opt[program])


def test_usmoe_ge_tc_and_topc_eq_hold_with_cbc():
    for fam, S, k in TINY[::4]:
        inst = Batch.one(S, k, WITH_CBC)
        for claim_id in ("usmoe_ge_tc", "topc_optimal_eq", "ilp_eq_lp"):
            chk = CLAIMS[claim_id].check(inst)[0]
            assert chk.passed, (claim_id, fam, chk.note)
        assert "opt_cbc" in CLAIMS["topc_optimal_eq"].check(inst)[0].values


def test_ilp_eq_lp_not_applicable_above_ilp_max_vars():
    S = np.random.default_rng(5).standard_normal((3, 3))
    for backends in (("closed_form", "highs", "milp"), ("closed_form", "highs", "cbc")):
        assert CLAIMS["ilp_eq_lp"].check_one(S, 1, Context(backends, ilp_max_vars=8)) is None
        chk = CLAIMS["ilp_eq_lp"].check_one(S, 1, Context(backends, ilp_max_vars=9))
        assert chk is not None and chk.passed
    # no integer-program backend at all: not applicable either
    assert CLAIMS["ilp_eq_lp"].check_one(S, 1, FAST) is None


# ----------------------------------------------------------------------------- disagreement
def _skew_backend(monkeypatch, backend: str, value=None, shift: float = 0.0):
    original = Batch.optimum

    def skewed(self, name, b):
        v = original(self, name, b)
        if b != backend:
            return v
        return np.full_like(v, value) if value is not None else v + shift

    monkeypatch.setattr(Batch, "optimum", skewed)


@pytest.mark.parametrize("claim_id", ["topc_optimal_eq", "topc_optimal_le", "usmoe_ge_tc",
                                      "usmoe_ge_ec", "greedy_tc_eq_lp", "greedy_ec_eq_lp",
                                      "capped_greedy_optimal"])
def test_disagreeing_backends_fail_the_check(monkeypatch, claim_id):
    S = np.array([[0.9, 0.1], [0.2, 0.8]])  # positive, N | T k: every claim holds on it
    assert CLAIMS[claim_id].check_one(S, 1, WITH_ILP).passed
    _skew_backend(monkeypatch, "highs", shift=1e-3)
    chk = CLAIMS[claim_id].check_one(S, 1, WITH_ILP)
    assert not chk.passed
    assert "backends disagree" in chk.note


def test_ilp_backend_off_the_lp_fails_ilp_eq_lp(monkeypatch):
    S = np.array([[0.9, 0.1, 0.4], [0.2, 0.8, 0.3]])
    _skew_backend(monkeypatch, "milp", shift=-0.5)
    chk = CLAIMS["ilp_eq_lp"].check_one(S, 1, WITH_ILP)
    assert not chk.passed
    assert chk.gap == pytest.approx(0.5)
    assert "milp" in chk.note


def test_failed_backend_fails_the_check(monkeypatch):
    S = np.array([[0.9, 0.1, 0.4], [0.2, 0.8, 0.3]])
    _skew_backend(monkeypatch, "highs", value=math.nan)
    chk = CLAIMS["greedy_tc_eq_lp"].check_one(S, 1, FAST)
    assert not chk.passed
    assert "failed to solve" in chk.note


@pytest.mark.parametrize("T,N,k", [(T, N, k) for T in (1, 2, 3, 7, 8, 13, 64) for N in (1, 2, 3, 4, 8, 16)
                                   for k in (1, 2, 3) if k <= N])
def test_capacities_are_the_smallest_integers_that_fit(T, N, k):
    """EC's e (capacity factor 1) and the capped program's per-expert cap (factor 5/4), by integer search:
    the smallest e with N e >= T k (resp. 4 N e >= 5 T k), clipped to T."""
    e = next(e for e in range(T * k + 1) if N * e >= T * k)
    assert ec_capacity(T, N, k) == min(T, e)
    cap = next(e for e in range(2 * T * k + 1) if 4 * N * e >= 5 * T * k)
    assert capped_bounds(T, N, k) == (T * k, min(N, k + 1), min(T, cap))
    inst = Batch.one(np.zeros((T, N)), k, FAST)
    assert inst.e == ec_capacity(T, N, k)
