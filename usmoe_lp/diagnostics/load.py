"""Load-balance statistics of a routing: load entropy, MaxVio, CV, Gini, dead experts, aux and z losses.

Definitions follow their original sources, named at each metric (Switch Transformers, ST-MoE,
DeepSeek's MaxVio, moewatch, Megatron-LM's ``routing_diagnostics``). Known quirks of other tools are
avoided on purpose (and each is a regression test): top-k counts (moewatch counts top-1 only),
zero-load experts counted in max/mean (plumb-moe leaves them out), population CV, Gini exactly 0 at
perfect balance (Megatron-LM's omits the +1/N term), and both the pooled (transformers) and the
per-layer-mean (OLMoE scripts) Switch aux loss.

Entropies are in nats; "normalised" entropies are divided by log N (N = number of experts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from usmoe_lp._json import json_ready
from usmoe_lp._validate import PADDING_CONVENTION, check_int, check_padding_mask
from usmoe_lp.errors import InvalidParameter, InvalidScores, ShapeMismatch
from usmoe_lp.routing.routers import max_violation

COLD_SHARE = 0.001  # moewatch's dead/cold threshold on the load share


def _as_numpy(x, name: str) -> np.ndarray:
    """Return ``x`` (numpy array, torch tensor of any dtype incl. bfloat16, list) as a numpy array."""
    if type(x).__module__.startswith("torch"):
        x = x.detach()
        if x.is_floating_point() and str(x.dtype) != "torch.float64":
            x = x.float()  # bfloat16/float16 have no numpy dtype
        x = x.cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise InvalidScores(f"{name} could not be converted to an array: {exc}") from None


def _check_counts(counts) -> np.ndarray:
    c = _as_numpy(counts, "counts")
    if c.dtype == bool:
        c = c.astype(np.int64)
    if not (np.issubdtype(c.dtype, np.integer) or np.issubdtype(c.dtype, np.floating)):
        raise InvalidScores(f"counts must be integer or float, got dtype {c.dtype}")
    if c.ndim != 1:
        raise InvalidScores(f"counts must be 1-D (N,) per-expert counts, got shape {tuple(c.shape)}")
    if c.size == 0:
        raise InvalidScores("counts is empty; need at least one expert (N >= 1)")
    if np.issubdtype(c.dtype, np.floating) and not np.isfinite(c).all():
        raise InvalidScores("counts has NaN or Inf entries; pass finite per-expert counts")
    if (c < 0).any():
        raise InvalidScores(f"counts must be >= 0, got a minimum of {c.min()}")
    if np.issubdtype(c.dtype, np.integer):
        return c.astype(np.int64)
    return c.astype(np.float64)


def _entropy_nats(share: np.ndarray) -> float:
    """Shannon entropy in nats of a probability vector (0 log 0 = 0)."""
    pos = share[share > 0]
    return float(-(pos * np.log(pos)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0


BALANCE_KEYS = ("load_entropy", "load_entropy_nats", "maxvio", "max_over_mean", "cv", "gini", "dead_experts",
                "cold_experts", "utilisation")
"""The keys of :func:`balance_metrics`, in order."""


def balance_metrics(counts) -> dict[str, float | int]:
    """Balance metrics of per-expert counts (the source of each is named at its entry below).

    Args:
        counts: (N,) int or float, c_e = number of token-expert assignments of expert e (count
            every selected pair: a top-k router gives k per token, never top-1 only as moewatch counts).
            numpy array, torch tensor or list; must be finite and >= 0.

    Returns a dict (plain Python floats/ints):
        - ``load_entropy``: H(l) / log N, unitless in [0, 1], with l_e = c_e / sum c the load
          share and H in nats; 1.0 at perfect balance. N = 1 gives 1.0 (one expert is balanced).
        - ``load_entropy_nats``: H(l) in nats.
        - ``maxvio``: max_e c_e / mean_e c_e - 1 (DeepSeek, arXiv 2408.15664); 0 at balance.
        - ``max_over_mean``: max_e c_e / mean_e c_e = maxvio + 1, the mean taken over ALL N
          experts, zero-load experts included (plumb-moe leaves them out).
        - ``cv``: POPULATION std (ddof=0, not torch's sample default) / mean of c_e.
        - ``gini``: G = 1 + 1/N - 2 sum_i (sum_{j<=i} c_(j)) / (N sum c), c sorted ascending.
          Exactly 0 at perfect balance (Megatron-LM omits the +1/N, giving -1/N) and (N-1)/N when one
          expert takes everything.
        - ``dead_experts``: int, #{e : c_e == 0} (Megatron's threshold).
        - ``cold_experts``: int, #{e : l_e <= 0.001} (moewatch's threshold; includes the dead).
        - ``utilisation``: 1 - dead_experts / N, share of experts with nonzero load.

    All-zero counts (no assignment at all): the load share is undefined, so ``load_entropy``,
    ``load_entropy_nats``, ``maxvio``, ``max_over_mean``, ``cv`` and ``gini`` are NaN (no warning
    is emitted), every expert is dead and cold, and ``utilisation`` is 0.0.

    >>> m = balance_metrics([3, 1, 0, 0])
    >>> m["max_over_mean"], m["maxvio"], m["gini"], m["dead_experts"]
    (3.0, 2.0, 0.625, 2)
    >>> balance_metrics([5, 5, 5, 5])["gini"], balance_metrics([5, 5, 5, 5])["load_entropy"]
    (0.0, 1.0)
    """
    c = _check_counts(counts)
    n = int(c.size)
    total = c.sum()
    dead = int((c == 0).sum())
    out: dict[str, float | int] = {}
    if total == 0:
        nan = float("nan")
        out.update(load_entropy=nan, load_entropy_nats=nan, maxvio=nan, max_over_mean=nan, cv=nan, gini=nan)
        out.update(dead_experts=n, cold_experts=n, utilisation=0.0)
        return out
    balanced = bool((c == c[0]).all())
    share = c / float(total)
    if balanced:  # exact values where float round-off would give 0.9999... or 1e-17
        h = math.log(n)
        out["load_entropy"] = 1.0
        out["load_entropy_nats"] = h
    else:
        h = _entropy_nats(share)
        out["load_entropy"] = h / math.log(n) if n > 1 else 1.0
        out["load_entropy_nats"] = h
    mean = float(total) / n
    mom = float(c.max()) / mean
    out["maxvio"] = max_violation(c)
    out["max_over_mean"] = 1.0 if balanced else mom
    out["cv"] = 0.0 if balanced else float(np.sqrt(((c - mean) ** 2).mean()) / mean)
    # G = sum_i (2i - N - 1) c_(i) / (N sum c), identical to the formula above (expand the cumsum).
    srt = np.sort(c)
    w = 2 * np.arange(1, n + 1, dtype=np.int64) - n - 1
    if balanced:
        out["gini"] = 0.0
    elif np.issubdtype(c.dtype, np.integer):
        out["gini"] = int((w * srt).sum()) / (n * int(total))
    else:
        out["gini"] = float((w * srt).sum() / (n * float(total)))
    out["dead_experts"] = dead
    out["cold_experts"] = int((share <= COLD_SHARE).sum())
    out["utilisation"] = 1.0 - dead / n
    return out


# ---------------------------------------------------------------------------------------------
# Per-token statistics: validation of one chunk
# ---------------------------------------------------------------------------------------------


def _work_dtype(a: np.ndarray) -> type:
    """float64 inputs stay float64; everything else is computed in float32 (sums go to float64)."""
    return np.float64 if a.dtype == np.float64 else np.float32


def _flatten(a: np.ndarray, name: str) -> np.ndarray:
    if a.ndim == 3:
        return a.reshape(-1, a.shape[-1])
    if a.ndim != 2:
        raise InvalidScores(f"{name} must be (T, N) or (B, T, N), got {a.ndim}-D shape {tuple(a.shape)}")
    return a


def _check_mask(mask, num_experts: int | None) -> np.ndarray:
    m = _flatten(_as_numpy(mask, "mask"), "mask")
    if m.dtype != bool:
        if not (np.issubdtype(m.dtype, np.integer) or np.issubdtype(m.dtype, np.floating)):
            raise InvalidScores(f"mask must be bool (or 0/1 numbers), got dtype {m.dtype}")
        if not np.isin(m, (0, 1)).all():
            raise InvalidScores("mask must hold only 0/1 (or True/False); got other values")
        m = m.astype(bool)
    if m.shape[1] == 0:
        raise InvalidScores("mask has N = 0 experts; need N >= 1")
    if num_experts is not None and m.shape[1] != num_experts:
        raise ShapeMismatch(f"mask has N = {m.shape[1]} experts but this accumulator was made for {num_experts}")
    return m


def _check_float(x, name: str, shape: tuple[int, ...]) -> np.ndarray:
    a = _flatten(_as_numpy(x, name), name)
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64) if np.issubdtype(a.dtype, np.number) else a
    if not np.issubdtype(a.dtype, np.floating):
        raise InvalidScores(f"{name} must be a float array, got dtype {a.dtype}")
    if a.shape != shape:
        raise ShapeMismatch(f"{name} has shape {tuple(a.shape)} (flattened) but mask has {shape}; pass them aligned")
    if a.size and not np.isfinite(a.sum()) and not np.isfinite(a).all():  # the sum is a fast path
        n_nan = int(np.isnan(a).sum())
        raise InvalidScores(
            f"{name} has {n_nan} NaN and {int((~np.isfinite(a)).sum()) - n_nan} Inf entries; "
            "drop padding rows instead of filling them with -inf/NaN"
        )
    return a


def _row_sums(a: np.ndarray) -> np.ndarray:
    """(T,) sum of each row, in a's dtype (torch's row reduction: numpy's is several times slower)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(a)).sum(dim=1).numpy()


def mask_counts(mask: np.ndarray, *, per_token: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    """((T,) experts per token, (N,) tokens per expert) of a (T, N) bool numpy mask, int64, exact (the first
    None with ``per_token=False``).

    Reduced over the uint8 view with int32 accumulators (numpy's bool ``sum`` is slower; exact for T < 2**31).
    """
    u8 = np.ascontiguousarray(mask).view(np.uint8)
    rows = np.add.reduce(u8, axis=1, dtype=np.int32).astype(np.int64) if per_token else None
    return rows, np.add.reduce(u8, axis=0, dtype=np.int32).astype(np.int64)


def _normalised_rows(probs: np.ndarray) -> np.ndarray:
    if probs.size and probs.min() < 0:
        raise InvalidScores("probs must be >= 0 (routing probabilities); got a negative entry")
    rows = _row_sums(probs)[:, None]
    if probs.shape[0] and (rows <= 0).any():
        bad = int(np.argmax(rows[:, 0] <= 0))
        raise InvalidScores(f"probs row {bad} sums to 0; every token needs a positive routing distribution")
    return probs * (1.0 / rows)  # one division per row; within 1 ulp of probs / rows


def _row_entropy(q: np.ndarray) -> np.ndarray:
    """(T,) entropy in nats of each row of a row-stochastic (T, N) matrix (0 log 0 = 0).

    log is taken of max(q, tiny): a 0 entry then contributes 0 * log(tiny) = 0 exactly.
    """
    return -_row_sums(q * np.log(np.maximum(q, np.finfo(q.dtype).tiny)))


def _logsumexp_rows(z: np.ndarray) -> np.ndarray:
    import torch

    m = torch.from_numpy(np.ascontiguousarray(z)).amax(dim=1).numpy()
    return m + np.log(_row_sums(np.exp(z - m[:, None])))


def softmax_token_stats(logits, probs, p_max=None, scratch=None):
    """Per token, for rows of probs that are the softmax of the logits: ``(H(q_t) in nats, logsumexp_e z_{t,e},
    r_t = sum_e p_{t,e})``, each (T,) torch, in the dtype of the inputs.

    logits, probs: (T, N) torch float32 (or float64), ``probs = softmax(logits)`` row by row (as
    :func:`usmoe_lp.routing.probabilities` computes it), finite; p_max: optionally (T,) the largest
    probability of each row, when the caller has it (the last column of the sorted rows); scratch: optionally
    a (T, N) tensor of the logits' dtype to work in (the caller's reused memory).

    One exp per entry (the softmax's) serves the three, with no log per entry: the softmax computes
    p_e = exp(x_e) / S with x = z - max_e z, so its largest entry is p_max = 1 / S and log p_e = x_e + log p_max.
    Hence logsumexp = max_e z - log p_max and, for q = p / r (:class:`LoadStats`' row-normalised
    probabilities), H(q) = -sum q log q = log(r / p_max) - (sum_e p_e x_e) / r. Equal to the direct formulas
    up to float32 round-off (relative error ~1e-6 per token, measured against float64 in
    ``tests/test_diag_load.py``); an entry whose probability underflows to 0 adds 0, as 0 log 0 = 0.
    """
    import torch

    z, p = logits, probs
    m = z.amax(dim=1, keepdim=True)
    x = z - m if scratch is None else torch.sub(z, m, out=scratch)
    dot = x.mul_(p).sum(dim=1)  # sum_e p_e x_e, in place (vecdot makes a temporary of the same size)
    r = p.sum(dim=1)
    pm = p.amax(dim=1) if p_max is None else torch.as_tensor(p_max)
    entropy = torch.log(r / pm) - dot / r
    return entropy, m[:, 0] - torch.log(pm), r


# ---------------------------------------------------------------------------------------------
# Result and accumulator
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LoadStats:
    """Load-balance statistics of one routing (one layer, or several layers pooled).

    Counts are token-expert assignments (a top-k router gives k per token). Units:

    - ``num_tokens``, ``num_experts``: T (tokens analysed, all layers together when pooled) and N.
    - ``top_k``: the router's k if known (None otherwise); informative only.
    - ``counts``: (N,) int64 array c_e; ``load_share``: (N,) float64 array l_e = c_e / sum c
      (shares, sum 1).
    - ``entropy``: normalised load entropy H(l)/log N in [0, 1]; ``entropy_nats``: H(l) in nats.
    - ``token_entropy``: mean over tokens of H(q_t) in nats, q_t = p_t / sum_e p_{t,e} (each row of
      probs normalised to sum 1, so sigmoid scores are handled too); ``token_entropy_normalised``:
      divided by log N. moewatch's "logits mode" entropy.
    - ``mean_prob_entropy``: H(mean_t q_t) / log N, the entropy of the mean routing distribution
      (Megatron ``routing_diagnostics``); ``mean_prob_entropy_nats``: the same in nats.
      The three entropies differ in general (moewatch reports the first two both as "entropy").
    - ``maxvio``, ``max_over_mean``, ``cv`` (population), ``gini``, ``dead_experts``,
      ``cold_experts``, ``utilisation``: as in :func:`balance_metrics`.
    - ``experts_per_token``: (N+1,) int64 array, entry j = number of tokens that got exactly j experts.
    - ``mean_experts_per_token``: pairs / T (k for Top-k; fractional for EC / global top-c).
    - ``zero_expert_rate``: share of tokens with no expert (dropped tokens).
    - ``aux_loss``: Switch/GShard L = N * sum_e f_e P_e, f_e = c_e / T (sums to k under top-k, as in
      transformers' ``load_balancing_loss_func``), P_e = mean_t p_{t,e} of the RAW probs (no row
      normalisation). 1.0 at balance for top-1 (k at balance for top-k). Unitless.
    - ``z_loss``: ST-MoE router z-loss (1/T) sum_t (logsumexp_e z_{t,e})^2, in squared logit units.
    - ``importance_cv2``: Var_e(Imp_e)/Mean_e(Imp_e)^2 with Imp_e = sum_t p_{t,e} (Shazeer et al.
      2017). POPULATION variance (Tutel's ``importance_loss`` uses torch's sample variance, which is
      N/(N-1) times this value).

    Probability- and logit-based fields are None when the accumulator did not see probs / logits
    for every token. With T = 0 the ratio fields are NaN (None in :meth:`to_dict`).
    """

    num_tokens: int
    num_experts: int
    top_k: int | None
    counts: np.ndarray
    load_share: np.ndarray
    entropy: float
    entropy_nats: float
    token_entropy: float | None
    token_entropy_normalised: float | None
    mean_prob_entropy: float | None
    mean_prob_entropy_nats: float | None
    maxvio: float
    max_over_mean: float
    cv: float
    gini: float
    dead_experts: int
    cold_experts: int
    utilisation: float
    experts_per_token: np.ndarray
    mean_experts_per_token: float
    zero_expert_rate: float
    aux_loss: float | None
    z_loss: float | None
    importance_cv2: float | None

    def to_dict(self) -> dict:
        """JSON-serialisable plain Python (arrays become lists, NaN becomes None), keyed by field name."""
        return json_ready({f.name: getattr(self, f.name) for f in fields(self)})


class LoadPartial:
    """Mergeable accumulator of :class:`LoadStats` (streaming protocol of the analysis driver).

    State: ``counts`` (N,) int64 token-expert assignments, ``hist`` (N+1,) int64 experts-per-token
    histogram, ``num_tokens``, ``prob_sum`` (N,) float64 sum of raw probs, ``norm_prob_sum`` (N,)
    float64 sum of row-normalised probs, ``token_entropy_sum`` (nats), ``prob_tokens`` (tokens
    that came with probs), ``lse_sq_sum`` (sum of squared logsumexp), ``logit_tokens``.
    :meth:`update` forms the probability sums in float64; :meth:`update_softmax` (the streaming
    analysis) adds float32 sums of blocks of at most 8192 tokens, within 1e-6 relative of them.

    Mixing chunks with and without probs (or logits) is allowed; the probability-based (resp.
    logit-based) fields of the result are then None, since they would cover only part of the tokens.

    Merging the partials of DIFFERENT layers gives the POOLED statistics over all layers' tokens
    (T = sum of the layers' token counts). For the aux loss this is exactly what transformers'
    ``load_balancing_loss_func`` computes (it pools every layer's tokens into one set); the OLMoE
    scripts instead average the per-layer losses (``aux_loss(..., pooled=False)``).

    >>> import numpy as np
    >>> a = LoadPartial.empty(4, top_k=1)
    >>> a.update(np.eye(4, dtype=bool)[[0, 0, 1]])
    >>> b = LoadPartial.empty(4, top_k=1)
    >>> b.update(np.eye(4, dtype=bool)[[2, 3]])
    >>> a.merge(b).result().counts
    array([2, 1, 1, 1])
    """

    def __init__(self, num_experts: int, top_k: int | None = None) -> None:
        self.num_experts = check_int(num_experts, "num_experts", low=1)
        self.top_k = None if top_k is None else check_int(top_k, "top_k", low=1, high=self.num_experts)
        n = self.num_experts
        self.counts = np.zeros(n, dtype=np.int64)
        self.hist = np.zeros(n + 1, dtype=np.int64)
        self.num_tokens = 0
        self.prob_sum = np.zeros(n, dtype=np.float64)
        self.norm_prob_sum = np.zeros(n, dtype=np.float64)
        self.token_entropy_sum = 0.0
        self.prob_tokens = 0
        self.lse_sq_sum = 0.0
        self.logit_tokens = 0

    @classmethod
    def empty(cls, num_experts: int, top_k: int | None = None) -> LoadPartial:
        """An accumulator with no token yet, for N = ``num_experts`` experts."""
        return cls(num_experts, top_k)

    def update(self, mask, probs=None, logits=None) -> None:
        """Consume one chunk of tokens (mutates self).

        Args:
            mask: (T, N) or (B, T, N) bool (or 0/1 numbers): the selection actually made. Tokens
                may have 0..N experts.
            probs: same shape, float >= 0, routing probabilities (rows with positive sum).
            logits: same shape, float, finite router logits (for the z-loss).
        """
        m = _check_mask(mask, self.num_experts)
        t = m.shape[0]
        p = None if probs is None else _check_float(probs, "probs", m.shape)
        z = None if logits is None else _check_float(logits, "logits", m.shape)
        if p is not None:
            q = _normalised_rows(p.astype(_work_dtype(p), copy=False))
        if t == 0:
            return
        per_token, counts = mask_counts(m)
        sums = {}
        if p is not None:
            sums.update(prob_sum=p.sum(axis=0, dtype=np.float64), norm_prob_sum=q.sum(axis=0, dtype=np.float64),
                        token_entropy_sum=float(_row_entropy(q).sum(dtype=np.float64)))
        if z is not None:
            lse = _logsumexp_rows(z.astype(_work_dtype(z), copy=False)).astype(np.float64)
            sums["lse_sq_sum"] = float((lse * lse).sum())
        self.add(t, counts, np.bincount(per_token, minlength=self.num_experts + 1), **sums)

    def update_softmax(self, mask: np.ndarray, logits, probs, *, p_max=None, experts_each: int | None = None,
                       scratch=None) -> None:
        """Consume one chunk whose probabilities are the softmax of its logits (the streaming analysis,
        :class:`usmoe_lp.diagnostics.stream.LayerStream`); the same statistics as :meth:`update`.

        mask: (T, N) bool numpy; logits, probs: (T, N) torch float32, ``probs = softmax(logits)``; p_max:
        optionally (T,) the largest probability of each row; experts_each: optionally the number of experts
        every row of the mask holds (a top-k mask: k), which spares counting them; scratch: optionally a
        (T, N) float32 tensor to work in (see :func:`softmax_token_stats`). Trusted (finite, aligned:
        the log reader checked them), so nothing is validated. The entropies and the logsumexp come from
        :func:`softmax_token_stats`; the column sums of the probabilities (raw and row-normalised) are
        float32 sums over the chunk's tokens (torch's blocked reduction and a matrix-vector product) added
        to the float64 state: pass chunks of at most a few thousand tokens (the stream's blocks of 8192) and
        their relative error stays below 1e-6 (tested against float64 sums in ``tests/test_diag_load.py``).
        """
        t = mask.shape[0]
        if t == 0:
            return
        per_token, counts = mask_counts(mask, per_token=experts_each is None)
        if experts_each is None:
            hist = np.bincount(per_token, minlength=self.num_experts + 1)
        else:
            hist = np.zeros(self.num_experts + 1, dtype=np.int64)
            hist[experts_each] = t
        entropy, lse, r = softmax_token_stats(logits, probs, p_max, scratch)
        lse = lse.double()
        self.add(t, counts, hist,
                 prob_sum=probs.sum(dim=0).double().numpy(),
                 norm_prob_sum=(probs.T @ r.reciprocal()).double().numpy(),
                 token_entropy_sum=float(entropy.double().sum()), lse_sq_sum=float((lse * lse).sum()))

    def add(self, tokens: int, counts, experts_per_token, *, prob_sum=None, norm_prob_sum=None,
            token_entropy_sum: float | None = None, lse_sq_sum: float | None = None) -> None:
        """Add the sums of one chunk of ``tokens`` tokens (in place; the state is described in the class
        docstring): ``counts`` (N,) token-expert assignments per expert, ``experts_per_token`` (N+1,)
        histogram, and, when the chunk came with probabilities, ``prob_sum`` and ``norm_prob_sum`` (N,)
        float and ``token_entropy_sum`` (all three or none), when it came with logits ``lse_sq_sum``.
        :meth:`update` and :meth:`update_softmax` compute them and call this."""
        self.counts += counts
        self.hist += experts_per_token
        self.num_tokens += tokens
        if prob_sum is not None:
            self.prob_sum += prob_sum
            self.norm_prob_sum += norm_prob_sum
            self.token_entropy_sum += token_entropy_sum
            self.prob_tokens += tokens
        if lse_sq_sum is not None:
            self.lse_sq_sum += lse_sq_sum
            self.logit_tokens += tokens

    def merge(self, other: LoadPartial) -> LoadPartial:
        """A NEW accumulator holding the tokens of both (neither input changes).

        Raises InvalidParameter if the two were made for different N or different known top_k.
        """
        if not isinstance(other, LoadPartial):
            raise InvalidParameter(f"can only merge a LoadPartial with a LoadPartial, got {type(other).__name__}")
        if other.num_experts != self.num_experts:
            raise InvalidParameter(
                f"cannot merge load partials with different numbers of experts ({self.num_experts} vs "
                f"{other.num_experts}); analyse such layers separately"
            )
        if self.top_k is not None and other.top_k is not None and self.top_k != other.top_k:
            raise InvalidParameter(f"cannot merge load partials with different top_k ({self.top_k} vs {other.top_k})")
        out = LoadPartial(self.num_experts, self.top_k if self.top_k is not None else other.top_k)
        out.counts = self.counts + other.counts
        out.hist = self.hist + other.hist
        out.num_tokens = self.num_tokens + other.num_tokens
        out.prob_sum = self.prob_sum + other.prob_sum
        out.norm_prob_sum = self.norm_prob_sum + other.norm_prob_sum
        out.token_entropy_sum = self.token_entropy_sum + other.token_entropy_sum
        out.prob_tokens = self.prob_tokens + other.prob_tokens
        out.lse_sq_sum = self.lse_sq_sum + other.lse_sq_sum
        out.logit_tokens = self.logit_tokens + other.logit_tokens
        return out

    def result(self) -> LoadStats:
        """The :class:`LoadStats` of every token consumed so far."""
        n, t = self.num_experts, self.num_tokens
        bal = balance_metrics(self.counts)
        total = int(self.counts.sum())
        share = self.counts / total if total else np.full(n, np.nan)
        log_n = math.log(n)
        nan = float("nan")
        has_p = self.prob_tokens == t and t > 0
        token_h = token_hn = mp_h = mp_hn = aux = imp = None
        if has_p:
            token_h = self.token_entropy_sum / t
            token_hn = token_h / log_n if n > 1 else 1.0
            mp_hn = _entropy_nats(self.norm_prob_sum / self.norm_prob_sum.sum())  # nats
            mp_h = mp_hn / log_n if n > 1 else 1.0  # normalised
            aux = float(n * np.dot(self.counts / t, self.prob_sum / t))
            imp_mean = self.prob_sum.mean()
            imp = float(((self.prob_sum - imp_mean) ** 2).mean() / imp_mean**2) if imp_mean > 0 else nan
        z_loss = self.lse_sq_sum / t if (self.logit_tokens == t and t > 0) else None
        return LoadStats(
            num_tokens=t,
            num_experts=n,
            top_k=self.top_k,
            counts=self.counts.copy(),
            load_share=share,
            entropy=bal["load_entropy"],
            entropy_nats=bal["load_entropy_nats"],
            token_entropy=token_h,
            token_entropy_normalised=token_hn,
            mean_prob_entropy=mp_h,
            mean_prob_entropy_nats=mp_hn,
            maxvio=bal["maxvio"],
            max_over_mean=bal["max_over_mean"],
            cv=bal["cv"],
            gini=bal["gini"],
            dead_experts=bal["dead_experts"],
            cold_experts=bal["cold_experts"],
            utilisation=bal["utilisation"],
            experts_per_token=self.hist.copy(),
            mean_experts_per_token=total / t if t else nan,
            zero_expert_rate=int(self.hist[0]) / t if t else nan,
            aux_loss=aux,
            z_loss=z_loss,
            importance_cv2=imp,
        )


def load_stats(mask, probs=None, *, logits=None, top_k: int | None = None) -> LoadStats:
    """Load-balance statistics of one routing (definitions and sources: :class:`LoadStats`).

    Args:
        mask: (T, N) or (B, T, N) bool (or 0/1 numbers), the selection actually made (top-k or any
            router; tokens may have 0..N experts). (B, T, N) is flattened to (B*T, N).
        probs: optional, same shape, float >= 0: routing probabilities p_{t,e}. Each row is
            normalised to sum 1 for the entropies; the aux loss and importance use the raw values.
        logits: optional, same shape, float: router logits for the z-loss.
        top_k: optional int, the router's k (recorded in the result only).

    Returns :class:`LoadStats` (see its docstring for every definition and unit). Equivalent to
    ``LoadPartial.empty(N, top_k)`` + one ``update`` + ``result()``.

    >>> import numpy as np
    >>> mask = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 0]], dtype=bool)
    >>> s = load_stats(mask)
    >>> s.counts, s.maxvio, s.dead_experts, s.experts_per_token, round(s.zero_expert_rate, 3)
    (array([3, 1, 1, 0]), 1.4, 1, array([0, 1, 2, 0, 0]), 0.0)
    """
    m = _check_mask(mask, None)
    acc = LoadPartial.empty(m.shape[1], top_k)
    acc.update(m, probs, logits)
    return acc.result()


# ---------------------------------------------------------------------------------------------
# Losses on transformers' per-layer router logits
# ---------------------------------------------------------------------------------------------


def _layers(router_logits) -> list[np.ndarray]:
    if isinstance(router_logits, (tuple, list)):
        layers = list(router_logits)
    else:
        layers = [router_logits]
    if not layers:
        raise InvalidScores("router_logits is an empty tuple; pass one (B*T, N) tensor per MoE layer")
    out = []
    for i, layer in enumerate(layers):
        a = _flatten(_as_numpy(layer, f"router_logits[{i}]"), f"router_logits[{i}]")
        if not np.issubdtype(a.dtype, np.floating):
            raise InvalidScores(f"router_logits[{i}] must be float, got dtype {a.dtype}")
        if a.size == 0:
            raise InvalidScores(f"router_logits[{i}] is empty (shape {tuple(a.shape)})")
        if not np.isfinite(a).all():
            raise InvalidScores(f"router_logits[{i}] has NaN or Inf entries; router logits must be finite")
        if out and a.shape[1] != out[0].shape[1]:
            raise ShapeMismatch(f"router_logits[{i}] has N = {a.shape[1]} experts, layer 0 has {out[0].shape[1]}")
        out.append(a)
    return out


def _softmax_rows(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _topk_mask(p: np.ndarray, k: int) -> np.ndarray:
    """(T, N) bool: the k largest entries of each row; ties go to the lowest expert index."""
    idx = np.argsort(-p, axis=1, kind="stable")[:, :k]
    m = np.zeros(p.shape, dtype=bool)
    np.put_along_axis(m, idx, True, axis=1)
    return m


def aux_loss(router_logits, k: int, padding_mask=None, pooled: bool = True, *, attention_mask=None) -> float:
    """Switch/GShard load-balancing loss on transformers' router logits (Fedus et al. 2022, eqs. 4-6).

    Args:
        router_logits: the per-layer tuple exactly as transformers returns it with
            ``output_router_logits=True``: each layer (B*T, N) float (a (B, T, N) layer is
            flattened); a single tensor is taken as one layer (transformers would return 0).
        k: experts per token (top-k of the softmax, ties to the lowest expert index), 1 <= k <= N.
        padding_mask: optional (B, T) bool, True = padding (the package's one convention; from
            transformers' ``attention_mask`` pass ``attention_mask == 0``); padding rows are left
            out of both f and P (identical to transformers' masked formula). ``attention_mask``
            itself is refused with that conversion.
        pooled: True (default): all layers' tokens pooled into one set, L = N sum_e f_e P_e with
            f_e = c_e / T and P_e = mean_t p_{t,e} over the pooled tokens, exactly transformers'
            ``load_balancing_loss_func`` (Mixtral, Qwen-MoE, OLMoE in transformers...). False: the
            mean over layers of each layer's loss, as the OLMoE training scripts compute it.

    Returns the loss as a float (unitless; 1 at perfect balance for k = 1, k for top-k).

    >>> import numpy as np
    >>> aux_loss((np.zeros((4, 4)),), k=1)   # uniform probs: P_e = 1/4, f_e = (1, 0, 0, 0)
    1.0
    """
    layers = _layers(router_logits)
    n = layers[0].shape[1]
    k = check_int(k, "k", low=1, high=n)
    if attention_mask is not None:
        raise InvalidParameter(f"aux_loss takes padding_mask=, not attention_mask=; {PADDING_CONVENTION}")
    keep = None
    if padding_mask is not None:
        keep = ~check_padding_mask(padding_mask).detach().cpu().numpy().reshape(-1)
        if not keep.any():
            raise InvalidParameter("padding_mask marks every token as padding; the loss is undefined")
    partials = []
    for i, z in enumerate(layers):
        if keep is not None:
            if keep.shape[0] != z.shape[0]:
                raise ShapeMismatch(
                    f"padding_mask has {keep.shape[0]} entries (B*T) but router_logits[{i}] has {z.shape[0]} rows"
                )
            z = z[keep]
        p = _softmax_rows(z.astype(_work_dtype(z), copy=False))
        acc = LoadPartial.empty(n, k)
        acc.update(_topk_mask(p, k), p)
        partials.append(acc)
    if pooled:
        acc = partials[0]
        for other in partials[1:]:
            acc = acc.merge(other)
        return float(acc.result().aux_loss)
    return float(np.mean([a.result().aux_loss for a in partials]))


def router_z_loss(router_logits) -> float:
    """ST-MoE router z-loss (1/T) sum_t (logsumexp_e z_{t,e})^2 (Zoph et al. 2022, arXiv 2202.08906).

    Args:
        router_logits: per-layer tuple of (B*T, N) or (B, T, N) float tensors, or one tensor.

    Layers are pooled like transformers' Switch Transformers, which concatenates every layer's
    logits along the sequence axis before ``router_z_loss_func``: T counts the tokens of all
    layers. No attention mask (Switch applies none). Units: squared logits.

    >>> import numpy as np
    >>> round(router_z_loss(np.zeros((3, 4))), 6)   # (log 4)^2
    1.921812
    """
    acc = None
    for z in _layers(router_logits):
        part = LoadPartial.empty(z.shape[1])
        part.update(np.zeros(z.shape, dtype=bool), logits=z)
        acc = part if acc is None else acc.merge(part)
    return float(acc.result().z_loss)
