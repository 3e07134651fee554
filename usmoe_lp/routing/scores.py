"""Score functions f(Z) applied to router logits Z (torch; CPU or CUDA).

USMoE (arXiv 2503.22996, Def. 3.2; papers/routing-as-lp.md §1) mixes a token-side and an expert-side score:

    U = alpha * f_e(Z) + (1 - alpha) * f_t(Z),   f_t = softmax over experts,
                                                 f_e = 2 * sigmoid(Z) / N.

The 2/N factor is the reference code's: it sets f_e = 1/N at logit 0, the softmax's mean. The
reference code hard-codes alpha = 0.5 (``rate``). Scores are computed in float32 (float64 input
stays float64): the reference runs its softmax in float32.
Logits must be finite (a NaN or Inf raises :class:`~usmoe_lp.errors.InvalidScores` naming the
count and the first index); complex and bool logits are refused.
"""

from __future__ import annotations

import numpy as np
import torch

from usmoe_lp._validate import as_score_tensor, check_finite_torch, check_real
from usmoe_lp.errors import InvalidParameter, InvalidScores


def _float(logits) -> torch.Tensor:
    """Validated logits: real (complex/bool refused), a non-empty expert dimension, every entry
    finite; float32 unless the input is float64."""
    integer = not (torch.is_floating_point(logits) if isinstance(logits, torch.Tensor)
                   else np.asarray(logits).dtype.kind == "f")
    logits = as_score_tensor(logits, "logits")
    if integer:  # validated exactly above; the score itself is float32 like the reference's
        logits = logits.float()
    if logits.ndim < 1 or logits.shape[-1] == 0:
        raise InvalidScores(f"logits must have a non-empty expert dimension, got shape {tuple(logits.shape)}")
    if logits.numel():
        check_finite_torch(logits, "logits")
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
    alpha = check_real(alpha, "alpha", low=0.0, high=1.0)
    z = _float(logits)
    return alpha * sigmoid_score(z) + (1.0 - alpha) * softmax_score(z)


PROBABILITY_FUNCTIONS = ("softmax", "sigmoid", "softmax_topk", "unknown")
"""Score functions a model's router may use (``LayerInfo.score_function`` of a router log)."""


def probabilities(logits: torch.Tensor, score_function: str = "softmax") -> torch.Tensor:
    """The model's routing distribution P of each token: rows sum to 1. One definition for the package.

    logits: (..., N) real -> (..., N), float64 for float64 input, else float32.
    ``softmax``, ``softmax_topk`` and ``unknown``: softmax over all experts (for a softmax-after-top-k
    model such as GPT-OSS the full softmax is the distribution analysed). ``sigmoid``
    (DeepSeek-V3-style routers): sigmoid(z) / sum_e sigmoid(z), computed stably as
    softmax(logsigmoid(z)) so that no logit under- or overflows.

    >>> import torch
    >>> probabilities(torch.zeros(1, 4), "sigmoid")
    tensor([[0.2500, 0.2500, 0.2500, 0.2500]])
    """
    if score_function not in PROBABILITY_FUNCTIONS:
        raise InvalidParameter(f"score_function must be one of {', '.join(PROBABILITY_FUNCTIONS)}, "
                            f"got {score_function!r}")
    z = _float(logits)
    if score_function == "sigmoid":
        z = torch.nn.functional.logsigmoid(z)
    return torch.softmax(z, dim=-1)
