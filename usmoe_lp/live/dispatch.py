"""Run a block's experts on exactly the selected token-expert pairs.

transformers' MoE blocks hand their experts module ``experts(hidden (n, d), top_k_index (n, k), top_k_weights (n, k))``
and get back sum_j w_ij E_j(h_i) per token. A registry router gives each token any number of experts (0 included),
so the selection is packed into (n, kmax) index and weight tensors where the index N means "no expert"
(:func:`pack`; a token's experts by decreasing weight, the models' own slot order), and run by :func:`run_experts`:

* when every row has exactly kmax experts (no "no expert" slot), the experts module is called as the model calls it,
  with its own implementation (eager loop, grouped or batched matmul);
* otherwise, the selected pairs are gathered, one row per pair sorted by expert, and the experts module is called on
  them with k = 1 (every implementation handles that); the weighted outputs are summed back into their tokens in
  expert order. The "no expert" index is never handed to the module: its eager loop skips it but its grouped and
  batched implementations need the expert-parallel masks to do so.

Either way the expert rows computed are the selected pairs: a token given 0 experts costs no expert compute.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["pack", "run_experts"]


def pack(mask: torch.Tensor, weights: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, N) bool selection and (n, N) weights -> ((n, kmax) int64 expert indices, N in the slots of a token with
    fewer than kmax experts; (n, kmax) weights, 0 in those slots). kmax >= 1.

    A token's experts fill its slots by decreasing weight, ties to the lower index: the slot order of the models'
    own top-k (descending gate value), which the grouped and batched experts implementations' results depend on,
    so that a selection equal to the model's (a replayed log, Token Choice with the model's weights) runs bitwise
    as the model does."""
    counts = mask.sum(dim=-1)
    kmax = max(int(counts.max()) if counts.numel() else 0, 1)
    key = torch.where(mask, -weights.to(torch.float64), torch.full((), float("inf"), dtype=torch.float64,
                                                                   device=weights.device))
    order = torch.sort(key, dim=-1, stable=True).indices[:, :kmax]  # selected first, by decreasing weight
    chosen = mask.gather(1, order)
    index = torch.where(chosen, order, torch.full_like(order, num_experts))
    w = torch.where(chosen, weights.gather(1, order), torch.zeros((), dtype=weights.dtype, device=weights.device))
    return index, w


def run_experts(call: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                index: torch.Tensor, weights: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, int]:
    """``call(hidden, index, weights)`` (the experts module's own forward) on the selected pairs only.

    hidden: (n, d); index: (n, kmax) int64, N = no expert; weights: (n, kmax) in the module's weight dtype.
    Returns the (n, d) output (0 for a token with no expert) and the number of expert rows computed.
    """
    real = index < num_experts
    if bool(real.all()):
        return call(hidden, index, weights), int(index.numel())
    token, slot = real.nonzero(as_tuple=True)
    expert = index[token, slot]
    order = torch.argsort(expert, stable=True)
    token, slot, expert = token[order], slot[order], expert[order]
    out = torch.zeros_like(hidden)
    if token.numel():
        pairs = call(hidden[token], expert.unsqueeze(1), weights[token, slot].unsqueeze(1))
        out.index_add_(0, token, pairs.reshape(token.numel(), -1).to(out.dtype))
    return out, int(token.numel())
