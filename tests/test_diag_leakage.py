"""Leakage (prefix consistency) diagnostics against a brute-force oracle that re-routes every prefix.

The oracle calls the real routers (``token_choice``, ``expert_choice``, ``global_topc``) on each
prefix 1..t and computes every statistic by explicit loops; the cross-sequence oracle selects the
top-c of each group by an explicit Python sort (score descending, flat index ascending).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from usmoe_lp._validate import round_half_up
from usmoe_lp.diagnostics.leakage import (
    LeakagePartial,
    cross_sequence_dependence,
    decode_mismatch,
    prefix_consistency,
)
from usmoe_lp.errors import InvalidParameter, InvalidScores, ShapeMismatch
from usmoe_lp.routers import RouterConfig
from usmoe_lp.routing import capacity_token_choice, expert_choice, global_topc, token_choice

KBARS = [0.5, 1.0, 1.5, 2.25, 3.0]
CFS = [0.5, 1.0, 1.25, 2.0]


# ----------------------------------------------------------------------------- oracle
def _route(prefix: np.ndarray, router: str, params: dict) -> np.ndarray:
    t = torch.from_numpy(prefix)
    if router == "tc":
        return token_choice(t, k=params["k"]).mask.numpy()
    if router == "ec":
        return expert_choice(t, capacity_factor=params["capacity_factor"], k=params["k"]).mask.numpy()
    if router == "capacity_tc":
        return capacity_token_choice(t, params["k"], capacity_factor=params["capacity_factor"],
                                     policy=params["policy"]).mask.numpy()
    return global_topc(t, kbar=params["kbar"], scope="sequence").mask.numpy()


def _oracle_sequence(s: np.ndarray, router: str, params: dict) -> dict:
    """Per-sequence raw quantities by re-routing every prefix with the real routers."""
    T, N = s.shape
    D = [_route(s[:t], router, params) for t in range(1, T + 1)]
    full = D[-1]
    flips, tok, jac, disp = [], [], [], []
    for t in range(T):
        a = {e for e in range(N) if D[t][t, e]}
        b = {e for e in range(N) if full[t, e]}
        flips.append(sum(1 for e in range(N) if bool(D[t][t, e]) != bool(full[t, e])))
        tok.append(a != b)
        jac.append(0.0 if not (a | b) else 1.0 - len(a & b) / len(a | b))
    for t in range(1, T):  # 0-based: prefix t+1 vs prefix t
        n = 0
        for s_ in range(t):
            if any(bool(D[t][s_, e]) != bool(D[t - 1][s_, e]) for e in range(N)):
                n += 1
        disp.append(n)
    return {"T": T, "N": N, "flips": flips, "tok": tok, "jac": jac, "disp": disp}


def _oracle_stats(seqs: list[np.ndarray], router: str, params: dict) -> dict:
    raws = [_oracle_sequence(s, router, params) for s in seqs]
    N = seqs[0].shape[1]
    tokens = sum(r["T"] for r in raws)
    tmax = max(r["T"] for r in raws)
    off_f, off_c = [0] * tmax, [0] * tmax
    for r in raws:
        for t in range(r["T"]):
            off_f[r["T"] - 1 - t] += r["flips"][t]
            off_c[r["T"] - 1 - t] += 1
    disp = [d for r in raws for d in r["disp"]]
    hist = [0] * (max(disp) + 1) if disp else []
    for d in disp:
        hist[d] += 1
    return {
        "num_tokens": tokens,
        "flip_rate": sum(sum(r["flips"]) for r in raws) / (tokens * N),
        "token_flip_rate": sum(sum(r["tok"]) for r in raws) / tokens,
        "jaccard_distance": sum(sum(r["jac"]) for r in raws) / tokens,
        "per_offset": [f / (c * N) for f, c in zip(off_f, off_c, strict=True)],
        "per_offset_count": off_c,
        "displacement_mean": sum(disp) / len(disp) if disp else float("nan"),
        "displacement_max": max(disp) if disp else 0,
        "displacement_histogram": hist,
    }


def _assert_matches(stats, want: dict) -> None:
    assert stats.num_tokens == want["num_tokens"]
    assert stats.flip_rate == want["flip_rate"]
    assert stats.token_flip_rate == want["token_flip_rate"]
    assert stats.jaccard_distance == pytest.approx(want["jaccard_distance"], rel=1e-12, abs=1e-15)
    assert stats.per_offset == want["per_offset"]
    assert stats.per_offset_count == want["per_offset_count"]
    if math.isnan(want["displacement_mean"]):
        assert math.isnan(stats.displacement_mean)
    else:
        assert stats.displacement_mean == want["displacement_mean"]
    assert stats.displacement_max == want["displacement_max"]
    assert stats.displacement_histogram == want["displacement_histogram"]


def _scores(rng: np.random.Generator, shape, tied: bool) -> np.ndarray:
    if tied:  # integer-valued: ties everywhere
        return rng.integers(0, 3, size=shape).astype(np.float64)
    return rng.standard_normal(shape)


@st.composite
def _case(draw):
    T = draw(st.integers(1, 12))
    N = draw(st.integers(1, 5))
    router = draw(st.sampled_from(["tc", "ec", "usmoe"]))
    if router == "usmoe":
        params = {"k": 1, "kbar": draw(st.sampled_from([kb for kb in KBARS if kb <= N]))}
    else:
        params = {"k": draw(st.integers(1, N))}
        if router == "ec":
            params["capacity_factor"] = draw(st.sampled_from(CFS))
    tied = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    return T, N, router, params, tied, seed


# ----------------------------------------------------------------------------- brute force
@settings(max_examples=60, deadline=None)
@given(_case())
def test_matches_bruteforce_every_prefix(case):
    T, N, router, params, tied, seed = case
    s = _scores(np.random.default_rng(seed), (T, N), tied)
    stats = prefix_consistency(s, router, **params)
    _assert_matches(stats, _oracle_stats([s], router, params))
    assert stats.router == router and stats.k == params["k"] and stats.num_sequences == 1
    assert all(stats.params[name] == v for name, v in params.items() if name != "k")
    assert stats.prefix_rule == {"tc": "token_local", "ec": "expert_capacity", "usmoe": "global_topc"}[router]
    assert stats.positions_sampled == 0


@pytest.mark.parametrize("router,params", [("ec", {"k": 2, "capacity_factor": 1.25}), ("usmoe", {"k": 1, "kbar": 1.5}),
                                           ("ec", {"k": 1, "capacity_factor": 0.5}), ("usmoe", {"k": 1, "kbar": 2.25})])
def test_bruteforce_batch_with_padding(router, params):
    """(B, T, N) with padding anywhere: padded tokens are removed, each sequence analysed alone."""
    rng = np.random.default_rng(7)
    B, T, N = 4, 10, 4
    s = rng.integers(0, 4, size=(B, T, N)).astype(np.float64)
    pad = rng.random((B, T)) < 0.3
    pad[2] = True  # an all-padding sequence is skipped
    seqs = [s[b][~pad[b]] for b in range(B) if (~pad[b]).any()]
    stats = prefix_consistency(s, router, padding_mask=pad, **params)
    _assert_matches(stats, _oracle_stats(seqs, router, params))
    assert stats.num_sequences == len(seqs)
    # numpy padding mask and torch padding mask / torch scores agree
    again = prefix_consistency(torch.from_numpy(s), router, padding_mask=torch.from_numpy(pad), **params)
    assert again.to_dict() == stats.to_dict()


@pytest.mark.parametrize("router,params", [("ec", {"k": 3, "capacity_factor": 1.0}), ("usmoe", {"k": 1, "kbar": 2.5}),
                                           ("ec", {"k": 1, "capacity_factor": 2.0}), ("usmoe", {"k": 1, "kbar": 0.5})])
@pytest.mark.parametrize("tied", [False, True])
def test_bruteforce_longer_sequence(router, params, tied):
    """A longer sequence (T = 48, N = 6) exercises many heap moves per step."""
    rng = np.random.default_rng(11)
    s = rng.integers(0, 5, size=(48, 6)).astype(np.float32) if tied else rng.standard_normal((48, 6)).astype(np.float32)
    _assert_matches(prefix_consistency(s, router, **params), _oracle_stats([s.astype(np.float64)], router, params))


@pytest.mark.parametrize("router,params", [("ec", {"k": 2, "capacity_factor": 1.0}), ("usmoe", {"k": 1, "kbar": 1.5})])
def test_bfloat16_matches_routers_in_bf16(router, params):
    """bf16 scores (many ties after rounding): same as the routers on every bf16 prefix."""
    rng = np.random.default_rng(3)
    s = torch.from_numpy(rng.standard_normal((12, 5))).to(torch.bfloat16) * 0.05
    stats = prefix_consistency(s, router, **params)
    _assert_matches(stats, _oracle_stats([s.float().numpy()], router, params))
    T, N = s.shape
    D = [_route_t(s[:t], router, params) for t in range(1, T + 1)]
    flips = sum(int((D[t][t] != D[-1][t]).sum()) for t in range(T))
    assert stats.flip_rate == flips / (T * N)


@pytest.mark.parametrize("policy", ["position", "priority"])
@pytest.mark.parametrize("tied", [False, True])
def test_recompute_rule_matches_bruteforce(policy, tied):
    """capacity-TC has the ``recompute`` prefix rule: every prefix re-routed, checked by the oracle."""
    rng = np.random.default_rng(4)
    s = _scores(rng, (14, 4), tied)
    params = {"k": 2, "capacity_factor": 0.75, "policy": policy}
    stats = prefix_consistency(s, "capacity_tc", **params)
    _assert_matches(stats, _oracle_stats([s], "capacity_tc", params))
    assert stats.prefix_rule == "recompute" and stats.positions_sampled == 0 and stats.flip_rate > 0


def test_recompute_rule_samples_long_sequences():
    """Beyond max_recompute_tokens the causal decision is evaluated at evenly spaced positions only."""
    rng = np.random.default_rng(5)
    s = rng.standard_normal((14, 4))
    params = {"k": 2, "capacity_factor": 0.75, "policy": "position"}
    stats = prefix_consistency(s, "capacity_tc", max_recompute_tokens=5, **params)
    positions = sorted({int(round(x)) for x in np.linspace(0, 13, 5)})
    full = _route(s, "capacity_tc", params)
    flips = [int((_route(s[: t + 1], "capacity_tc", params)[t] != full[t]).sum()) for t in positions]
    assert stats.num_tokens == stats.positions_sampled == len(positions) and stats.sampled_sequences == 1
    assert stats.flip_rate == sum(flips) / (len(positions) * 4)
    assert [stats.per_offset_count[13 - t] for t in positions] == [1] * len(positions)
    assert math.isnan(stats.displacement_mean) and stats.displacement_steps == 0
    whole = prefix_consistency(s, "capacity_tc", **params)  # the exact run evaluates every token
    assert whole.num_tokens == 14 and whole.positions_sampled == 0


def _route_t(prefix: torch.Tensor, router: str, params: dict) -> torch.Tensor:
    if router == "ec":
        return expert_choice(prefix, capacity_factor=params["capacity_factor"], k=params["k"]).mask
    return global_topc(prefix, kbar=params["kbar"]).mask


# ----------------------------------------------------------------------------- properties
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.integers(1, 6), st.integers(0, 2**32 - 1), st.booleans(), st.data())
def test_token_choice_is_leak_free(T, N, seed, tied, data):
    k = data.draw(st.integers(1, N))
    s = _scores(np.random.default_rng(seed), (T, N), tied)
    stats = prefix_consistency(s, "tc", k=k)
    assert stats.flip_rate == 0.0 and stats.token_flip_rate == 0.0 and stats.jaccard_distance == 0.0
    assert stats.per_offset == [0.0] * T and stats.per_offset_count == [1] * T
    assert stats.displacement_max == 0
    assert stats.displacement_histogram == ([T - 1] if T > 1 else [])


def test_hand_case_displacement_usmoe():
    """Three tokens each win one pair (kbar = 1); a fourth token scoring 0.9 everywhere takes three of
    the four pairs, so the prefix of length 4 drops tokens 2 and 3 (token 1 keeps its pair: lowest
    flat index wins the tie at 0.5)."""
    s = np.array([[0.5, 0.1, 0.1]] * 3 + [[0.9, 0.9, 0.9]])
    st_ = prefix_consistency(s, "usmoe", k=1, kbar=1.0)
    assert st_.displacement_histogram == [2, 0, 1]
    assert st_.displacement_max == 2 and st_.displacement_mean == pytest.approx(2 / 3)
    # causal: {0},{0},{0},{0,1,2}; full: {0},{},{},{0,1,2}
    assert st_.flip_rate == 2 / 12
    assert st_.token_flip_rate == 0.5 and st_.jaccard_distance == 0.5
    assert st_.per_offset == [0.0, 1 / 3, 1 / 3, 0.0]


def test_hand_case_expert_choice():
    """EC with k = 1, N = 2, cf = 1: e_t = ceil(t / 2). A strong last token takes expert 0 from token 1."""
    s = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [1.0, 0.0]])
    st_ = prefix_consistency(s, "ec", k=1, capacity_factor=1.0)
    # full (e = 2): expert 0 -> tokens 0, 3; expert 1 -> tokens 1, 2.
    # causal: t0 (e=1): {0,1}; t1 (e=1): {1}; t2 (e=2): e0 takes t0,t2 -> {0,1}; t3 (e=2): {0}
    # flips: t0 1 (expert 1), t1 0, t2 1 (expert 0), t3 0
    assert st_.flip_rate == 2 / 8 and st_.token_flip_rate == 0.5
    assert st_.per_offset == [0.0, 0.5, 0.0, 0.5]
    # step 2 (e = 1): e1 moves t0 -> t1, so t0 changes; step 3 (e = 2): e0 adds t2, e1 adds t2 (both new),
    # no earlier token changes; step 4: e0 drops t2 for t3, so t2 changes.
    assert st_.displacement_histogram == [1, 2] and st_.displacement_mean == 2 / 3


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["ec", "usmoe"]), st.integers(2, 3), st.booleans())
def test_merge_equals_whole(seed, router, nchunks, tied):
    """Sequences of different lengths, split into 2-3 chunks: merge(partials) == one partial ==
    prefix_consistency on the padded batch; the inputs of merge are not changed."""
    rng = np.random.default_rng(seed)
    N = int(rng.integers(2, 5))
    params = {"k": 1, "kbar": 1.5} if router == "usmoe" else {"k": 2, "capacity_factor": 1.25}
    lens = rng.integers(1, 14, size=int(rng.integers(2, 7)))
    seqs = [_scores(rng, (int(t), N), tied) for t in lens]
    whole = LeakagePartial.empty(router, **params)
    for s in seqs:
        whole.update(s)
    cuts = sorted(rng.choice(np.arange(1, len(seqs)), size=min(nchunks - 1, len(seqs) - 1), replace=False))
    parts = []
    for chunk in np.split(np.arange(len(seqs)), cuts):
        p = LeakagePartial.empty(router, **params)
        for i in chunk:
            p.update(seqs[i])
        parts.append(p)
    before = [p.result().to_dict() for p in parts]
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    assert [p.result().to_dict() for p in parts] == before
    a, b = merged.result(), whole.result()
    for name in ("num_sequences", "num_tokens", "flip_rate", "token_flip_rate", "per_offset", "per_offset_count",
                 "displacement_mean", "displacement_max", "displacement_histogram"):
        # NaN compares equal here: e.g. displacement_mean is NaN when every sequence has one token
        np.testing.assert_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.jaccard_distance == pytest.approx(b.jaccard_distance, rel=1e-12, abs=1e-15)
    # the non-streaming function on a right-padded batch
    T = int(lens.max())
    batch = np.zeros((len(seqs), T, N))
    pad = np.ones((len(seqs), T), dtype=bool)
    for i, s in enumerate(seqs):
        batch[i, : len(s)] = s
        pad[i, : len(s)] = False
    c = prefix_consistency(batch, router, padding_mask=pad, **params)
    assert c.per_offset == b.per_offset and c.displacement_histogram == b.displacement_histogram
    assert c.flip_rate == b.flip_rate and c.jaccard_distance == pytest.approx(b.jaccard_distance, rel=1e-12, abs=1e-15)


def test_merge_incompatible_and_empty():
    a = LeakagePartial.empty("usmoe", k=1, kbar=1.0)
    with pytest.raises(InvalidParameter):
        a.merge(LeakagePartial.empty("usmoe", k=1, kbar=2.0))
    with pytest.raises(InvalidParameter):
        a.merge(LeakagePartial.empty("ec", k=1))
    a.update(np.zeros((3, 4)))
    b = LeakagePartial.empty("usmoe", k=1, kbar=1.0)
    b.update(np.zeros((3, 2)))
    with pytest.raises(InvalidParameter, match="N = 4"):
        a.merge(b)
    with pytest.raises(ShapeMismatch):
        a.update(np.zeros((3, 2)))
    empty = LeakagePartial.empty("ec", k=1).result()
    assert math.isnan(empty.flip_rate) and empty.per_offset == [] and empty.num_tokens == 0
    json.dumps(empty.to_dict(), allow_nan=False)


def test_to_dict_and_frame():
    rng = np.random.default_rng(0)
    stats = prefix_consistency(rng.standard_normal((2, 9, 4)), "ec", k=2, capacity_factor=1.0)
    d = stats.to_dict()
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert d["flip_rate"] == stats.flip_rate and d["params"] == {"capacity_factor": 1.0} and d["k"] == 2
    assert d["jaccard_distance"] == stats.jaccard_distance and "jaccard" not in d
    f = stats.per_offset_frame()
    assert list(f.columns) == ["offset", "flip_rate", "tokens"]
    assert f["offset"].tolist() == list(range(9)) and f["tokens"].tolist() == [2] * 9
    assert f["flip_rate"].tolist() == stats.per_offset and stats.per_offset[0] == 0.0


# ----------------------------------------------------------------------------- cross-sequence
def _topc_oracle(groups: list[list[tuple[float, int, tuple]]], cs: list[int]) -> set:
    """Selected keys: in each group the c best entries by (score desc, flat index asc)."""
    out = set()
    for g, c in zip(groups, cs, strict=True):
        out |= {key for _, _, key in sorted(g, key=lambda x: (-x[0], x[1]))[:c]}
    return out


def _cross_oracle(s: np.ndarray, pad: np.ndarray, kbar: float, scope: str) -> tuple[int, int]:
    B, T, N = s.shape
    real = [(b, t) for b in range(B) for t in range(T) if not pad[b, t]]

    def entries(bt_list):
        return [(s[b, t, e], (b * T + t) * N + e, (b, t, e)) for b, t in bt_list for e in range(N)]

    if scope == "batch":
        with_ = _topc_oracle([entries(real)], [round_half_up(kbar * len(real))])
        seqs = [[(b, t) for (b_, t) in real if b_ == b] for b in range(B)]
        alone = _topc_oracle([entries(q) for q in seqs], [round_half_up(kbar * len(q)) for q in seqs])
    else:
        pos = [[(b, t) for (b, t_) in real if t_ == t] for t in range(T)]
        with_ = _topc_oracle([entries(q) for q in pos], [round_half_up(kbar * len(q)) for q in pos])
        alone = _topc_oracle([entries([bt]) for bt in real], [round_half_up(kbar)] * len(real))
    flips = len(with_ ^ alone)
    toks = len({key[:2] for key in with_ ^ alone})
    return flips, toks


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 4), st.sampled_from(KBARS), st.sampled_from(
    ["batch", "position"]), st.booleans(), st.integers(0, 2**32 - 1))
def test_cross_sequence_bruteforce(B, T, N, kbar, scope, tied, seed):
    if kbar > N:
        kbar = float(N)
    rng = np.random.default_rng(seed)
    s = _scores(rng, (B, T, N), tied)
    pad = rng.random((B, T)) < 0.25
    cs = cross_sequence_dependence(s, "usmoe", k=1, kbar=kbar, scope=scope, padding_mask=pad)
    flips, toks = _cross_oracle(s, pad, kbar, scope)
    ntok = int((~pad).sum())
    assert cs.num_tokens == ntok
    if ntok:
        assert cs.flip_rate == flips / (ntok * N) and cs.token_flip_rate == toks / ntok
    else:
        assert math.isnan(cs.flip_rate)
    if B == 1:
        assert cs.flip_rate in (0.0,) or ntok == 0
        assert cs.pairs_batch == cs.pairs_alone


def test_cross_sequence_constructed():
    """Batch scope, kbar = 1: sequence 0 outbids sequence 1 for all four pairs of the batch."""
    s = np.array([[[9.0, 8.0], [7.0, 6.0]], [[1.0, 0.0], [2.0, 3.0]]])
    cs = cross_sequence_dependence(s, "usmoe", k=1, kbar=1.0, scope="batch")
    assert cs.flip_rate == 0.5 and cs.token_flip_rate == 0.5 and cs.jaccard_distance == 0.5
    assert cs.per_sequence_flip_rate == [0.5, 0.5] and cs.pairs_batch == cs.pairs_alone == 4
    # position scope: per position, both sequences compete for c = 2 pairs; seq 0 wins both positions
    cp = cross_sequence_dependence(s, "usmoe", k=1, kbar=1.0, scope="position")
    # alone: each token takes its best expert: s0 {0}, {0}; s1 {0}, {1}; with batch: s0 both, s1 none
    assert cp.flip_rate == 4 / 8 and cp.token_flip_rate == 1.0
    json.dumps(cp.to_dict(), allow_nan=False)


def test_cross_sequence_single_sequence_is_zero():
    rng = np.random.default_rng(1)
    s = rng.integers(0, 3, size=(1, 7, 4)).astype(np.float32)
    for scope in ("batch", "position"):
        assert cross_sequence_dependence(s, "usmoe", k=1, kbar=1.5, scope=scope).flip_rate == 0.0


def test_a_rule_that_does_not_describe_the_setting_falls_back_to_rerouting():
    """USMoE's prefix rule is the global top-c; with scope="position" a sequence alone is routed token by
    token, so the rule's full routing differs from the router's: every prefix is re-routed instead."""
    rng = np.random.default_rng(9)
    s = rng.standard_normal((2, 9, 4))
    st_ = prefix_consistency(s, "usmoe", k=1, kbar=1.5, scope="position")
    flips = 0
    for b in range(2):
        t_ = torch.from_numpy(s[b])[None]
        full = global_topc(t_, kbar=1.5, scope="position").mask[0]
        flips += sum(int((global_topc(t_[:, : t + 1], kbar=1.5, scope="position").mask[0][t] != full[t]).sum())
                     for t in range(9))
    assert st_.rule_mismatches == 2 and st_.flip_rate == flips / (18 * 4) == 0.0
    assert prefix_consistency(s, "usmoe", k=1, kbar=1.5, scope="batch").rule_mismatches == 0


# ----------------------------------------------------------------------------- decode-time routing
@pytest.mark.parametrize("scope", ["sequence", "batch", "position"])
def test_decode_mismatch_is_token_choice_against_the_global_topc(scope):
    """USMoE decodes each token alone: c = round_half_up(kbar) experts, i.e. Token Choice on its row.
    The full routing of a sequence alone is its top-c (sequence and batch scope; position scope: each
    position group of one sequence holds one token, so the full routing is that Token Choice too)."""
    rng = np.random.default_rng(8)
    s = rng.standard_normal((2, 10, 4))

    def full(b):
        t = torch.from_numpy(s[b])
        return token_choice(t, 2).mask if scope == "position" else global_topc(t, kbar=2.0).mask

    want_tok = want_pairs = 0
    for b in range(2):
        diff = full(b) != token_choice(torch.from_numpy(s[b]), 2).mask
        want_tok, want_pairs = want_tok + int(diff.any(-1).sum()), want_pairs + int(diff.sum())
    d = decode_mismatch(s, "usmoe", k=1, kbar=2.0, scope=scope)
    assert (d.num_tokens, d.token_flips, d.pair_flips, d.positions_sampled) == (20, want_tok, want_pairs, 0)
    assert (want_tok > 0) == (scope != "position")
    # usmoe's decode rule is a function of the whole sequence (Token Choice with round_half_up(kbar)
    # experts), so no scope needs one router call per token: every position is evaluated, at any bound
    few = decode_mismatch(s, "usmoe", k=1, kbar=2.0, scope=scope, max_recompute_tokens=4)
    assert (few.num_tokens, few.positions_sampled, few.token_flips, few.pair_flips) == (20, 0, want_tok, want_pairs)
    json.dumps(d.to_dict(), allow_nan=False)


# ----------------------------------------------------------------------------- bad input
def test_bad_input():
    s = np.random.default_rng(0).standard_normal((5, 3))
    bad = s.copy()
    bad[2, 1] = np.nan
    with pytest.raises(InvalidScores, match="NaN"):
        prefix_consistency(bad, "usmoe", k=1, kbar=1.0)
    with pytest.raises(InvalidParameter, match="unknown router 'topk'; choose one of"):
        prefix_consistency(s, "topk", k=1)
    with pytest.raises(InvalidParameter, match="needs k"):
        prefix_consistency(s, "tc")
    with pytest.raises(InvalidParameter, match="needs k"):
        prefix_consistency(s, "ec", capacity_factor=1.0)
    with pytest.raises(InvalidParameter, match="exceeds"):
        prefix_consistency(s, "usmoe", k=1, kbar=3.5)
    with pytest.raises(InvalidParameter, match="exceeds"):
        prefix_consistency(s, "tc", k=4)
    with pytest.raises(InvalidParameter):
        prefix_consistency(s, "ec", k=1, capacity_factor=0.0)
    with pytest.raises(InvalidParameter):
        prefix_consistency(s, "usmoe", k=1, kbar=-1.0)
    with pytest.raises(InvalidParameter, match="capacity_factor"):
        prefix_consistency(s, "usmoe", k=1, kbar=1.0, capacity_factor=2.0)
    with pytest.raises(InvalidParameter):
        prefix_consistency(s, "tc", k=1.5)
    with pytest.raises(InvalidParameter, match="not both"):
        prefix_consistency(s, RouterConfig("tc", 1), k=2)
    with pytest.raises(ShapeMismatch):
        prefix_consistency(s, "tc", k=1, padding_mask=np.zeros(4, dtype=bool))
    with pytest.raises(ShapeMismatch):
        prefix_consistency(s[None], "tc", k=1, padding_mask=np.zeros((2, 5), dtype=bool))
    with pytest.raises(InvalidParameter, match="True where the token is padding"):
        prefix_consistency(s, "tc", k=1, padding_mask=np.zeros(5, dtype=np.int64))  # one mask check
    with pytest.raises(InvalidScores):
        prefix_consistency(s[0], "tc", k=1)
    with pytest.raises(InvalidScores):
        prefix_consistency(np.zeros((0, 3)), "tc", k=1)
    with pytest.raises(InvalidScores):
        cross_sequence_dependence(s, "usmoe", k=1, kbar=1.0, scope="batch")
    with pytest.raises(InvalidParameter, match="couples"):
        cross_sequence_dependence(s[None], "usmoe", k=1, kbar=1.0, scope="sequence")
    with pytest.raises(InvalidParameter, match="couples"):
        cross_sequence_dependence(s[None], "ec", k=1)
    with pytest.raises(InvalidParameter):
        cross_sequence_dependence(s[None], "usmoe", k=1, kbar=4.0, scope="batch")
    with pytest.raises(ShapeMismatch):
        cross_sequence_dependence(s[None], "usmoe", k=1, kbar=1.0, scope="batch",
                                  padding_mask=np.zeros((1, 4), dtype=bool))


def test_decode_mismatch_samples_positions_where_a_batch_router_has_no_decode_function(monkeypatch):
    """A router grouped per batch without a decode function is decoded one router call per token, at
    most ``max_recompute_tokens`` evenly spaced positions per sequence (usmoe with its function removed:
    the sampled positions must give exactly the full computation's flips at those positions)."""
    import dataclasses

    from usmoe_lp.routers import config as config_module
    from usmoe_lp.routers import registry

    plain = dataclasses.replace(registry.ROUTERS["usmoe"], decode_route=None)
    table = {**registry.ROUTERS, "usmoe": plain}
    monkeypatch.setattr(registry, "ROUTERS", table)
    monkeypatch.setattr(config_module, "ROUTERS", table)
    s = np.random.default_rng(8).standard_normal((2, 10, 4))
    few = decode_mismatch(s, "usmoe", k=1, kbar=2.0, scope="batch", max_recompute_tokens=4)
    pos = [0, 3, 6, 9]
    tok = 0
    for b in range(2):
        t = torch.from_numpy(s[b])
        tok += int((global_topc(t, kbar=2.0).mask[pos] != token_choice(t, 2).mask[pos]).any(-1).sum())
    assert (few.num_tokens, few.positions_sampled, few.token_flips) == (8, 8, tok)
