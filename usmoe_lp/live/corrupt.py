"""Input corruption for a language-model evaluation: each input token replaced, with probability p, by a random one.

:func:`corrupt_tokens` corrupts one token stream (a document's ``[BOS] + tokens + [EOS]``): every position is
replaced, independently with probability ``rate``, by a token drawn uniformly from ``0 .. vocab - 1`` (which may
equal the original by chance). The model then predicts the *clean* next tokens from the corrupted inputs
(:func:`usmoe_lp.live.evaluate.evaluate`): the corrupted-input setting of robustness evaluations, translated to
language modelling.

Draws (numpy ``default_rng([seed, stream])``): one uniform ``u`` in [0, 1) and one replacement token per position,
in that order; a position is replaced where ``u < rate``. Hence the corruption of a stream is fixed by
``(seed, stream)`` alone, identical for every router evaluated on it, and nested across rates (what ``rate = 0.1``
replaces, ``rate = 0.2`` replaces too, by the same tokens); ``rate = 0`` returns the stream unchanged.
"""

from __future__ import annotations

import numpy as np
import torch

from usmoe_lp._validate import check_int, check_real

__all__ = ["corrupt_tokens"]


def corrupt_tokens(ids: torch.Tensor, rate: float, vocab: int, *, seed: int = 0,
                   stream: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each token of ``ids`` with probability ``rate`` by a uniform token of ``0 .. vocab - 1``.

    Args:
        ids: (n,) int64 token stream.
        rate: the replacement probability, in [0, 1].
        vocab: the number of tokens drawn from (256 for a byte-level model: bytes only).
        seed, stream: the draws come from ``numpy.random.default_rng([seed, stream])`` (both >= 0), ``stream``
            telling apart the streams (documents) of one seed.

    Returns:
        ``(corrupted, replaced)``: (n,) int64 on the device of ``ids``, and (n,) bool, True where a draw replaced
        the token (the replacement may equal the original, with probability 1 / vocab).

    >>> x = torch.arange(10)
    >>> corrupt_tokens(x, 0.0, 256)[0].equal(x)
    True
    >>> a, ra = corrupt_tokens(x, 0.3, 256, seed=1)
    >>> b, rb = corrupt_tokens(x, 0.6, 256, seed=1)
    >>> bool((ra <= rb).all()), bool((a[ra] == b[ra]).all())       # nested across rates
    (True, True)
    """
    rate = check_real(rate, "corrupt rate", low=0.0, high=1.0)
    vocab = check_int(vocab, "vocab", low=1)
    seed = check_int(seed, "seed", low=0)
    stream = check_int(stream, "stream", low=0)
    if not isinstance(ids, torch.Tensor) or ids.ndim != 1 or ids.is_floating_point():
        raise TypeError(f"ids must be a 1-d integer tensor, got {getattr(ids, 'shape', type(ids).__name__)}")
    n = int(ids.numel())
    rng = np.random.default_rng([seed, stream])
    u = rng.random(n)
    tokens = rng.integers(0, vocab, n)
    replaced = torch.from_numpy(u < rate)
    if not bool(replaced.any()):
        return ids.clone(), replaced
    out = ids.clone()
    where = replaced.to(ids.device)
    out[where] = torch.from_numpy(tokens).to(ids.device, ids.dtype)[where]
    return out, replaced
