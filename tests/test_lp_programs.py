"""Hand-computed routing programs and the error surface of the exact LP path (``usmoe_lp.lp``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from usmoe_lp import errors
from usmoe_lp.errors import (
    InfeasibleProblem,
    InvalidParameter,
    InvalidScores,
    ShapeMismatch,
    UnsupportedProblem,
    UsmoeLpError,
)
from usmoe_lp.lp import (
    BACKENDS,
    RoutingProblem,
    certify,
    certify_with_duals,
    check_feasible,
    dual_bound,
    is_feasible,
    solve,
)
from usmoe_lp.lp.backends import solve_highs

SOLVERS = ("flow", "highs", "milp", "cbc")


def _mask(rows) -> np.ndarray:
    return np.array(rows, dtype=bool)


# ----------------------------------------------------------------------------- sign caveat
SIGN_S = np.array([[0.5, -1.0], [-2.0, -0.2]])
TOP2 = _mask([[1, 0], [0, 1]])  # global top-2: 0.5 and -0.2


@pytest.mark.parametrize("backend", BACKENDS)
def test_sign_counterexample_le(backend):
    """<= 2: the optimum takes the single positive entry (0.5); top-c (0.3) is not optimal."""
    problem = RoutingProblem.budget(SIGN_S, 2, sense="<=")
    sol = solve(problem, backend)
    assert sol.success
    assert sol.objective == pytest.approx(0.5)
    np.testing.assert_array_equal(sol.mask, _mask([[1, 0], [0, 0]]))
    assert sol.certificate.optimal


@pytest.mark.parametrize("backend", BACKENDS)
def test_sign_counterexample_eq(backend):
    """== 2: exactly two entries, 0.5 + (-0.2) = 0.3, which is top-c."""
    problem = RoutingProblem.budget(SIGN_S, 2, sense="==")
    sol = solve(problem, backend)
    assert sol.objective == pytest.approx(0.3)
    np.testing.assert_array_equal(sol.mask, TOP2)
    assert sol.certificate.optimal


@pytest.mark.parametrize("cert_backend", ["closed_form", "highs"])
def test_top_c_is_not_optimal_for_le(cert_backend):
    le = RoutingProblem.budget(SIGN_S, 2, sense="<=")
    cert = certify(le, TOP2, backend=cert_backend)
    assert cert.feasible and not cert.optimal
    assert cert.primal == pytest.approx(0.3)
    assert cert.gap == pytest.approx(0.2)
    assert cert.dual == pytest.approx(0.5)
    eq = RoutingProblem.budget(SIGN_S, 2, sense="==")
    assert certify(eq, TOP2, backend=cert_backend).optimal


def test_sense_is_kept():
    le = RoutingProblem.budget(SIGN_S, 2, sense="<=")
    eq = RoutingProblem.budget(SIGN_S, 2, sense="==")
    assert (le.budget_sense, eq.budget_sense) == ("<=", "==")
    assert le.blocks == eq.blocks == ("budget",)
    np.testing.assert_array_equal(le.budget, [2])
    np.testing.assert_array_equal(le.budget_lo, [0])
    np.testing.assert_array_equal(eq.budget_lo, [2])
    assert RoutingProblem.budget(SIGN_S, 2).budget_sense == "<="  # the paper's statement


# ----------------------------------------------------------------------------- capped (b-matching)
def greedy_with_caps(S, c, token_max, expert_max, positive_only):
    """Sort all entries, take each one whose row and column still have room, stop at c."""
    T, N = S.shape
    mask = np.zeros((T, N), dtype=bool)
    for flat in np.argsort(-S, axis=None, kind="stable"):
        i, j = divmod(int(flat), N)
        if mask.sum() == c or (positive_only and S[i, j] <= 0):
            break
        if mask[i].sum() < token_max and mask[:, j].sum() < expert_max:
            mask[i, j] = True
    return mask


CAPPED_CASES = [
    # S, c, token cap, expert cap, optimal mask (unique), optimum, greedy objective
    (np.array([[10.0, 9.0], [9.0, 0.0]]), 2, 1, 1, [[0, 1], [1, 0]], 18.0, 10.0),
    # row 0 and column 0 both hold at most 2; the optimum drops the shared 5 at (0, 0)
    (np.array([[5.0, 5.0, 4.0], [5.0, 0.0, 0.0], [4.0, 0.0, 0.0]]), 4, 2, 2,
     [[0, 1, 1], [1, 0, 0], [1, 0, 0]], 18.0, 15.0),
]


@pytest.mark.parametrize("sense", ["<=", "=="])
@pytest.mark.parametrize("case", range(len(CAPPED_CASES)))
def test_capped_beats_greedy(case, sense):
    S, c, a, b, best, opt, greedy_obj = CAPPED_CASES[case]
    problem = RoutingProblem.capped(S, c, a, b, sense=sense)
    assert set(problem.blocks) == {"token", "expert", "budget"}
    greedy = greedy_with_caps(S, c, a, b, positive_only=(sense == "<="))
    assert problem.objective(greedy) == greedy_obj
    for backend in SOLVERS:
        sol = solve(problem, backend)
        assert sol.success and sol.objective == pytest.approx(opt)
        np.testing.assert_array_equal(sol.mask, _mask(best))
        assert sol.certificate.optimal
    cert = certify(problem, greedy)
    assert cert.feasible and not cert.optimal
    assert cert.gap == pytest.approx(opt - greedy_obj)
    with pytest.raises(UnsupportedProblem):
        solve(problem, "closed_form")
    with pytest.raises(UnsupportedProblem):
        certify(problem, greedy, backend="closed_form")


def test_capped_without_binding_caps_is_the_budget_program():
    S = np.array([[0.5, -1.0, 3.0], [-2.0, -0.2, 1.0]])
    capped = RoutingProblem.capped(S, 3, token_max=3, expert_max=2, sense="==")
    assert capped.blocks == ("budget",)
    plain = RoutingProblem.budget(S, 3, sense="==")
    np.testing.assert_array_equal(solve(capped).mask, solve(plain).mask)
    assert solve(capped).objective == pytest.approx(3.0 + 1.0 + 0.5)


# ----------------------------------------------------------------------------- grouped budgets
GROUP_S = np.array([[3.0, -1.0], [2.0, 2.0], [5.0, 0.5], [-4.0, 1.0]])
GROUPS = [0, 1, 0, 1]  # group 0: rows 0 and 2; group 1: rows 1 and 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_budget_le(backend):
    # group 0 takes its best entry (5); group 1 its three positive ones (2 + 2 + 1 = 5 <= 4 slots)
    problem = RoutingProblem.budget(GROUP_S, [1, 4], sense="<=", groups=GROUPS)
    sol = solve(problem, backend)
    assert sol.objective == pytest.approx(10.0)
    np.testing.assert_array_equal(sol.mask, _mask([[0, 0], [1, 1], [1, 0], [0, 1]]))
    assert sol.certificate.optimal


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_budget_eq(backend):
    # == forces group 1 to take all four entries, the -4 included: 5 + (2 + 2 + 1 - 4) = 6
    problem = RoutingProblem.budget(GROUP_S, [1, 4], sense="==", groups=GROUPS)
    sol = solve(problem, backend)
    assert sol.objective == pytest.approx(6.0)
    np.testing.assert_array_equal(sol.mask, _mask([[0, 0], [1, 1], [1, 0], [1, 1]]))


def test_grouped_budget_scalar_broadcasts_and_differs_from_global():
    per_group = RoutingProblem.budget(GROUP_S, 1, sense="==", groups=GROUPS)
    np.testing.assert_array_equal(per_group.budget, [1, 1])
    assert per_group.num_groups == 2
    np.testing.assert_array_equal(per_group.group_sizes, [2, 2])
    sol = solve(per_group)
    # group 1 ties 2 = 2 in row 1: the lowest flat index, (1, 0), is taken
    np.testing.assert_array_equal(sol.mask, _mask([[0, 0], [1, 0], [1, 0], [0, 0]]))
    assert sol.objective == 7.0
    assert sol.certificate.ties == 2
    assert sol.certificate.log10_optimal_masks == pytest.approx(math.log10(2))
    # the same budget, 2, over all tokens at once: 5 + 3
    assert solve(RoutingProblem.budget(GROUP_S, 2, sense="==")).objective == 8.0
    assert solve(per_group, "highs").objective == pytest.approx(7.0)


def test_grouped_duals_certify_and_close_the_bound():
    problem = RoutingProblem.budget(GROUP_S, [1, 4], sense="==", groups=GROUPS)
    sol = solve(problem)
    assert sol.duals["budget"].shape == (2,)
    assert dual_bound(problem, sol.duals) == pytest.approx(6.0)
    hs = solve(problem, "highs")
    assert dual_bound(problem, hs.duals) == pytest.approx(6.0)


# ----------------------------------------------------------------------------- tie-breaking
TIE_CASES = [
    # problem, expected mask, number of optimal masks
    (lambda: RoutingProblem.token_choice(np.ones((2, 3)), 2), [[1, 1, 0], [1, 1, 0]], 9),
    (lambda: RoutingProblem.expert_choice(np.ones((3, 2)), 1), [[1, 1], [0, 0], [0, 0]], 9),
    (lambda: RoutingProblem.budget(np.ones((2, 3)), 3, sense="=="), [[1, 1, 1], [0, 0, 0]], 20),
    (lambda: RoutingProblem.budget(np.ones((2, 3)), 3, sense="<="), [[1, 1, 1], [0, 0, 0]], 20),
    # 2s at flat indices 1, 3, 5: take 1 and 3
    (lambda: RoutingProblem.budget(np.array([[1.0, 2, 1], [2, 1, 2]]), 2, sense="=="),
     [[0, 1, 0], [1, 0, 0]], 3),
    # negative ties under ==: the lowest indices
    (lambda: RoutingProblem.budget(-np.ones((2, 2)), 2, sense="=="), [[1, 1], [0, 0]], 6),
    # zeros under <=: taking none is optimal, as is any set of up to 4 (1+6+15+20+15)
    (lambda: RoutingProblem.budget(np.zeros((2, 3)), 4, sense="<="), [[0, 0, 0], [0, 0, 0]], 57),
    (lambda: RoutingProblem.budget(np.zeros((2, 3)), 2, sense="=="), [[1, 1, 0], [0, 0, 0]], 15),
    # a token block with per-row bounds and a tie at zero: rows need 1..2, 0..1, 2 experts
    (lambda: RoutingProblem(np.array([[0.0, 0, -1], [0, -3, -3], [1, -1, -1]]),
                            token_min=[1, 0, 2], token_max=[2, 1, 2]),
     [[1, 0, 0], [0, 0, 0], [1, 1, 0]], 3 * 2 * 2),
    # groups [1, 0, 1]: group 0 is row 1, group 1 rows 0 and 2 (lowest flat index is row 0)
    (lambda: RoutingProblem.budget(np.ones((3, 2)), [1, 1], sense="==", groups=[1, 0, 1]),
     [[1, 0], [1, 0], [0, 0]], 2 * 4),
]


@pytest.mark.parametrize("case", range(len(TIE_CASES)))
def test_closed_form_tie_breaking_is_lowest_flat_index_first(case):
    make, expected, n_optimal = TIE_CASES[case]
    first = solve(make())
    np.testing.assert_array_equal(first.mask, _mask(expected))
    for _ in range(3):  # deterministic
        np.testing.assert_array_equal(solve(make()).mask, first.mask)
    cert = first.certificate
    assert cert.optimal
    assert cert.log10_optimal_masks == pytest.approx(math.log10(n_optimal))
    assert cert.ties > 0 and not cert.unique and cert.margin == 0.0


# ----------------------------------------------------------------------------- integrality
def _tied_instances():
    rng = np.random.default_rng(7)
    out = []
    for T, N in [(1, 1), (3, 2), (6, 4), (12, 6), (40, 8)]:
        for values in ([0.0, 1.0], [-1.0, 0.0, 1.0], [0.25, 0.5]):
            S = rng.choice(values, size=(T, N))
            k = int(rng.integers(1, N + 1))
            e = int(rng.integers(1, T + 1))
            c = int(rng.integers(0, T * N + 1))
            out += [
                RoutingProblem.token_choice(S, k), RoutingProblem.expert_choice(S, e),
                RoutingProblem.budget(S, c, sense="<="), RoutingProblem.budget(S, c, sense="=="),
                RoutingProblem.capped(S, min(c, T * k, N * e), k, e, sense="=="),
                RoutingProblem.capped(S, c, k, e, sense="<="),
                RoutingProblem(S, token_min=k, token_max=k, expert_max=max(e, -(-T * k // N))),
            ]
            if (T * k) % N == 0:  # TC and EC together at equal budget
                out.append(RoutingProblem(S, token_min=k, token_max=k,
                                          expert_min=T * k // N, expert_max=T * k // N))
    return out


def test_highs_returns_integral_vertices_on_tied_programs():
    for problem in _tied_instances():
        for solver in ("choose", "simplex", "ipm"):  # ipm runs crossover: still a vertex
            raw = solve_highs(problem, solver=solver)
            assert raw.status == "optimal"
            assert np.max(np.abs(raw.x - np.round(raw.x))) == 0.0, (problem.describe(), solver)
        sol = solve(problem, "highs")
        assert sol.max_fractionality == 0.0
        assert sol.certificate.integral is True and sol.certificate.max_fractionality == 0.0
        assert sol.certificate.optimal, problem.describe()
        assert problem.objective(sol.mask) == pytest.approx(sol.objective)
        if problem.is_single_block:
            assert sol.objective == pytest.approx(solve(problem).objective)


# ----------------------------------------------------------------------------- HiGHS duals
def test_highs_duals_certify_any_optimal_mask_and_only_those():
    rng = np.random.default_rng(3)
    S = rng.integers(-2, 3, size=(6, 4)).astype(float)  # ties: many optimal masks
    for problem in [RoutingProblem.token_choice(S, 2), RoutingProblem.expert_choice(S, 3),
                    RoutingProblem.budget(S, 9, sense="<="),
                    RoutingProblem.budget(S, [5, 2, 7], sense="==", groups=[0, 1, 0, 1, 2, 2]),
                    RoutingProblem.capped(S, 9, 2, 3, sense="==")]:
        hs = solve(problem, "highs")
        opt = hs.objective
        cert = certify_with_duals(problem, hs.mask, hs.duals, x=hs.x, backend="highs")
        assert cert.optimal and cert.gap == pytest.approx(0.0, abs=1e-9)
        assert cert.integral is True and cert.backend == "highs"
        other = solve(problem, "cbc").mask  # another optimal mask, maybe a different one
        assert certify_with_duals(problem, other, hs.duals).optimal
        # a feasible mask that is worse by exactly one unit: swap a selected entry for a worse
        # unselected one in the same row (keeps every count)
        worse = _worse_by_one_swap(problem, hs.mask)
        assert worse is not None
        c2 = certify_with_duals(problem, worse, hs.duals)
        assert not c2.optimal and c2.feasible
        assert c2.gap == pytest.approx(opt - problem.objective(worse), abs=1e-9)
        if problem.is_single_block:  # the closed form refutes it exactly
            assert c2.status == "not_optimal" and "not optimal" in c2.message
        else:  # multipliers alone cannot refute a mask: undecided, never optimal
            assert c2.status == "undecided" and "not proven optimal" in c2.message
    # zero multipliers bound the optimum by the positive mass: valid, not tight
    problem = RoutingProblem.token_choice(S, 1)
    weak = certify_with_duals(problem, solve(problem).mask, {})
    assert weak.feasible and not weak.optimal and weak.status == "undecided"
    assert weak.dual == pytest.approx(np.maximum(S, 0).sum())


def _worse_by_one_swap(problem, mask):
    """A feasible mask that trades one selected entry for a strictly worse unselected one in the
    same row or the same column (None if there is none)."""
    S = problem.scores
    for M, X, flip in ((S, mask, False), (S.T, mask.T, True)):
        for i in range(M.shape[0]):
            for a in np.flatnonzero(X[i]):
                for b in np.flatnonzero(~X[i]):
                    if M[i, b] < M[i, a]:
                        out = X.copy()
                        out[i, a], out[i, b] = False, True
                        out = out.T if flip else out
                        if certify(problem, out).feasible:
                            return out
    return None


# ----------------------------------------------------------------------------- margins
def test_margin_semantics():
    tc = RoutingProblem.token_choice(np.array([[3.0, 1.0, 2.0]]), 1)
    best = certify(tc, _mask([[1, 0, 0]]))
    assert best.optimal and best.margin == 1.0 and best.unique and best.ties == 0
    wrong = certify(tc, _mask([[0, 0, 1]]))
    assert not wrong.optimal and wrong.margin == -1.0
    assert wrong.gap == pytest.approx(1.0)

    tied = RoutingProblem.token_choice(np.array([[3.0, 3.0, 1.0]]), 1)
    for m in ([[1, 0, 0]], [[0, 1, 0]]):
        cert = certify(tied, _mask(m))
        assert cert.optimal and cert.margin == 0.0 and cert.ties == 2
        assert cert.log10_optimal_masks == pytest.approx(math.log10(2))

    # <= with a zero: {1} and {1, 0} are both optimal (a free tie at the threshold 0)
    zero = RoutingProblem.budget(np.array([[1.0, 0.0, -1.0]]), 2, sense="<=")
    for m in ([[1, 0, 0]], [[1, 1, 0]]):
        cert = certify(zero, _mask(m))
        assert cert.optimal and cert.margin == 0.0
        assert cert.log10_optimal_masks == pytest.approx(math.log10(2))

    # <= without ties: the cheapest change is adding the -0.5 (costs 0.5)
    le = RoutingProblem.budget(np.array([[1.0, -0.5]]), 2, sense="<=")
    cert = certify(le, _mask([[1, 0]]))
    assert cert.optimal and cert.margin == 0.5 and cert.unique
    not_greedy = certify(le, _mask([[1, 1]]))  # feasible, keeps a negative entry
    assert not not_greedy.optimal and not_greedy.margin < 0
    assert not_greedy.gap == pytest.approx(0.5)

    # expert block: margins per column
    ec = RoutingProblem.expert_choice(np.array([[4.0, 0.0], [1.0, 2.0], [3.0, 2.0]]), 1)
    cert = certify(ec, _mask([[1, 0], [0, 1], [0, 0]]))
    assert cert.optimal and cert.margin == 0.0  # column 1 ties 2 = 2
    cert = certify(ec, _mask([[1, 0], [0, 0], [0, 1]]))
    assert cert.optimal and cert.margin == 0.0
    cert = certify(RoutingProblem.expert_choice(np.array([[4.0, 0.0], [1.0, 2.5], [3.0, 2.0]]), 1),
                   _mask([[1, 0], [0, 1], [0, 0]]))
    assert cert.optimal and cert.margin == pytest.approx(0.5)  # min(4 - 3, 2.5 - 2)


# ----------------------------------------------------------------------------- small cases
@pytest.mark.parametrize("backend", BACKENDS)
def test_unconstrained_program_takes_the_positive_entries(backend):
    S = np.array([[1.0, -2.0, 0.0], [3.0, -4.0, 0.5]])
    problem = RoutingProblem(S)
    assert problem.blocks == () and problem.is_single_block
    sol = solve(problem, backend)
    assert sol.objective == pytest.approx(4.5)
    np.testing.assert_array_equal(sol.mask & (S != 0), S > 0)
    assert sol.certificate.optimal
    assert sol.certificate.log10_optimal_masks == pytest.approx(math.log10(2))  # the zero


@pytest.mark.parametrize("backend", BACKENDS)
def test_tc_and_ec_hand_optimum(backend):
    S = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3], [0.4, 0.6, 0.7], [0.05, 0.15, 0.25]])
    tc = solve(RoutingProblem.token_choice(S, 1), backend)
    assert tc.objective == pytest.approx(0.9 + 0.8 + 0.7 + 0.25)
    ec = solve(RoutingProblem.expert_choice(S, 2), backend)
    assert ec.objective == pytest.approx((0.9 + 0.4) + (0.8 + 0.6) + (0.7 + 0.5))
    top6 = solve(RoutingProblem.budget(S, 6, sense="=="), backend)
    assert top6.objective == pytest.approx(0.9 + 0.8 + 0.7 + 0.6 + 0.5 + 0.4)


def test_certify_accepts_int_and_torch_masks():
    torch = pytest.importorskip("torch")
    problem = RoutingProblem.token_choice(np.array([[1.0, 2.0], [4.0, 3.0]]), 1)
    assert certify(problem, np.array([[0, 1], [1, 0]])).optimal
    assert certify(problem, torch.tensor([[False, True], [True, False]])).optimal
    assert not certify(problem, torch.tensor([[1, 0], [1, 0]])).optimal


def test_caller_scores_are_copied_not_frozen():
    S = np.array([[1.0, 2.0], [3.0, 4.0]])
    problem = RoutingProblem.budget(S, 1)
    assert S.flags.writeable
    assert not problem.scores.flags.writeable
    S[1, 1] = -10.0
    assert problem.scores[1, 1] == 4.0
    assert solve(problem).objective == 4.0


def test_solve_without_certificate_and_solution_fields():
    problem = RoutingProblem.token_choice(np.array([[1.0, 2.0], [4.0, 3.0]]), 1)
    for backend in BACKENDS:
        sol = solve(problem, backend, certify_solution=False)
        assert sol.certificate is None and sol.success and sol.backend == backend
        assert sol.x.shape == (2, 2) and sol.x.dtype == np.float64
    d = solve(problem).certificate.to_dict()
    assert d["optimal"] is True and "duals" not in d


# ----------------------------------------------------------------------------- validation
CONSTRUCTORS = {
    "token_choice": lambda S: RoutingProblem.token_choice(S, 1),
    "expert_choice": lambda S: RoutingProblem.expert_choice(S, 1),
    "budget": lambda S: RoutingProblem.budget(S, 1),
    "capped": lambda S: RoutingProblem.capped(S, 1, 1, 1),
    "custom": lambda S: RoutingProblem(S),
}


def test_every_error_is_a_usmoe_lp_error():
    kinds = [errors.InvalidScores, errors.InvalidParameter, errors.ShapeMismatch,
             errors.InfeasibleProblem, errors.UnsupportedProblem, errors.SolverError]
    for cls in kinds:
        assert issubclass(cls, UsmoeLpError)
    for cls in kinds[:-1]:
        assert issubclass(cls, ValueError)  # bad input is also a ValueError


@pytest.mark.parametrize("ctor", CONSTRUCTORS)
def test_non_finite_scores_name_the_count(ctor):
    S = np.array([[np.nan, 1.0, np.inf], [-np.inf, 2.0, np.nan]])
    with pytest.raises(InvalidScores, match=r"2 NaN and 2 Inf") as info:
        CONSTRUCTORS[ctor](S)
    assert isinstance(info.value, UsmoeLpError)
    with pytest.raises(InvalidScores, match=r"0 NaN and 1 Inf"):
        CONSTRUCTORS[ctor](np.array([[1.0, -np.inf], [0.0, 0.0]]))


@pytest.mark.parametrize("ctor", CONSTRUCTORS)
@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0, 0)])
def test_empty_scores(ctor, shape):
    with pytest.raises(InvalidScores, match="empty"):
        CONSTRUCTORS[ctor](np.zeros(shape))


@pytest.mark.parametrize("ctor", CONSTRUCTORS)
@pytest.mark.parametrize("shape", [(3,), (2, 2, 2), ()])
def test_scores_must_be_2d(ctor, shape):
    with pytest.raises(InvalidScores, match="2-D"):
        CONSTRUCTORS[ctor](np.ones(shape))


def test_scores_must_be_numeric():
    with pytest.raises(InvalidScores, match="numeric"):
        RoutingProblem.budget(np.array([["a", "b"]]), 1)
    with pytest.raises(InvalidScores):
        RoutingProblem.budget(np.array([[True, False]]), 1)
    assert RoutingProblem.budget(np.array([[1, 2]]), 1).scores.dtype == np.float64


@pytest.mark.parametrize("k", [0, -1, 4, 1.5, True, None, "x", float("nan")])
def test_bad_k(k):
    with pytest.raises(InvalidParameter, match="k"):
        RoutingProblem.token_choice(np.ones((2, 3)), k)


def test_integral_float_k_is_accepted():
    assert solve(RoutingProblem.token_choice(np.ones((2, 3)), 2.0)).mask.sum() == 4


@pytest.mark.parametrize("e", [0, -2, 3, 2.5])
def test_bad_capacity(e):
    with pytest.raises(InvalidParameter, match="capacity"):
        RoutingProblem.expert_choice(np.ones((2, 3)), e)


@pytest.mark.parametrize("c", [-1, 7, 2.5, True])
@pytest.mark.parametrize("ctor", ["budget", "capped"])
def test_bad_budget(c, ctor):
    S = np.ones((2, 3))
    make = (lambda: RoutingProblem.budget(S, c)) if ctor == "budget" else \
        (lambda: RoutingProblem.capped(S, c, 3, 2))
    with pytest.raises(InvalidParameter, match="budget"):
        make()


def test_budget_limits_are_inclusive():
    S = np.ones((2, 3))
    assert solve(RoutingProblem.budget(S, 0, sense="==")).mask.sum() == 0
    assert solve(RoutingProblem.budget(S, 6, sense="==")).mask.sum() == 6


def test_group_budget_beyond_its_group():
    with pytest.raises(InvalidParameter, match="group 1"):
        RoutingProblem.budget(np.ones((3, 2)), [4, 3], groups=[0, 1, 0])
    with pytest.raises(InvalidParameter, match="-1"):
        RoutingProblem.budget(np.ones((3, 2)), [1, -1], groups=[0, 1, 0])


def test_bad_groups():
    S = np.ones((3, 2))
    with pytest.raises(ShapeMismatch, match="groups"):
        RoutingProblem.budget(S, 1, groups=[0, 1])
    with pytest.raises(InvalidParameter, match="unused"):
        RoutingProblem.budget(S, 1, groups=[0, 2, 2])
    with pytest.raises(InvalidParameter, match="integer"):
        RoutingProblem.budget(S, 1, groups=[0.0, 1.0, 1.0])
    with pytest.raises(InvalidParameter, match="non-negative"):
        RoutingProblem.budget(S, 1, groups=[0, -1, 1])
    with pytest.raises(ShapeMismatch, match="one per group"):
        RoutingProblem.budget(S, [1, 1, 1], groups=[0, 1, 1])


def test_bad_sense_and_bounds():
    S = np.ones((2, 3))
    with pytest.raises(InvalidParameter, match="budget_sense"):
        RoutingProblem.budget(S, 1, sense="<")
    with pytest.raises(ShapeMismatch, match="token_max"):
        RoutingProblem(S, token_max=[1, 1, 1])
    with pytest.raises(InvalidParameter, match="negative"):
        RoutingProblem(S, expert_max=[1, -1, 1])
    with pytest.raises(InvalidParameter, match="integers"):
        RoutingProblem(S, token_min=0.5)


def test_capacity_cap_beyond_t_is_clipped_not_an_error():
    problem = RoutingProblem.capped(np.ones((2, 3)), 2, token_max=1, expert_max=5)
    assert problem.expert_max.tolist() == [2, 2, 2]
    assert problem.blocks == ("token", "budget")


@pytest.mark.parametrize("bad", [np.zeros((2, 3)), np.zeros((3, 2)), np.zeros(4), np.zeros((2, 2, 1))])
def test_mask_shape_mismatch(bad):
    problem = RoutingProblem.token_choice(np.ones((2, 2)), 1)
    capped = RoutingProblem.capped(np.ones((2, 2)), 1, 1, 1)
    for call in (lambda: certify(problem, bad), lambda: certify(capped, bad),
                 lambda: certify(problem, bad, backend="highs"),
                 lambda: certify_with_duals(problem, bad, {})):
        with pytest.raises(ShapeMismatch, match="shape"):
            call()


def test_mask_must_be_zero_one():
    problem = RoutingProblem.token_choice(np.ones((2, 2)), 1)
    for bad in (np.array([[0.5, 0.0], [1.0, 0.0]]), np.array([[2, 0], [1, 0]])):
        with pytest.raises(ShapeMismatch, match="0/1"):
            certify(problem, bad)


INFEASIBLE = [
    (dict(token_min=3), "token_min"),
    (dict(expert_min=[0, 4]), r"expert_min\[1\] = 4 exceeds the T = 3"),
    (dict(token_min=[1, 2, 1], token_max=[1, 1, 1]), r"token_min\[1\] = 2 > token_max\[1\] = 1"),
    (dict(expert_min=2, expert_max=[2, 1]), r"expert_min\[1\] = 2 > expert_max\[1\] = 1"),
    (dict(token_min=1, expert_max=1), "token minimums need 3 .* expert maximums allow 2"),
    (dict(expert_min=2, token_max=1), "expert minimums need 4 .* token maximums allow 3"),
    (dict(token_min=1, budget=2), "budget 2 of group 0 is below the 3 selections that token_min"),
    (dict(token_max=1, budget=4, budget_sense="=="), "budget == 4 .* token_max"),
    (dict(expert_min=2, budget=3), "expert minimums need 4 .* budget allows 3"),
    (dict(expert_max=1, budget=3, budget_sense="=="), "budget == 3 exceeds the 2 .* expert_max"),
    (dict(token_min=1, budget=[1, 1], groups=[0, 1, 1]), "group 1"),
]


@pytest.mark.parametrize(("kwargs", "match"), INFEASIBLE)
def test_infeasible_bounds_name_the_constraint(kwargs, match):
    with pytest.raises(InfeasibleProblem, match=match) as info:
        RoutingProblem(np.ones((3, 2)), **kwargs)
    assert isinstance(info.value, UsmoeLpError)


def test_infeasible_constructor_combinations():
    S = np.ones((3, 2))
    with pytest.raises(InfeasibleProblem, match="expert_max"):
        RoutingProblem.capped(S, 5, token_max=2, expert_max=2, sense="==")
    with pytest.raises(InfeasibleProblem, match="token_max"):
        RoutingProblem.capped(S, 5, token_max=1, expert_max=3, sense="==")
    # TC with k = 1 and EC with e = 2 cannot hold together on 3 tokens x 2 experts (3 != 4)
    with pytest.raises(InfeasibleProblem):
        RoutingProblem(S, token_min=1, token_max=1, expert_min=2, expert_max=2)
    # ... whereas <= is always satisfiable (take nothing)
    assert solve(RoutingProblem.capped(S, 5, 1, 1, sense="<="), "highs").mask.sum() == 2


def test_structural_infeasibility_is_detected_by_check_feasible():
    # token 0 needs both experts but expert 0 takes nobody; every total balances, so construction
    # (totals only, no solver) accepts it and the explicit step refuses it
    problem = RoutingProblem(np.ones((2, 2)), token_min=[2, 0], expert_max=[0, 2])
    assert not problem.totals_decide_feasibility
    assert not is_feasible(problem)
    with pytest.raises(InfeasibleProblem, match="token and expert bounds"):
        check_feasible(problem)
    ok = RoutingProblem(np.ones((2, 2)), token_min=[2, 0], expert_max=[1, 2])
    assert check_feasible(ok) is ok and is_feasible(ok)
    uniform = RoutingProblem.capped(np.ones((2, 2)), 2, 1, 1)
    assert uniform.totals_decide_feasibility and check_feasible(uniform) is uniform


def test_structurally_infeasible_program_is_reported():
    """Every solver reports such a program as infeasible and never yields a routing."""
    problem = RoutingProblem(np.ones((2, 2)), token_min=[2, 0], expert_max=[0, 2])
    for backend in SOLVERS:
        sol = solve(problem, backend)
        assert sol.status == "infeasible" and not sol.success and sol.certificate is None


def test_unknown_backends():
    problem = RoutingProblem.token_choice(np.ones((2, 2)), 1)
    with pytest.raises(InvalidParameter, match="gurobi"):
        solve(problem, "gurobi")
    with pytest.raises(InvalidParameter, match="cbc"):
        certify(problem, np.eye(2), backend="cbc")


def test_closed_form_rejects_combined_programs():
    capped = RoutingProblem.capped(np.ones((2, 3)), 2, 1, 1)
    with pytest.raises(UnsupportedProblem, match="highs") as info:
        solve(capped, "closed_form")
    assert isinstance(info.value, UsmoeLpError)
    with pytest.raises(UnsupportedProblem):
        certify(capped, np.zeros((2, 3)), backend="closed_form")
    both = RoutingProblem(np.ones((2, 2)), token_min=1, token_max=1, expert_min=1, expert_max=1)
    with pytest.raises(UnsupportedProblem, match="token . expert"):
        solve(both)
    assert certify(both, np.eye(2)).backend == "flow"  # auto: the flow solver's multipliers
    assert certify(both, np.eye(2), backend="highs").backend == "highs"
