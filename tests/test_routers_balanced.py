"""The balanced-assignment routers (sinkhorn, base, aux_free_bias) against independent oracles.

Oracles, none of which calls the code under test:

* a hand-written numpy Sinkhorn, Megatron's iteration (d0, d1 on exp(logits)) line by line;
* brute force: every 0/1 assignment of a tiny score matrix with k experts per token and at most
  C = ceil(T k / N) tokens per expert, enumerated;
* ``scipy.optimize.milp`` on the 0/1 program (``usmoe_lp.lp.solve(..., backend="milp")``) and the
  exact certificates of ``usmoe_lp.lp.certify``;
* hand computation of one bias step and of MaxVio, and ``usmoe_lp.diagnostics.load``'s MaxVio.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from usmoe_lp.diagnostics.load import balance_metrics
from usmoe_lp.errors import InvalidParameter, ShapeMismatch
from usmoe_lp.lp import certify, solve
from usmoe_lp.routers import RouterConfig, get_router, reroute
from usmoe_lp.routers.entries.aux_free_bias import (
    aux_free_routing,
    bias_trajectory,
    gate_scores,
    max_violation,
    run_bias_balancing,
    update_bias,
)
from usmoe_lp.routers.entries.base import balanced_assignment, balanced_capacity, balanced_program
from usmoe_lp.routers.entries.sinkhorn import sinkhorn_balance, sinkhorn_routing
from usmoe_lp.routers.spec import RouterContext
from usmoe_lp.routing import token_choice


# ----------------------------------------------------------------------------- oracles
def megatron_sinkhorn(z: np.ndarray, tol: float) -> tuple[np.ndarray, int]:
    """Megatron-Core's ``sinkhorn(cost, tol)`` in float64 without its 1e-8: returns (R, iterations)
    with R's rows summing to 1/T and columns to 1/N."""
    cost = np.exp(z)
    T, N = cost.shape
    d0, d1 = np.ones(T), np.ones(N)
    d1_old, error, it = d1, 1e9, 0
    while error > tol:
        d0 = (1 / T) / (cost @ d1)
        d1 = (1 / N) / (d0 @ cost)
        error = np.mean(np.abs(d1_old - d1))
        d1_old = d1
        it += 1
    return d1 * cost * d0[:, None], it


def brute_force_balanced(S: np.ndarray, k: int) -> float:
    """max sum S x over x with k experts per token and <= ceil(T k / N) tokens per expert."""
    T, N = S.shape
    C = math.ceil(T * k / N)
    best = -math.inf
    for choice in itertools.product(itertools.combinations(range(N), k), repeat=T):
        load = np.zeros(N, dtype=int)
        for experts in choice:
            load[list(experts)] += 1
        if load.max() <= C:
            best = max(best, sum(S[i, list(e)].sum() for i, e in enumerate(choice)))
    return best


def np_topk_rows(values: np.ndarray, k: int) -> np.ndarray:
    """(T, N) bool: each row's k largest, ties to the lower index (stable sort of -values)."""
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]
    out = np.zeros(values.shape, dtype=bool)
    np.put_along_axis(out, order, True, axis=1)
    return out


def padding(B: int, T: int, seed: int) -> torch.Tensor:
    """(B, T) bool, True = padding, every sequence with at least 2 real tokens, left or right."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    pos = torch.arange(T).unsqueeze(0)
    right = pos >= lengths.unsqueeze(1)
    left = pos < (T - lengths).unsqueeze(1)
    return torch.where(torch.arange(B).unsqueeze(1) % 2 == 0, right, left)


# ----------------------------------------------------------------------------- sinkhorn
@pytest.mark.parametrize("seed,T,N,scale", [(0, 12, 4, 1.0), (1, 30, 6, 3.0), (2, 9, 5, 0.3)])
def test_sinkhorn_matrix_matches_hand_written_megatron(seed, T, N, scale):
    z = np.random.default_rng(seed).standard_normal((T, N)) * scale
    R_ref, it_ref = megatron_sinkhorn(z, tol=1e-4)
    bal = sinkhorn_balance(torch.tensor(z), tol=1e-4)
    R = bal.balanced.numpy()
    assert bal.iterations == (it_ref,) and bal.converged == (True,)
    np.testing.assert_allclose(R, T * R_ref, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(R.sum(0), np.full(N, T / N), rtol=1e-12)  # the last update is the columns'
    tight = sinkhorn_balance(torch.tensor(z), tol=1e-13).balanced.numpy()
    np.testing.assert_allclose(tight.sum(1), np.ones(T), rtol=1e-9)
    np.testing.assert_allclose(tight.sum(0), np.full(N, T / N), rtol=1e-9)


def test_sinkhorn_log_space_fallback_when_a_column_underflows():
    """An expert 2000 logits below every token's best: exp() underflows to 0 in its whole column,
    the float64 iteration breaks down and the log-space one balances it anyway."""
    z = np.random.default_rng(3).standard_normal((8, 4))
    z[:, 2] -= 2000.0
    bal = sinkhorn_balance(torch.tensor(z), tol=1e-12, max_iter=500)
    R = bal.balanced.numpy()
    assert bal.converged == (True,) and np.isfinite(bal.log_balanced.numpy()).all()
    np.testing.assert_allclose(R.sum(0), np.full(4, 2.0), rtol=1e-9)
    np.testing.assert_allclose(R.sum(1), np.ones(8), rtol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_sinkhorn_routing_is_topk_of_the_balanced_matrix(k):
    z = np.random.default_rng(10 + k).standard_normal((3, 16, 6)) * 2
    r = sinkhorn_routing(torch.tensor(z), k)
    for b in range(3):
        R_ref, it = megatron_sinkhorn(z[b], tol=1e-4)
        np.testing.assert_array_equal(r.mask[b].numpy(), np_topk_rows(R_ref, k))
        assert r.params["iterations"][b] == it
    assert (r.mask.sum(-1) == k).all()
    load = r.mask.sum(1).numpy()
    C = balanced_capacity(16, k, 6)
    assert r.params["capacity"] == [C] * 3
    assert r.params["overflow"] == np.maximum(load - C, 0).sum(1).tolist()
    assert r.params["max_load"] == load.max(1).tolist()
    np.testing.assert_array_equal(r.weights.numpy(), np.where(r.mask.numpy(), z, 0.0))  # scores: the logits


def test_sinkhorn_ties_go_to_the_lowest_expert():
    """All-equal logits: R is uniform, every token ties everywhere and takes experts 0..k-1;
    the overflow is then every assignment beyond C."""
    r = sinkhorn_routing(torch.zeros(10, 5), k=2)
    expected = np.zeros((10, 5), dtype=bool)
    expected[:, :2] = True
    np.testing.assert_array_equal(r.mask.numpy(), expected)
    assert r.params["capacity"] == 4 and r.params["overflow"] == 2 * (10 - 4)


def test_sinkhorn_gap_is_nonnegative_when_feasible_and_infeasibility_is_reported():
    seen_feasible = seen_infeasible = 0
    for seed in range(12):
        z = np.random.default_rng(seed).standard_normal((6, 3)) * 1.5
        for k in (1, 2):
            r = sinkhorn_routing(torch.tensor(z), k)
            problem = balanced_program(z, k, r.params["capacity"])
            cert = certify(problem, r.mask.numpy())
            optimum = brute_force_balanced(z, k)
            if r.params["overflow"] == 0:
                seen_feasible += 1
                assert cert.status != "infeasible"
                assert optimum - problem.objective(r.mask.numpy()) >= -1e-9
            else:
                seen_infeasible += 1
                assert cert.status == "infeasible" and not cert.optimal
    assert seen_feasible and seen_infeasible  # both cases were exercised


def test_sinkhorn_gap_is_zero_when_the_scores_are_already_balanced():
    """Each token strongly prefers experts that already share the load equally: Sinkhorn changes
    nothing, its routing is TC's and the optimum of the balanced program (certified)."""
    T, N, k = 12, 4, 2
    z = np.random.default_rng(5).standard_normal((T, N)) * 0.1
    for i in range(T):
        z[i, [i % N, (i + 1) % N]] += 6.0
    r = sinkhorn_routing(torch.tensor(z), k)
    assert r.params["overflow"] == 0
    np.testing.assert_array_equal(r.mask.numpy(), token_choice(torch.tensor(z), k).mask.numpy())
    problem = balanced_program(z, k)
    assert certify(problem, r.mask.numpy()).optimal
    base = balanced_assignment(torch.tensor(z), k).mask.numpy()  # BASE: checked against brute force below
    assert math.isclose(problem.objective(base), problem.objective(r.mask.numpy()), abs_tol=1e-9)


# ----------------------------------------------------------------------------- base
@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 5), N=st.integers(1, 3), k=st.integers(1, 3), seed=st.integers(0, 10**6),
       grid=st.booleans())
def test_base_matches_brute_force(T, N, k, seed, grid):
    k = min(k, N)
    rng = np.random.default_rng(seed)
    S = rng.integers(-2, 3, (T, N)) / 2.0 if grid else rng.standard_normal((T, N))  # grid: many ties
    best = brute_force_balanced(S, k)
    methods = ("auto", "lp", "assignment") if k == 1 else ("auto", "lp")
    for method in methods:
        r = balanced_assignment(torch.tensor(S), k, method=method)
        m = r.mask.numpy()
        assert (m.sum(1) == k).all() and m.sum(0).max() <= balanced_capacity(T, k, N)
        assert math.isclose(float(S[m].sum()), best, abs_tol=1e-9)


@pytest.mark.parametrize("T,N,k", [(40, 6, 1), (37, 5, 2), (24, 8, 3), (30, 3, 3)])
def test_base_matches_milp_and_is_certified(T, N, k):
    S = np.random.default_rng(T * N + k).standard_normal((T, N))
    r = balanced_assignment(torch.tensor(S), k)
    m = r.mask.numpy()
    problem = balanced_program(S, k)
    C = balanced_capacity(T, k, N)
    assert r.params["capacity"] == C == math.ceil(T * k / N)
    assert (m.sum(1) == k).all() and m.sum(0).max() <= C
    if T * k % N == 0:
        assert (m.sum(0) == C).all()  # divisible: every expert exactly T k / N
    milp = solve(problem, backend="milp")
    assert math.isclose(problem.objective(m), milp.objective, rel_tol=1e-12, abs_tol=1e-9)
    assert certify(problem, m).optimal


def test_base_probs_objective_and_capacity_reporting():
    z = torch.randn(2, 7, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cfg = RouterConfig("base", 2, maximise="probs")
    assert cfg.label == "base" + " probs" and RouterConfig("base", 2).label == "base"
    r = reroute(z, cfg)
    P = torch.softmax(z, -1).numpy()
    assert r.params["capacity"] == [5, 5] and "ceil" in r.params["capacity_rule"]  # ceil(7 * 2 / 3) = 5
    for b in range(2):
        assert math.isclose(float(P[b][r.mask[b].numpy()].sum()), brute_force_balanced(P[b], 2), abs_tol=1e-9)


# ----------------------------------------------------------------------------- aux_free_bias
def test_bias_update_one_step_by_hand():
    s = torch.tensor([[0.50, 0.30, 0.20], [0.60, 0.25, 0.15], [0.40, 0.35, 0.25], [0.10, 0.30, 0.60]],
                     dtype=torch.float64)
    r = aux_free_routing(s, 1, bias=[0.0, 0.0, 0.0], gamma=0.01)
    # top-1: experts 0, 0, 0, 2 -> load (3, 0, 1), mean 4/3: expert 0 over, 1 and 2 under
    assert r.params["load"].tolist() == [3, 0, 1]
    np.testing.assert_array_equal(r.params["state"], [-0.01, 0.01, 0.01])
    assert r.params["max_vio"] == pytest.approx(3 / (4 / 3) - 1)
    # a bias of 0.25 on expert 1 moves tokens 0 and 2 there (0.30 + 0.25 > 0.50; 0.35 + 0.25 > 0.40)
    r2 = aux_free_routing(s, 1, bias=[0.0, 0.25, 0.0], gamma=0.01)
    assert r2.mask.int().tolist() == [[0, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]
    # load (1, 2, 1), mean 4/3: expert 1 over, 0 and 2 under
    np.testing.assert_allclose(r2.params["state"], [0.01, 0.24, 0.01], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(r2.weights.numpy(), np.where(r2.mask.numpy(), s.numpy(), 0.0))  # s, not s + b


def test_max_violation_matches_the_load_diagnostics():
    for load in ([3, 0, 1], [2, 2, 2], [0, 5], [7, 1, 1, 3]):
        assert max_violation(load) == pytest.approx(balance_metrics(np.array(load))["maxvio"], abs=1e-12)
    assert math.isnan(max_violation([0, 0, 0]))
    assert update_bias([0.1, 0.2], [0, 0], 0.5).tolist() == [0.1, 0.2]  # an empty batch moves nothing


def skewed_stream(batches: int, seed: int, n: int = 8, t: int = 256):
    """Batches whose router strongly prefers the high-index experts (a fixed skew plus noise)."""
    g = torch.Generator().manual_seed(seed)
    skew = torch.linspace(0.0, 2.5, n, dtype=torch.float64)
    return [torch.randn(t, n, generator=g, dtype=torch.float64) + skew for _ in range(batches)]


@pytest.mark.parametrize("seed,k", [(0, 1), (1, 2), (2, 2)])
def test_aux_free_bias_reduces_maxvio_on_a_skewed_stream(seed, k):
    chunks = skewed_stream(60, seed)
    traj = run_bias_balancing(chunks, k, gamma=0.01)
    first, last = traj.max_vio[0], traj.max_vio[-10:].mean()
    assert first > 1.0  # TC on this stream is badly unbalanced
    assert last < 0.35 * first
    assert traj.global_max_vio < first
    # the bias rose on the unpopular experts and fell on the popular ones
    assert traj.final_bias[0] > 0 > traj.final_bias[-1]
    assert traj.bias.shape == (61, 8) and traj.load.shape == (60, 8) and (traj.tokens == 256).all()
    # gamma = 0: the bias never moves and every batch is routed as TC
    frozen = run_bias_balancing(chunks[:3], k, gamma=0.0)
    assert (frozen.bias == 0).all()
    np.testing.assert_array_equal(frozen.load[0], token_choice(torch.softmax(chunks[0], -1), k).tokens_per_expert)


def test_state_is_carried_through_reroute_and_equals_the_trajectory():
    chunks = skewed_stream(4, 7, n=6, t=40)
    state, states = None, []
    for z in chunks:
        r = reroute(z, "aux_free_bias", k=2, gamma=0.02, state=state)
        state = r.params["state"]
        states.append(state)
    traj = run_bias_balancing(chunks, 2, gamma=0.02)
    np.testing.assert_array_equal(traj.bias[1:], np.stack(states))
    assert get_router("aux_free_bias").stateful and traj.to_dict()["k"] == 2


def test_bias_trajectory_over_a_router_log(tmp_path):
    from usmoe_lp.logs import import_array

    z = torch.cat(skewed_stream(3, 11, n=6, t=50)).numpy().astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    log = import_array(tmp_path / "z.npy", tmp_path / "log", top_k=2, score_function="softmax", shard_tokens=64)
    traj = bias_trajectory(tmp_path / "log", log.layers[0], gamma=0.02, chunk_tokens=40)
    direct = run_bias_balancing([torch.from_numpy(z[a:a + 40]) for a in range(0, 150, 40)], 2, gamma=0.02)
    assert traj.k == 2 and traj.tokens.tolist() == [40, 40, 40, 30]
    np.testing.assert_array_equal(traj.bias, direct.bias)
    np.testing.assert_array_equal(traj.max_vio, direct.max_vio)


def test_sigmoid_gate_and_model_init():
    from usmoe_lp.logs import LayerInfo

    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    np.testing.assert_allclose(gate_scores(z, "sigmoid").numpy(), torch.sigmoid(z).numpy())  # raw, unnormalised
    layer = LayerInfo("l0", num_experts=4, top_k=1, score_function="sigmoid", selection_bias=(0.0, 0.0, 0.0, 9.0))
    r = reroute(z, "aux_free_bias", k=1, init="model", layer=layer)
    assert r.mask[:, 3].all() and r.params["bias"].tolist() == [0.0, 0.0, 0.0, 9.0]
    with pytest.raises(InvalidParameter, match="selection_bias"):
        reroute(z, "aux_free_bias", k=1, init="model")
    with pytest.raises(ShapeMismatch, match="state"):
        reroute(z, "aux_free_bias", k=1, state=np.zeros(3))


# ----------------------------------------------------------------------------- padding, registry
@pytest.mark.parametrize("name", ["sinkhorn", "base", "aux_free_bias"])
def test_padding_is_never_selected_nor_counted(name):
    B, T, N, k = 4, 9, 4, 2
    z = torch.randn(B, T, N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pad = padding(B, T, seed=2)
    garbage = z.masked_fill(pad.unsqueeze(-1), float("nan"))  # padding rows may hold anything
    r = reroute(garbage, name, k=k, padding_mask=pad)
    assert not r.mask[pad].any() and (r.mask[~pad].sum(-1) == k).all()
    if name == "aux_free_bias":  # one batch: loads over the real tokens only
        alone = reroute(z[~pad], name, k=k)
        np.testing.assert_array_equal(r.params["load"], alone.params["load"])
        np.testing.assert_array_equal(r.params["state"], alone.params["state"])
        np.testing.assert_array_equal(r.mask[~pad].numpy(), alone.mask.numpy())
        return
    for b in range(B):  # per sequence: the same as the sequence's real tokens alone
        alone = reroute(z[b][~pad[b]], name, k=k)
        np.testing.assert_array_equal(r.mask[b][~pad[b]].numpy(), alone.mask.numpy())
        alone_cap = int(np.atleast_1d(alone.params["capacity"])[0])  # reroute keeps per-sequence lists
        assert r.params["capacity"][b] == alone_cap == balanced_capacity(int((~pad[b]).sum()), k, N)


def test_registry_records():
    ctx = RouterContext(k=2, num_experts=5)
    z = torch.randn(1, 6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = {RouterConfig(n, 2).label for n in ("sinkhorn", "base", "aux_free_bias")}
    assert labels == {"sinkhorn tol=0.0001 it=1000", "base", "auxfree g=0.001"}
    assert RouterConfig("sinkhorn", 2, max_iter=50).label != RouterConfig("sinkhorn", 2).label
    for name, exact, group, prefix in (("sinkhorn", False, "sequence", "recompute"),
                                       ("base", True, "sequence", "recompute"),
                                       ("aux_free_bias", False, "batch", "token_local")):
        entry = get_router(name)
        assert (entry.exact, entry.group({}), entry.prefix) == (exact, group, prefix)
        r = reroute(z, name, k=2)
        S = entry.scores(z, RouterConfig(name, 2).param_dict, ctx)[0].numpy()
        problem = entry.problem(S, RouterConfig(name, 2).param_dict, r.params, 0, ctx)
        assert problem.name == "balanced" and (problem.token_min == 2).all()
        assert (problem.expert_max == balanced_capacity(6, 2, 5)).all()
    # decode: Sinkhorn and the frozen bias route each token by its own scores (Token Choice)
    tc = token_choice(z, 2).mask
    assert torch.equal(get_router("sinkhorn").decode_route(z, {}, ctx), tc)
    params = RouterConfig("aux_free_bias", 2).param_dict
    assert torch.equal(get_router("aux_free_bias").decode_route(z, params, ctx), tc)
