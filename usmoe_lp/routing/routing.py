"""`Routing`: the result of a router, with the counts users ask for derived on demand."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, eq=False)
class Routing:
    """A 0/1 routing of tokens to experts and the parameters that produced it.

    Attributes:
        mask: (T, N) or (B, T, N) bool, True where token i is processed by expert j.
        weights: same shape, float: the score of each selected pair (0 elsewhere). Weights are
            the scores themselves, not renormalised over the selected experts, as in the USMoE reference
            code (papers/routing-as-lp.md §1).
        router: ``token_choice``, ``expert_choice``, ``global_topc`` or ``capacity_token_choice``.
        params: the parameters as used, e.g. ``k``, ``capacity``, per-group ``budget``,
            requested ``kbar``, ``scope``, the rounding rule.
        token_mask: (T,) or (B, T) bool, True for real tokens, False for padding; None if all real.
    """

    mask: torch.Tensor
    weights: torch.Tensor
    router: str
    params: dict = field(default_factory=dict)
    token_mask: torch.Tensor | None = None

    @property
    def experts_per_token(self) -> torch.Tensor:
        """(T,) or (B, T) long: experts selected by each token (padding counts 0)."""
        return self.mask.sum(dim=-1)

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        """(N,) long: tokens routed to each expert, summed over the batch."""
        return self.mask.reshape(-1, self.mask.shape[-1]).sum(dim=0)

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        if self.token_mask is None:
            return int(self.mask[..., 0].numel())
        return int(self.token_mask.sum())

    @property
    def realised_budget(self) -> int:
        """Total number of selected token-expert pairs (padding's pairs included, which exist
        only when padding competed: ``global_topc(..., include_padding=True)``)."""
        return int(self.mask.sum())

    @property
    def realised_kbar(self) -> float:
        """Experts per real token: pairs given to real tokens / real tokens (k for Token
        Choice; fractional for the others). Pairs won by padding are not counted."""
        real_pairs = self.mask.sum() if self.token_mask is None else self.mask[self.token_mask].sum()
        return int(real_pairs) / max(self.num_tokens, 1)

    @property
    def dropped_tokens(self) -> int:
        """Real tokens that received no expert (USMoE and capacity routing can drop tokens)."""
        zero = self.experts_per_token == 0
        if self.token_mask is not None:
            zero &= self.token_mask
        return int(zero.sum())

    @property
    def objective(self) -> float:
        """sum of the scores of the selected pairs, in float64."""
        return float(self.weights.double().sum())

    def numpy_mask(self):
        """The mask as a numpy bool array on the CPU (for ``usmoe_lp.lp.certify``)."""
        return self.mask.detach().cpu().numpy()
