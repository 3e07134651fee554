"""Dynamic-k registry routers (topp, seqtopk, causal_topc) against independent oracles.

Oracles, none of which calls the code under test:

* top-p: a hand-written loop per token (sort by (-p, index), add probabilities one by one until
  the mass reaches p), and exact rational arithmetic (``fractions``) for the defining properties;
* SeqTopK: a naive greedy over the pairs in (-score, flat index) order that skips tokens at their
  cap, brute-force enumeration of every feasible mask on tiny inputs, and the HiGHS certificate of
  ``RoutingProblem.capped(S, c=T*k, token_max=U, expert_max=T, sense="==")``;
* causal top-c: a brute-force re-implementation (the c_t-th largest of rows 1..t by a full sort,
  the band by a plain loop), the routing of every prefix 1..t recomputed from scratch, and the
  sequence's top pairs by a full sort for the share of the non-causal optimum.
"""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from usmoe_lp._validate import round_half_up
from usmoe_lp.errors import InvalidParameter
from usmoe_lp.lp import RoutingProblem, certify
from usmoe_lp.routers import RouterConfig, RouterContext, get_router, list_routers, reroute
from usmoe_lp.routers.entries.causal_topc import band_counts, causal_topc, prefix_targets, running_thresholds
from usmoe_lp.routers.entries.seqtopk import seq_topk
from usmoe_lp.routers.entries.topp import top_p, topp_counts
from usmoe_lp.routing import unified_score


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_padding(g, B: int, T: int) -> torch.Tensor:
    """(B, T) bool, True = padding, left or right, at least one real token per sequence."""
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    pos = torch.arange(T).unsqueeze(0)
    left = pos < (T - lengths).unsqueeze(1)
    right = pos >= lengths.unsqueeze(1)
    return torch.where(torch.rand(B, 1, generator=g) < 0.5, left, right)


def order_by_score(row: np.ndarray) -> list[int]:
    """Indices by descending score, ties lowest index first."""
    return sorted(range(len(row)), key=lambda j: (-row[j], j))


# ============================================================================ top-p
def topp_oracle(P: np.ndarray, p: float, cap: int) -> np.ndarray:
    """Per token: add probabilities in descending order until the mass reaches p; at most cap."""
    out = np.zeros(P.shape, dtype=bool)
    for idx in np.ndindex(P.shape[:-1]):
        row = P[idx].astype(np.float64)
        mass, taken = 0.0, []
        for j in order_by_score(row):
            if mass >= p or len(taken) == cap:
                break
            taken.append(j)
            mass += float(row[j])
        out[idx + (taken,)] = True
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_topp_matches_loop_oracle(dtype):
    g = gen(0)
    for trial in range(30):
        B, T, N = 2, 7, int(torch.randint(1, 10, (1,), generator=g))
        z = torch.randn(B, T, N, generator=g) * float(torch.rand(1, generator=g) * 4)
        P = torch.softmax(z.to(dtype), -1)
        p = float(torch.rand(1, generator=g) * 0.98 + 0.02) if trial else 1.0
        cap = int(torch.randint(0, N + 1, (1,), generator=g))
        r = top_p(P, p=p, max_k=cap)
        assert np.array_equal(r.mask.numpy(), topp_oracle(P.numpy(), p, cap or N)), (trial, p, cap)


def test_topp_ties_and_grid():
    # uniform rows: 0.5 needs two experts, the lowest indices; a 0/1 row needs one
    P = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.0, 1.0, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0]], dtype=torch.float64)
    assert top_p(P, p=0.5).mask.int().tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]]
    assert top_p(P, p=0.51).mask.int().tolist() == [[1, 1, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0]]
    assert top_p(P, p=0.51, max_k=1).experts_per_token.tolist() == [1, 1, 1]


@settings(max_examples=60, deadline=None)
@given(weights=st.lists(st.lists(st.integers(0, 50), min_size=2, max_size=8).filter(lambda w: sum(w) > 0),
                        min_size=1, max_size=4),
       p=st.fractions(min_value=Fraction(1, 100), max_value=1))
def test_topp_reaches_p_with_the_fewest_experts(weights, p):
    """Exact arithmetic: the selected mass reaches p, and dropping the smallest selected drops below it."""
    N = min(len(w) for w in weights)
    W = [w[:N] for w in weights if sum(w[:N]) > 0]
    assume(W)
    exact = [[Fraction(x, sum(w)) for x in w] for w in W]
    # float sums within 1e-12 of p may round either way: not a property of the rule
    for row in exact:
        run = Fraction(0)
        for x in sorted(row, reverse=True):
            run += x
            assume(abs(run - p) > Fraction(1, 10**12))
    P = torch.tensor([[float(x) for x in row] for row in exact], dtype=torch.float64)
    mask = top_p(P, p=float(p)).mask.numpy()
    for row, sel in zip(exact, mask, strict=True):
        chosen = [row[j] for j in np.flatnonzero(sel)]
        assert sum(chosen) >= p
        assert sum(chosen) - min(chosen) < p
        # and the chosen are the largest: no unchosen probability beats a chosen one
        unchosen = [row[j] for j in np.flatnonzero(~sel)]
        assert not unchosen or max(unchosen) <= min(chosen)


def test_topp_counts_certified_and_problem_recomputes_them():
    g = gen(1)
    z = torch.randn(3, 9, 6, generator=g, dtype=torch.float64) * 2
    pad = random_padding(g, 3, 9)
    cfg = RouterConfig("topp", 2, p=0.6, max_k=3)
    r = reroute(z, cfg, padding_mask=pad)
    entry, ctx = get_router("topp"), RouterContext(k=2, num_experts=6)
    S_all = torch.softmax(z, -1).numpy()
    for b in range(3):
        S, X = S_all[b][~pad[b].numpy()], r.mask[b][~pad[b]].numpy()
        prob = entry.problem(S, cfg.param_dict, r.params, b, ctx)
        assert np.array_equal(prob.token_max, X.sum(1)) and np.array_equal(prob.token_min, X.sum(1))
        assert certify(prob, X).optimal
    assert not r.mask[pad].any()
    assert int(r.experts_per_token.max()) <= 3 and int(r.experts_per_token[~pad].min()) >= 1


def test_topp_registry_and_errors():
    assert {"topp", "seqtopk", "causal_topc"} <= set(list_routers())
    assert RouterConfig("topp", 2, p=0.5).label == "topp p=0.5"
    assert RouterConfig("topp", 2, p=0.5, max_k=4).label == "topp p=0.5 max_k=4"
    assert get_router("topp").prefix == "token_local" and get_router("topp").exact
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(InvalidParameter, match="p"):
            RouterConfig("topp", 2, p=bad)
    with pytest.raises(InvalidParameter, match="max_k"):
        top_p(torch.full((2, 4), 0.25), p=0.5, max_k=5)
    # the counts are a function of a row alone: batch layout does not change them
    P = torch.softmax(torch.randn(4, 5, 8, generator=gen(2)), -1)
    assert torch.equal(topp_counts(P, 0.7), topp_counts(P.reshape(20, 8), 0.7).reshape(4, 5))


# ============================================================================ SeqTopK
def seqtopk_oracle(S: np.ndarray, k: int, cap: int) -> np.ndarray:
    """Greedy over the pairs of one sequence in (-score, flat index) order, skipping full tokens."""
    T, N = S.shape
    out = np.zeros((T, N), dtype=bool)
    held = [0] * T
    for f in order_by_score(S.reshape(-1)):
        if out.sum() == T * k:
            break
        t, j = divmod(f, N)
        if held[t] < cap:
            out[t, j] = True
            held[t] += 1
    return out


def brute_capped_best(S: np.ndarray, c: int, cap: int) -> float:
    T, N = S.shape
    best = -np.inf
    for pick in itertools.combinations(range(T * N), c):
        rows = np.bincount(np.array(pick) // N, minlength=T)
        if rows.max() <= cap:
            best = max(best, float(S.reshape(-1)[list(pick)].sum()))
    return best


def score_kinds(g, shape):
    yield torch.rand(*shape, generator=g, dtype=torch.float64)
    yield torch.randn(*shape, generator=g, dtype=torch.float64)  # signed
    yield torch.randint(0, 3, shape, generator=g).double() / 2  # ties


def test_seqtopk_matches_greedy_oracle_and_highs():
    g = gen(3)
    for trial in range(8):
        B, T, N = 3, 6, 5
        k = int(torch.randint(1, 3, (1,), generator=g))
        cap = [0, k, k + 1, N][trial % 4]
        U = cap or min(2 * k, N)
        pad = random_padding(g, B, T)
        for S in score_kinds(g, (B, T, N)):
            r = seq_topk(S, k, max_k=cap, padding_mask=pad)
            for b in range(B):
                real = ~pad[b]
                Sb, Xb = S[b][real].numpy(), r.mask[b][real].numpy()
                assert np.array_equal(Xb, seqtopk_oracle(Sb, k, U))
                prob = RoutingProblem.capped(Sb, c=Sb.shape[0] * k, token_max=U, expert_max=Sb.shape[0], sense="==")
                assert certify(prob, Xb, backend="highs").optimal
            assert not r.mask[pad].any()
            assert r.params["budget"] == (k * (~pad).sum(-1)).tolist()


def test_seqtopk_brute_force_tiny():
    g = gen(4)
    for _ in range(6):
        S = torch.randn(3, 3, generator=g, dtype=torch.float64)
        for k, cap in ((1, 2), (1, 1), (2, 3), (1, 3)):
            X = seq_topk(S, k, max_k=cap).mask.numpy()
            assert X.sum() == 3 * k and X.sum(1).max() <= cap
            assert float(S.numpy()[X].sum()) == pytest.approx(brute_capped_best(S.numpy(), 3 * k, cap), abs=1e-12)


def test_seqtopk_uncapped_is_usmoe_alpha0_and_decode_is_tc():
    z = torch.randn(2, 12, 6, generator=gen(5), dtype=torch.float64) * 2
    a = reroute(z, "seqtopk", k=2, max_k=6).mask
    b = reroute(z, "usmoe", k=2, kbar=2, alpha=0.0).mask
    assert torch.equal(a, b)
    one = reroute(z[:, :1], "seqtopk", k=2).mask  # a decode step: a sequence of one token
    assert torch.equal(one, reroute(z[:, :1], "tc", k=2).mask)


def test_seqtopk_registry_program_and_errors():
    g = gen(6)
    z = torch.randn(2, 8, 5, generator=g, dtype=torch.float64)
    pad = random_padding(g, 2, 8)
    cfg = RouterConfig("seqtopk", 2)
    assert cfg.label == "seqtopk" and RouterConfig("seqtopk", 2, max_k=3).label == "seqtopk max_k=3"
    r = reroute(z, cfg, padding_mask=pad)
    entry, ctx = get_router("seqtopk"), RouterContext(k=2, num_experts=5)
    assert entry.group(cfg.param_dict) == "sequence" and entry.exact and entry.prefix == "recompute"
    P = torch.softmax(z, -1).numpy()
    for b in range(2):
        real = ~pad[b].numpy()
        prob = entry.problem(P[b][real], cfg.param_dict, r.params, b, ctx)
        assert certify(prob, r.mask[b][~pad[b]].numpy()).optimal
    with pytest.raises(InvalidParameter, match="max_k"):
        seq_topk(torch.rand(4, 5), k=2, max_k=1)
    with pytest.raises(InvalidParameter, match="max_k"):
        RouterConfig("seqtopk", 2, max_k=6).check_experts(5)


# ============================================================================ causal top-c
def thresholds_oracle(v: np.ndarray, ranks) -> np.ndarray:
    B, T, _ = v.shape
    out = np.full((B, T), np.inf)
    for b in range(B):
        for t in range(T):
            if ranks[t]:
                out[b, t] = np.sort(v[b, : t + 1].ravel())[::-1][ranks[t] - 1]
    return out


def causal_oracle(S: np.ndarray, kbar: float, slack: float, min_k: int) -> np.ndarray:
    """One sequence's real rows S (T, N): quantile threshold, band, top-a_t, by plain loops."""
    T, N = S.shape
    D = round_half_up(slack * kbar)
    out = np.zeros((T, N), dtype=bool)
    P = 0
    for t in range(T):
        c = round_half_up(kbar * (t + 1))
        theta = np.sort(S[: t + 1].ravel())[::-1][c - 1] if c else np.inf
        q = int((S[t] >= theta).sum())
        lo = min(N, max(min_k, c - D - P))
        hi = max(lo, min(N, c + D - P))
        a = min(max(q, lo), hi)
        out[t, order_by_score(S[t])[:a]] = True
        P += a
    return out


def test_running_thresholds_match_sorting():
    g = gen(7)
    for trial in range(40):
        B, T, N = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 40, (1,), generator=g)), \
            int(torch.randint(1, 9, (1,), generator=g))
        v = torch.rand(B, T, N, generator=g, dtype=torch.float64) if trial % 2 else \
            torch.randint(0, 4, (B, T, N), generator=g).double()  # ties
        kbar = float(torch.rand(1, generator=g)) * N + 1e-3
        ranks = prefix_targets(min(kbar, N), T)[1:]
        got = running_thresholds(v, torch.tensor(ranks)).numpy()
        assert np.array_equal(got, thresholds_oracle(v.numpy(), ranks)), trial


@pytest.mark.parametrize("slack,min_k", [(8.0, 0), (1.0, 0), (0.0, 0), (1e9, 0), (2.0, 1)])
def test_causal_topc_matches_loop_oracle_with_padding(slack, min_k):
    g = gen(8)
    for trial in range(6):
        B, T, N = 3, 20, 6
        S = torch.rand(B, T, N, generator=g, dtype=torch.float64) if trial % 2 else \
            torch.randint(0, 5, (B, T, N), generator=g).double()
        pad = random_padding(g, B, T)
        kbar = [0.5, 1.0, 1.7, 3.0][trial % 4]
        r = causal_topc(S, kbar=kbar, slack=slack, min_k=min_k, padding_mask=pad)
        for b in range(B):
            real = ~pad[b]
            assert np.array_equal(r.mask[b][real].numpy(), causal_oracle(S[b][real].numpy(), kbar, slack, min_k))
        assert not r.mask[pad].any()
        # padding takes no budget: the routing of the real rows alone is the same
        solo = causal_topc(S[0][~pad[0]], kbar=kbar, slack=slack, min_k=min_k)
        assert torch.equal(solo.mask, r.mask[0][~pad[0]])


def test_causal_topc_prefix_is_the_routing_of_the_prefix():
    """Brute force: route every prefix 1..t from scratch; its last row is the full routing's row t."""
    g = gen(9)
    z = torch.randn(2, 30, 8, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, 30).view(1, 30, 1)
    pad = torch.zeros(2, 30, dtype=torch.bool)
    pad[1, :5] = True  # left padding
    cfg = RouterConfig("causal_topc", 2, kbar=1.5, alpha=0.5, slack=2.0)
    full = reroute(z, cfg, padding_mask=pad).mask
    for t in range(1, 31):
        part = reroute(z[:, :t], cfg, padding_mask=pad[:, :t]).mask
        assert torch.equal(part, full[:, :t]), t
    entry = get_router("causal_topc")
    assert entry.prefix == "causal" and not entry.exact
    scores = entry.scores(z, cfg.param_dict, RouterContext(k=2, num_experts=8))
    assert torch.equal(entry.decode_route(scores, cfg.param_dict, RouterContext(k=2, num_experts=8)),
                       reroute(z, cfg).mask)


def drifting_logits(kind: str, B: int, T: int, N: int, g) -> torch.Tensor:
    z = torch.randn(B, T, N, generator=g, dtype=torch.float64)
    s = torch.linspace(0, 1, T, dtype=torch.float64).view(1, T, 1)
    return {"iid": z, "sharpen": z * (0.5 + 2.5 * s), "flatten": z * (3 - 2.5 * s), "offset": z + 4 * s - 2,
            "regimes": torch.where((torch.arange(T) // (T // 4)).view(1, T, 1) % 2 == 0, z * 0.5, z * 3)}[kind]


@pytest.mark.parametrize("kind", ["iid", "sharpen", "flatten", "offset", "regimes"])
def test_causal_topc_realises_kbar_near_target(kind):
    """Realised k-bar: within the band's bound D / T (3.1 % at T = 256) on random and drifting
    scores; on i.i.d. scores also the quantile alone stays within a few percent, while on drifting
    ones it does not (which is what the band is for)."""
    g = gen(10)
    for N, T in ((64, 256), (16, 1024)):
        U = unified_score(drifting_logits(kind, 2, T, N, g), 0.5)
        for kbar in (1.0, 2.5):
            r = causal_topc(U, kbar=kbar)
            D = round_half_up(8 * kbar)
            for b, realised in enumerate(r.params["budget"]):
                target = r.params["target"][b]
                assert abs(realised - target) <= D
                assert abs(realised / target - 1) <= 8 / T + 1e-9
            ratio = causal_topc(U, kbar=kbar, slack=1e9).realised_kbar / kbar
            print(f"{kind} N={N} T={T} kbar={kbar:g}: band {r.realised_kbar / kbar:.3f}, quantile alone {ratio:.3f}")
            if kind == "iid":
                assert abs(ratio - 1) < 0.05
            elif kind in ("sharpen", "flatten", "regimes") and kbar == 1:
                assert abs(ratio - 1) > 0.1  # the drift the band corrects


def test_causal_topc_keeps_most_of_the_global_optimum_on_stationary_scores():
    """Share of the non-causal optimum (the top pairs of the sequence, as many as were taken): the
    band keeps > 99 % on i.i.d. scores, well above Token Choice at k-bar (slack 0)."""
    U = unified_score(torch.randn(1, 512, 32, generator=gen(11), dtype=torch.float64), 0.5)[0]
    for kbar in (1.0, 2.0):
        shares = {}
        for slack in (0.0, 8.0):
            X = causal_topc(U, kbar=kbar, slack=slack).mask
            best = torch.sort(U.reshape(-1), descending=True).values[: int(X.sum())].sum()
            shares[slack] = float((U * X).sum() / best)
        assert shares[8.0] > 0.99 and shares[8.0] > shares[0.0] + 0.01, shares


def test_causal_topc_slack0_is_token_choice_at_kbar_and_program_is_the_global_topc():
    S = torch.rand(2, 30, 7, generator=gen(12), dtype=torch.float64)
    r = causal_topc(S, kbar=1.5, slack=0)
    c = prefix_targets(1.5, 30)
    assert (r.experts_per_token == torch.from_numpy(np.diff(c))).all()
    cfg = RouterConfig("causal_topc", 2, kbar=1.5, alpha=0.5)
    z = torch.randn(2, 30, 7, generator=gen(13), dtype=torch.float64)
    rr = reroute(z, cfg)
    entry, ctx = get_router("causal_topc"), RouterContext(k=2, num_experts=7)
    U = unified_score(z, 0.5).numpy()
    for b in range(2):
        prob = entry.problem(U[b], cfg.param_dict, rr.params, b, ctx)
        assert int(prob.budget[0]) == int(rr.mask[b].sum())
        cert = certify(prob, rr.mask[b].numpy())
        assert cert.feasible and cert.gap >= -1e-12  # a heuristic for the non-causal program


@settings(max_examples=80, deadline=None)
@given(q=st.lists(st.integers(0, 6), min_size=1, max_size=40), kbar=st.floats(0.1, 6.0),
       D=st.integers(0, 5), min_k=st.integers(0, 2))
def test_band_keeps_every_prefix_within_d(q, kbar, D, min_k):
    N = 6
    targets = prefix_targets(kbar, len(q))
    a = band_counts(np.array([q]), targets, D, N, min_k)[0]
    P = np.cumsum(a)
    assert (a >= min_k).all() and (a <= N).all()
    if min_k <= kbar - 1 or min_k == 0:
        assert (np.abs(P - targets[1:]) <= D).all()
    # where the band does not bind the quantile count is kept
    free = [t for t in range(len(q)) if abs((P[t - 1] if t else 0) + max(q[t], min_k) - targets[t + 1]) <= D]
    assert all(a[t] == max(q[t], min_k) for t in free)


def test_causal_topc_registry_and_errors():
    assert RouterConfig("causal_topc", 2, kbar=1.5, alpha=0.5).label == "causal_topc a=0.5 kbar=1.5"
    assert RouterConfig("causal_topc", 2, kbar=1, alpha=0.3, slack=4, min_k=1).label == \
        "causal_topc a=0.3 kbar=1 slack=4 min_k=1"
    with pytest.raises(InvalidParameter, match="kbar"):
        causal_topc(torch.rand(5, 4), kbar=5)
    with pytest.raises(InvalidParameter, match="slack"):
        causal_topc(torch.rand(5, 4), kbar=1, slack=-1)
    r = causal_topc(torch.rand(2, 5, 4), kbar=1, padding_mask=torch.tensor([[True] * 5, [False] * 5]))
    assert r.params["budget"][0] == 0 and r.params["target"][0] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dynamic_routers_same_on_cuda():
    """Scores built on the CPU and moved: the masks on the device equal the CPU's (ties included)."""
    g = gen(14)
    for S in (torch.rand(3, 50, 8, generator=g, dtype=torch.float64),
              torch.randint(0, 3, (3, 50, 8), generator=g).double() / 2):
        pad = random_padding(g, 3, 50)
        P = S / S.sum(-1, keepdim=True)
        for f in (lambda x, m: top_p(x, p=0.5, padding_mask=m), lambda x, m: seq_topk(x, 2, padding_mask=m),
                  lambda x, m: causal_topc(x, kbar=1.5, slack=2, padding_mask=m)):
            assert torch.equal(f(P.cuda(), pad.cuda()).mask.cpu(), f(P, pad).mask)
