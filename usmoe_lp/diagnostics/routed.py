"""One chunk of one layer's routing as the experts each token was sent to: the input of the routing-pattern
partials (:mod:`~usmoe_lp.diagnostics.coactivation`, :mod:`~usmoe_lp.diagnostics.transitions`,
:mod:`~usmoe_lp.diagnostics.vocab`, :mod:`~usmoe_lp.diagnostics.domain`,
:mod:`~usmoe_lp.diagnostics.locality`, pooled per layer by :mod:`~usmoe_lp.diagnostics.patterns`).

Definitions of every statistic: ``docs/definitions.md``, section "Routing patterns".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from usmoe_lp._validate import check_finite_numpy, check_int
from usmoe_lp.errors import InvalidScores, ShapeMismatch

__all__ = ["Routed", "ids_mask", "pair_counts"]


def _int_vector(x, name: str, n: int | None, low: int) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ShapeMismatch(f"{name} must be 1-D (n,), got shape {tuple(a.shape)}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise InvalidScores(f"{name} must hold integers, got dtype {a.dtype}")
    a = a.astype(np.int64, copy=False)
    if n is not None and a.shape[0] != n:
        raise ShapeMismatch(f"{name} has {a.shape[0]} entries but ranked has {n} tokens (rows)")
    if a.size and int(a.min()) < low:
        raise InvalidScores(f"{name} must be >= {low}, got {int(a.min())} at index {int(np.argmin(a))}")
    return a


def _compact(ranked: np.ndarray) -> np.ndarray:
    """Move the -1 slots of each row to its end, the experts keeping their order (a stable sort on validity)."""
    empty = ranked < 0
    if not empty.any():
        return ranked
    order = np.argsort(empty, axis=1, kind="stable")
    return np.take_along_axis(ranked, order, axis=1)


def ids_mask(ranked: np.ndarray, num_experts: int) -> np.ndarray:
    """(n, N) bool C-contiguous mask of (n, k) expert ids in [-1, N) (-1 = no expert)."""
    n, k = ranked.shape
    if k and n and int(ranked.min()) >= 0:  # every slot holds an expert: one flat scatter
        out = np.zeros((n, num_experts), dtype=bool)
        out.reshape(-1)[(np.arange(n, dtype=np.int64)[:, None] * num_experts + ranked).ravel()] = True
        return out
    out = np.zeros((n, num_experts + 1), dtype=bool)
    out[np.arange(n)[:, None], np.where(ranked < 0, num_experts, ranked)] = True
    return np.ascontiguousarray(out[:, :num_experts])


@dataclass(frozen=True, eq=False)
class Routed:
    """The selections of one chunk of one layer, in log order (validated and normalised on construction).

    Attributes:
        ranked: (n, k) int64 expert ids, best first (the serving stack's rank order); -1 = empty slot. The
            -1 slots are moved to the end of each row on construction (the experts keep their order), so
            ``ranked[:, 0]`` is each token's top-1 expert (-1 for a token with no expert). An expert may appear
            at most once per row. ``k`` may be 0 (no token has an expert).
        num_experts: N; ids must lie in [-1, N).
        token_ids: (n,) int64 vocabulary ids, -1 = unknown.
        sequence_ids: (n,) int64 >= 0.
        positions: (n,) int64 >= 0; a sequence's positions increase through the log (checked here within the
            chunk, and across chunks by :class:`~usmoe_lp.diagnostics.locality.LocalityPartial`).
        domains: optionally (n,) int64 domain index per token, -1 = unlabelled.

    >>> r = Routed(np.array([[2, -1, 0]]), 3, token_ids=[7], sequence_ids=[0], positions=[0])
    >>> r.ranked.tolist(), r.mask().astype(int).tolist()
    ([[2, 0, -1]], [[1, 0, 1]])
    """

    ranked: np.ndarray
    num_experts: int
    token_ids: np.ndarray
    sequence_ids: np.ndarray
    positions: np.ndarray
    domains: np.ndarray | None = None

    def __post_init__(self) -> None:
        n_exp = check_int(self.num_experts, "num_experts", low=1, high=2**15 - 1)
        r = np.asarray(self.ranked)
        if r.ndim != 2:
            raise ShapeMismatch(f"ranked must be (n, k) expert ids, got shape {tuple(r.shape)}")
        if r.size and not np.issubdtype(r.dtype, np.integer):
            raise InvalidScores(f"ranked must hold integer expert ids, got dtype {r.dtype}")
        r = r.astype(np.int64, copy=False)
        if r.size and (int(r.min()) < -1 or int(r.max()) >= n_exp):
            bad = tuple(int(i) for i in np.argwhere((r < -1) | (r >= n_exp))[0])
            raise InvalidScores(f"ranked has expert id {int(r[bad])} at {bad}; ids must be in [-1, {n_exp}) "
                                f"(-1 = no expert, N = {n_exp} experts)")
        if r.shape[1] > 1:
            s = np.sort(r, axis=1)
            dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
            if dup.any():
                row = int(np.argwhere(dup)[0, 0])
                raise InvalidScores(f"ranked row {row} selects an expert twice: {r[row].tolist()}")
        n = r.shape[0]
        object.__setattr__(self, "num_experts", n_exp)
        object.__setattr__(self, "ranked", _compact(r))
        object.__setattr__(self, "token_ids", _int_vector(self.token_ids, "token_ids", n, -1))
        object.__setattr__(self, "sequence_ids", _int_vector(self.sequence_ids, "sequence_ids", n, 0))
        pos = _int_vector(self.positions, "positions", n, 0)
        object.__setattr__(self, "positions", pos)
        if self.domains is not None:
            object.__setattr__(self, "domains", _int_vector(self.domains, "domains", n, -1))
        if n > 1:
            order = np.argsort(self.sequence_ids, kind="stable")
            same = self.sequence_ids[order][1:] == self.sequence_ids[order][:-1]
            back = same & (pos[order][1:] <= pos[order][:-1])
            if back.any():
                i = int(np.flatnonzero(back)[0])
                a, b = int(order[i]), int(order[i + 1])
                raise InvalidScores(f"positions of sequence {int(self.sequence_ids[b])} do not increase through the "
                                    f"log: token {b} has position {int(pos[b])} after token {a} at {int(pos[a])}")

    @property
    def num_tokens(self) -> int:
        """n, the chunk's tokens."""
        return int(self.ranked.shape[0])

    def mask(self) -> np.ndarray:
        """(n, N) bool: mask[t, e] = token t selected expert e. Built once per chunk and shared by every caller
        (the pattern partials and the layer transitions), so it is read-only."""
        m = self.__dict__.get("_mask")
        if m is None:
            m = ids_mask(self.ranked, self.num_experts)
            m.flags.writeable = False
            object.__setattr__(self, "_mask", m)
        return m

    @classmethod
    def from_mask(cls, mask, scores=None, *, token_ids, sequence_ids, positions, domains=None) -> Routed:
        """A :class:`Routed` from an (n, N) bool (or 0/1) selection mask: each row's selected experts ranked by
        descending ``scores`` ((n, N) finite float, optional), ties (and every row without scores) to the lowest
        expert index. ``ranked`` has as many columns as the largest row count, -1 after each row's experts.

        >>> m = np.array([[1, 0, 1, 1], [0, 1, 0, 0]], dtype=bool)
        >>> Routed.from_mask(m, np.array([[.1, 0, .5, .5], [0, 1, 0, 0]]), token_ids=[1, 2],
        ...                  sequence_ids=[0, 0], positions=[0, 1]).ranked.tolist()
        [[2, 3, 0], [1, -1, -1]]
        """
        m = np.asarray(mask)
        if m.ndim != 2:
            raise ShapeMismatch(f"mask must be (n, N), got shape {tuple(m.shape)}")
        if m.dtype != bool:
            if not np.isin(m, (0, 1)).all():
                raise InvalidScores("mask must hold only 0/1 (or True/False); got other values")
            m = m.astype(bool)
        n, n_exp = m.shape
        if scores is None:
            key = (~m).view(np.uint8)
        else:
            s = np.asarray(scores, dtype=np.float64)
            if s.shape != m.shape:
                raise ShapeMismatch(f"scores has shape {tuple(s.shape)} but mask has {(n, n_exp)}; pass them aligned")
            if s.size:
                check_finite_numpy(s, "scores")
            key = np.where(m, -s, np.inf)
        width = int(m.sum(axis=1).max()) if n else 0
        order = np.argsort(key, axis=1, kind="stable")[:, :width]
        ranked = np.where(np.take_along_axis(m, order, axis=1), order, -1).astype(np.int64)
        return cls(ranked, n_exp, token_ids=token_ids, sequence_ids=sequence_ids, positions=positions,
                   domains=domains)


_EXACT_ROWS = 1 << 23
"""Rows per float32 product in :func:`pair_counts`: every partial sum of 0/1 products stays below 2**24 (the
float32 significand holds every integer up to 2**24 exactly), so each product is exact whatever the summation
order of the matrix multiply."""


def pair_counts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N_a, N_b) int64 ``a.T @ b`` of (n, N_a) and (n, N_b) bool masks, exact: float32 products (torch's matrix
    multiply, on the caller's torch threads: one inside :func:`usmoe_lp._threads.one_torch_thread`, unlike
    numpy's BLAS) of blocks of at most 2**23 rows, each exact, summed in int64."""
    out = np.zeros((a.shape[1], b.shape[1]), dtype=np.int64)
    for lo in range(0, a.shape[0], _EXACT_ROWS):
        fa = torch.from_numpy(a[lo:lo + _EXACT_ROWS].astype(np.float32))  # a copy: the masks may be read-only
        fb = fa if b is a else torch.from_numpy(b[lo:lo + _EXACT_ROWS].astype(np.float32))
        out += torch.mm(fa.T, fb).numpy().astype(np.int64)
    return out
