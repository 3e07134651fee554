"""Compute of the routed experts, from their parameter shapes: multiply-adds of one token in one expert.

An expert applies its weight matrices to a token's hidden state: a matrix of shape (a, b) costs a*b multiply-adds
(2*a*b FLOPs). :func:`expert_multiply_adds` reads them from an MoE block's experts module, whatever its layout:

* fused (transformers 5: Mixtral, OLMoE, Qwen-MoE, DeepSeek, ...): 3-d parameters (N, a, b), e.g.
  ``gate_up_proj`` (N, 2I, d) and ``down_proj`` (N, d, I): a*b each per expert, 2*I*d + d*I in all for a SwiGLU
  expert (gpt-oss's transposed (N, d, 2I) the same);
* per-expert modules (Switch Transformers, NLLB-MoE: ``expert_0.wi.weight`` ...) and row-stacked matrices (DBRX:
  ``w1`` (N*I, d)): 2-d parameters, their total size over the N experts.

Biases (parameters named ``*bias``, and 1-d parameters) are additions, not multiply-adds, and are left out, as are
the activation function, the combine weights, the router and any shared expert (outside the experts module). The
MoE FLOPs of a token are then 2 x multiply-adds per (token, expert) pair x its pairs, summed over layers
(:func:`usmoe_lp.live.evaluate.evaluate`'s ``moe_flops_per_token``; the convention of Kaplan et al. 2020,
arXiv 2001.08361, 2 FLOPs per multiply-add).
"""

from __future__ import annotations

from torch import nn

from usmoe_lp._validate import check_int

__all__ = ["expert_multiply_adds"]


def expert_multiply_adds(experts: nn.Module, num_experts: int) -> float:
    """Multiply-adds one token costs in one expert of ``experts`` (module docstring), or NaN when the module has no
    weight matrix.

    ``experts``: the MoE block's experts module (fused, or a container of per-expert modules); ``num_experts``: N,
    the experts it holds.

    >>> import torch
    >>> class Fused(nn.Module):
    ...     def __init__(self, n, d, i):
    ...         super().__init__()
    ...         self.gate_up_proj = nn.Parameter(torch.zeros(n, 2 * i, d))
    ...         self.down_proj = nn.Parameter(torch.zeros(n, d, i))
    >>> expert_multiply_adds(Fused(8, 16, 32), 8)        # 2*32*16 + 16*32
    1536.0
    >>> mlps = nn.ModuleList([nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 16)) for _ in range(4)])
    >>> expert_multiply_adds(mlps, 4)                     # 16*32 + 32*16, biases left out
    1024.0
    """
    n = check_int(num_experts, "num_experts", low=1)
    total = 0.0
    found = False
    for name, p in experts.named_parameters():
        if p.ndim < 2 or name.rsplit(".", 1)[-1].endswith("bias"):
            continue
        found = True
        total += p.numel() / (p.shape[0] if p.ndim == 3 else n)
    return total if found else float("nan")
