"""Representation-collapse diagnostics: effective rank, singular spectra, cosine similarities, span energy.

Definitions (X-MoE's collapse argument, Chi et al. 2022, and the works cited per item; the MoE analysis
tools we know of, such as moewatch and Megatron-LM's diagnostics, measure only load collapse):

* **Effective rank** (Roy & Vetterli 2007): ``erank(X) = exp(H(q))`` with ``q_i = sigma_i / sum_j sigma_j``
  over the singular values of X and H the Shannon entropy in nats; ``1 <= erank <= min(n, d)`` for a
  non-zero matrix, and we define ``erank(0) = 0.0``. On router logits Z (T, N) it is computed three
  ways: raw Z; **row-centred** Z (each token's mean logit subtracted: the part the softmax sees, since
  the softmax is shift invariant per token; ``Z C_N`` with ``C_N = I - 11^T/N``); **column-centred** Z
  (each expert's mean logit subtracted: the spread around the mean token).
* **Expert cosine**: ``cos(P[:, i], P[:, j])`` between the score profiles (columns) of experts i and j
  over the tokens, P the routing probabilities (T, N); the mean is over the ``N (N - 1)`` ordered
  pairs ``i != j``.
* **Router-row similarity** (arXiv 2605.12476): mean over ``i != j`` of ``|cos(W_i, W_j)|``, W (N, d)
  the router weight rows.
* **Span energy** (X-MoE's "collapse toward an N-dimensional span", Chi et al. 2022, arXiv
  2204.09179): ``||H P_W||_F^2 / ||H||_F^2`` with ``P_W`` the orthogonal projector onto the row space
  of W; 1 = every hidden state lies in the router span (collapse), ``rank(W) / d`` is its expectation
  for isotropic hidden states, 0 = orthogonal to every router row.

Streaming (:class:`CollapsePartial`). The state is a few Gram matrices and column sums, never a
per-token row, so memory is ``O(N^2 + d^2)`` whatever the number of tokens and two partials merge by
addition. Singular values come from a Gram matrix G = X^T X as ``sqrt(max(eigvalsh(G), 0))``,
descending. This squares the condition number: a singular value below about ``sqrt(eps) * sigma_ref``
cannot be told apart from round-off, where eps is the precision of the accumulated Gram and sigma_ref
the scale of the data it was computed from. float32/float16/bfloat16 chunks are multiplied in float32
(BLAS, blocks of 8192 rows, each shifted by its own mean; the mean's part is added back exactly
in float64), so their round-off is relative to the logits' spread around their means (for the logits,
the doubly-centred spread: the token-mean logit is a separate coordinate whose round-off lies along
the all-ones direction); float64 chunks stay float64. Every block's product is accumulated in float64.
Eigenvalues at or below ``lambda_ref * m * eps64 + 4 * eps32 * lambda_spread`` (m = size of G; the
second term only when a float32 chunk was seen) are reported as exactly 0, so exactly low-rank logits
keep their rank: about ``7e-4 * sigma_spread`` (float32) or ``1.5e-8 * sigma_ref`` (float64, N = 64)
is the smallest singular value reported.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import scipy.linalg
import torch

from usmoe_lp._json import json_ready
from usmoe_lp._validate import check_int
from usmoe_lp.errors import InvalidParameter, InvalidScores, ShapeMismatch

_EPS64 = float(np.finfo(np.float64).eps)
_EPS32 = float(np.finfo(np.float32).eps)
_BLOCK_ROWS = 8192  # float32 products are summed in float64 every this many rows (bounds float32 round-off)
_ACC_TOL = 4.0  # Gram eigenvalues below lambda_max * (_ACC_TOL * eps_acc + m * eps64) count as 0


# --------------------------------------------------------------------------------------------- inputs


def _as_array(x, name: str, *, ndim: int = 2) -> np.ndarray:
    """``x`` (numpy array, torch tensor of any dtype incl. bfloat16, nested list) as float32 or float64.

    float64 stays float64; other floating dtypes become float32; integers and bools become float64.
    Raises :class:`InvalidScores` on the wrong ndim, an empty last dimension, NaN or Inf.
    """
    if type(x).__module__.startswith("torch"):
        x = x.detach()
        if x.is_complex():
            raise InvalidScores(f"{name} must be real, got dtype {x.dtype}")
        if x.is_floating_point():
            x = x if str(x.dtype) == "torch.float64" else x.float()  # bfloat16/float16 have no numpy dtype
        else:
            x = x.double()
        x = x.cpu().numpy()
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise InvalidScores(f"{name} could not be converted to an array: {exc}") from None
    if arr.dtype.kind == "f":
        if arr.dtype != np.float64:
            arr = arr.astype(np.float32, copy=False)
    elif arr.dtype.kind in "biu":
        arr = arr.astype(np.float64)
    else:
        raise InvalidScores(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        want = "(n, d)" if ndim == 2 else f"{ndim}-D"
        raise InvalidScores(f"{name} must be {ndim}-D {want}, got shape {tuple(arr.shape)}; "
                            "flatten batch and sequence dimensions into rows first")
    if arr.shape[-1] == 0:
        raise InvalidScores(f"{name} has an empty last dimension (shape {tuple(arr.shape)})")
    if not np.isfinite(arr.sum()) and not np.isfinite(arr).all():  # the sum is a fast path
        n_nan = int(np.isnan(arr).sum())
        n_inf = int((~np.isfinite(arr)).sum()) - n_nan
        first = tuple(int(v) for v in np.argwhere(~np.isfinite(arr))[0])
        raise InvalidScores(f"{name} has {n_nan} NaN and {n_inf} Inf entries (first at index {first}); "
                            "drop padding rows or fix the capture before computing collapse statistics")
    return arr


def _nonempty(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.shape[0] == 0:
        raise InvalidScores(f"{name} has no rows (shape {tuple(arr.shape)}); need at least one row")
    return arr


# ------------------------------------------------------------------------------------ spectral helpers


def _entropy_rank(sigma: np.ndarray) -> float:
    """exp(entropy in nats) of sigma / sum(sigma); 0.0 for an all-zero vector."""
    total = float(sigma.sum())
    if total <= 0.0:
        return 0.0
    q = sigma[sigma > 0] / total
    erank = float(np.exp(-(q * np.log(q)).sum()))
    return float(np.clip(erank, 1.0, q.size))


def _svd_values(x: np.ndarray) -> np.ndarray:
    return np.linalg.svd(x.astype(np.float64, copy=False), compute_uv=False)


def _truncate_svd(sigma: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Zero the singular values below numpy.linalg.matrix_rank's default tolerance."""
    if sigma.size == 0 or sigma[0] <= 0.0:
        return np.zeros_like(sigma)
    tol = sigma[0] * max(shape) * _EPS64
    return np.where(sigma > tol, sigma, 0.0)


def _lambda_max(gram: np.ndarray) -> float:
    """Largest eigenvalue of a symmetric matrix (0.0 for an empty one)."""
    m = gram.shape[0]
    if m == 0:
        return 0.0
    return float(scipy.linalg.eigvalsh(0.5 * (gram + gram.T), subset_by_index=[m - 1, m - 1])[0])


def _spectrum_from_gram(gram: np.ndarray, length: int, scale32: float, scale64: float = 0.0) -> np.ndarray:
    """Descending singular values (``length`` of them) of X from its Gram G = X^T X.

    Eigenvalues at or below ``max(lambda_max(G), scale64) * m * eps64 + _ACC_TOL * eps32 * scale32``
    are set to 0: the first term is float64 round-off (the eigensolver; ``scale64`` is the largest
    eigenvalue of a Gram that G was derived from by subtraction, e.g. the raw Gram for the column-centred
    one), the second the float32 products' round-off, ``scale32`` being an upper bound on the largest
    eigenvalue of the part of G computed in float32 (0 when every chunk was float64).
    """
    gram = 0.5 * (gram + gram.T)
    lam = np.linalg.eigvalsh(gram)[::-1]
    out = np.zeros(length)
    if lam.size == 0 or lam[0] <= 0.0:
        return out
    tol = max(lam[0], scale64) * gram.shape[0] * _EPS64 + _ACC_TOL * _EPS32 * scale32
    lam = np.where(lam > tol, lam, 0.0)[:length]
    out[: lam.size] = np.sqrt(lam)
    return out


def _row_space_basis(weights: np.ndarray) -> np.ndarray:
    """(d, r) orthonormal basis of the row space of weights (N, d); rank r by the SVD tolerance."""
    _, s, vt = np.linalg.svd(weights, full_matrices=False)
    if s.size == 0 or s[0] <= 0.0:
        return np.zeros((weights.shape[1], 0))
    r = int((s > s[0] * max(weights.shape) * _EPS64).sum())
    return vt[:r].T


# -------------------------------------------------------------------------------- one-shot functions


def singular_spectrum(matrix) -> np.ndarray:
    """Singular values of ``matrix`` (n, d) float (numpy or torch, any float dtype), descending.

    Returns (min(n, d),) float64, computed by LAPACK SVD in float64 (no Gram matrix, no truncation).

    >>> singular_spectrum(np.diag([1.0, 3.0]))
    array([3., 1.])
    """
    return _svd_values(_nonempty(_as_array(matrix, "matrix"), "matrix"))


def effective_rank(matrix, *, center: bool = False) -> float:
    """Effective rank of ``matrix`` (n, d) float (numpy or torch, any float dtype), unitless.

    Roy & Vetterli 2007 (papers/references.bib: ``roy2007erank``): ``exp(H(q))`` with ``q_i = sigma_i / sum_j sigma_j``
    over the singular values and H the Shannon entropy in nats. ``1 <= erank <= min(n, d)``; it is the
    rank for a matrix whose non-zero singular values are equal. The zero matrix has effective rank
    0.0 (by definition here: q is undefined). Singular values below numpy's ``matrix_rank`` tolerance
    ``sigma_max * max(n, d) * eps64`` are treated as 0, so an exactly rank-r matrix with equal
    singular values gives r, not r + 1e-13. ``center=True`` subtracts each column's mean first.
    Computed by SVD in float64.

    >>> effective_rank(np.eye(4))
    4.0
    >>> effective_rank(np.outer([1.0, 2.0, 3.0], [1.0, -1.0]))
    1.0
    >>> round(effective_rank(np.diag([1.0, 1.0, 2.0])), 4)
    2.8284
    """
    x = _nonempty(_as_array(matrix, "matrix"), "matrix").astype(np.float64)
    if center:
        x = x - x.mean(axis=0, keepdims=True)
    return _entropy_rank(_truncate_svd(_svd_values(x), x.shape))


def cosine_matrix(rows) -> np.ndarray:
    """Pairwise cosine similarity of the rows of ``rows`` (N, d) float: (N, N) float64, diagonal 1.

    Signed, clipped to [-1, 1]. An all-zero row has no direction: raises :class:`InvalidScores`.

    >>> cosine_matrix(np.array([[1.0, 0.0], [1.0, 1.0]])).round(4)
    array([[1.    , 0.7071],
           [0.7071, 1.    ]])
    """
    r = _nonempty(_as_array(rows, "rows"), "rows").astype(np.float64)
    norms = np.linalg.norm(r, axis=1)
    if (norms == 0).any():
        bad = np.flatnonzero(norms == 0).tolist()
        raise InvalidScores(f"rows {bad[:10]} are all zero; the cosine similarity of a zero vector is undefined")
    u = r / norms[:, None]
    cos = np.clip(u @ u.T, -1.0, 1.0)
    np.fill_diagonal(cos, 1.0)
    return cos


def router_row_similarity(weights) -> float:
    """Router-direction similarity: mean over ``i != j`` of ``|cos(W_i, W_j)|`` (arXiv 2605.12476).

    weights: (N, d) float router weight rows (one per expert, as ``nn.Linear(d, N).weight``), N >= 2.
    Unitless, in [0, 1]: 0 for orthogonal rows, 1 when every row is parallel to every other. A cheap
    *router-collapse* proxy (auxiliary balance losses make rows about 3x more similar).

    >>> router_row_similarity(np.eye(3))
    0.0
    >>> router_row_similarity(np.array([[1.0, 2.0], [-2.0, -4.0]]))
    1.0
    """
    cos = cosine_matrix(weights)
    n = cos.shape[0]
    if n < 2:
        raise InvalidParameter(f"router_row_similarity needs at least 2 router rows, got {n}")
    return float((np.abs(cos).sum() - n) / (n * (n - 1)))


def span_energy(hidden, weights) -> float:
    """Share of the hidden states' energy inside the router's row space: ``||H P_W||_F^2 / ||H||_F^2``.

    hidden: (n, d) float pre-router hidden states; weights: (N, d) float router rows. P_W is the
    orthogonal projector onto the row space of W, built from an orthonormal basis (SVD of W, rank by
    numpy's ``matrix_rank`` tolerance; no explicit inverse). Unitless, in [0, 1]: 1 means every hidden
    state lies in the router span (X-MoE's representation collapse, Chi et al. 2022, arXiv
    2204.09179), ``rank(W) / d`` is the expectation for isotropic hidden states, 0 means orthogonal to
    every router row. All-zero hidden states have no energy to split: :class:`InvalidScores`.

    >>> span_energy(np.array([[3.0, 4.0, 0.0]]), np.array([[1.0, 0.0, 0.0]]))
    0.36
    """
    h = _nonempty(_as_array(hidden, "hidden"), "hidden").astype(np.float64)
    w = _nonempty(_as_array(weights, "weights"), "weights").astype(np.float64)
    if h.shape[1] != w.shape[1]:
        raise ShapeMismatch(f"hidden has d = {h.shape[1]} features but the router weights have d = {w.shape[1]}; "
                            "pass weights of shape (N, d) with the hidden states' d")
    total = float(np.einsum("ij,ij->", h, h))
    if total == 0.0:
        raise InvalidScores("hidden states are all zero; their span energy is undefined")
    q = _row_space_basis(w)
    hq = h @ q
    return float(np.clip(np.einsum("ij,ij->", hq, hq) / total, 0.0, 1.0))


# ------------------------------------------------------------------------------------------ streaming


def _gram_cuts(m: int) -> list[int]:
    """Column cuts of the blocked Gram: about four column blocks (multiples of 8 columns) for m >= 32."""
    if m < 32:
        return [0, m]
    return [0, *(int(round(i * m / 4 / 8)) * 8 for i in range(1, 4)), m]


def _upper_gram(x: torch.Tensor, acc: torch.Tensor) -> None:
    """Add the upper block triangle of X^T X (X (n, m) float32 torch) to ``acc`` (m, m) float64: one product
    per column block c, ``X[:, c]^T X[:, c.start:]``, about 5/8 of the multiply-adds of the full product
    (the Gram is symmetric; torch has no syrk). :func:`_symmetric` fills the lower part."""
    cuts = _gram_cuts(x.shape[1])
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        acc[a:b, a:] += (x[:, a:b].T @ x[:, a:]).double()


def _symmetric(upper: torch.Tensor) -> np.ndarray:
    """The full Gram from :func:`_upper_gram`'s accumulator (numpy float64)."""
    u = upper.numpy()
    g = u + u.T
    cuts = _gram_cuts(u.shape[0])
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        g[a:b, a:b] = u[a:b, a:b]
    return g


def _chunk_gram(x, scratch=None, name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(X^T X, X^T 1) in float64 for one chunk X (n, m): torch or numpy, float32 or float64.

    float64: one float64 product. float32: in blocks of _BLOCK_ROWS rows, each block shifted by its own
    float32 mean mu (Xc = X - mu), multiplied in float32 (:func:`_upper_gram`: the products of column blocks;
    each block's product and column sums converted to float64 and summed), then mu's part added back exactly
    in float64: X^T X = Xc^T Xc + r mu^T + mu r^T + n mu mu^T and X^T 1 = r + n mu, with r = Xc^T 1. The
    float32 round-off is then relative to the spread of X around its block means, not to the means. The
    float32 products run in torch (its BLAS honours ``torch.set_num_threads``; numpy's OpenBLAS spins up its
    own threads, which on a shared machine was an order of magnitude slower and erratic). scratch, name: where
    to write the shifted block (:meth:`CollapsePartial.update`'s scratch), else a new tensor.
    """
    xt = torch.as_tensor(x)
    n, m = xt.shape
    if xt.dtype == torch.float64:
        return (xt.T @ xt).numpy(), xt.sum(dim=0).numpy()
    upper = torch.zeros((m, m), dtype=torch.float64)
    gram = np.zeros((m, m))
    total = np.zeros(m)
    for a in range(0, n, _BLOCK_ROWS):
        block = xt[a : a + _BLOCK_ROWS]
        mu = block.mean(dim=0)
        if scratch is None:
            xc = block - mu
        else:
            xc = torch.sub(block, mu, out=scratch.get(name, block.shape[0], m, xt.dtype))
        _upper_gram(xc, upper)
        r = xc.sum(dim=0).double().numpy()
        mu64 = mu.double().numpy()
        nb = block.shape[0]
        gram += np.outer(r, mu64) + np.outer(mu64, r) + nb * np.outer(mu64, mu64)
        total += r + nb * mu64
    return gram + _symmetric(upper), total


def _softmax(z: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(z), dim=1).numpy()


def _cosine_from_gram(gram: np.ndarray) -> np.ndarray:
    """Column cosines from a Gram matrix; a zero column has cosine 0 with every column, itself included."""
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    ok = norms > 0
    denom = np.where(np.outer(ok, ok), np.outer(norms, norms), 1.0)
    cos = np.where(np.outer(ok, ok), np.clip(gram / denom, -1.0, 1.0), 0.0)
    np.fill_diagonal(cos, ok.astype(np.float64))
    return cos


@dataclass(frozen=True, eq=False)
class CollapseStats:
    """Representation-collapse statistics of one layer (or of several layers pooled).

    Attributes:
        num_tokens: T, tokens accumulated (count).
        num_experts: N.
        max_rank: min(T, N), the largest possible rank of the logit matrix.
        logit_spectrum: (max_rank,) float64, singular values of the raw logits Z (T, N), descending.
        logit_effective_rank: effective rank of Z (0.0 when T = 0 or Z = 0).
        logit_spectrum_centered: (max_rank,) singular values of the row-centred logits
            ``Z (I - 11^T/N)`` (each token's mean logit removed: what the softmax sees). Its last value
            is 0 when T >= N.
        logit_effective_rank_centered: effective rank of the row-centred logits (at most N - 1).
        logit_effective_rank_column_centered: effective rank of Z minus each expert's mean logit.
        expert_cosine: (N, N) float64, ``cos(P[:, i], P[:, j])`` of the experts' score profiles over the
            tokens (diagonal 1; an expert whose probability is 0 on every token has cosine 0 everywhere).
        mean_expert_cosine: mean of expert_cosine over the ``N (N - 1)`` pairs i != j (signed).
        probs_source: ``"softmax"`` (softmax of the logits) or ``"given"`` (the caller's probabilities).
        hidden_dim: d when hidden states were accumulated, else None.
        hidden_spectrum: (min(T, d),) singular values of the hidden states H (T, d), or None.
        hidden_effective_rank: effective rank of H (uncentred), or None.
        router_row_similarity: mean ``|cos(W_i, W_j)|`` over i != j, when router weights were given.
        span_energy: ``||H P_W||_F^2 / ||H||_F^2`` in [0, 1] when hidden states and router weights were
            both given (None if H = 0).
        span_energy_isotropic: ``rank(W) / d``, the span energy of isotropic hidden states (baseline).
    """

    num_tokens: int
    num_experts: int
    max_rank: int
    logit_spectrum: np.ndarray
    logit_effective_rank: float
    logit_spectrum_centered: np.ndarray
    logit_effective_rank_centered: float
    logit_effective_rank_column_centered: float
    expert_cosine: np.ndarray
    mean_expert_cosine: float
    probs_source: str | None = None
    hidden_dim: int | None = None
    hidden_spectrum: np.ndarray | None = None
    hidden_effective_rank: float | None = None
    router_row_similarity: float | None = None
    span_energy: float | None = None
    span_energy_isotropic: float | None = None

    def to_dict(self) -> dict:
        """JSON-ready plain Python: ints, floats, None, lists (spectra as lists of floats; NaN None)."""
        return json_ready({f.name: getattr(self, f.name) for f in fields(self)})


class CollapsePartial:
    """Mergeable accumulator of :class:`CollapseStats` over chunks of tokens (streaming protocol).

    State, all float64 and independent of the number of tokens:

    * for the logits Z (T, N): the Gram matrix and column sums of the augmented rows
      ``a_t = [z_t - m_t 1, m_t]`` (N + 1 values), m_t the token's mean logit. Its top-left block is
      the Gram of the row-centred logits ``Z C_N`` directly (no cancellation against a large common
      logit); with ``A = [I_N | 1]``, ``Z^T Z = A G_a A^T``, the column sums are ``A s_a`` and the
      column-centred Gram is ``Z^T Z - s s^T / T`` — all exact algebra on the accumulated sums;
    * for the probabilities P (T, N): the Gram ``P^T P`` and column sums;
    * for the hidden states H (T, d), when ``hidden_dim`` is set: ``H^T H`` (d, d) and column sums.

    ``probs`` defaults to the softmax of the logits (the usual routing distribution ``p = softmax(z)``); pass the
    model's own probabilities for sigmoid routers. A partial takes either always or never ``probs``.

    >>> import torch
    >>> part = CollapsePartial.empty(4)
    >>> part.update(torch.eye(4).repeat(2, 1).to(torch.bfloat16))
    >>> stats = part.result()
    >>> stats.num_tokens, stats.logit_effective_rank, round(stats.logit_effective_rank_centered, 6)
    (8, 4.0, 3.0)
    """

    def __init__(self, num_experts: int, hidden_dim: int | None = None):
        self.num_experts = check_int(num_experts, "num_experts", low=1)
        self.hidden_dim = None if hidden_dim is None else check_int(hidden_dim, "hidden_dim", low=1)
        n = self.num_experts
        self.num_tokens = 0
        self._logit_gram = np.zeros((n + 1, n + 1))
        self._logit_sum = np.zeros(n + 1)
        self._logit_f32 = False
        self._prob_gram = np.zeros((n, n))
        self._prob_sum = np.zeros(n)
        self._probs_given: bool | None = None
        d = self.hidden_dim
        self._hidden_gram = None if d is None else np.zeros((d, d))
        self._hidden_sum = None if d is None else np.zeros(d)
        self._hidden_f32 = False

    @classmethod
    def empty(cls, num_experts: int, hidden_dim: int | None = None) -> CollapsePartial:
        """An accumulator with no tokens. num_experts: N >= 1; hidden_dim: d if hidden states will be
        passed to every :meth:`update`, else None."""
        return cls(num_experts, hidden_dim)

    def update(self, logits, probs=None, hidden=None, *, checked: bool = False, scratch=None) -> None:
        """Add one chunk of tokens. Mutates self, returns None.

        logits: (n, N) float router logits (numpy or torch, any float dtype incl. bfloat16);
        probs: (n, N) float routing probabilities, or None for ``softmax(logits)``;
        hidden: (n, d) float pre-router hidden states — required when ``hidden_dim`` was set, refused
        otherwise. A chunk of 0 tokens is allowed (a no-op). Everything is validated before any state
        changes. checked: the inputs are already valid (float32 or float64 torch tensors, finite, aligned,
        probs given: the streaming analysis, whose log reader checked them) — skip the checks and their
        passes over the data. scratch: where to work, an object whose ``get(name, rows, cols, dtype)`` returns a
        (rows, cols) tensor to overwrite, the same memory from call to call (the streaming analysis passes its
        block buffers: see :mod:`usmoe_lp.diagnostics.stream`); None: new tensors.
        """
        if checked:
            self._add(logits, probs, hidden, scratch=scratch)
            return
        z = _as_array(logits, "logits")
        n, big_n = z.shape
        if big_n != self.num_experts:
            raise ShapeMismatch(f"logits have N = {big_n} experts but this partial was created with "
                                f"num_experts = {self.num_experts}")
        given = probs is not None
        if given:
            p = _as_array(probs, "probs")
            if p.shape != z.shape:
                raise ShapeMismatch(f"probs has shape {tuple(p.shape)} but logits have {tuple(z.shape)}")
        if self._probs_given is not None and n > 0 and given != self._probs_given:
            raise InvalidParameter("probs were passed to some updates and not to others; pass them always "
                                   "(the model's probabilities) or never (softmax of the logits)")
        h = None
        if hidden is not None and self.hidden_dim is None:
            raise InvalidParameter("hidden states were passed but this partial has hidden_dim = None; create it "
                                   "with CollapsePartial.empty(num_experts, hidden_dim=d)")
        if hidden is None and self.hidden_dim is not None:
            raise InvalidParameter(f"this partial expects hidden states (hidden_dim = {self.hidden_dim}) with "
                                   "every chunk; pass hidden=..., or create it with hidden_dim=None")
        if hidden is not None:
            h = _as_array(hidden, "hidden")
            if h.shape != (n, self.hidden_dim):
                raise ShapeMismatch(f"hidden has shape {tuple(h.shape)}, expected ({n}, {self.hidden_dim}): "
                                    "one row per logits row and hidden_dim features")
        if n == 0:
            return
        if not given:
            p = _softmax(z)
        self._add(torch.from_numpy(np.ascontiguousarray(z)), torch.from_numpy(np.ascontiguousarray(p)),
                  None if h is None else torch.from_numpy(np.ascontiguousarray(h)), given)

    def _add(self, zt: torch.Tensor, pt: torch.Tensor, ht: torch.Tensor | None, given: bool = True,
             scratch=None) -> None:
        """Accumulate valid (n, N) logits, probabilities and (n, d) hidden states (torch float32/float64)."""
        n, big_n = zt.shape
        if n == 0:
            return
        m = zt.mean(dim=1)  # torch: numpy's row reductions / gemv are several times slower here
        shape = (n, big_n + 1)
        aug = torch.empty(shape, dtype=zt.dtype) if scratch is None else scratch.get("aug", *shape, zt.dtype)
        torch.sub(zt, m[:, None], out=aug[:, :big_n])
        aug[:, big_n] = m
        g, s = _chunk_gram(aug, scratch, "logits")
        pg, ps = _chunk_gram(pt, scratch, "probs")
        if ht is not None:
            hg, hs = _chunk_gram(ht, scratch, "hidden")
            self._hidden_gram += hg
            self._hidden_sum += hs
            if ht.dtype != torch.float64:
                self._hidden_f32 = True
        self._logit_gram += g
        self._logit_sum += s
        if zt.dtype != torch.float64:
            self._logit_f32 = True
        self._prob_gram += pg
        self._prob_sum += ps
        self._probs_given = given
        self.num_tokens += n

    def merge(self, other: CollapsePartial) -> CollapsePartial:
        """A new partial holding the tokens of both; neither input changes.

        Raises :class:`InvalidParameter` for different num_experts or hidden_dim, or when one partial
        had probabilities given and the other used the softmax.
        """
        if not isinstance(other, CollapsePartial):
            raise InvalidParameter(f"can only merge a CollapsePartial, got {type(other).__name__}")
        if other.num_experts != self.num_experts:
            raise InvalidParameter(f"cannot merge partials with num_experts {self.num_experts} and {other.num_experts}")
        if other.hidden_dim != self.hidden_dim:
            raise InvalidParameter(f"cannot merge partials with hidden_dim {self.hidden_dim} and {other.hidden_dim}")
        if None not in (self._probs_given, other._probs_given) and self._probs_given != other._probs_given:
            raise InvalidParameter("cannot merge a partial built from given probs with one built from the softmax")
        out = CollapsePartial(self.num_experts, self.hidden_dim)
        out.num_tokens = self.num_tokens + other.num_tokens
        out._logit_gram = self._logit_gram + other._logit_gram
        out._logit_sum = self._logit_sum + other._logit_sum
        out._logit_f32 = self._logit_f32 or other._logit_f32
        out._prob_gram = self._prob_gram + other._prob_gram
        out._prob_sum = self._prob_sum + other._prob_sum
        out._probs_given = self._probs_given if self._probs_given is not None else other._probs_given
        if self.hidden_dim is not None:
            out._hidden_gram = self._hidden_gram + other._hidden_gram
            out._hidden_sum = self._hidden_sum + other._hidden_sum
            out._hidden_f32 = self._hidden_f32 or other._hidden_f32
        return out

    def logit_grams(self) -> dict[str, np.ndarray]:
        """The (N, N) float64 Gram matrices of the raw, row-centred and column-centred logits."""
        n = self.num_experts
        ga = 0.5 * (self._logit_gram + self._logit_gram.T)
        gr, b, s = ga[:n, :n], ga[:n, n], ga[n, n]
        ones = np.ones(n)
        raw = gr + np.outer(b, ones) + np.outer(ones, b) + s * np.outer(ones, ones)
        centring = np.eye(n) - np.full((n, n), 1.0 / n)
        row = centring @ gr @ centring  # removes the float round-off left in the 1-direction
        col_sum = self._logit_sum[:n] + self._logit_sum[n]
        col = raw - np.outer(col_sum, col_sum) / self.num_tokens if self.num_tokens else raw
        return {"raw": raw, "row_centered": row, "column_centered": col}

    def result(self, router_weights=None) -> CollapseStats:
        """The statistics of every token seen so far (see :class:`CollapseStats`).

        router_weights: optional (N, d) float router rows (numpy or torch): adds router_row_similarity,
        and with hidden states span_energy computed exactly from the hidden Gram as
        ``trace(P_W H^T H) / trace(H^T H)``. With no tokens the spectra are empty and the ranks 0.0.
        """
        n_exp, t = self.num_experts, self.num_tokens
        max_rank = min(t, n_exp)
        grams = self.logit_grams()
        # Scale of the float32 round-off: the float32 products are of rows shifted by a chunk mean, so
        # their row-centred block is at most (PSD order) the doubly-centred Gram C G_col C. The round-off
        # of the mean-logit coordinate lies along the all-ones direction (see the module docstring).
        scale = 0.0
        if self._logit_f32:
            centring = np.eye(n_exp) - np.full((n_exp, n_exp), 1.0 / n_exp)
            scale = _lambda_max(centring @ grams["column_centered"] @ centring)
        spec = _spectrum_from_gram(grams["raw"], max_rank, scale)
        spec_row = _spectrum_from_gram(grams["row_centered"], max_rank, scale)
        spec_col = _spectrum_from_gram(grams["column_centered"], max_rank, scale, _lambda_max(grams["raw"]))
        cos = _cosine_from_gram(0.5 * (self._prob_gram + self._prob_gram.T))
        mean_cos = float((cos.sum() - np.trace(cos)) / (n_exp * (n_exp - 1))) if n_exp > 1 else 0.0

        hidden_spec = hidden_erank = None
        if self.hidden_dim is not None:
            scale = 0.0
            if self._hidden_f32 and t:
                scale = _lambda_max(self._hidden_gram - np.outer(self._hidden_sum, self._hidden_sum) / t)
            hidden_spec = _spectrum_from_gram(self._hidden_gram, min(t, self.hidden_dim), scale)
            hidden_erank = _entropy_rank(hidden_spec)
        row_sim = energy = energy_iso = None
        if router_weights is not None:
            w = _as_array(router_weights, "router_weights").astype(np.float64)
            if w.shape[0] != n_exp:
                raise ShapeMismatch(f"router_weights has {w.shape[0]} rows but the logits have N = {n_exp} experts; "
                                    "pass the (N, d) router weight matrix")
            if self.hidden_dim is not None and w.shape[1] != self.hidden_dim:
                raise ShapeMismatch(f"router_weights have d = {w.shape[1]} features but the hidden states have "
                                    f"d = {self.hidden_dim}")
            row_sim = router_row_similarity(w) if n_exp >= 2 else None
            q = _row_space_basis(w)
            energy_iso = q.shape[1] / w.shape[1]
            if self.hidden_dim is not None:
                g = 0.5 * (self._hidden_gram + self._hidden_gram.T)
                total = float(np.trace(g))
                if total > 0:
                    energy = float(np.clip(np.einsum("ij,ij->", g @ q, q) / total, 0.0, 1.0))
        return CollapseStats(
            num_tokens=t, num_experts=n_exp, max_rank=max_rank,
            logit_spectrum=spec, logit_effective_rank=_entropy_rank(spec),
            logit_spectrum_centered=spec_row, logit_effective_rank_centered=_entropy_rank(spec_row),
            logit_effective_rank_column_centered=_entropy_rank(spec_col),
            expert_cosine=cos, mean_expert_cosine=mean_cos,
            probs_source=None if self._probs_given is None else ("given" if self._probs_given else "softmax"),
            hidden_dim=self.hidden_dim, hidden_spectrum=hidden_spec, hidden_effective_rank=hidden_erank,
            router_row_similarity=row_sim, span_energy=energy, span_energy_isotropic=energy_iso,
        )


def collapse_stats(logits, probs=None, hidden=None, router_weights=None) -> CollapseStats:
    """:class:`CollapseStats` of in-memory arrays in one call (one chunk of a :class:`CollapsePartial`).

    logits: (T, N) float; probs: (T, N) float or None (softmax of the logits); hidden: (T, d) float or
    None; router_weights: (N, d) float or None.
    """
    z = _as_array(logits, "logits")
    d = None if hidden is None else _as_array(hidden, "hidden").shape[1]
    part = CollapsePartial.empty(z.shape[1], hidden_dim=d)
    part.update(z, probs, hidden)
    return part.result(router_weights=router_weights)
