"""Score functions f(Z) applied to router logits Z (torch; CPU or CUDA).

USMoE (arXiv 2503.22996, Def. 3.2; papers/routing-as-lp.md §1) mixes a token-side and an expert-side score:

    U = alpha * f_e(Z) + (1 - alpha) * f_t(Z),   f_t = softmax over experts,
                                                 f_e = 2 * sigmoid(Z) / N.

The 2/N factor is the reference code's: it sets f_e = 1/N at logit 0, the softmax's mean. The
reference code hard-codes alpha = 0.5 (``rate``). Scores are computed in float32 (float64 input
stays float64): the reference runs its softmax in float32.
"""

from __future__ import annotations

import torch

from usmoe_lp.errors import InvalidParameter, InvalidScores


def _float(logits: torch.Tensor) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        logits = torch.as_tensor(logits)
    if logits.ndim < 1 or logits.shape[-1] == 0:
        raise InvalidScores(f"logits must have a non-empty expert dimension, got shape {tuple(logits.shape)}")
    if not torch.is_floating_point(logits):
        logits = logits.float()
    return logits if logits.dtype == torch.float64 else logits.float()


def softmax_score(logits: torch.Tensor) -> torch.Tensor:
    """f_t: softmax over the expert (last) dimension. logits: (..., N) -> (..., N) float32."""
    return torch.softmax(_float(logits), dim=-1)


def sigmoid_score(logits: torch.Tensor, scaled: bool = True) -> torch.Tensor:
    """f_e: ``2 * sigmoid(Z) / N`` (reference scaling) or plain ``sigmoid(Z)`` if not ``scaled``.

    logits: (..., N) -> (..., N) float32.
    """
    z = _float(logits)
    s = torch.sigmoid(z)
    return s * (2.0 / z.shape[-1]) if scaled else s


def unified_score(logits: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """USMoE unified score ``alpha * f_e + (1 - alpha) * f_t`` (Def. 3.2, reference scaling).

    logits: (..., N) float -> (..., N) float32. Every entry is > 0 in exact arithmetic, so the
    "<= c" and "== c" budget programs agree on it; in float32 a logit gap beyond ~100 underflows
    to an exact 0. ``alpha`` in [0, 1]: 0 is the softmax (TC's score), 1 the scaled sigmoid
    (EC's score).

    >>> import torch
    >>> unified_score(torch.zeros(1, 4), alpha=0.5)
    tensor([[0.2500, 0.2500, 0.2500, 0.2500]])
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise InvalidParameter(f"alpha must lie in [0, 1], got {alpha}")
    z = _float(logits)
    return alpha * sigmoid_score(z) + (1.0 - alpha) * softmax_score(z)
