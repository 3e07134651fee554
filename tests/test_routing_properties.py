"""Hypothesis properties of the torch routers (papers/routing-as-lp.md §1, invariances; §3).

* Token Choice depends only on the order within each row, Expert Choice only on the order
  within each column (of a sequence); so strictly monotone row-wise (resp. column-wise)
  transforms leave the mask unchanged when there are no ties.
* At equal budget c = T * k the Token Choice mask is feasible for the global ``== c``
  program, so the global top-c objective is at least the TC objective (Prop. 3.1).
* Only the global top-c depends on the calibration across tokens: a concrete example shows
  its mask changing with alpha.

Scores are built from distinct integers / 4 in float64, so every transform used here keeps
them strictly ordered (no ties created by rounding).
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usmoe_lp.routing import expert_choice, global_topc, token_choice, unified_score

PROFILE = settings(max_examples=60, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def row_distinct(draw, max_b=3, max_t=6, max_n=7):
    """(B, T, N) float64 scores whose rows have distinct entries, and k in [1, N]."""
    B = draw(st.integers(1, max_b))
    T = draw(st.integers(1, max_t))
    N = draw(st.integers(2, max_n))
    rows = [draw(st.lists(st.integers(-40, 40), min_size=N, max_size=N, unique=True))
            for _ in range(B * T)]
    S = torch.tensor(rows, dtype=torch.float64).reshape(B, T, N) / 4
    k = draw(st.integers(1, N))
    return S, k


@st.composite
def column_distinct(draw, max_b=3, max_t=7, max_n=5):
    """(B, T, N) float64 scores whose columns (per sequence) have distinct entries; capacity."""
    B = draw(st.integers(1, max_b))
    T = draw(st.integers(1, max_t))
    N = draw(st.integers(1, max_n))
    cols = [draw(st.lists(st.integers(-40, 40), min_size=T, max_size=T, unique=True))
            for _ in range(B * N)]
    S = torch.tensor(cols, dtype=torch.float64).reshape(B, N, T).transpose(1, 2) / 4
    e = draw(st.integers(1, T))
    return S.contiguous(), e


def positive_affine(draw, shape):
    a = torch.tensor(draw(st.lists(st.floats(0.1, 10.0), min_size=shape, max_size=shape)),
                     dtype=torch.float64)
    b = torch.tensor(draw(st.lists(st.floats(-5.0, 5.0), min_size=shape, max_size=shape)),
                     dtype=torch.float64)
    return a, b


@PROFILE
@given(row_distinct(), st.data())
def test_token_choice_invariant_under_rowwise_monotone_transforms(case, data):
    S, k = case
    B, T, N = S.shape
    base = token_choice(S, k).mask
    a, b = positive_affine(data.draw, B * T)
    transforms = {
        "softmax": torch.softmax(S, dim=-1),
        "sigmoid": torch.sigmoid(S),
        "exp-shift": torch.exp(S - S.amax(-1, keepdim=True)),
        "affine": S * a.reshape(B, T, 1) + b.reshape(B, T, 1),
        "cube": S ** 3,
    }
    for name, S2 in transforms.items():
        assert torch.equal(token_choice(S2, k).mask, base), name
    # the unified score is a row-wise monotone function of the logits too
    assert torch.equal(token_choice(unified_score(S, 0.3), k).mask, base)


@PROFILE
@given(column_distinct(), st.data())
def test_expert_choice_invariant_under_columnwise_monotone_transforms(case, data):
    S, e = case
    B, T, N = S.shape
    base = expert_choice(S, capacity=e).mask
    a, b = positive_affine(data.draw, B * N)
    transforms = {
        "sigmoid": torch.sigmoid(S),
        "column-softmax": torch.softmax(S, dim=1),
        "affine": S * a.reshape(B, 1, N) + b.reshape(B, 1, N),
        "tanh": torch.tanh(S / 10),
    }
    for name, S2 in transforms.items():
        assert torch.equal(expert_choice(S2, capacity=e).mask, base), name


@PROFILE
@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.data())
def test_global_topc_objective_at_least_token_choice(B, T, N, data):
    k = data.draw(st.integers(1, N))
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    kind = data.draw(st.sampled_from(["signed", "unified", "grid"]))
    if kind == "signed":
        S = torch.randn(B, T, N, generator=gen, dtype=torch.float64)
    elif kind == "unified":
        S = unified_score(torch.randn(B, T, N, generator=gen) * 3, data.draw(st.floats(0, 1)))
    else:
        S = torch.randint(0, 3, (B, T, N), generator=gen).double()
    tc = token_choice(S, k)
    for scope in ("sequence", "batch", "position"):
        g = global_topc(S, kbar=k, scope=scope)
        assert g.realised_budget == tc.realised_budget == B * T * k
        assert g.objective >= tc.objective - 1e-9 * max(1.0, abs(tc.objective)), scope
    # per-sequence and per-position budgets (summing to B*T*k) restrict the batch scope
    batch = global_topc(S, kbar=k, scope="batch").objective
    for scope in ("sequence", "position"):
        assert batch >= global_topc(S, kbar=k, scope=scope).objective - 1e-9 * max(1.0, abs(batch))
    # at an integral EC capacity e = T*k/N, EC is feasible for the sequence-scope program too
    if (T * k) % N == 0:
        ec = expert_choice(S, capacity=T * k // N)
        seq = global_topc(S, kbar=k, scope="sequence")
        assert ec.realised_budget == seq.realised_budget
        assert seq.objective >= ec.objective - 1e-9 * max(1.0, abs(ec.objective))


@PROFILE
@given(row_distinct(max_b=2, max_t=5, max_n=6))
def test_single_token_global_topc_is_token_choice(case):
    """With T = 1 (one decoding step), the per-sequence top-c is TC on the same score (§4)."""
    S, k = case
    S1 = S[:, :1]
    assert torch.equal(global_topc(S1, kbar=k).mask, token_choice(S1, k).mask)


def test_global_topc_on_unified_score_changes_with_alpha():
    """Token A has large logits on both experts, token B a peaked but low pair; c = T * k = 2."""
    Z = torch.tensor([[3.0, 2.9],     # A: softmax ~ (0.525, 0.475), sigmoid ~ (0.953, 0.948)
                      [0.0, -3.0]])   # B: softmax ~ (0.953, 0.047), sigmoid ~ (0.5, 0.047)
    masks = {a: global_topc(unified_score(Z, a), kbar=1).mask.int().tolist()
             for a in (0.0, 0.5, 1.0)}
    assert masks[0.0] == [[1, 0], [1, 0]]          # softmax: one expert each, like TC
    assert masks[1.0] == [[1, 1], [0, 0]]          # scaled sigmoid: A takes both, B is dropped
    assert masks[0.0] != masks[1.0]
    # Token Choice does not see alpha at all
    tcs = {a: token_choice(unified_score(Z, a), 1).mask.int().tolist() for a in (0.0, 0.5, 1.0)}
    assert tcs[0.0] == tcs[0.5] == tcs[1.0] == [[1, 0], [1, 0]]
