"""Matrix families: the random score matrices the claims are checked on (float64, shape (T, N)).

"Matrix family" is one of three senses of "family" in this project (docs/definitions.md#three-kinds-of-family):
the model family of a router log is the transformers ``model_type``, and the constraint blocks of a
routing program are the LP's own. Each matrix family stresses a different assumption of the theory: the
sign of the scores (Prop. 3.1's "<= c" statement needs S >= 0 at the c-th entry), calibration across
tokens (the unified score), heavy tails, the low rank of real routers (Z = h W with d < N), and ties
(bf16 quantisation, as in the reference code's sigmoid; near-ties; all-equal).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from usmoe_lp.errors import InvalidParameter
from usmoe_lp.routing.scores import unified_score


@dataclass(frozen=True)
class Family:
    """A matrix family: a generator of (T, N) float64 score matrices.

    Attributes:
        name: registry key.
        description: one line for reports.
        signed: whether scores can be negative (where "<= c" and "== c" part ways).
        generate: ``generate(rng, T, N) -> (T, N) float64``.
    """

    name: str
    description: str
    signed: bool
    generate: Callable[[np.random.Generator, int, int], np.ndarray]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _gaussian(rng, T, N):
    return rng.standard_normal((T, N))


def _softmax_rows(rng, T, N):
    return _softmax(rng.standard_normal((T, N)))


def _sigmoid(rng, T, N):
    return 1.0 / (1.0 + np.exp(-rng.standard_normal((T, N))))


def _unified(rng, T, N):
    z = torch.from_numpy(rng.standard_normal((T, N)))
    return unified_score(z, alpha=0.5).numpy().astype(np.float64)


def _student_t(rng, T, N):
    return rng.standard_t(df=2.0, size=(T, N))


def _low_rank(rng, T, N):
    d = max(1, N // 4)
    return rng.standard_normal((T, d)) @ rng.standard_normal((d, N)) / np.sqrt(d)


def _bf16(rng, T, N):
    s = _softmax(2.0 * rng.standard_normal((T, N)))
    return torch.from_numpy(s).to(torch.bfloat16).to(torch.float64).numpy()


def _near_ties(rng, T, N):
    return np.round(rng.standard_normal((T, N)), 1) + 1e-10 * rng.standard_normal((T, N))


def _all_equal(rng, T, N):
    return np.full((T, N), float(np.round(rng.standard_normal(), 3)))


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("gaussian", "signed Gaussian logits N(0, 1)", True, _gaussian),
        Family("softmax", "row softmax of Gaussian logits (TC's score)", False, _softmax_rows),
        Family("sigmoid", "sigmoid of Gaussian logits (EC's score)", False, _sigmoid),
        Family("unified", "USMoE unified score, alpha = 0.5, 2/N-scaled sigmoid", False, _unified),
        Family("student_t", "heavy-tailed Student-t logits (df = 2)", True, _student_t),
        Family("low_rank", "low-rank logits h W, d = N/4, like real routers", True, _low_rank),
        Family("bf16", "softmax scores quantised to bfloat16 (many ties)", False, _bf16),
        Family("near_ties", "logits on a 0.1 grid plus 1e-10 noise", True, _near_ties),
        Family("all_equal", "one constant (random sign) everywhere", True, _all_equal),
    ]
}


def get_families(names) -> list[Family]:
    """Resolve matrix-family names (or ``"all"``) to :class:`Family` objects, in registry order."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if names is None or list(names) == ["all"]:
        return list(FAMILIES.values())
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise InvalidParameter(f"unknown matrix families {unknown}; choose from {', '.join(FAMILIES)}")
    return [FAMILIES[n] for n in names]
