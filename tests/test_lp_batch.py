"""Batched exact solving and certification (``usmoe_lp.lp.batch``) against the per-program path.

Oracles: the per-program functions (``certify``, ``solve(p, "closed_form")``,
``backends.solve_highs``, ``backends.solve_milp``) for the batch functions; for the exhaustive
backend a brute force written here (every 0/1 mask from ``itertools.product``, the bounds restated
from the constructor arguments, objectives in exact integer arithmetic), plus HiGHS and the closed
form. Scores mix Gaussian, bf16-rounded (ties), all-equal and signed small-integer matrices.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usmoe_lp.errors import InvalidParameter, InvalidScores, ShapeMismatch, UnsupportedProblem
from usmoe_lp.lp import (
    EXHAUSTIVE_MAX_ENTRIES,
    RoutingProblem,
    backends,
    batch,
    certify,
    certify_batch,
    certify_with_duals,
    closed_form_batch,
    dual_bound,
    solve,
    solve_exhaustive_batch,
    solve_highs_batch,
)
from usmoe_lp.lp.backends import solve_highs, solve_milp

PROFILE = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RTOL = 1e-9
KINDS = ("gauss", "bf16", "equal", "integer")
SINGLE = ("tc", "ec", "budget<=", "budget==", "token_range", "expert_range", "grouped")
COMBINED = ("capped<=", "capped==", "transport")


# ----------------------------------------------------------------------------- instances
def make_scores(kind: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    if kind == "gauss":
        return rng.normal(size=shape)
    if kind == "bf16":  # bf16 quantisation: ties between near-equal scores
        return torch.from_numpy(rng.normal(size=shape)).to(torch.bfloat16).double().numpy()
    if kind == "equal":
        return np.full(shape, float(rng.choice([-0.75, 0.0, 0.5])))
    return rng.integers(-2, 3, size=shape).astype(np.float64)


def make_program(name: str, S: np.ndarray, rng: np.random.Generator) -> RoutingProblem:
    """A random program ``name`` on ``S``; may be infeasible only for capped == and transport."""
    T, N = S.shape
    if name == "tc":
        return RoutingProblem.token_choice(S, int(rng.integers(1, N + 1)))
    if name == "ec":
        return RoutingProblem.expert_choice(S, int(rng.integers(1, T + 1)))
    if name == "token_range":
        lo = rng.integers(0, N + 1, T)
        return RoutingProblem(S, token_min=lo, token_max=[rng.integers(a, N + 1) for a in lo])
    if name == "expert_range":
        lo = rng.integers(0, T + 1, N)
        return RoutingProblem(S, expert_min=lo, expert_max=[rng.integers(a, T + 1) for a in lo])
    if name == "grouped":
        G = int(rng.integers(1, T + 1))
        groups = np.concatenate([np.arange(G), rng.integers(0, G, T - G)])
        rng.shuffle(groups)
        c = [int(rng.integers(0, s * N + 1)) for s in np.bincount(groups)]
        return RoutingProblem.budget(S, c, sense=str(rng.choice(["<=", "=="])), groups=groups)
    if name == "transport":
        a = int(rng.integers(0, N + 1))
        b = int(rng.integers(0, T + 1))
        return RoutingProblem(S, token_min=a, token_max=int(rng.integers(a, N + 1)), expert_min=b,
                              expert_max=int(rng.integers(b, T + 1)))
    sense = "==" if name.endswith("==") else "<="
    c = int(rng.integers(0, T * N + 1))
    if name.startswith("budget"):
        return RoutingProblem.budget(S, c, sense=sense)
    return RoutingProblem.capped(S, c, int(rng.integers(1, N + 1)), int(rng.integers(1, T + 1)), sense=sense)


def make_batch(seed: int, names, max_t: int = 8, max_n: int = 5, families: int = 3,
               per_family: int = 4) -> list[RoutingProblem]:
    """A mixture: a few (shape, program, score kind) families of several programs each (so that
    stacks and joint models hold programs of one pattern and of several), shuffled."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(int(rng.integers(1, families + 1))):
        shape = (int(rng.integers(1, max_t + 1)), int(rng.integers(1, max_n + 1)))
        name, kind = str(rng.choice(names)), str(rng.choice(KINDS))
        made, wanted = 0, int(rng.integers(1, per_family + 1))
        for _ in range(50):
            if made == wanted:
                break
            try:
                out.append(make_program(name, make_scores(kind, shape, rng), rng))
                made += 1
            except Exception:  # an infeasible total refused at construction: draw again
                continue
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def random_mask(p: RoutingProblem, rng: np.random.Generator) -> np.ndarray:
    """The closed-form optimum, a swap of it, or a random mask (often infeasible)."""
    choice = rng.integers(3)
    if choice == 2 or not p.is_single_block:
        return rng.random(p.shape) < 0.4
    mask = solve(p, "closed_form", certify_solution=False).mask.copy()
    if choice == 1 and mask.any() and (~mask).any():
        on, off = np.flatnonzero(mask), np.flatnonzero(~mask)
        mask.flat[rng.choice(on)] = False
        mask.flat[rng.choice(off)] = True
    return mask


def same(a, b) -> bool:
    """Equal floats, NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


CERT_FIELDS = ("primal", "dual", "gap", "optimal", "feasible", "integral", "max_fractionality", "ties",
               "log10_optimal_masks", "margin", "backend", "tolerance", "message", "status")


def assert_same_certificate(a, b):
    for f in CERT_FIELDS:
        assert same(getattr(a, f), getattr(b, f)), (f, getattr(a, f), getattr(b, f))
    assert a.duals.keys() == b.duals.keys()
    for k in a.duals:
        assert np.array_equal(a.duals[k], b.duals[k])


def close(a: float, b: float) -> bool:
    return abs(a - b) <= RTOL * max(1.0, abs(a), abs(b))


def frac(x: np.ndarray) -> float:
    return float(np.max(np.abs(x - np.round(x)))) if x.size else 0.0


# ----------------------------------------------------------------------------- certificates, closed form
@PROFILE
@given(st.integers(0, 2**32 - 1))
def test_certify_batch_equals_certify(seed):
    """Every certificate field but ``seconds`` equals the per-program ``certify``, on mixtures of
    single-block and combined programs, optimal, swapped and random masks, ties and signed scores."""
    problems = make_batch(seed, SINGLE + COMBINED)
    rng = np.random.default_rng(seed + 1)
    masks = [random_mask(p, rng) for p in problems]
    for got, p, m in zip(certify_batch(problems, masks), problems, masks, strict=True):
        assert_same_certificate(got, certify(p, m))


def test_certify_batch_takes_a_stacked_array_and_torch_masks():
    rng = np.random.default_rng(3)
    S = rng.normal(size=(6, 5, 4))
    problems = [RoutingProblem.token_choice(s, 2) for s in S]
    masks = np.stack([solve(p, "closed_form").mask for p in problems])
    masks[2, 0, 0] = ~masks[2, 0, 0]  # one infeasible
    stacked = certify_batch(problems, masks)
    as_torch = certify_batch(problems, [torch.from_numpy(m) for m in masks])
    for a, b, p, m in zip(stacked, as_torch, problems, masks, strict=True):
        assert_same_certificate(a, b)
        assert_same_certificate(a, certify(p, m))
    assert [c.status for c in stacked] == ["optimal"] * 2 + ["infeasible"] + ["optimal"] * 3


@PROFILE
@given(st.integers(0, 2**32 - 1))
def test_closed_form_batch_equals_solve(seed):
    problems = make_batch(seed, SINGLE)
    for got, p in zip(closed_form_batch(problems), problems, strict=True):
        sol = solve(p, "closed_form", certify_solution=False)
        assert got.status == "optimal"
        assert np.array_equal(got.x, sol.x)
        assert got.objective == sol.objective
        assert got.duals.keys() == sol.duals.keys()
        for k in sol.duals:
            assert np.array_equal(got.duals[k], sol.duals[k])


def test_closed_form_batch_refuses_combined_programs():
    S = np.random.default_rng(0).normal(size=(4, 3))
    with pytest.raises(UnsupportedProblem, match="single-block"):
        closed_form_batch([RoutingProblem.token_choice(S, 1), RoutingProblem.capped(S, 4, 2, 2)])


# ----------------------------------------------------------------------------- HiGHS
def _check_highs_block(got, p, ref):
    assert got.status == ref.status, (p.describe(), got.message, ref.message)
    if ref.status != "optimal":
        return
    assert close(got.objective, ref.objective), (p.describe(), got.objective, ref.objective)
    assert close(got.objective, float(np.sum(p.scores * got.x)))
    assert frac(got.x) <= 1e-9  # every block's solution is a vertex: integral (network matrix)
    # the block's duals: their Lagrangian bound is the block's optimum (strong duality, to HiGHS's
    # tolerance), and they prove the block's mask optimal, exactly
    if got.duals is not None:
        assert got.duals.keys() == set(p.blocks)
        bound = dual_bound(p, got.duals)
        assert abs(bound - got.objective) <= 1e-6 * max(1.0, float(np.abs(p.scores).sum())), (bound, got.objective)
        cert = certify_with_duals(p, got.x > 0.5, got.duals, x=got.x, backend="highs")
        assert cert.optimal, (p.describe(), cert.message)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["simplex", "ipm", "auto"]))
def test_highs_batch_equals_single_solves(seed, solver):
    problems = make_batch(seed, SINGLE + COMBINED)
    for got, p in zip(solve_highs_batch(problems, solver=solver), problems, strict=True):
        _check_highs_block(got, p, solve_highs(p, solver=solver))


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_highs_batch_blocks_of_different_magnitudes(seed):
    """Blocks scaled by 10^-8 .. 10^8 in one joint model: each block is scaled by its own power of
    two, so every block still matches its single solve to 1e-9 relative."""
    rng = np.random.default_rng(seed)
    problems = [p.for_scores(p.scores[None] * 10.0 ** rng.uniform(-8, 8))[0]
                for p in make_batch(seed, SINGLE + COMBINED)]
    for got, p in zip(solve_highs_batch(problems), problems, strict=True):
        _check_highs_block(got, p, solve_highs(p, solver="simplex"))


@settings(max_examples=6, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_highs_batch_mip_equals_milp(seed):
    problems = make_batch(seed, SINGLE + COMBINED, max_t=5, max_n=4, per_family=3)
    for got, p in zip(solve_highs_batch(problems, integer=True), problems, strict=True):
        ref = solve_milp(p)
        assert got.status == ref.status
        assert got.duals is None
        if ref.status == "optimal":
            assert close(got.objective, ref.objective)
            assert frac(got.x) <= 1e-6  # MIP feasibility tolerance
            assert got.message.startswith("HiGHS MIP")


def test_highs_batch_splits_models_and_isolates_an_infeasible_program(monkeypatch):
    """Small models (forced), one program larger than a model, and an infeasible program in the
    middle: each program still gets its own status and optimum."""
    rng = np.random.default_rng(7)
    problems = [RoutingProblem.token_choice(rng.normal(size=(4, 3)), 2) for _ in range(5)]
    problems.insert(2, RoutingProblem(np.ones((2, 2)), token_min=[2, 0], expert_max=[0, 2]))  # infeasible
    problems.append(RoutingProblem.budget(rng.normal(size=(10, 6)), 7, sense="=="))  # 60 > 40 columns
    monkeypatch.setattr(batch, "HIGHS_BATCH_COLUMNS", 40)
    assert batch._chunks(problems, 40) == [[0, 1, 2, 3], [4, 5], [6]]
    got = solve_highs_batch(problems)
    assert [r.status for r in got] == ["optimal"] * 2 + ["infeasible"] + ["optimal"] * 4
    assert "infeasible" in got[2].message.lower()
    for r, p in zip(got, problems, strict=True):
        _check_highs_block(r, p, solve_highs(p, solver="simplex"))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["simplex", "choose"]))
def test_lifted_formulation_equals_the_direct_one(seed, solver):
    """The lifted model (token-count columns, forced on small programs) has the optimum of the
    direct one, an integral vertex, and token / expert / budget duals that prove the mask optimal."""
    problems = [p for p in make_batch(seed, ("budget<=", "budget==", "grouped") + COMBINED)
                if p.budget is not None]
    old = backends.LIFT_MIN_ENTRIES
    for p in problems:
        try:
            backends.LIFT_MIN_ENTRIES = 0
            lifted = backends.highs_formulation(p, solver, "off")
            got = solve_highs(p, solver=solver, presolve="off")
        finally:
            backends.LIFT_MIN_ENTRIES = old
        assert lifted == ("expert" if p.num_groups == 1 and "expert" in p.blocks else "token")
        _check_highs_block(got, p, solve_highs(p, solver=solver, presolve="off"))


def test_lifted_formulation_on_a_large_budget_row():
    """Above LIFT_MIN_ENTRIES the simplex gets a lifted model by default (expert counts for the
    capped program with one group, token counts otherwise); it agrees with the closed form (== c)
    and the flow solver (capped), duals included."""
    rng = np.random.default_rng(11)
    S = rng.normal(size=(160, 32))  # 5120 > 4096 entries
    two_groups = (np.arange(160) >= 140).astype(int)  # group 0: 140 x 32 > 4096 entries
    for p, ref, side in [(RoutingProblem.budget(S, 320, sense="=="), "closed_form", "token"),
                         (RoutingProblem.capped(S, 320, 3, 13), "flow", "expert"),
                         (RoutingProblem.capped(S, [280, 40], 3, 13, groups=two_groups), "flow", "token")]:
        assert backends.highs_formulation(p, "simplex", "off") == side
        raw = solve_highs(p)
        assert raw.status == "optimal"
        assert close(raw.objective, solve(p, ref, certify_solution=False).objective)
        assert raw.duals["budget"][0] > 0  # the budget binds: token multipliers u = w - lam differ from w
        _check_highs_block(raw, p, raw)


def test_highs_batch_rejects_bad_input():
    p = RoutingProblem.token_choice(np.ones((2, 2)), 1)
    with pytest.raises(InvalidParameter, match="solver"):
        solve_highs_batch([p], solver="dual")
    with pytest.raises(InvalidParameter, match=r"problems\[1\]"):
        solve_highs_batch([p, np.ones((2, 2))])
    assert solve_highs_batch([]) == []


# ----------------------------------------------------------------------------- exhaustive
def brute_force(p: RoutingProblem, bounds: dict) -> tuple[int | None, Fraction | None]:
    """(smallest mask number among the exact optima, the optimum), or (None, None) when no mask
    is feasible; bounds restated by the caller from the constructor arguments."""
    T, N = p.shape
    scores = [Fraction(float(v)) for v in p.scores.ravel()]
    best, best_m = None, None
    for bits in itertools.product((0, 1), repeat=T * N):
        x = np.array(bits[::-1]).reshape(T, N)  # bits[-1] is entry 0: masks in number order
        rows, cols = x.sum(axis=1), x.sum(axis=0)
        if "token" in bounds and not np.all((rows >= bounds["token"][0]) & (rows <= bounds["token"][1])):
            continue
        if "expert" in bounds and not np.all((cols >= bounds["expert"][0]) & (cols <= bounds["expert"][1])):
            continue
        if "budget" in bounds and not bounds["budget"][0] <= rows.sum() <= bounds["budget"][1]:
            continue
        value = sum((s for s, b in zip(scores, x.ravel(), strict=True) if b), Fraction(0))
        if best is None or value > best:
            best, best_m = value, int("".join(map(str, bits)), 2)
    return best_m, best


def _tiny(name: str, S: np.ndarray, rng: np.random.Generator):
    """(program, bounds as the brute force reads them)."""
    T, N = S.shape
    if name == "tc":
        k = int(rng.integers(1, N + 1))
        return RoutingProblem.token_choice(S, k), {"token": (k, k)}
    if name == "ec":
        e = int(rng.integers(1, T + 1))
        return RoutingProblem.expert_choice(S, e), {"expert": (e, e)}
    if name in ("budget<=", "budget=="):
        c = int(rng.integers(0, T * N + 1))
        lo = c if name == "budget==" else 0
        return RoutingProblem.budget(S, c, sense=name[-2:]), {"budget": (lo, c)}
    c, a, b = int(rng.integers(0, T * N + 1)), int(rng.integers(1, N + 1)), int(rng.integers(1, T + 1))
    return RoutingProblem.capped(S, c, a, b), {"token": (0, a), "expert": (0, b), "budget": (0, c)}


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(("tc", "ec", "budget<=", "budget==", "capped")),
       st.sampled_from(KINDS + ("decimal",)))
def test_exhaustive_equals_brute_force(seed, name, kind):
    """The exact optimum and the same mask (the smallest number among exact optima) as a brute
    force in rationals; "decimal" scores (0.1, 0.2, 0.3, ...) separate float and exact sums."""
    rng = np.random.default_rng(seed)
    T, N = [(1, 1), (2, 2), (3, 2), (2, 4), (3, 3)][rng.integers(5)]
    if kind == "decimal":
        S = rng.choice([0.1, 0.2, 0.3, 0.7, -0.1, -0.3], size=(T, N))
    else:
        S = make_scores(kind, (T, N), rng)
    p, bounds = _tiny(name, S, rng)
    m, best = brute_force(p, bounds)
    got = solve(p, "exhaustive", certify_solution=False)
    assert got.objective == float(best)  # fsum: the exact optimum, correctly rounded
    x = ((m >> np.arange(T * N)) & 1).reshape(T, N).astype(bool)
    assert np.array_equal(got.mask, x)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_exhaustive_batch_equals_highs_and_closed_form(seed):
    problems = make_batch(seed, SINGLE + COMBINED, max_t=4, max_n=4)
    exhaustive = solve_exhaustive_batch(problems)
    highs = solve_highs_batch(problems)
    for ex, hi, p in zip(exhaustive, highs, problems, strict=True):
        single = solve(p, "exhaustive")
        assert ex.status == single.status == hi.status
        if ex.status != "optimal":
            continue
        assert np.array_equal(ex.x, single.x) and ex.objective == single.objective
        assert close(ex.objective, hi.objective)
        assert single.certificate.optimal  # the enumerated mask is certified by the other path
        if p.is_single_block:
            assert close(ex.objective, solve(p, "closed_form").objective)


def test_exhaustive_limits_and_infeasible_programs():
    big = RoutingProblem.token_choice(np.zeros((3, EXHAUSTIVE_MAX_ENTRIES // 3 + 1)), 1)
    with pytest.raises(UnsupportedProblem, match=r"T\*N = 20.*3x7 = 21"):
        solve(big, "exhaustive")
    ok = RoutingProblem.token_choice(np.zeros((4, 5)), 1)  # exactly 20 entries: enumerated
    with pytest.raises(UnsupportedProblem, match="21 entries"):
        solve_exhaustive_batch([ok, big])
    assert solve(ok, "exhaustive").objective == 0.0
    infeasible = RoutingProblem(np.ones((2, 2)), token_min=[2, 0], expert_max=[0, 2])
    got = solve(infeasible, "exhaustive")
    assert got.status == "infeasible" and not got.success and got.certificate is None
    assert "none of the 2^4 masks" in got.message


def test_exhaustive_is_exact_where_float_sums_are_not():
    """fl(0.1 + 0.3) == 0.4, but as float64 values 0.1 + 0.3 < 0.4 exactly: of the two
    assignments of a 2x2 transport program, float sums tie and the exact sums do not. The
    enumeration takes the exactly better one, in either orientation."""
    assert 0.1 + 0.3 == 0.4 and Fraction(0.1) + Fraction(0.3) < Fraction(0.4)
    for S, best in [([[0.1, 0.4], [0.0, 0.3]], [[False, True], [True, False]]),
                    ([[0.4, 0.1], [0.3, 0.0]], [[True, False], [False, True]])]:
        p = RoutingProblem(np.array(S), token_min=1, token_max=1, expert_min=1, expert_max=1)
        got = solve(p, "exhaustive", certify_solution=False)
        assert got.mask.tolist() == best
        assert got.objective == 0.4


def test_certify_batch_rejects_bad_masks():
    p = RoutingProblem.token_choice(np.ones((2, 3)), 1)
    with pytest.raises(ShapeMismatch, match="2 masks for 1 programs"):
        certify_batch([p], [np.ones((2, 3), bool)] * 2)
    with pytest.raises(ShapeMismatch, match="shape"):
        certify_batch([p], [np.ones((3, 2), bool)])
    with pytest.raises(ShapeMismatch, match="0/1"):
        certify_batch([p], [np.full((2, 3), 0.5)])


# ----------------------------------------------------------------------------- RoutingProblem.for_scores
PROBLEM_FIELDS = ("scores", "token_min", "token_max", "expert_min", "expert_max", "budget", "groups", "group_sizes")


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_for_scores_equals_construction(seed):
    """B programs from one template equal B constructions field by field (dtypes and blocks too),
    with read-only scores."""
    rng = np.random.default_rng(seed)
    template = make_batch(seed, SINGLE + COMBINED, families=1, per_family=1)[0]
    kind = str(rng.choice(KINDS))
    S = np.stack([make_scores(kind, template.shape, rng) for _ in range(int(rng.integers(0, 5)))]
                 or [np.zeros(template.shape)])
    got = template.for_scores(S.astype(np.float32) if kind == "bf16" else S)
    for p, s in zip(got, S, strict=True):
        ref = RoutingProblem(s, token_min=template.token_min, token_max=template.token_max,
                             expert_min=template.expert_min, expert_max=template.expert_max,
                             budget=template.budget, budget_sense=template.budget_sense, groups=template.groups,
                             name=template.name)
        for f in PROBLEM_FIELDS:
            a, b = getattr(p, f), getattr(ref, f)
            assert (a is None) == (b is None)
            if a is not None:
                assert a.dtype == b.dtype and np.array_equal(a, b), f
        assert (p.budget_sense, p.name, p.blocks, p.shape) == (ref.budget_sense, ref.name, ref.blocks, ref.shape)
        assert not p.scores.flags.writeable and p.scores.flags.c_contiguous
        a, b = (solve(q, "flow", certify_solution=False) for q in (p, ref))
        assert a.status == b.status and same(a.objective, b.objective)


def test_for_scores_rejects_bad_stacks():
    p = RoutingProblem.token_choice(np.zeros((3, 2)), 1)
    with pytest.raises(ShapeMismatch, match=r"expected \(B, 3, 2\)"):
        p.for_scores(np.zeros((4, 2, 3)))
    with pytest.raises(ShapeMismatch, match=r"expected \(B, 3, 2\)"):
        p.for_scores(np.zeros((3, 2)))
    bad = np.zeros((4, 3, 2))
    bad[2, 1, 0] = np.nan
    with pytest.raises(InvalidScores, match="NaN"):
        p.for_scores(bad)
    huge = np.zeros((4, 3, 2))
    huge[3, 0, 0] = 1e307
    with pytest.raises(InvalidScores, match=r"scores\[3\]"):
        p.for_scores(huge)
    assert p.for_scores(np.zeros((0, 3, 2))) == []
