"""The flow backend (``solve(..., "flow")``, ``usmoe_lp.lp.flow``) and the ``capped_optimal`` router.

Oracles: brute force over every 0/1 mask for T*N <= 16 (bounds stated here, independently of the
library; scores on a dyadic grid, so every subset sum is exact and ties are ties), HiGHS on larger
programs, hand-computed cases, and the exact certificate of the flow's own multipliers.
"""

from __future__ import annotations

import ast
import importlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usmoe_lp.errors import InfeasibleProblem, InvalidParameter, UnsupportedProblem
from usmoe_lp.lp import (
    RoutingProblem,
    certify,
    check_feasible,
    dual_bound,
    flow_optimum,
    is_feasible,
    solve,
)
from usmoe_lp.lp import flow as flow_module
from usmoe_lp.routers import RouterConfig, get_router, reroute
from usmoe_lp.routers.entries.capped_optimal import capped_optimal
from usmoe_lp.routing import capacity_token_choice

ROOT = Path(__file__).resolve().parents[1]
GRID = 2.0**-20


# ----------------------------------------------------------------------------- brute force
def brute_force(S, tmin, tmax, emin, emax, groups, blo, bhi):
    """(optimum or None when infeasible, number of optimal masks) over all 2^(T N) masks."""
    T, N = S.shape
    n = T * N
    codes = np.arange(2**n, dtype=np.int64)
    bits = ((codes[:, None] >> np.arange(n)) & 1).astype(bool)
    X = bits.reshape(-1, T, N)
    rows, cols = X.sum(axis=2), X.sum(axis=1)
    ok = np.all((rows >= tmin) & (rows <= tmax), axis=1) & np.all((cols >= emin) & (cols <= emax), axis=1)
    for g in range(blo.size):
        tot = rows[:, groups == g].sum(axis=1)
        ok &= (tot >= blo[g]) & (tot <= bhi[g])
    if not ok.any():
        return None, 0
    obj = bits[ok].astype(np.float64) @ S.ravel()  # exact: dyadic scores, few terms
    best = obj.max()
    return float(best), int(np.sum(obj == best))


def grid_scores(kind: str, T: int, N: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "gauss":
        s = rng.normal(size=(T, N))
    elif kind == "integer":  # many ties, zeros and negatives
        s = rng.integers(-2, 3, size=(T, N)).astype(np.float64)
    elif kind == "positive":
        s = rng.uniform(0.01, 1.0, size=(T, N))
    elif kind == "equal":
        s = np.full((T, N), rng.choice([-0.5, 0.25, 1.0]))
    else:
        s = np.zeros((T, N))
    return np.clip(np.round(s / GRID) * GRID, -7.0, 7.0)


@st.composite
def programs(draw, general: bool = False):
    """A tiny routing program (T*N <= 16) with its bounds restated for the oracle."""
    T = draw(st.integers(1, 8))
    N = draw(st.integers(1, max(1, 16 // T)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    S = grid_scores(draw(st.sampled_from(["gauss", "integer", "positive", "equal", "zeros"])), T, N, rng)
    sense = draw(st.sampled_from(["<=", "=="]))
    G = draw(st.integers(1, T))
    groups = None if G == 1 else np.concatenate([np.arange(G), rng.integers(0, G, T - G)])
    if groups is not None:
        rng.shuffle(groups)
    sizes = np.array([T]) if groups is None else np.bincount(groups)
    budget = np.array([int(rng.integers(0, s * N + 1)) for s in sizes])
    if general:  # per-row bounds, lower bounds too
        tmin = rng.integers(0, 2, T) * (rng.random(T) < 0.3)
        tmax = np.maximum(tmin, rng.integers(0, N + 1, T))
        emin = rng.integers(0, 2, N) * (rng.random(N) < 0.3)
        emax = np.maximum(emin, rng.integers(0, T + 1, N))
        kwargs = dict(token_min=tmin, token_max=tmax, expert_min=emin, expert_max=emax)
    else:  # the capped program
        tmin, emin = np.zeros(T, np.int64), np.zeros(N, np.int64)
        tmax = np.full(T, draw(st.integers(1, N)))
        emax = np.full(N, draw(st.integers(1, T)))
        kwargs = dict(token_max=int(tmax[0]), expert_max=int(emax[0]))
    make = lambda: RoutingProblem(S, budget=budget if groups is not None else int(budget[0]),  # noqa: E731
                                  budget_sense=sense, groups=groups, **kwargs)
    blo = budget if sense == "==" else np.zeros_like(budget)
    gid = np.zeros(T, np.int64) if groups is None else groups
    return S, make, (tmin, tmax, emin, emax, gid, blo, budget)


HYPO = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@HYPO
@given(programs())
def test_capped_flow_matches_brute_force_and_certifies_itself(case):
    S, make, bounds = case
    opt, _ = brute_force(S, *bounds)
    try:
        problem = make()
    except InfeasibleProblem:
        assert opt is None  # construction refuses only programs without a routing
        return
    sol = solve(problem, "flow")
    if opt is None:
        assert sol.status == "infeasible" and sol.certificate is None and not sol.mask.any()
        return
    assert sol.success, sol.message
    assert sol.objective == opt
    assert problem.objective(sol.mask) == opt
    cert = sol.certificate
    # exact arithmetic on the grid: the flow's own multipliers prove it, no HiGHS fallback
    assert cert.optimal and cert.backend == "flow", (cert.message, sol.message)
    assert dual_bound(problem, sol.duals) == pytest.approx(opt, abs=1e-9)


@HYPO
@given(programs(general=True))
def test_general_bounds_feasibility_and_optimum_match_brute_force(case):
    S, make, bounds = case
    opt, _ = brute_force(S, *bounds)
    try:
        problem = make()
    except InfeasibleProblem:
        assert opt is None
        return
    assert is_feasible(problem) == (opt is not None)
    if opt is None:
        with pytest.raises(InfeasibleProblem):
            check_feasible(problem)
    else:
        assert check_feasible(problem) is problem
    res = flow_optimum(problem)
    assert res.status == ("infeasible" if opt is None else "optimal"), res.message
    if opt is not None:
        assert problem.objective(res.mask) == opt
        sol = solve(problem, "flow")
        assert sol.certificate.optimal and sol.certificate.backend == "flow", sol.certificate.message


# ----------------------------------------------------------------------------- hand-computed
def test_capped_hand_case_and_duals():
    # expert 0 holds one token: the optimum gives it to token 1 (0.9 - 0.1 beats 0.6 - 0.5)
    S = np.array([[0.6, 0.5], [0.9, 0.1]])
    problem = RoutingProblem.capped(S, 2, token_max=1, expert_max=1)
    sol = solve(problem, "flow")
    np.testing.assert_array_equal(sol.mask, [[False, True], [True, False]])
    assert sol.objective == pytest.approx(1.4) and sol.certificate.optimal
    assert set(sol.duals) == {"token", "expert", "budget"}
    assert dual_bound(problem, sol.duals) == pytest.approx(1.4)


def test_negative_scores_le_takes_only_what_pays():
    S = np.array([[0.5, -1.0, -0.2], [-2.0, -0.2, 0.3], [-0.1, -0.3, -0.4]])
    le = solve(RoutingProblem.capped(S, 4, token_max=2, expert_max=2, sense="<="), "flow")
    np.testing.assert_array_equal(le.mask, S > 0)
    eq = solve(RoutingProblem.capped(S, 4, token_max=2, expert_max=2, sense="=="), "flow")
    assert eq.mask.sum() == 4 and eq.objective == pytest.approx(0.5 + 0.3 - 0.1 - 0.2)
    assert le.certificate.optimal and eq.certificate.optimal


def test_infeasible_eq_budget():
    S = np.ones((3, 2))
    with pytest.raises(InfeasibleProblem, match="expert_max"):  # totals: refused at construction
        RoutingProblem.capped(S, 5, token_max=2, expert_max=2, sense="==")
    # every total balances, but token 0 (group 0) needs both experts while expert 0 takes nobody
    problem = RoutingProblem(S[:2], token_max=2, expert_max=[0, 2], budget=[2, 0], budget_sense="==",
                             groups=[0, 1])
    assert not problem.totals_decide_feasibility
    sol = solve(problem, "flow")
    assert sol.status == "infeasible" and not sol.success and sol.certificate is None
    assert "infeasible" in sol.message and "expert" in sol.message
    assert solve(problem, "highs").status == "infeasible"
    with pytest.raises(InfeasibleProblem, match="flow condition"):
        check_feasible(problem)


def test_single_block_programs_match_the_closed_form():
    rng = np.random.default_rng(3)
    S = rng.normal(size=(40, 7))
    for problem in (RoutingProblem.token_choice(S, 2), RoutingProblem.expert_choice(S, 9),
                    RoutingProblem.budget(S, 50, sense="<="), RoutingProblem.budget(S, 50, sense="=="),
                    RoutingProblem(S)):
        sol = solve(problem, "flow")
        ref = solve(problem, "closed_form")
        assert sol.objective == pytest.approx(ref.objective, rel=1e-12)
        assert sol.certificate.optimal


# ----------------------------------------------------------------------------- against HiGHS
@pytest.mark.parametrize("seed", range(6))
def test_flow_matches_highs_on_larger_programs(seed):
    rng = np.random.default_rng(seed)
    T, N = int(rng.integers(30, 120)), int(rng.integers(3, 12))
    if seed % 3 == 0:
        S = rng.normal(size=(T, N))
    elif seed % 3 == 1:  # skewed softmax: the expert caps bind
        z = rng.normal(size=(T, N)) + 1.5 * rng.normal(size=N)
        S = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    else:  # heavy ties
        S = rng.integers(-1, 3, size=(T, N)).astype(np.float64)
    k = int(rng.integers(1, min(3, N) + 1))
    groups = None if seed < 3 else rng.integers(0, 3, T)
    if groups is not None:
        groups[:3] = [0, 1, 2]
    sizes = np.array([T]) if groups is None else np.bincount(groups)
    for sense in ("<=", "=="):
        problem = RoutingProblem.capped(S, sizes * k if groups is not None else T * k, min(k + 1, N),
                                        math.ceil(1.25 * T * k / N), sense=sense, groups=groups)
        f, h = solve(problem, "flow"), solve(problem, "highs")
        assert f.success and h.success
        assert f.objective == pytest.approx(h.objective, rel=1e-9, abs=1e-9)
        assert f.certificate.optimal and h.certificate.optimal


def test_price_rounds_and_repair_are_both_exercised():
    """A skewed program large enough for the warm start to run rounds and leave work to the repair."""
    rng = np.random.default_rng(0)
    T, N, k = 768, 16, 2
    z = rng.normal(size=(T, N)) + rng.normal(size=N)
    S = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    problem = RoutingProblem.capped(S, T * k, k + 1, math.ceil(1.25 * T * k / N))
    res = flow_optimum(problem)
    assert res.status == "optimal" and res.price_rounds > 0 and res.augmentations > 0
    sol = solve(problem, "flow")
    assert np.array_equal(sol.mask, res.mask)  # deterministic
    assert sol.certificate.optimal and sol.certificate.backend == "flow"
    assert sol.objective == pytest.approx(solve(problem, "highs").objective, rel=1e-9)


# ----------------------------------------------------------------------------- edges
def test_time_limit_and_too_many_groups():
    rng = np.random.default_rng(1)
    S = rng.normal(size=(60, 4))
    problem = RoutingProblem.capped(S, 100, 3, 16)
    res = flow_optimum(problem, time_limit=0.0)
    assert res.status in ("time_limit", "optimal")  # optimal only if nothing was left to repair
    if res.imbalance:
        assert res.status == "time_limit" and not res.mask.any()
    T = flow_module.MAX_NODES  # one group per token: N + G + 1 nodes, too many
    many = RoutingProblem.capped(np.ones((T, 2)), np.ones(T, dtype=np.int64), token_max=1, expert_max=T,
                                 groups=np.arange(T))
    with pytest.raises(UnsupportedProblem, match="highs"):
        solve(many, "flow")
    mask = np.zeros((T, 2), dtype=bool)
    mask[:, 0] = True
    cert = certify(many, mask)  # auto: HiGHS where flow does not apply
    assert cert.backend == "highs" and cert.optimal


def test_float_trouble_falls_back_to_highs(monkeypatch):
    """Where the flow solver reports float64 trouble, solve() answers with HiGHS and says so."""
    problem = RoutingProblem.capped(np.array([[0.6, 0.5], [0.9, 0.1]]), 2, 1, 1)
    real = flow_module.flow_optimum

    def trouble(p, **kw):
        r = real(p, **kw)
        return flow_module.FlowResult(np.zeros_like(r.mask), None, "error", "flow: float64 trouble (test)",
                                      r.seconds, 0, 0, 0)

    monkeypatch.setattr(importlib.import_module("usmoe_lp.lp.solve"), "flow_optimum", trouble)
    sol = solve(problem, "flow")
    assert sol.success and sol.backend == "flow" and "HiGHS" in sol.message
    assert sol.objective == pytest.approx(1.4) and sol.certificate.optimal


def test_certify_auto_uses_flow_and_refutes_a_worse_mask():
    S = np.array([[0.6, 0.5], [0.9, 0.1]])
    problem = RoutingProblem.capped(S, 2, token_max=1, expert_max=1)
    worse = np.array([[True, False], [False, True]])
    cert = certify(problem, worse)
    assert cert.backend == "flow" and cert.status == "not_optimal" and cert.gap == pytest.approx(0.7)
    assert certify(problem, ~worse).optimal


def test_block_names_and_their_former_aliases():
    p = RoutingProblem.capped(np.ones((3, 2)), 3, 1, 2)
    assert p.blocks == p.families == ("token", "expert", "budget")
    assert p.is_single_block is p.is_single_family is False
    for block in p.blocks:
        for a, b in zip(p.block_bounds(block), p.family_bounds(block), strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="block"):
        p.block_bounds("rows")


def test_problem_module_imports_no_solver():
    """Building a program never runs a solver: problem.py imports neither backends nor flow."""
    tree = ast.parse((ROOT / "usmoe_lp" / "lp" / "problem.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not any(m and m.startswith("usmoe_lp.lp.") for m in imported), imported


# ----------------------------------------------------------------------------- the router
def _probs(B, T, N, seed, skew=1.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, N, generator=g, dtype=torch.float64) + skew * torch.randn(N, generator=g, dtype=torch.float64)
    return torch.softmax(z, dim=-1)


def test_router_routing_is_the_lp_optimum_per_sequence():
    s = _probs(3, 40, 6, 0)
    pad = torch.zeros(3, 40, dtype=torch.bool)
    pad[1, 31:] = True
    r = capped_optimal(s, k=2, padding_mask=pad)
    assert r.params["budget"] == [80, 62, 80] and r.params["capacity"] == [17, 13, 17]
    assert r.params["token_max"] == 3 and r.params["tokens"] == [40, 31, 40]
    assert not r.mask[1, 31:].any()
    entry = get_router("capped_optimal")
    for b in range(3):
        rows = np.flatnonzero(~pad[b].numpy())
        S_b = s[b].numpy()[rows]
        problem = entry.problem(S_b, RouterConfig("capped_optimal", 2).param_dict, r.params, b, None)
        ref = solve(problem, "highs")
        X = r.mask[b].numpy()[rows]
        assert problem.objective(X) == pytest.approx(ref.objective, rel=1e-12)
        assert certify(problem, X).optimal
        assert X.sum() <= r.params["budget"][b] and X.sum(axis=1).max() <= 3
        assert X.sum(axis=0).max() <= r.params["capacity"][b]


def test_router_registry_record_label_and_defaults():
    entry = get_router("capped_optimal")
    assert entry.exact and entry.prefix == "recompute" and "decode step" in entry.decode
    c = RouterConfig("capped_optimal", 2)
    assert c.label == "capped kbar=2 kmax=3 cf=1.25"
    assert RouterConfig("capped_optimal", 2, kbar=1.5, token_max=2, capacity_factor=1.0).label == \
        "capped kbar=1.5 kmax=2 cf=1"
    with pytest.raises(InvalidParameter, match="token_max"):
        RouterConfig("capped_optimal", 2, token_max=0)
    with pytest.raises(InvalidParameter, match="kbar"):
        capped_optimal(torch.ones(4, 3), k=1, kbar=4.0)


def test_router_shapes_padding_and_decode_rule():
    s = _probs(1, 12, 5, 1)[0]
    r2 = capped_optimal(s, k=2)
    r3 = capped_optimal(s[None], k=2)
    assert r2.mask.shape == (12, 5) and torch.equal(r2.mask, r3.mask[0])
    assert r2.params["budget"] == 24 and r3.params["budget"] == [24]
    assert torch.equal(r2.weights, torch.where(r2.mask, s, torch.zeros(())))
    # all padding: nothing routed
    pad = torch.ones(2, 12, dtype=torch.bool)
    pad[0] = False
    r = capped_optimal(torch.stack([s, s]), k=2, padding_mask=pad)
    assert torch.equal(r.mask[0], r2.mask) and not r.mask[1].any() and r.params["budget"] == [24, 0]
    # one token (a decode step): its min(round(kbar), token_max) best experts
    one = s[:1]
    for kbar, kmax in ((2.0, 3), (2.6, 3), (3.0, 2)):
        m = capped_optimal(one, k=2, kbar=kbar, token_max=kmax).mask[0]
        want = min(round(kbar + 1e-9), kmax)
        assert torch.equal(m, torch.zeros(5, dtype=torch.bool).index_fill(0, torch.topk(one[0], want).indices, True))


def test_router_beats_capacity_tc_on_its_program():
    """At kbar = token_max = k the program is capacity-TC's: the optimum is never below the greedy."""
    s = _probs(2, 64, 8, 2, skew=1.5)
    k = 2
    opt = capped_optimal(s, k=k, kbar=k, token_max=k, capacity_factor=1.25)
    greedy = capacity_token_choice(s, k, capacity_factor=1.25)
    for b in range(2):
        assert opt.weights[b].sum() >= greedy.weights[b].sum() - 1e-12
    assert opt.objective > greedy.objective  # strictly better here: the caps bind


def test_reroute_with_the_router_runs_on_logits():
    z = torch.randn(2, 16, 6, generator=torch.Generator().manual_seed(4))
    r = reroute(z, "capped_optimal", k=2, kbar=1.5)
    assert r.mask.shape == (2, 16, 6) and r.params["budget"] == [24, 24]
    assert (r.mask.sum(-1) <= 3).all()
