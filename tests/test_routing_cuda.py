"""The routers on CUDA give the same masks (and weights) as on the CPU.

Scores are built on the CPU and moved, so the comparison is of the routers, not of the
device's softmax/sigmoid kernels. Tied inputs (bf16, coarse grid, all-equal) check that the
documented tie rule (lowest flat index first) holds on the device as well.
"""

from __future__ import annotations

import pytest
import torch

from usmoe_lp.routing import (
    capacity_token_choice,
    expert_choice,
    global_topc,
    sigmoid_score,
    softmax_score,
    token_choice,
    unified_score,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ROUTERS = {
    "token_choice": lambda s, p: token_choice(s, 2, padding_mask=p),
    "expert_choice": lambda s, p: expert_choice(s, k=2, padding_mask=p),
    "expert_choice_cap": lambda s, p: expert_choice(s, capacity=3, padding_mask=p),
    "global_sequence": lambda s, p: global_topc(s, kbar=1.5, padding_mask=p),
    "global_batch": lambda s, p: global_topc(s, kbar=1.5, scope="batch", padding_mask=p),
    "global_position": lambda s, p: global_topc(s, kbar=2, scope="position", padding_mask=p),
    "global_include_padding": lambda s, p: global_topc(s, kbar=1, padding_mask=p,
                                                       include_padding=True),
    "global_budget": lambda s, p: global_topc(s, budget=5, padding_mask=None),
    "capacity_position": lambda s, p: capacity_token_choice(s, 2, padding_mask=p),
    "capacity_priority": lambda s, p: capacity_token_choice(s, 2, policy="priority",
                                                            capacity_factor=0.75, padding_mask=p),
}


def _inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    B, T, N = 3, 9, 6
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    pad = torch.arange(T).unsqueeze(0) < (T - lengths).unsqueeze(1)
    Z = torch.randn(B, T, N, generator=gen) * 2
    yield "unified", unified_score(Z, 0.5), pad
    yield "float64", torch.randn(B, T, N, generator=gen, dtype=torch.float64), pad
    yield "bf16", torch.rand(B, T, N, generator=gen).to(torch.bfloat16), pad
    yield "grid", torch.randint(0, 3, (B, T, N), generator=gen).float(), None
    yield "equal", torch.full((B, T, N), 0.5), pad
    yield "2d", torch.rand(T, N, generator=gen), pad[0]


@pytest.mark.parametrize("router", sorted(ROUTERS))
@pytest.mark.parametrize("seed", range(3))
def test_cuda_matches_cpu(router, seed):
    call = ROUTERS[router]
    dev = torch.device("cuda")
    for name, S, pad in _inputs(seed):
        cpu = call(S, pad)
        gpu = call(S.to(dev), None if pad is None else pad.to(dev))
        assert gpu.mask.device.type == "cuda"
        assert gpu.weights.dtype == cpu.weights.dtype
        assert torch.equal(gpu.mask.cpu(), cpu.mask), (router, name)
        assert torch.equal(gpu.weights.cpu(), cpu.weights), (router, name)
        assert gpu.params == cpu.params, (router, name)
        assert gpu.dropped_tokens == cpu.dropped_tokens
        assert gpu.realised_kbar == cpu.realised_kbar


def test_scores_on_cuda_agree_with_cpu():
    Z = torch.randn(4, 7, 8, generator=torch.Generator().manual_seed(0)) * 3
    Zc = Z.cuda()
    for f in (softmax_score, sigmoid_score, unified_score):
        out = f(Zc)
        assert out.device.type == "cuda"
        torch.testing.assert_close(out.cpu(), f(Z), rtol=1e-5, atol=1e-7)


def test_padding_mask_on_cpu_with_scores_on_cuda():
    S = torch.rand(2, 5, 4, generator=torch.Generator().manual_seed(1))
    pad = torch.tensor([[True, False, False, False, False], [False] * 5])
    cpu = global_topc(S, kbar=1, padding_mask=pad)
    gpu = global_topc(S.cuda(), kbar=1, padding_mask=pad)
    assert torch.equal(gpu.mask.cpu(), cpu.mask)
