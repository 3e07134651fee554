"""The torch routers against independent oracles.

Oracles used here, none of which calls the code under test:

* the exact routing programs of ``usmoe_lp.lp`` (``RoutingProblem`` + ``certify``, and the
  HiGHS LP objective on some cases): a router's mask must be an optimal 0/1 solution;
* a naive pure-Python selection (sort by (-score, flat index), take the first c) for the
  documented tie-breaking: ties go to the lowest flat index of the (B, T, N) tensor;
* a naive pure-Python loop for GShard/flaxformer capacity routing (all first choices before
  any second choice; position order or descending top-1 score; drop when an expert is full);
* exact rational arithmetic (``fractions``) for the rounding of budgets and capacities.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import usmoe_lp
from usmoe_lp.errors import InvalidParameter, InvalidScores, ShapeMismatch, UsmoeLpError
from usmoe_lp.lp import RoutingProblem, certify, solve
from usmoe_lp.routing import (
    Routing,
    capacity_token_choice,
    expert_choice,
    global_topc,
    sigmoid_score,
    softmax_score,
    token_choice,
    unified_score,
)


# ----------------------------------------------------------------------------- helpers
def rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_padding(gen, B: int, T: int, left: bool = True) -> torch.Tensor:
    """(B, T) bool, True = padding; every sequence keeps at least one real token."""
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    pos = torch.arange(T).unsqueeze(0)
    return pos < (T - lengths).unsqueeze(1) if left else pos >= lengths.unsqueeze(1)


def score_kinds(gen, shape):
    """(name, scores) pairs: continuous, signed, bf16-quantised, coarse grid (ties), all-equal."""
    yield "uniform", torch.rand(*shape, generator=gen)
    yield "signed", torch.randn(*shape, generator=gen)
    yield "bf16", torch.rand(*shape, generator=gen).to(torch.bfloat16)
    yield "grid", torch.randint(0, 3, shape, generator=gen).float() / 2
    yield "equal", torch.full(shape, 0.25)


def np64(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float64).cpu().numpy()


def naive_top(values: list[float], count: int) -> set[int]:
    """Indices of the ``count`` largest values; ties to the lower index (the documented rule)."""
    return set(sorted(range(len(values)), key=lambda i: (-values[i], i))[:count])


def naive_token_choice(S: torch.Tensor, k: int, pad: torch.Tensor | None) -> torch.Tensor:
    B, T, N = S.shape
    vals = S.double().tolist()
    out = torch.zeros(B, T, N, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            if pad is not None and bool(pad[b, t]):
                continue
            for j in naive_top(vals[b][t], k):
                out[b, t, j] = True
    return out


def naive_expert_choice(S: torch.Tensor, caps: list[int], pad: torch.Tensor | None) -> torch.Tensor:
    B, T, N = S.shape
    vals = S.double().tolist()
    out = torch.zeros(B, T, N, dtype=torch.bool)
    for b in range(B):
        real = [t for t in range(T) if pad is None or not bool(pad[b, t])]
        for j in range(N):
            column = [vals[b][t][j] for t in real]
            for pos in naive_top(column, caps[b]):
                out[b, real[pos], j] = True
    return out


def naive_global(S: torch.Tensor, counts: list[int], scope: str, pad: torch.Tensor | None,
                 include_padding: bool = False) -> torch.Tensor:
    """Global top-c per group over entries listed in row-major (b, t, n) order."""
    B, T, N = S.shape
    vals = S.double().tolist()

    def live(b, t):
        return include_padding or pad is None or not bool(pad[b, t])

    if scope == "sequence":
        groups = [[(b, t, n) for t in range(T) for n in range(N) if live(b, t)] for b in range(B)]
    elif scope == "batch":
        groups = [[(b, t, n) for b in range(B) for t in range(T) for n in range(N) if live(b, t)]]
    else:
        groups = [[(b, t, n) for b in range(B) for n in range(N) if live(b, t)] for t in range(T)]
    out = torch.zeros(B, T, N, dtype=torch.bool)
    for g, entries in enumerate(groups):
        for i in naive_top([vals[b][t][n] for b, t, n in entries], counts[g]):
            out[entries[i]] = True
    return out


def naive_capacity_token_choice(S: torch.Tensor, k: int, cap: int, policy: str,
                                pad_row: list[bool] | None = None) -> torch.Tensor:
    """One sequence (T, N): GShard / flaxformer ``TokensChooseMaskedRouter`` semantics."""
    T, N = S.shape
    vals = S.double().tolist()
    pad_row = pad_row or [False] * T
    prefs = [sorted(range(N), key=lambda j, t=t: (-vals[t][j], j))[:k] for t in range(T)]
    if policy == "priority":   # batch-prioritised routing: descending top-1 score, stable
        order = sorted(range(T), key=lambda t: (-vals[t][prefs[t][0]], t))
    else:
        order = list(range(T))
    load = [0] * N
    out = torch.zeros(T, N, dtype=torch.bool)
    for r in range(k):          # all first choices, then all second choices, ...
        for t in order:
            if pad_row[t]:
                continue
            e = prefs[t][r]
            if load[e] < cap:
                load[e] += 1
                out[t, e] = True
    return out


def exact_ceil(cf: float, tokens: int, k: int, n: int) -> int:
    return math.ceil(Fraction(str(cf)) * tokens * k / n)


def exact_round_half_up(kbar: float, tokens: int) -> int:
    return math.floor(Fraction(str(kbar)) * tokens + Fraction(1, 2))


def as_list(x, n):
    return list(x) if isinstance(x, list) else [x] * n


def group_problem(S: torch.Tensor, mask: torch.Tensor, budgets: list[int], scope: str,
                  pad: torch.Tensor | None):
    """Real tokens of (B, T, N) as one RoutingProblem.budget with a group per scope block."""
    B, T, N = S.shape
    rows, group_of, mrows = [], [], []
    for b in range(B):
        for t in range(T):
            if pad is not None and bool(pad[b, t]):
                continue
            rows.append(S[b, t])
            mrows.append(mask[b, t])
            group_of.append({"sequence": b, "batch": 0, "position": t}[scope])
    used = sorted(set(group_of))           # groups with no real token carry no constraint
    remap = {g: i for i, g in enumerate(used)}
    groups = np.array([remap[g] for g in group_of], dtype=np.int64)
    budget = np.array([budgets[g] for g in used], dtype=np.int64)
    problem = RoutingProblem.budget(np64(torch.stack(rows)), budget, sense="==", groups=groups)
    return problem, torch.stack(mrows).numpy()


# ----------------------------------------------------------------------------- token choice
@pytest.mark.parametrize("seed", range(4))
def test_token_choice_is_lp_optimal_and_follows_tie_rule(seed):
    gen = rng(seed)
    B, T, N = 3, 6, 5
    for k in (1, 2, N):
        for name, S in score_kinds(gen, (B, T, N)):
            pad = random_padding(gen, B, T) if seed % 2 else None
            r = token_choice(S, k, padding_mask=pad)
            assert isinstance(r, Routing) and r.router == "token_choice" and r.params["k"] == k
            assert torch.equal(r.mask, naive_token_choice(S, k, pad)), name
            real = ~pad if pad is not None else torch.ones(B, T, dtype=torch.bool)
            problem = RoutingProblem.token_choice(np64(S[real]), k)
            cert = certify(problem, r.mask[real].numpy())
            assert cert.feasible and cert.optimal, (name, cert.message)
            assert r.experts_per_token[real].eq(k).all()
            assert not r.mask[~real].any()


def test_token_choice_objective_matches_highs_lp():
    gen = rng(40)
    for _ in range(3):
        S = torch.randn(7, 6, generator=gen)
        r = token_choice(S, 2)
        sol = solve(RoutingProblem.token_choice(np64(S), 2), backend="highs")
        assert sol.success and r.objective == pytest.approx(sol.objective, rel=1e-9, abs=1e-9)


def test_token_choice_hand_ties():
    r = token_choice(torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.5, 0.0]]), k=1)
    assert r.mask.int().tolist() == [[0, 1, 0], [1, 0, 0]]
    r = token_choice(torch.ones(3, 4), k=2)
    assert r.mask.int().tolist() == [[1, 1, 0, 0]] * 3
    r = token_choice(torch.tensor([[0.5, 0.9, 0.5, 0.5]]), k=2)
    assert r.mask.int().tolist() == [[1, 1, 0, 0]]
    r = token_choice(torch.tensor([[0.2, 0.5, 0.9, 0.5]]), k=3)
    assert r.mask.int().tolist() == [[0, 1, 1, 1]]


# ----------------------------------------------------------------------------- expert choice
@pytest.mark.parametrize("seed", range(4))
def test_expert_choice_is_lp_optimal_and_follows_tie_rule(seed):
    gen = rng(100 + seed)
    B, T, N = 2, 7, 4
    for k in (1, 2, 3):
        for name, S in score_kinds(gen, (B, T, N)):
            pad = random_padding(gen, B, T, left=bool(seed % 2)) if seed >= 2 else None
            r = expert_choice(S, k=k, padding_mask=pad)
            caps = r.params["capacity"]
            tokens = [T - int(pad[b].sum()) if pad is not None else T for b in range(B)]
            assert caps == [min(exact_ceil(1.0, t, k, N), t) for t in tokens]
            assert torch.equal(r.mask, naive_expert_choice(S, caps, pad)), name
            for b in range(B):
                real = ~pad[b] if pad is not None else torch.ones(T, dtype=torch.bool)
                assert r.mask[b].sum(0).tolist() == [caps[b]] * N
                assert not r.mask[b, ~real].any()
                problem = RoutingProblem.expert_choice(np64(S[b, real]), caps[b])
                cert = certify(problem, r.mask[b, real].numpy())
                assert cert.optimal, (name, cert.message)


def test_expert_choice_objective_matches_highs_lp():
    gen = rng(41)
    S = torch.randn(9, 4, generator=gen)
    r = expert_choice(S, capacity=3)
    assert r.params["capacity"] == 3 and r.params["capacity_factor"] is None
    sol = solve(RoutingProblem.expert_choice(np64(S), 3), backend="highs")
    assert sol.success and r.objective == pytest.approx(sol.objective, rel=1e-9, abs=1e-9)


def test_expert_choice_hand_ties():
    r = expert_choice(torch.ones(4, 3), capacity=2)
    assert r.mask.int().tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 0], [0, 0, 0]]
    S = torch.tensor([[0.1, 0.3], [0.5, 0.3], [0.5, 0.9], [0.2, 0.3]])
    r = expert_choice(S, capacity=2)
    assert r.mask.int().tolist() == [[0, 1], [1, 0], [1, 1], [0, 0]]


@pytest.mark.parametrize("T,N,k,cf,cap,mismatch", [
    (5, 4, 1, 1.0, 2, 3),      # T*k/N = 1.25: ceil -> 2, budget 8 vs 5
    (8, 4, 2, 1.0, 4, 0),      # integral: EC matches TC's budget exactly
    (8, 4, 1, 1.25, 3, 4),     # ceil(2.5) = 3
    (10, 1, 1, 1.1, 10, 0),    # ceil(11.000000000000002) must not give 12; clipped to T = 10
    (6, 4, 1, 0.5, 1, -2),     # ceil(0.75) = 1: budget 4 below T*k = 6
])
def test_expert_choice_capacity_and_budget_mismatch(T, N, k, cf, cap, mismatch):
    r = expert_choice(torch.rand(T, N, generator=rng(T * N)), capacity_factor=cf, k=k)
    assert r.params["capacity"] == cap
    assert r.params["budget"] == cap * N == r.realised_budget
    assert r.params["budget_mismatch"] == mismatch == cap * N - T * k
    assert r.params["capacity_factor"] == cf


def test_expert_choice_budget_mismatch_per_sequence_with_padding():
    pad = torch.tensor([[False] * 6, [True, True, False, False, False, False]])
    r = expert_choice(torch.rand(2, 6, 4, generator=rng(3)), k=1, padding_mask=pad)
    assert r.params["capacity"] == [2, 1]           # ceil(6/4), ceil(4/4)
    assert r.params["budget"] == [8, 4]
    assert r.params["budget_mismatch"] == [2, 0]
    assert r.tokens_per_expert.tolist() == [3] * 4
    assert not r.mask[1, :2].any()


# ----------------------------------------------------------------------------- global top-c
@pytest.mark.parametrize("scope", ["sequence", "batch", "position"])
@pytest.mark.parametrize("seed", range(3))
def test_global_topc_is_lp_optimal_per_scope(scope, seed):
    gen = rng(200 + seed)
    B, T, N = 3, 5, 4
    for kbar in (0.5, 1, 1.5, 2.7):
        for name, S in score_kinds(gen, (B, T, N)):
            pad = random_padding(gen, B, T, left=bool(seed % 2)) if seed else None
            r = global_topc(S, kbar=kbar, scope=scope, padding_mask=pad)
            real = ~pad if pad is not None else torch.ones(B, T, dtype=torch.bool)
            tokens = {"sequence": real.sum(1).tolist(), "batch": [int(real.sum())],
                      "position": real.sum(0).tolist()}[scope]
            counts = [exact_round_half_up(kbar, t) for t in tokens]
            assert as_list(r.params["budget"], len(counts)) == counts
            assert r.params["scope"] == scope and r.params["kbar"] == float(kbar)
            assert torch.equal(r.mask, naive_global(S, counts, scope, pad)), (name, kbar)
            assert not r.mask[~real].any()
            problem, m = group_problem(S, r.mask, counts, scope, pad)
            cert = certify(problem, m)
            assert cert.feasible and cert.optimal, (name, kbar, cert.message)


@pytest.mark.parametrize("scope", ["sequence", "batch", "position"])
def test_global_topc_with_budget_matches_highs_lp(scope):
    gen = rng(300)
    B, T, N = 2, 4, 3
    S = torch.randn(B, T, N, generator=gen)
    r = global_topc(S, budget=3, scope=scope)
    G = {"sequence": B, "batch": 1, "position": T}[scope]
    assert as_list(r.params["budget"], G) == [3] * G
    assert r.params["kbar"] is None and r.params["rounding"] is None
    problem, m = group_problem(S, r.mask, [3] * G, scope, None)
    sol = solve(problem, backend="highs")
    assert sol.success and r.objective == pytest.approx(sol.objective, rel=1e-9, abs=1e-9)
    assert certify(problem, m, backend="highs").optimal


def test_global_topc_hand_ties_follow_flat_index_order():
    r = global_topc(torch.ones(2, 3), budget=4)
    assert r.mask.int().tolist() == [[1, 1, 1], [1, 0, 0]]
    r = global_topc(torch.ones(2, 2, 2), budget=3, scope="batch")
    assert r.mask.int().tolist() == [[[1, 1], [1, 0]], [[0, 0], [0, 0]]]
    r = global_topc(torch.ones(2, 2, 2), budget=3, scope="position")
    assert r.mask.int().tolist() == [[[1, 1], [1, 1]], [[1, 0], [1, 0]]]
    r = global_topc(torch.ones(2, 2, 2), budget=3, scope="sequence")
    assert r.mask.int().tolist() == [[[1, 1], [1, 0]], [[1, 1], [1, 0]]]
    # a strict winner first, then the tied entries in flat order
    r = global_topc(torch.tensor([[0.5, 0.5], [0.9, 0.5]]), budget=3)
    assert r.mask.int().tolist() == [[1, 1], [1, 0]]


@pytest.mark.parametrize("kbar,T,c", [(1.5, 3, 5), (0.5, 5, 3), (0.25, 2, 1), (0.25, 6, 2),
                                      (1.0, 7, 7), (0.0, 4, 0), (2.5, 1, 3), (1.75, 6, 11)])
def test_fractional_kbar_rounds_half_up(kbar, T, c):
    assert exact_round_half_up(kbar, T) == c
    r = global_topc(torch.rand(T, 4, generator=rng(T)), kbar=kbar)
    assert r.params["budget"] == c == r.realised_budget
    assert r.realised_kbar == pytest.approx(c / T)
    assert "round_half_up" in r.params["rounding"]


def test_fractional_kbar_uses_real_tokens_per_group():
    pad = torch.tensor([[True, False, False, False], [False, False, False, False],
                        [True, True, True, False]])
    S = torch.rand(3, 4, 5, generator=rng(9))
    r = global_topc(S, kbar=1.5, padding_mask=pad)
    assert r.params["budget"] == [5, 6, 2]          # 4.5 -> 5, 6, 1.5 -> 2
    assert r.mask.sum((1, 2)).tolist() == [5, 6, 2]
    assert r.num_tokens == 8
    assert r.realised_kbar == pytest.approx(13 / 8)
    r = global_topc(S, kbar=1.5, padding_mask=pad, scope="batch")
    assert r.params["budget"] == 12                 # 1.5 * 8
    r = global_topc(S, kbar=1.5, padding_mask=pad, scope="position")
    assert r.params["budget"] == [2, 3, 3, 5]       # 1.5 * (1, 2, 2, 3 real tokens)
    r = global_topc(S, kbar=1.5, padding_mask=pad, include_padding=True)
    assert r.params["budget"] == [6, 6, 6]


def test_dropped_tokens_when_one_token_takes_the_budget():
    S = torch.tensor([[0.9, 0.8, 0.7], [0.1, 0.2, 0.05], [0.3, 0.01, 0.02]])
    r = global_topc(S, kbar=1)
    assert r.mask.int().tolist() == [[1, 1, 1], [0, 0, 0], [0, 0, 0]]
    assert r.dropped_tokens == 2
    assert r.experts_per_token.tolist() == [3, 0, 0]
    assert r.realised_kbar == pytest.approx(1.0)
    assert r.weights[0].tolist() == pytest.approx([0.9, 0.8, 0.7])
    assert token_choice(S, 1).dropped_tokens == 0
    # the docstring example
    r = global_topc(torch.tensor([[0.9, 0.8], [0.1, 0.2]]), kbar=1)
    assert r.mask.int().tolist() == [[1, 1], [0, 0]] and r.dropped_tokens == 1


def test_dropped_tokens_ignore_padding():
    pad = torch.tensor([[True, False, False]])
    S = torch.tensor([[[0.99, 0.99], [0.9, 0.8], [0.1, 0.2]]])
    r = global_topc(S, kbar=1, padding_mask=pad)
    assert r.mask[0].int().tolist() == [[0, 0], [1, 1], [0, 0]]
    assert r.dropped_tokens == 1                    # the real token 2, not the pad token 0
    r = global_topc(S, kbar=1, padding_mask=pad, include_padding=True)
    assert r.mask[0].int().tolist() == [[1, 1], [1, 0], [0, 0]]
    assert r.dropped_tokens == 1
    assert r.num_tokens == 2


# ----------------------------------------------------------------------------- padding
def test_padding_gets_nothing_and_is_excluded_from_counts():
    gen = rng(50)
    B, T, N = 2, 5, 4
    S = torch.rand(B, T, N, generator=gen)
    pad = torch.tensor([[True, True, False, False, False], [False, False, False, False, True]])
    routings = [token_choice(S, 2, padding_mask=pad),
                expert_choice(S, k=2, padding_mask=pad),
                global_topc(S, kbar=2, padding_mask=pad),
                global_topc(S, kbar=2, padding_mask=pad, scope="batch"),
                global_topc(S, kbar=2, padding_mask=pad, scope="position"),
                capacity_token_choice(S, 2, capacity_factor=2.0, padding_mask=pad)]
    for r in routings:
        assert not r.mask[pad].any(), r.router
        assert torch.equal(r.token_mask, ~pad)
        assert r.num_tokens == 7
        assert r.experts_per_token[pad].eq(0).all()
        assert r.weights[pad].eq(0).all()
    tc = routings[0]
    assert tc.realised_kbar == 2.0 and tc.dropped_tokens == 0
    assert tc.tokens_per_expert.sum() == 14
    assert routings[2].params["budget"] == [6, 8]


def test_padding_mask_accepts_1d_for_2d_scores_and_lists():
    S = torch.rand(4, 3, generator=rng(2))
    a = token_choice(S, 1, padding_mask=torch.tensor([False, True, False, False]))
    b = token_choice(S, 1, padding_mask=[False, True, False, False])
    assert torch.equal(a.mask, b.mask) and not a.mask[1].any()
    assert a.token_mask.tolist() == [True, False, True, True]


def test_capacity_ignores_padding_tokens():
    # token 0 is padding and would take expert 0's only slot in position order
    S = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
    pad = torch.tensor([True, False, False])
    r = capacity_token_choice(S, 1, padding_mask=pad, capacity=1)
    assert r.mask.int().tolist() == [[0, 0], [1, 0], [0, 1]]
    assert r.params["dropped_assignments"] == 0
    r = capacity_token_choice(S, 1, padding_mask=pad)          # C = ceil(2 * 1 / 2) = 1
    assert r.params["capacity"] == 1
    assert r.mask.int().tolist() == [[0, 0], [1, 0], [0, 1]]


# ----------------------------------------------------------------------------- capacity TC
def test_capacity_serves_first_choices_before_second_choices():
    S = torch.tensor([[0.9, 0.8], [0.1, 0.6]])     # t0: e0 then e1; t1: e1 then e0
    r = capacity_token_choice(S, 2, capacity=1)
    assert r.mask.int().tolist() == [[1, 0], [0, 1]]   # not t0 -> {e0, e1}, t1 -> {}
    assert r.params["dropped_assignments"] == 2
    assert r.dropped_tokens == 0


def test_capacity_priority_orders_by_top1_score():
    S = torch.tensor([[0.6, 0.1], [0.9, 0.0], [0.7, 0.2]])
    pos = capacity_token_choice(S, 1, capacity=1, policy="position")
    pri = capacity_token_choice(S, 1, capacity=1, policy="priority")
    assert pos.mask.int().tolist() == [[1, 0], [0, 0], [0, 0]]
    assert pri.mask.int().tolist() == [[0, 0], [1, 0], [0, 0]]
    assert pos.dropped_tokens == pri.dropped_tokens == 2
    assert pri.params["policy"] == "priority"


@pytest.mark.parametrize("policy", ["position", "priority"])
@pytest.mark.parametrize("seed", range(3))
def test_capacity_token_choice_matches_naive_loop(policy, seed):
    gen = rng(400 + seed)
    for B, T, N in ((1, 8, 4), (3, 10, 5), (2, 16, 8)):
        for k in (1, 2, 3):
            for cf in (0.5, 1.0, 1.25, 2.0):
                for name, S in score_kinds(gen, (B, T, N)):
                    if name == "signed" and seed == 0:
                        S = S * 0.01
                    pad = random_padding(gen, B, T, left=bool(seed % 2)) if seed else None
                    r = capacity_token_choice(S, k, capacity_factor=cf, policy=policy,
                                              padding_mask=pad)
                    caps = []
                    for b in range(B):
                        prow = pad[b].tolist() if pad is not None else [False] * T
                        tokens = T - sum(prow)
                        cap = exact_ceil(cf, tokens, k, N)
                        caps.append(cap)
                        expected = naive_capacity_token_choice(S[b], k, cap, policy, prow)
                        assert torch.equal(r.mask[b], expected), (name, k, cf, b)
                        assert bool((r.mask[b].sum(0) <= cap).all())
                    assert r.params["capacity"] == caps
                    live = k * (T * B - (int(pad.sum()) if pad is not None else 0))
                    assert r.params["dropped_assignments"] == live - r.realised_budget


def test_capacity_token_choice_with_ample_capacity_is_token_choice():
    gen = rng(12)
    for name, S in score_kinds(gen, (2, 6, 4)):
        a = capacity_token_choice(S, 2, capacity_factor=2.0)    # C = ceil(6 * 2 * 2 / 4) = 6 = T
        assert torch.equal(a.mask, token_choice(S, 2).mask), name
        assert a.params["dropped_assignments"] == 0


def test_capacity_zero_drops_everything():
    r = capacity_token_choice(torch.rand(4, 3, generator=rng(1)), 1, capacity=0)
    assert r.realised_budget == 0 and r.dropped_tokens == 4
    assert r.params["dropped_assignments"] == 4


# ----------------------------------------------------------------------------- batching
@pytest.mark.parametrize("use_pad", [False, True])
def test_batched_equals_per_sequence(use_pad):
    gen = rng(60)
    B, T, N = 4, 7, 5
    for name, S in score_kinds(gen, (B, T, N)):
        pad = random_padding(gen, B, T) if use_pad else None
        calls = [
            lambda s, p: token_choice(s, 2, padding_mask=p),
            lambda s, p: expert_choice(s, k=2, padding_mask=p),
            lambda s, p: expert_choice(s, capacity=3, padding_mask=p),
            lambda s, p: global_topc(s, kbar=1.5, padding_mask=p),
            lambda s, p: global_topc(s, kbar=1.5, padding_mask=p, include_padding=True),
            lambda s, p: capacity_token_choice(s, 2, capacity_factor=1.0, padding_mask=p),
            lambda s, p: capacity_token_choice(s, 2, policy="priority", padding_mask=p),
        ]
        for i, call in enumerate(calls):
            batched = call(S, pad)
            assert batched.mask.shape == (B, T, N)
            for b in range(B):
                single = call(S[b], None if pad is None else pad[b])
                assert single.mask.shape == (T, N)
                assert torch.equal(batched.mask[b], single.mask), (name, i, b)
                assert torch.equal(batched.weights[b], single.weights), (name, i, b)


def test_batch_and_position_scopes_couple_sequences():
    gen = rng(61)
    S = torch.rand(3, 4, 3, generator=gen)
    S[0] += 1.0  # sequence 0 dominates and has exactly T * N = 12 entries
    batch = global_topc(S, kbar=1, scope="batch")
    assert batch.params["budget"] == 12
    assert batch.mask[0].all() and not batch.mask[1:].any()
    seq = global_topc(S, kbar=1, scope="sequence")
    assert seq.mask.sum((1, 2)).tolist() == [4, 4, 4]
    pos = global_topc(S, kbar=1, scope="position")
    assert pos.params["budget"] == [3, 3, 3, 3]
    assert pos.mask.sum((0, 2)).tolist() == [3, 3, 3, 3]
    assert not pos.mask[1:].any()


# ----------------------------------------------------------------------------- dtypes
def test_float64_stays_float64():
    S = torch.rand(2, 5, 4, generator=rng(70), dtype=torch.float64)
    for r in (token_choice(S, 2), expert_choice(S, k=2), global_topc(S, kbar=1.5),
              capacity_token_choice(S, 2)):
        assert r.weights.dtype == torch.float64, r.router
        assert torch.equal(r.weights[r.mask], S[r.mask])
        assert r.weights[~r.mask].eq(0).all()
        assert r.objective == pytest.approx(float(S[r.mask].sum()), rel=1e-15)
    Z = torch.randn(3, 4, dtype=torch.float64, generator=rng(71))
    for f in (softmax_score, sigmoid_score, unified_score):
        assert f(Z).dtype == torch.float64


def test_float64_resolves_what_float32_would_tie():
    S = torch.tensor([[1.0, 1.0 + 1e-12]], dtype=torch.float64)
    assert token_choice(S, 1).mask.tolist() == [[False, True]]
    assert token_choice(S.float(), 1).mask.tolist() == [[True, False]]


def test_integer_and_half_scores_are_accepted():
    r = token_choice(torch.tensor([[1, 3, 2]]), 2)
    assert r.mask.tolist() == [[False, True, True]] and torch.is_floating_point(r.weights)
    r = global_topc(torch.tensor([[0.5, 0.25], [0.75, 0.125]], dtype=torch.bfloat16), budget=2)
    assert r.mask.tolist() == [[True, False], [True, False]]
    assert r.weights.dtype == torch.bfloat16


def test_routing_counts_are_consistent():
    S = torch.rand(3, 6, 5, generator=rng(72))
    r = global_topc(S, kbar=1.2)
    assert r.realised_budget == int(r.mask.sum()) == sum(r.params["budget"])
    assert r.tokens_per_expert.tolist() == r.mask.sum((0, 1)).tolist()
    assert r.experts_per_token.shape == (3, 6)
    assert r.num_tokens == 18
    assert r.numpy_mask().dtype == np.bool_ and r.numpy_mask().shape == (3, 6, 5)


# ----------------------------------------------------------------------------- scores
def test_unified_score_limits_and_positivity():
    Z = torch.randn(50, 7, generator=rng(80)) * 6
    N = Z.shape[-1]
    U = unified_score(Z, 0.5)
    assert U.dtype == torch.float32 and bool((U > 0).all())
    assert torch.equal(unified_score(Z, 0.0), torch.softmax(Z, dim=-1))
    assert torch.equal(unified_score(Z, 0.0), softmax_score(Z))
    torch.testing.assert_close(unified_score(Z, 1.0), 2 * torch.sigmoid(Z) / N, rtol=1e-6, atol=0)
    torch.testing.assert_close(unified_score(Z, 1.0), sigmoid_score(Z), rtol=0, atol=0)
    torch.testing.assert_close(sigmoid_score(Z, scaled=False), torch.sigmoid(Z))
    for a in (0.0, 0.3, 0.5, 0.7, 1.0):
        expected = a * 2 * torch.sigmoid(Z.double()) / N + (1 - a) * torch.softmax(Z.double(), -1)
        torch.testing.assert_close(unified_score(Z, a).double(), expected, rtol=1e-6, atol=1e-9)
        assert bool((unified_score(Z, a) > 0).all())


@pytest.mark.parametrize("N", [1, 2, 3, 4, 60, 64])
def test_unified_score_is_one_over_n_at_zero_logits(N):
    for a in (0.0, 0.25, 0.5, 1.0):
        U = unified_score(torch.zeros(3, N), a)
        torch.testing.assert_close(U, torch.full((3, N), 1.0 / N), rtol=1e-6, atol=0)
        U64 = unified_score(torch.zeros(2, N, dtype=torch.float64), a)
        torch.testing.assert_close(U64, torch.full((2, N), 1.0 / N, dtype=torch.float64))


def test_unified_score_accepts_any_leading_shape():
    Z = torch.randn(2, 3, 4, 5, generator=rng(81))
    torch.testing.assert_close(unified_score(Z).reshape(-1, 5), unified_score(Z.reshape(-1, 5)))
    assert unified_score(torch.tensor([[0, 1, 2]])).dtype == torch.float32


# ----------------------------------------------------------------------------- validation
S_OK = torch.rand(4, 3)
NAN = torch.tensor([[0.1, float("nan")], [0.2, 0.3]])
INF = torch.tensor([[0.1, 0.2], [float("-inf"), 0.3]])


@pytest.mark.parametrize("call,exc,match", [
    # non-finite and malformed scores
    (lambda: token_choice(NAN, 1), InvalidScores, "NaN and .* Inf entries"),
    (lambda: token_choice(INF, 1), InvalidScores, "padding_mask"),
    (lambda: expert_choice(NAN, capacity=1), InvalidScores, "NaN and .* Inf entries"),
    (lambda: global_topc(INF, budget=1), InvalidScores, "NaN and .* Inf entries"),
    (lambda: capacity_token_choice(NAN, 1), InvalidScores, "NaN and .* Inf entries"),
    (lambda: token_choice(torch.rand(3), 1), InvalidScores, r"\(T, N\) or \(B, T, N\)"),
    (lambda: token_choice(torch.rand(1, 2, 3, 4), 1), InvalidScores, "shape"),
    (lambda: global_topc(torch.rand(0, 3), budget=0), InvalidScores, "empty"),
    (lambda: unified_score(torch.rand(3, 0)), InvalidScores, "expert dimension"),
    # k
    (lambda: token_choice(S_OK, 4), InvalidParameter, "exceeds the number of experts N = 3"),
    (lambda: token_choice(S_OK, 0), InvalidParameter, "k must be >= 1"),
    (lambda: token_choice(S_OK, -2), InvalidParameter, "k must be >= 1"),
    (lambda: token_choice(S_OK, 1.5), InvalidParameter, "kbar"),
    (lambda: capacity_token_choice(S_OK, 4), InvalidParameter, "N = 3"),
    (lambda: capacity_token_choice(S_OK, 0), InvalidParameter, "k must be >= 1"),
    (lambda: expert_choice(S_OK, k=0), InvalidParameter, "k must be >= 1"),
    # budget / kbar
    (lambda: global_topc(S_OK), InvalidParameter, "exactly one of budget"),
    (lambda: global_topc(S_OK, budget=2, kbar=1.0), InvalidParameter, "exactly one of budget"),
    (lambda: global_topc(S_OK, budget=13), InvalidParameter, "exceeds the group's T\\*N = 12"),
    (lambda: global_topc(S_OK, budget=-1), InvalidParameter, "budget must be >= 0"),
    (lambda: global_topc(S_OK, budget=2.5), InvalidParameter, "budget must be an integer"),
    (lambda: global_topc(S_OK, kbar=3.5), InvalidParameter, "exceeds the number of experts"),
    (lambda: global_topc(S_OK, kbar=-0.5), InvalidParameter, "kbar must be a finite number"),
    (lambda: global_topc(S_OK, kbar=float("nan")), InvalidParameter, "kbar"),
    (lambda: global_topc(torch.rand(2, 4, 3), budget=7, scope="position"), InvalidParameter,
     "exceeds"),
    # padding mask shape
    (lambda: token_choice(S_OK, 1, padding_mask=torch.zeros(3, dtype=torch.bool)), ShapeMismatch,
     r"expected \(4,\)"),
    (lambda: global_topc(torch.rand(2, 4, 3), kbar=1,
                         padding_mask=torch.zeros(4, dtype=torch.bool)),
     ShapeMismatch, r"expected \(2, 4\)"),
    (lambda: expert_choice(torch.rand(2, 4, 3), padding_mask=torch.zeros(2, 5, dtype=torch.bool)),
     ShapeMismatch, "True marks padding"),
    (lambda: capacity_token_choice(S_OK, 1, padding_mask=torch.zeros(4, 3, dtype=torch.bool)),
     ShapeMismatch, "padding_mask"),
    # scope / policy / alpha
    (lambda: global_topc(S_OK, budget=1, scope="global"), InvalidParameter, "scope must be"),
    (lambda: capacity_token_choice(S_OK, 1, policy="random"), InvalidParameter, "policy must be"),
    (lambda: unified_score(S_OK, alpha=1.5), InvalidParameter, r"alpha must lie in \[0, 1\]"),
    (lambda: unified_score(S_OK, alpha=-0.1), InvalidParameter, "alpha"),
    (lambda: unified_score(S_OK, alpha=float("nan")), InvalidParameter, "alpha"),
    # capacities
    (lambda: expert_choice(S_OK, capacity=5), InvalidParameter, "exceeds the number of tokens"),
    (lambda: expert_choice(S_OK, capacity=0), InvalidParameter, "capacity must be >= 1"),
    (lambda: expert_choice(S_OK, capacity_factor=0.0), InvalidParameter, "capacity_factor"),
    (lambda: expert_choice(S_OK, capacity_factor=float("inf")), InvalidParameter,
     "capacity_factor"),
    (lambda: capacity_token_choice(S_OK, 1, capacity_factor=float("nan")), InvalidParameter,
     "capacity_factor"),
    (lambda: capacity_token_choice(S_OK, 1, capacity_factor=-1.0), InvalidParameter,
     "capacity_factor"),
    (lambda: capacity_token_choice(S_OK, 1, capacity=-1), InvalidParameter,
     "capacity must be >= 0"),
])
def test_validation_errors(call, exc, match):
    with pytest.raises(exc, match=match) as info:
        call()
    assert isinstance(info.value, UsmoeLpError)
    assert isinstance(info.value, ValueError)
    assert exc in (getattr(usmoe_lp, exc.__name__),)


def test_fully_padded_sequence_gets_nothing():
    pad = torch.tensor([[False, False, False], [True, True, True]])
    S = torch.rand(2, 3, 4, generator=rng(90))
    assert global_topc(S, kbar=1, padding_mask=pad).params["budget"] == [3, 0]
    assert expert_choice(S, padding_mask=pad).params["capacity"] == [1, 0]
    for r in (token_choice(S, 2, padding_mask=pad), global_topc(S, kbar=1, padding_mask=pad),
              expert_choice(S, padding_mask=pad), capacity_token_choice(S, 1, padding_mask=pad)):
        assert not r.mask[1].any(), r.router
