"""Hypothesis properties of the routing programs (papers/routing-as-lp.md §1-3): the closed form against HiGHS,
the relaxation ordering TC/EC <= global budget, invariances, and the sign caveat."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from usmoe_lp.lp import RoutingProblem, certify, dual_bound, solve

PROFILE = settings(max_examples=60, deadline=None)

# magnitudes in [1e-100, 1e3] or exactly 0 (no subnormals: scaling by 2^m stays exact)
_FLOATS = st.one_of(st.just(0.0), st.floats(1e-100, 1e3), st.floats(-1e3, -1e-100))
_TIED = st.integers(-2, 2).map(float)  # few distinct values: ties everywhere


@st.composite
def scores(draw, max_t: int = 12, max_n: int = 6, nonnegative: bool = False, tied=None):
    T = draw(st.integers(1, max_t))
    N = draw(st.integers(1, max_n))
    is_tied = draw(st.booleans()) if tied is None else tied
    elements = _TIED if is_tied else _FLOATS
    if nonnegative:
        elements = elements.map(abs)
    return draw(hnp.arrays(np.float64, (T, N), elements=elements))


@st.composite
def groups_for(draw, T: int):
    if draw(st.booleans()):
        return None
    G = draw(st.integers(1, T))
    ids = draw(st.lists(st.integers(0, G - 1), min_size=T, max_size=T))
    ids[:G] = range(G)  # every id used
    return draw(st.permutations(ids))


@st.composite
def single_block_programs(draw, nonnegative: bool = False):
    S = draw(scores(nonnegative=nonnegative))
    T, N = S.shape
    kind = draw(st.sampled_from(["tc", "ec", "budget", "token_range"]))
    if kind == "tc":
        return RoutingProblem.token_choice(S, draw(st.integers(1, N)))
    if kind == "ec":
        return RoutingProblem.expert_choice(S, draw(st.integers(1, T)))
    if kind == "token_range":
        lo = draw(st.lists(st.integers(0, N), min_size=T, max_size=T))
        hi = [draw(st.integers(a, N)) for a in lo]
        return RoutingProblem(S, token_min=lo, token_max=hi)
    groups = draw(groups_for(T))
    sizes = [T] if groups is None else np.bincount(groups).tolist()
    c = [draw(st.integers(0, s * N)) for s in sizes]
    sense = draw(st.sampled_from(["<=", "=="]))
    return RoutingProblem.budget(S, c[0] if groups is None else c, sense=sense, groups=groups)


def _tol(S: np.ndarray) -> float:
    """Room for HiGHS's feasibility/optimality tolerances (~1e-7 per entry)."""
    return 1e-7 * S.size * (1.0 + float(np.abs(S).max()))


@PROFILE
@given(single_block_programs())
def test_closed_form_matches_highs(problem):
    cf = solve(problem, "closed_form")
    hs = solve(problem, "highs")
    assert hs.success
    tol = _tol(problem.scores)
    assert abs(cf.objective - hs.objective) <= tol
    assert abs(cf.objective - problem.objective(hs.mask)) <= tol
    # the closed-form duals are optimal duals: the Lagrangian bound is the optimum
    assert abs(dual_bound(problem, cf.duals) - cf.objective) <= 1e-9 * (1 + np.abs(problem.scores).sum())


@PROFILE
@given(single_block_programs())
def test_closed_form_mask_is_certified_optimal(problem):
    sol = solve(problem, "closed_form")
    cert = certify(problem, sol.mask)
    assert cert.optimal and cert.feasible and cert.gap == 0.0
    assert cert.margin >= 0
    assert (cert.ties == 0) == cert.unique == (cert.margin > 0)


@PROFILE
@given(st.data())
def test_global_budget_dominates_tc_and_ec_at_equal_budget(data):
    S = data.draw(scores())
    T, N = S.shape
    k = data.draw(st.integers(1, N))
    c = T * k
    tol = 1e-9 * (1 + np.abs(S).sum())
    eq = solve(RoutingProblem.budget(S, c, sense="==")).objective
    le = solve(RoutingProblem.budget(S, c, sense="<=")).objective
    tc = solve(RoutingProblem.token_choice(S, k)).objective
    assert eq >= tc - tol
    assert le >= eq - tol  # "<=" relaxes "=="
    if c % N == 0:  # EC with e = T*k/N spends the same budget
        ec = solve(RoutingProblem.expert_choice(S, c // N)).objective
        assert eq >= ec - tol
    # and the LP agrees on the ordering
    assert solve(RoutingProblem.budget(S, c, sense="=="), "highs").objective >= tc - _tol(S)


@PROFILE
@given(single_block_programs(), st.integers(-10, 10))
def test_scaling_by_a_power_of_two_keeps_the_mask(problem, m):
    scaled = _rebuild(problem, problem.scores * 2.0**m)
    np.testing.assert_array_equal(solve(problem).mask, solve(scaled).mask)


@PROFILE
@given(st.data(), st.floats(1e-3, 1e3))
def test_scaling_integer_scores_keeps_the_mask(data, factor):
    """Any positive factor on integer-valued scores (ties stay ties, order and sign are kept)."""
    S = data.draw(scores(tied=True))
    T, N = S.shape
    problems = [RoutingProblem.token_choice(S, data.draw(st.integers(1, N))),
                RoutingProblem.expert_choice(S, data.draw(st.integers(1, T))),
                RoutingProblem.budget(S, data.draw(st.integers(0, T * N)),
                                      sense=data.draw(st.sampled_from(["<=", "=="])))]
    for problem in problems:
        scaled = _rebuild(problem, S * factor)
        np.testing.assert_array_equal(solve(problem).mask, solve(scaled).mask)


def _rebuild(problem: RoutingProblem, scores_: np.ndarray) -> RoutingProblem:
    return RoutingProblem(scores_, token_min=problem.token_min, token_max=problem.token_max,
                          expert_min=problem.expert_min, expert_max=problem.expert_max,
                          budget=problem.budget, budget_sense=problem.budget_sense,
                          groups=problem.groups, name=problem.name)


@PROFILE
@given(st.data())
def test_nonnegative_scores_make_le_and_eq_coincide(data):
    S = data.draw(scores(nonnegative=True))
    T, N = S.shape
    groups = data.draw(groups_for(T))
    sizes = [T] if groups is None else np.bincount(groups).tolist()
    c = [data.draw(st.integers(0, s * N)) for s in sizes]
    c = c[0] if groups is None else c
    le = RoutingProblem.budget(S, c, sense="<=", groups=groups)
    eq = RoutingProblem.budget(S, c, sense="==", groups=groups)
    sol_le, sol_eq = solve(le), solve(eq)
    # equal sets up to zero entries; summation order may move the last bit
    assert abs(sol_le.objective - sol_eq.objective) <= 1e-12 * (1 + np.abs(S).sum())
    assert certify(le, sol_eq.mask).optimal  # top-c is optimal for "<=" when S >= 0
    assert abs(solve(le, "highs").objective - solve(eq, "highs").objective) <= _tol(S)


@PROFILE
@given(single_block_programs(), st.data())
def test_weak_duality_holds_at_any_multipliers(problem, data):
    T, N = problem.shape
    opt = solve(problem).objective

    def vec(n: int) -> np.ndarray:
        return np.array(data.draw(st.lists(st.floats(-50, 50), min_size=n, max_size=n)))

    duals = {"token": vec(T), "expert": vec(N), "budget": vec(problem.num_groups)}
    keys = data.draw(st.lists(st.sampled_from(sorted(duals)), unique=True))
    bound = dual_bound(problem, {k: duals[k] for k in keys})
    assert bound >= opt - 1e-9 * (1 + abs(bound) + np.abs(problem.scores).sum())
