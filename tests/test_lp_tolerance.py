"""Certificates at awkward scales: never ``optimal`` for a wrong mask (exact oracles).

The oracle enumerates every 0/1 mask of a tiny program and compares objectives with exact
rational arithmetic (``fractions.Fraction``), so near-ties at 1e-10 relative and scores at 1e-300
or 1e300 are decided exactly, independently of the library's float64 arithmetic.
"""

from __future__ import annotations

import functools
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usmoe_lp.errors import InvalidScores
from usmoe_lp.lp import RoutingProblem, certify, certify_with_duals, solve

STATUSES = {"optimal", "not_optimal", "infeasible", "undecided"}


def exact_objective(S: np.ndarray, mask: np.ndarray) -> Fraction:
    return sum((Fraction(float(v)) for v in S[np.asarray(mask, bool)]), Fraction(0))


@functools.cache
def _all_masks(T: int, N: int) -> np.ndarray:
    bits = (np.arange(2 ** (T * N))[:, None] >> np.arange(T * N)[None, :]) & 1
    return bits.astype(bool).reshape(-1, T, N)


def exact_optimum(problem: RoutingProblem) -> Fraction:
    """max over every feasible 0/1 mask (T*N <= 12), decided in exact arithmetic: float sums only
    shortlist the masks within 1e-6 (relative) of the float best, far beyond their rounding."""
    S = problem.scores
    masks = _all_masks(*S.shape)
    rows, cols = masks.sum(2), masks.sum(1)
    ok = np.all((rows >= problem.token_min) & (rows <= problem.token_max), axis=1)
    ok &= np.all((cols >= problem.expert_min) & (cols <= problem.expert_max), axis=1)
    if problem.budget is not None:
        g = problem.group_ids
        per = np.stack([rows[:, g == k].sum(1) for k in range(problem.num_groups)], axis=1)
        ok &= np.all((per >= problem.budget_lo) & (per <= problem.budget), axis=1)
    feasible = masks[ok]
    values = feasible.reshape(len(feasible), -1).astype(np.float64) @ S.ravel()
    close = values >= values.max() - 1e-6 * float(np.abs(S).sum())
    return max(exact_objective(S, X) for X in feasible[close])


def assert_honest(problem: RoutingProblem, mask, cert) -> None:
    """The certificate may be undecided, but ``optimal`` must be true and ``not_optimal`` false."""
    assert cert.status in STATUSES
    assert cert.optimal == (cert.status == "optimal")
    truth = exact_objective(problem.scores, mask) == exact_optimum(problem)
    where = f"{problem.describe()} mask={np.asarray(mask).astype(int).tolist()} {cert.message}"
    if cert.status == "optimal":
        assert truth, "a wrong mask certified optimal: " + where
    if cert.status == "not_optimal":
        assert not truth, "an optimal mask called not optimal: " + where
    if cert.status == "undecided":
        assert "undecided" in cert.message or "not proven" in cert.message


def near_tie() -> np.ndarray:
    S = np.full((4, 4), 0.25)
    S[0, 1] += 3e-10
    S[1, 2] += 3e-10
    return S


def programs(S: np.ndarray):
    T, N = S.shape
    return [RoutingProblem.token_choice(S, min(2, N)), RoutingProblem.expert_choice(S, min(2, T)),
            RoutingProblem.budget(S, 2, sense="=="), RoutingProblem.budget(S, 3, sense="<="),
            RoutingProblem.capped(S, 3, 1, 2, sense="==")]


def test_highs_near_tie_is_not_certified_optimal():
    """The regression: HiGHS picked a wrong mask on a 1.2e-9 relative near-tie and its duals,
    within an absolute 1e-9, certified it."""
    S = near_tie()
    problem = RoutingProblem.budget(S, 2, sense="==")
    sol = solve(problem, backend="highs")
    assert_honest(problem, sol.mask, sol.certificate)
    assert_honest(problem, sol.mask, certify(problem, sol.mask, backend="highs"))
    top = np.zeros((4, 4), bool)
    top[0, 1] = top[1, 2] = True
    assert certify(problem, top).status == "optimal"


@pytest.mark.parametrize("scale", [1e-12, 1e-200, 1e-300, 1.0, 1e25, 1e200])
@pytest.mark.parametrize("backend", ["closed_form", "highs", "milp"])
def test_scale_invariance(scale, backend):
    """Routing is invariant under positive scaling: the same optimum at any scale, and the
    certificate of the backend's mask is honest (tiny scores reached 55% of the optimum)."""
    rng = np.random.default_rng(7)
    base = rng.random((3, 4))
    for problem in programs(base * scale):
        if backend == "closed_form" and not problem.is_single_block:
            continue
        sol = solve(problem, backend=backend)
        assert sol.success, sol.message
        assert_honest(problem, sol.mask, sol.certificate)
        assert sol.certificate.status == "optimal", sol.certificate.message  # no near-ties here
        assert exact_objective(problem.scores, sol.mask) == exact_optimum(problem)


def test_near_tie_every_backend_every_program():
    S = near_tie()[:3, :4]
    for problem in programs(S):
        for backend in ("closed_form", "highs", "milp"):
            if backend == "closed_form" and not problem.is_single_block:
                continue
            sol = solve(problem, backend=backend)
            assert_honest(problem, sol.mask, sol.certificate)


def test_scores_too_large_to_sum_are_rejected():
    with pytest.raises(InvalidScores, match="too large to sum"):
        RoutingProblem.budget(np.full((2, 2), 1e308), 3, sense="==")
    # just below the limit: finite objective, gap and a decided certificate
    S = np.full((2, 2), 1e306)
    sol = solve(RoutingProblem.budget(S, 3, sense="=="))
    assert np.isfinite(sol.certificate.primal) and np.isfinite(sol.certificate.gap)
    assert sol.certificate.status == "optimal"
    hs = solve(RoutingProblem.budget(S, 3, sense="=="), backend="highs")
    assert hs.success and hs.certificate.status == "optimal", hs.message


def test_weak_multipliers_are_undecided_not_optimal():
    S = np.array([[0.5, 0.25], [0.125, 1.0]])
    problem = RoutingProblem.token_choice(S, 1)
    cert = certify_with_duals(problem, solve(problem).mask, {})
    assert cert.status == "undecided" and not cert.optimal and "not proven" in cert.message


def test_certificate_status_in_to_dict():
    problem = RoutingProblem.token_choice(np.eye(2), 1)
    d = certify(problem, np.eye(2, dtype=bool)).to_dict()
    assert d["status"] == "optimal" and d["optimal"] is True


# ----------------------------------------------------------------------------- property
@st.composite
def instances(draw):
    T = draw(st.integers(1, 3))
    N = draw(st.integers(1, 4 if T < 3 else 3))
    base = np.array(draw(st.lists(st.sampled_from([0.25, 0.5, -0.5, 1.0]), min_size=T * N,
                                  max_size=T * N))).reshape(T, N)
    jitter = np.array(draw(st.lists(st.sampled_from([0.0, 1e-16, 3e-10, -3e-10, 1e-7]),
                                    min_size=T * N, max_size=T * N))).reshape(T, N)
    exponent = draw(st.sampled_from([-300, -150, -40, 0, 40, 150, 290]))
    S = (base + jitter) * 10.0**exponent
    kind = draw(st.sampled_from(["tc", "ec", "eq", "le", "capped"]))
    k = draw(st.integers(1, N))
    e = draw(st.integers(1, T))
    c = draw(st.integers(0, T * N))
    if kind == "tc":
        return RoutingProblem.token_choice(S, k)
    if kind == "ec":
        return RoutingProblem.expert_choice(S, e)
    if kind == "capped":
        return RoutingProblem.capped(S, min(c, k * T, e * N), k, e, sense="<=")
    return RoutingProblem.budget(S, c, sense="==" if kind == "eq" else "<=")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(), st.sampled_from(["closed_form", "highs", "milp"]))
def test_optimal_only_if_brute_force_agrees(problem, backend):
    if backend == "closed_form" and not problem.is_single_block:
        backend = "highs"
    sol = solve(problem, backend=backend)
    if sol.certificate is not None:
        assert_honest(problem, sol.mask, sol.certificate)
    # and a random other mask through certify()
    rng = np.random.default_rng(problem.shape[0] * 7 + problem.shape[1])
    other = rng.random(problem.shape) < 0.5
    assert_honest(problem, other, certify(problem, other))


def test_a_budget_threshold_a_few_ulps_off_its_score_still_proves_the_mask():
    """HiGHS returned the budget dual -1.5834682906862634 for a program whose threshold is the score
    -1.5834682906862636 (2 ulps apart): taken literally it makes the selected entry's reduced cost negative. The
    rebuilt multiplier is moved onto the score it rounds, and the exact check then proves the mask; a threshold
    that is really off (0.1 away) still proves nothing."""
    S = np.array([[0.8883971751128152, -0.4683023488756826], [0.04007122508237042, -1.5834682906862636],
                  [-0.5464064038917776, 1.1914232308067025], [1.1862072993776271, -0.8052302822936388],
                  [1.002455162567904, -0.1521794203223147], [-0.8390516919692546, -2.033937437549325],
                  [-1.3575080882433566, 0.0885139043194626], [0.6359035205987369, -1.025088277818032]])
    p = RoutingProblem.budget(S, 15, sense="==")
    mask = S > S.min()                      # all but the smallest entry: the optimum of '== 15'
    assert certify(p, mask).optimal         # closed form
    cert = certify_with_duals(p, mask, {"budget": np.array([-1.5834682906862634])})
    assert cert.optimal and cert.status == "optimal", cert.message
    off = certify_with_duals(p, mask, {"budget": np.array([-1.4834682906862634])})
    assert not off.optimal and off.status == "undecided"
