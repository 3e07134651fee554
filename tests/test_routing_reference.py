"""The torch global top-c against a transcription of the USMoE reference code.

The reference (giangdip2410/USMoE, the training-free ``OlmoeSparseMoeBlock`` and the
from-scratch ``FMoETransformerMLP``; papers/routing-as-lp.md §1) routes one batch as follows::

    routing_weights = softmax(router_logits, dim=1, dtype=float32)       # (B*T, N)
    sig             = sigmoid(router_logits) * 2.0 / N
    U               = routing_weights * (1 - rate) + sig * rate           # rate = 0.5
    flat            = U.reshape(batch_size, -1)                           # (B, T*N)
    _, idx          = torch.topk(flat, k=sequence_length * top_k, dim=-1, sorted=False)
    mask            = zeros_like(flat, bool).scatter_(1, idx, True)       # (B, T*N)

There is no attention mask in the block, so left-padded tokens compete for c = T_padded * k.
The from-scratch Transformer-XL code feeds the block a time-major (T, B, d) tensor that it
unpacks as (batch, seq, d): each "row" is one position across the batch and c = B * k.

``reference_block`` below is an independent transcription of those lines; it does not call
anything from ``usmoe_lp``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from usmoe_lp.routing import global_topc, unified_score

RATE = 0.5


# ----------------------------------------------------------------------------- the reference
def reference_scores(router_logits: torch.Tensor) -> torch.Tensor:
    """U of the reference block; router_logits: (rows, N) -> (rows, N) float32."""
    num_experts = router_logits.shape[-1]
    routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
    router_logits_reshape = torch.sigmoid(router_logits) * 2.0 / num_experts
    return routing_weights * (1 - RATE) + router_logits_reshape * RATE


def reference_block(logits3: torch.Tensor, top_k: int) -> torch.Tensor:
    """The reference block's routing mask for (batch, seq, N) logits: (batch, seq, N) bool."""
    batch_size, sequence_length, num_experts = logits3.shape
    router_logits = logits3.reshape(-1, num_experts)
    routing_weights = reference_scores(router_logits)
    router_logits_reshape = routing_weights.reshape(batch_size, -1)
    topk = sequence_length * top_k
    _, gate_top_k_idx = torch.topk(
        router_logits_reshape, k=topk, dim=-1, largest=True, sorted=False
    )
    all_idx = torch.zeros_like(router_logits_reshape, dtype=torch.bool)
    all_idx = all_idx.scatter_(1, gate_top_k_idx, True)
    return all_idx.reshape(batch_size, sequence_length, num_experts)


def reference_block_time_major(logits_btn: torch.Tensor, top_k: int) -> torch.Tensor:
    """Transformer-XL variant: the block sees (T, B, N) as (batch, seq, N); returns (B, T, N)."""
    return reference_block(logits_btn.transpose(0, 1).contiguous(), top_k).transpose(0, 1)


def boundary_gap(U_rows: torch.Tensor, c: int) -> float:
    """Smallest gap between the c-th and (c+1)-th largest entry over the rows (inf if c = L)."""
    if c >= U_rows.shape[-1]:
        return float("inf")
    top = torch.topk(U_rows, c + 1, dim=-1).values
    return float((top[:, c - 1] - top[:, c]).min())


def no_tie_logits(gen: torch.Generator, shape, rows_fn, c: int, tries: int = 20) -> torch.Tensor:
    """Random float32 logits whose reference selection has a clear margin (no threshold tie)."""
    for _ in range(tries):
        Z = torch.randn(*shape, generator=gen) * 2.0
        U = reference_scores(Z.reshape(-1, shape[-1])).reshape(shape)
        if boundary_gap(rows_fn(U), c) > 1e-5:
            return Z
    raise AssertionError("could not draw tie-free logits")  # pragma: no cover


# ----------------------------------------------------------------------------- the unified score
@pytest.mark.parametrize("N", [2, 6, 8, 60, 64])
def test_unified_score_matches_reference_formula(N):
    gen = torch.Generator().manual_seed(N)
    Z = torch.randn(12, N, generator=gen) * 3
    torch.testing.assert_close(unified_score(Z, 0.5), reference_scores(Z), rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- sequence scope
SHAPES = [  # (B, T, N, k): toy sizes plus the three training-free configs with short T
    (1, 1, 2, 1), (1, 5, 4, 1), (2, 7, 4, 2), (3, 6, 8, 2), (4, 9, 6, 3), (2, 3, 5, 5),
    (2, 8, 64, 8),   # OLMoE: 8 of 64
    (2, 6, 60, 4),   # Qwen1.5-MoE: 4 of 60
    (3, 5, 64, 6),   # DeepSeek-MoE-16B: 6 of 64
]


@pytest.mark.parametrize("B,T,N,k", SHAPES)
def test_sequence_scope_reproduces_reference(B, T, N, k):
    gen = torch.Generator().manual_seed(1000 * B + 100 * T + N + k)
    for _ in range(15):
        Z = no_tie_logits(gen, (B, T, N), lambda U: U.reshape(U.shape[0], -1), T * k)
        expected = reference_block(Z, k)
        got = global_topc(unified_score(Z, 0.5), kbar=k, scope="sequence", include_padding=True)
        assert got.mask.dtype == torch.bool and got.mask.shape == (B, T, N)
        assert torch.equal(got.mask, expected)
        assert got.params["budget"] == ([T * k] * B if B > 1 else T * k)
        # the gating weights are U itself on the selected pairs (no renormalisation)
        U = reference_scores(Z.reshape(-1, N)).reshape(B, T, N)
        torch.testing.assert_close(got.weights, torch.where(expected, U, torch.zeros(())),
                                   rtol=1e-6, atol=0)


@pytest.mark.parametrize("B,T,N,k", [(2, 6, 4, 2), (3, 8, 8, 2), (2, 5, 64, 8)])
def test_sequence_scope_with_left_padding_included_reproduces_reference(B, T, N, k):
    """include_padding=True: pad tokens compete for c = T_padded * k exactly as in the reference."""
    gen = torch.Generator().manual_seed(7 + T)
    for _ in range(10):
        Z = no_tie_logits(gen, (B, T, N), lambda U: U.reshape(U.shape[0], -1), T * k)
        lengths = torch.randint(1, T + 1, (B,), generator=gen)
        pad = torch.arange(T).unsqueeze(0) < (T - lengths).unsqueeze(1)  # left padding
        got = global_topc(unified_score(Z, 0.5), kbar=k, padding_mask=pad, include_padding=True)
        assert torch.equal(got.mask, reference_block(Z, k))
        assert got.params["budget"] == [T * k] * B


def test_two_dim_input_is_one_sequence_of_the_reference():
    gen = torch.Generator().manual_seed(3)
    T, N, k = 10, 8, 2
    Z = no_tie_logits(gen, (1, T, N), lambda U: U.reshape(1, -1), T * k)[0]
    got = global_topc(unified_score(Z, 0.5), kbar=k)
    assert got.mask.shape == (T, N)
    assert torch.equal(got.mask, reference_block(Z.unsqueeze(0), k)[0])


# ----------------------------------------------------------------------------- position scope
@pytest.mark.parametrize("B,T,N,k", [(1, 4, 4, 1), (2, 5, 4, 2), (4, 6, 8, 2), (10, 3, 16, 2),
                                     (3, 4, 6, 3)])
def test_position_scope_reproduces_transformer_xl_reference(B, T, N, k):
    gen = torch.Generator().manual_seed(B * 31 + T * 7 + N)
    for _ in range(10):
        Z = no_tie_logits(gen, (B, T, N),
                          lambda U: U.transpose(0, 1).reshape(U.shape[1], -1), B * k)
        expected = reference_block_time_major(Z, k)
        got = global_topc(unified_score(Z, 0.5), kbar=k, scope="position", include_padding=True)
        assert torch.equal(got.mask, expected)
        assert got.params["budget"] == ([B * k] * T if T > 1 else B * k)
        # every position spends exactly B * k pairs across the batch
        assert got.mask.sum(dim=(0, 2)).tolist() == [B * k] * T


def test_position_scope_differs_from_sequence_scope():
    """The two released code paths route differently on the same logits (papers/routing-as-lp.md §1, §5.3)."""
    gen = torch.Generator().manual_seed(11)
    Z = torch.randn(4, 6, 8, generator=gen) * 2
    U = unified_score(Z, 0.5)
    seq = global_topc(U, kbar=2, scope="sequence").mask
    pos = global_topc(U, kbar=2, scope="position").mask
    assert not torch.equal(seq, pos)


# ----------------------------------------------------------------------------- padding excluded
def test_padding_excluded_equals_reference_run_on_unpadded_sequences():
    """Default (padding excluded) == the reference applied to each sequence without its padding.

    So the only difference from the reference on a padded batch is the pad tokens' competition
    (and the budget that T_padded * k gives them).
    """
    gen = torch.Generator().manual_seed(21)
    B, T, N, k = 4, 9, 8, 2
    checked = 0
    for _ in range(25):
        Z = torch.randn(B, T, N, generator=gen) * 2
        lengths = torch.randint(1, T + 1, (B,), generator=gen)
        pad = torch.arange(T).unsqueeze(0) < (T - lengths).unsqueeze(1)
        U_real = [reference_scores(Z[b, ~pad[b]]) for b in range(B)]
        if min(boundary_gap(u.reshape(1, -1), int(n) * k)
               for u, n in zip(U_real, lengths, strict=True)) < 1e-5:
            continue
        got = global_topc(unified_score(Z, 0.5), kbar=k, padding_mask=pad)
        for b in range(B):
            alone = reference_block(Z[b, ~pad[b]].unsqueeze(0), k)[0]
            assert torch.equal(got.mask[b, ~pad[b]], alone)
            assert not got.mask[b, pad[b]].any()
        assert got.params["budget"] == [int(n) * k for n in lengths]
        assert got.params["include_padding"] is False
        checked += 1
    assert checked >= 20


def test_padding_excluded_matches_reference_when_pads_would_lose_anyway():
    """With the reference's budget and pad scores below every real score, nothing changes."""
    gen = torch.Generator().manual_seed(5)
    T, N, k, P = 6, 4, 1, 2
    Z = torch.randn(1, T, N, generator=gen)
    Z[0, :P] = -30.0 + torch.arange(P * N, dtype=torch.float32).reshape(P, N) * 1e-3
    pad = torch.zeros(1, T, dtype=torch.bool)
    pad[0, :P] = True
    expected = reference_block(Z, k)
    assert not expected[0, :P].any()   # the pads lose every competition in the reference
    got = global_topc(unified_score(Z, 0.5), budget=T * k, padding_mask=pad)
    assert torch.equal(got.mask, expected)


def test_pad_token_wins_slots_in_the_reference_but_not_by_default():
    """A left pad token with large logits on every expert takes slots from real tokens.

    Its sigmoid term is near 2/N on all N experts, above every real token's score, so in the
    reference it wins N slots while bringing only k to the budget c = T_padded * k.
    """
    N, k = 4, 2
    Z = torch.tensor([[[6.0, 6.1, 5.9, 6.05],       # pad token: large logits everywhere
                       [0.3, 0.2, 0.1, 0.0],        # real tokens: moderate logits
                       [0.0, 0.6, 0.1, 0.2],
                       [0.1, -0.4, 0.5, 0.3]]])
    pad = torch.tensor([[True, False, False, False]])
    T = Z.shape[1]
    U = unified_score(Z, 0.5)
    ref = reference_block(Z, k)
    assert int(ref[0, 0].sum()) == N, "the pad token should win all N of its slots in the reference"
    assert int(ref.sum()) == T * k

    included = global_topc(U, kbar=k, padding_mask=pad, include_padding=True)
    assert torch.equal(included.mask, ref)
    assert included.params["budget"] == T * k
    # the real tokens got only T*k - N pairs instead of (T-1)*k
    assert int(included.mask[0, 1:].sum()) == T * k - N < (T - 1) * k

    excluded = global_topc(U, kbar=k, padding_mask=pad)
    assert not excluded.mask[0, 0].any()
    assert int(excluded.mask.sum()) == (T - 1) * k
    assert excluded.params["budget"] == (T - 1) * k
    # the real tokens' routing is the reference run on the real tokens alone ...
    assert torch.equal(excluded.mask[0, 1:], reference_block(Z[:, 1:], k)[0])
    # ... which contains what they got in the padded reference run, plus the slots the pad took
    assert bool((ref[0, 1:] <= excluded.mask[0, 1:]).all())
    assert not torch.equal(excluded.mask[0, 1:], ref[0, 1:])
    # the experts-per-token counts exclude the pad token either way
    assert excluded.num_tokens == included.num_tokens == T - 1
    assert excluded.realised_kbar == pytest.approx(k)


def test_budget_depends_on_batching_only_when_padding_is_included():
    """Same sequence, different amounts of left padding: excluded routing is batch-invariant."""
    gen = torch.Generator().manual_seed(8)
    L, N, k = 5, 6, 2
    Zs = torch.randn(1, L, N, generator=gen) * 2
    alone = global_topc(unified_score(Zs, 0.5), kbar=k).mask[0]
    for P in (1, 3, 6):
        Zp = torch.cat([torch.randn(1, P, N, generator=gen) * 4, Zs], dim=1)
        pad = torch.arange(P + L).unsqueeze(0) < P
        got = global_topc(unified_score(Zp, 0.5), kbar=k, padding_mask=pad).mask[0]
        assert torch.equal(got[P:], alone)
        assert not got[:P].any()
