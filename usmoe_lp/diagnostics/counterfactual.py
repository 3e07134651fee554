"""Counterfactual re-routing: what TC, EC, USMoE or capacity-limited TC do with the same captured logits.

No MoE analysis tool we know of replays captured logits offline under other routers (USMoE changes
the model's forward pass, moe-routing-bench retrains toy models). One set of router logits Z
(T tokens x N experts per sequence) is re-routed under each :class:`RouterConfig`; per config the
module reports the objective in a common currency, how much of the score mass it covers, dropped
tokens, load balance, agreement with the model's own selection and optimality certificates of the
selection against the router's own program (papers/routing-as-lp.md §1).

Scores (the choice made here; comparisons need one fixed S, papers/routing-as-lp.md §6):

* TC, EC and capacity-TC route on the router **probabilities** P: ``softmax(Z)`` over experts
  (``score_function="softmax"``), or, for sigmoid routers (DeepSeek-V3 style),
  ``sigmoid(Z) / sum_e sigmoid(Z)`` — the sigmoid normalised per token, computed stably as
  ``softmax(logsigmoid(Z))``, so that every token's probabilities sum to 1 and the coverage below
  stays a share. TC's selection is the same on Z, P or sigmoid(Z) (monotone within a row); EC's
  depends on the per-token normalisation.
* USMoE routes on its unified score ``U = alpha * 2 sigmoid(Z) / N + (1 - alpha) softmax(Z)``
  (``usmoe_lp.routing.unified_score``) with the global top-c per scope (papers/routing-as-lp.md §1).

Common currency: ``objective`` is sum of P over the selected pairs for every router, so USMoE's
objective is measured in probabilities too; ``own_objective`` is the sum of the router's own
scores (U for USMoE; equal to ``objective`` for the others). ``coverage = objective / sum of P
over real tokens`` (a share in [0, 1]; for TC the mean top-k probability mass).

Matched budget (papers/routing-as-lp.md §1; the relaxation argument and EC's rounding in §4.3-4.4):
TC selects T*k pairs per sequence; EC selects N*e with e = ceil(capacity_factor * T * k / N); USMoE
c = round_half_up(kbar * tokens in the group), = T*k at kbar = k. ``budget_mismatch`` = selected
pairs - k * real tokens (for EC exactly N*e - T*k summed over sequences; negative for capacity-TC =
dropped assignments).

Certificates:

* closed form on **every** group: the selection is certified against the router's own program
  on its own scores with ``usmoe_lp.lp.certify`` (exact, O(T*N)): TC against
  ``RoutingProblem.token_choice``, EC against ``RoutingProblem.expert_choice`` with the router's
  capacity, USMoE against ``RoutingProblem.budget(..., sense="==")`` with one group per sequence,
  one per update (``batch``) or one per position (``position``). All groups of an update are
  certified in one grouped program where the program allows it (TC, USMoE); only if that is not
  optimal are groups certified one by one to count them and find the largest gap.
* capacity-TC is a greedy heuristic, not the optimum of a program: it is certified with an LP
  solve (HiGHS duals) against the capped program ``experts per token <= k, tokens per expert
  <= C`` on the LP-sampled groups only; its gap can be > 0 (a finding, not an error).
* LP cross-check: the first ``lp_sample`` groups of each config seen by a partial (groups with
  more than ``lp_max_pairs`` token-expert pairs are skipped and counted) are solved with
  ``usmoe_lp.lp.solve(problem, backend="highs")``; ``max_lp_gap = max |LP optimum - router
  objective|`` on the router's own scores.

Groups: a sequence for TC, EC, capacity-TC and USMoE ``sequence``; the whole update for USMoE
``batch``; one position across the update's sequences for USMoE ``position``. ``batch`` and
``position`` couple the sequences of one ``update`` call, so their results depend on how the
stream is batched (as they would in the model); the others are independent of batching.

Padding: rows marked in ``padding_mask`` (True = padding) are set to logit 0 before scoring (so
garbage such as NaN there is ignored), are never selected and count nowhere.

Precision: logits of any dtype (bfloat16, float16, float32: all exact in float64) are scored in
float64. torch's float32 elementwise functions (sigmoid, exp) can differ by an ulp with the
position of an element in the tensor (vectorised body vs scalar tail), so float32 scores of one
token would depend on how the stream was chunked; in float64 such differences are ~1e-16 and
sums agree to ~1e-15 relative. Routing in float64 costs no more time than in float32 here.

Streaming: :class:`CounterfactualPartial` follows the usmoe-lp protocol (``empty``, ``update``,
``merge``, ``result``). Counts and sums merge exactly; the LP sample is per partial, so a merge
adds the partials' samples (``lp_checked`` and capacity-TC's certified counts may exceed the
sample size of a single partial).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from usmoe_lp._validate import check_int
from usmoe_lp.diagnostics.load import BALANCE_KEYS, balance_metrics
from usmoe_lp.errors import AllPaddingWarning, InvalidParameter, InvalidScores, ShapeMismatch
from usmoe_lp.lp import RoutingProblem, certify, certify_with_duals, solve
from usmoe_lp.routing import (
    Routing,
    capacity_token_choice,
    expert_choice,
    global_topc,
    token_choice,
    unified_score,
)

ROUTERS = ("tc", "ec", "usmoe", "capacity_tc")
SCOPES = ("sequence", "batch", "position")
POLICIES = ("position", "priority")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
_SCOPE_SHORT = {"sequence": "seq", "batch": "batch", "position": "pos"}
DEFAULT_LP_SAMPLE = 1
DEFAULT_LP_MAX_PAIRS = 2**18


# ----------------------------------------------------------------------------- configuration
def _finite(value, name: str) -> float:
    if isinstance(value, bool):
        raise InvalidParameter(f"{name} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InvalidParameter(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise InvalidParameter(f"{name} must be finite, got {value!r}")
    return out


@dataclass(frozen=True)
class RouterConfig:
    """One counterfactual router (module docstring for the programs and scores).

    Attributes:
        router: ``tc`` (Token Choice), ``ec`` (Expert Choice), ``usmoe`` (global top-c on the
            unified score) or ``capacity_tc`` (Token Choice with per-expert capacity, dropping).
        k: the model's experts per token (int >= 1): TC's k, the budget unit of EC and
            capacity-TC (capacity ceil(cf * T * k / N)), and the reference of ``budget_mismatch``.
        kbar: usmoe only, experts per token on average (float > 0, may be fractional); the budget
            per group is c = round_half_up(kbar * real tokens in the group). Default k (matched).
        alpha: usmoe only, weight of the scaled sigmoid in the unified score, in [0, 1]; 0 is the
            softmax, 1 the scaled sigmoid. Default 0.5 (the reference code's ``rate``).
        scope: usmoe only, the group of the global top-c: ``sequence``, ``batch`` or
            ``position`` (papers/routing-as-lp.md §1); ``sequence`` for every other router.
        capacity_factor: ec (default 1.0) and capacity_tc (default 1.25, the Switch default).
        policy: capacity_tc only, the order in which assignments are served: ``position`` or
            ``priority`` (``usmoe_lp.routing.capacity_token_choice``).

    Raises:
        InvalidParameter: unknown router / scope / policy, k < 1, alpha outside [0, 1],
            kbar <= 0, capacity_factor <= 0, or a parameter given to a router that ignores it.

    >>> RouterConfig("usmoe", k=2, kbar=1.5, alpha=0.5).label
    'usmoe a=0.5 kbar=1.5 seq'
    >>> RouterConfig("ec", k=2).label, RouterConfig("capacity_tc", k=2).label
    ('ec cf=1', 'captc cf=1.25')
    """

    router: str
    k: int
    kbar: float | None = None
    alpha: float | None = None
    scope: str = "sequence"
    capacity_factor: float | None = None
    policy: str = "position"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.router not in ROUTERS:
            raise InvalidParameter(f"unknown router {self.router!r}; choose one of {', '.join(ROUTERS)}")
        set_(self, "k", check_int(self.k, "k", low=1))
        r = self.router
        if r != "usmoe":
            for name in ("kbar", "alpha"):
                if getattr(self, name) is not None:
                    raise InvalidParameter(f"{name} applies to router 'usmoe' only, not {r!r}")
            if self.scope != "sequence":
                raise InvalidParameter(f"scope applies to router 'usmoe' only; {r!r} routes each sequence")
        if r not in ("ec", "capacity_tc") and self.capacity_factor is not None:
            raise InvalidParameter(f"capacity_factor applies to 'ec' and 'capacity_tc' only, not {r!r}")
        if r != "capacity_tc" and self.policy != "position":
            raise InvalidParameter(f"policy applies to router 'capacity_tc' only, not {r!r}")
        if r == "usmoe":
            kbar = float(self.k) if self.kbar is None else _finite(self.kbar, "kbar")
            if kbar <= 0:
                raise InvalidParameter(f"kbar must be > 0 (experts per token on average), got {self.kbar!r}")
            alpha = 0.5 if self.alpha is None else _finite(self.alpha, "alpha")
            if not 0.0 <= alpha <= 1.0:
                raise InvalidParameter(f"alpha must lie in [0, 1], got {self.alpha!r}")
            if self.scope not in SCOPES:
                raise InvalidParameter(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
            set_(self, "kbar", kbar)
            set_(self, "alpha", alpha)
        if r in ("ec", "capacity_tc"):
            default = 1.0 if r == "ec" else 1.25
            cf = default if self.capacity_factor is None else _finite(self.capacity_factor, "capacity_factor")
            if cf <= 0:
                raise InvalidParameter(f"capacity_factor must be > 0, got {self.capacity_factor!r}")
            set_(self, "capacity_factor", cf)
        if r == "capacity_tc" and self.policy not in POLICIES:
            raise InvalidParameter(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")

    @property
    def label(self) -> str:
        """Short stable name: ``tc k=2``, ``ec cf=1``, ``usmoe a=0.5 kbar=1.5 seq``, ``captc cf=1.25``."""
        if self.router == "tc":
            return f"tc k={self.k}"
        if self.router == "ec":
            return f"ec cf={self.capacity_factor:g}"
        if self.router == "capacity_tc":
            return f"captc cf={self.capacity_factor:g}" + (" priority" if self.policy == "priority" else "")
        return f"usmoe a={self.alpha:g} kbar={self.kbar:g} {_SCOPE_SHORT[self.scope]}"

    def check_experts(self, num_experts: int) -> None:
        """Raise :class:`InvalidParameter` if the config cannot route N = ``num_experts`` experts."""
        if self.k > num_experts:
            raise InvalidParameter(f"{self.label}: k = {self.k} exceeds the number of experts N = {num_experts}")
        if self.router == "usmoe" and self.kbar > num_experts:
            raise InvalidParameter(
                f"{self.label}: kbar = {self.kbar:g} exceeds the number of experts N = {num_experts}")

    def to_dict(self) -> dict:
        """JSON-ready parameters (``None`` for those the router ignores)."""
        return {"router": self.router, "label": self.label, "k": self.k, "kbar": self.kbar,
                "alpha": self.alpha, "scope": self.scope, "capacity_factor": self.capacity_factor,
                "policy": self.policy if self.router == "capacity_tc" else None}


def _default_kbars(k: int) -> tuple[float, ...]:
    vals = {k / 2, float(k), 1.5 * k}
    if k % 2 == 0:  # k/2 and 3k/2 are integers: add k -/+ 1/2 so fractional k-bars are always swept
        vals.update({k - 0.5, k + 0.5})
    return tuple(sorted(vals))


def default_configs(k: int, *, alphas=(0.3, 0.5, 0.7), kbars=None, scopes=("sequence",),
                    capacity_factor: float = 1.0, num_experts: int | None = None) -> tuple[RouterConfig, ...]:
    """The standard counterfactual grid for a model with top-``k`` routing.

    Returns, in order: TC at k; EC at ``capacity_factor`` (matched budget e = ceil(cf*T*k/N));
    capacity-TC at cf = 1.25 (the Switch Transformer default); USMoE over scopes x kbars x alphas.
    ``kbars`` defaults to (k/2, k, 3k/2), plus k + 1/2 when k is even, so the grid always has the
    matched budget k and a fractional k-bar (k = 1: 0.5, 1, 1.5; k = 2: 1, 2, 2.5, 3). With
    ``num_experts`` given, k-bars above N are left out.

    >>> [c.label for c in default_configs(1, alphas=(0.5,))]
    ['tc k=1', 'ec cf=1', 'captc cf=1.25', 'usmoe a=0.5 kbar=0.5 seq',
     'usmoe a=0.5 kbar=1 seq', 'usmoe a=0.5 kbar=1.5 seq']
    """
    k = check_int(k, "k", low=1)
    kb = _default_kbars(k) if kbars is None else tuple(_finite(x, "kbar") for x in kbars)
    if num_experts is not None:
        n = check_int(num_experts, "num_experts", low=1)
        kb = tuple(x for x in kb if x <= n)
    out = [RouterConfig("tc", k), RouterConfig("ec", k, capacity_factor=capacity_factor),
           RouterConfig("capacity_tc", k, capacity_factor=1.25)]
    out += [RouterConfig("usmoe", k, kbar=b, alpha=a, scope=s) for s in scopes for b in kb for a in alphas]
    if num_experts is not None:
        for c in out:
            c.check_experts(n)
    return tuple(out)


# ----------------------------------------------------------------------------- scores and routing
def _prepare_logits(logits, padding_mask):
    """Validate; return (z (B, T, N) float64 with padding rows zeroed, valid (B, T) bool, squeeze)."""
    if isinstance(logits, torch.Tensor):
        z = logits.detach()
    else:
        try:
            z = torch.as_tensor(np.asarray(logits))
        except (TypeError, ValueError) as exc:
            raise InvalidScores(f"logits could not be converted to an array: {exc}") from None
    if z.ndim not in (2, 3):
        raise InvalidScores(f"logits must be (T, N) or (B, T, N), got shape {tuple(z.shape)}")
    if z.numel() == 0:
        raise InvalidScores(f"logits are empty (shape {tuple(z.shape)}); need B, T, N >= 1")
    if z.dtype == torch.bool or not (torch.is_floating_point(z) or z.dtype in (
            torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise InvalidScores(f"logits must be real numbers, got dtype {z.dtype}")
    z = z.to(torch.float64)
    squeeze = z.ndim == 2
    z3 = z.unsqueeze(0) if squeeze else z
    B, T, _ = z3.shape
    if padding_mask is None:
        valid = torch.ones(B, T, dtype=torch.bool, device=z3.device)
    else:
        pm = torch.as_tensor(np.asarray(padding_mask) if not isinstance(padding_mask, torch.Tensor)
                             else padding_mask, device=z3.device)
        pm = pm.unsqueeze(0) if pm.ndim == 1 else pm
        if tuple(pm.shape) != (B, T):
            raise ShapeMismatch(f"padding_mask has shape {tuple(pm.shape)}; expected {tuple(z.shape[:-1])} "
                                "(True marks padding)")
        valid = ~pm.bool()
        if not bool(valid.all()):
            z3 = z3.masked_fill(~valid.unsqueeze(-1), 0.0)
    if not bool(torch.isfinite(z3).all()):
        bad = ~torch.isfinite(z3)
        first = tuple(int(v) for v in bad.nonzero()[0])
        first = first[1:] if squeeze else first
        raise InvalidScores(f"logits have {int(bad.sum())} NaN/Inf entries in real tokens (first at {first}); "
                            "mark padding with padding_mask or drop the broken rows")
    return z3, valid, squeeze


def _check_score_function(score_function: str) -> None:
    if score_function not in SCORE_FUNCTIONS:
        raise InvalidParameter(f"score_function must be one of {', '.join(SCORE_FUNCTIONS)}, got {score_function!r}")


def _probabilities(z: torch.Tensor, score_function: str) -> torch.Tensor:
    """Router probabilities (module docstring): softmax, or sigmoid normalised per token."""
    if score_function == "softmax":
        return torch.softmax(z, dim=-1)
    return torch.softmax(torch.nn.functional.logsigmoid(z), dim=-1)


def config_scores(logits: torch.Tensor, config: RouterConfig, score_function: str = "softmax") -> torch.Tensor:
    """The scores ``config`` routes on, same shape and dtype as ``logits`` ((T, N) or (B, T, N) float):
    ``unified_score(logits, alpha)`` for USMoE, else the router probabilities (softmax, or the sigmoid
    normalised per token for ``score_function="sigmoid"``)."""
    if config.router == "usmoe":
        return unified_score(logits, config.alpha)
    return _probabilities(logits, score_function)


def _dispatch(config: RouterConfig, scores: torch.Tensor, pad) -> Routing:
    with warnings.catch_warnings():  # a padding-only sequence of a batch routes nothing: expected here
        warnings.simplefilter("ignore", AllPaddingWarning)
        return _route(config, scores, pad)


def _route(config: RouterConfig, scores: torch.Tensor, pad) -> Routing:
    if config.router == "tc":
        return token_choice(scores, config.k, padding_mask=pad)
    if config.router == "ec":
        return expert_choice(scores, capacity_factor=config.capacity_factor, k=config.k, padding_mask=pad)
    if config.router == "capacity_tc":
        return capacity_token_choice(scores, config.k, capacity_factor=config.capacity_factor,
                                     policy=config.policy, padding_mask=pad)
    return global_topc(scores, kbar=config.kbar, scope=config.scope, padding_mask=pad)


def reroute(logits, config: RouterConfig, *, padding_mask=None, score_function: str = "softmax") -> Routing:
    """Route captured router logits with a counterfactual router.

    Args:
        logits: (T, N) or (B, T, N) float (torch incl. bfloat16, or numpy): the model's router
            logits, before any top-k. Scores are computed in float64 whatever the dtype (module
            docstring, "Precision").
        config: the router (:class:`RouterConfig`).
        padding_mask: (T,) or (B, T) bool, True where the token is padding (never selected).
        score_function: how the model turns logits into probabilities: ``softmax`` or
            ``sigmoid`` (normalised per token). TC, EC and capacity-TC route on these
            probabilities; USMoE routes on ``unified_score(logits, config.alpha)`` whatever it is.

    Returns:
        The :class:`usmoe_lp.routing.Routing` of the router (same rank as ``logits``); its
        ``weights`` are the router's own scores of the selected pairs.

    Raises:
        InvalidScores: NaN/Inf in real tokens, wrong rank, empty. ShapeMismatch: padding_mask.
        InvalidParameter: k or kbar > N, unknown score_function.

    >>> import torch
    >>> z = torch.log(torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]]))
    >>> reroute(z, RouterConfig("ec", k=1)).mask.int().tolist()   # e = ceil(3 * 1 / 2) = 2
    [[1, 0], [1, 1], [0, 1]]
    >>> r = reroute(z, RouterConfig("usmoe", k=1, kbar=0.5, alpha=0.0))   # c = round(1.5) = 2
    >>> r.mask.int().tolist(), r.dropped_tokens
    ([[1, 0], [0, 0], [0, 1]], 1)
    """
    if not isinstance(config, RouterConfig):
        raise InvalidParameter(f"config must be a RouterConfig, got {type(config).__name__}")
    _check_score_function(score_function)
    z3, valid, squeeze = _prepare_logits(logits, padding_mask)
    config.check_experts(z3.shape[-1])
    z = z3[0] if squeeze else z3
    pad = None if padding_mask is None else ~(valid[0] if squeeze else valid)
    return _dispatch(config, config_scores(z, config, score_function), pad)


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True, eq=False)
class CounterfactualRecord:
    """What one counterfactual router did with the logits (all updates of a partial).

    Attributes:
        config: the router.
        tokens: real tokens routed (count). groups: groups routed (sequences; updates for USMoE
            ``batch``; positions for ``position``), each with >= 1 real token.
        pairs: selected token-expert pairs. realised_kbar: pairs / tokens (experts per token).
        objective: sum of router probabilities P over the selected pairs (float64; common
            currency). own_objective: sum of the router's own scores over its selection.
        probability_mass: sum of P over real tokens (= tokens up to rounding).
        coverage: objective / probability_mass, share of the score mass covered, in [0, 1].
        dropped_tokens: real tokens with zero experts (count); drop_rate = dropped / tokens.
        budget_mismatch: pairs - k * tokens (EC: N*e - T*k summed over sequences).
        agreement: mean over real tokens of the Jaccard similarity |A & M| / |A | M| between the
            router's expert set A and the model's M (1 when both are empty); None without a
            model mask. agreement_tokens: tokens it averages over.
        expert_counts: (N,) int64 tokens routed to each expert. experts_per_token: (N+1,) int64
            histogram of experts per real token (index = number of experts).
        balance: ``usmoe_lp.diagnostics.load.balance_metrics(expert_counts)``.
        certificate: ``closed_form`` (every group) or ``lp_sample`` (capacity-TC: sampled groups).
        certified_optimal / certified_total: groups whose selection is proven optimal for the
            program / groups certified. max_certificate_gap: largest certificate gap (dual bound
            - objective, own scores) over certified groups; None when none was certified.
        lp_checked: groups solved by the LP cross-check; lp_skipped: groups passed over for being
            larger than ``lp_max_pairs``; lp_failed: LP solves that did not reach optimality.
        max_lp_gap: max |LP optimum - router objective| on own scores over the checked groups
            (None when none). lp_relative_gap: sum (LP optimum - router objective) / sum LP
            optimum over the checked groups (0 for exact routers; capacity-TC's loss).
    """

    config: RouterConfig
    tokens: int
    groups: int
    pairs: int
    objective: float
    own_objective: float
    probability_mass: float
    dropped_tokens: int
    budget_mismatch: int
    agreement: float | None
    agreement_tokens: int
    expert_counts: np.ndarray
    experts_per_token: np.ndarray
    balance: dict
    certificate: str
    certified_optimal: int
    certified_total: int
    max_certificate_gap: float | None
    lp_checked: int
    lp_skipped: int
    lp_failed: int
    max_lp_gap: float | None
    lp_relative_gap: float | None

    @property
    def label(self) -> str:
        return self.config.label

    @property
    def realised_kbar(self) -> float:
        return self.pairs / self.tokens if self.tokens else float("nan")

    @property
    def coverage(self) -> float:
        return self.objective / self.probability_mass if self.probability_mass > 0 else float("nan")

    @property
    def drop_rate(self) -> float:
        return self.dropped_tokens / self.tokens if self.tokens else float("nan")

    def row(self) -> dict:
        """Flat scalar columns (one DataFrame row): config, totals, balance and certificates."""
        cfg = self.config.to_dict()
        out = {"router": cfg["router"], "label": cfg["label"], "k": cfg["k"], "kbar": cfg["kbar"],
               "alpha": cfg["alpha"], "scope": cfg["scope"], "capacity_factor": cfg["capacity_factor"],
               "policy": cfg["policy"], "tokens": self.tokens, "groups": self.groups, "pairs": self.pairs,
               "realised_kbar": self.realised_kbar, "objective": self.objective,
               "own_objective": self.own_objective, "probability_mass": self.probability_mass,
               "coverage": self.coverage, "dropped_tokens": self.dropped_tokens, "drop_rate": self.drop_rate,
               "budget_mismatch": self.budget_mismatch, "agreement": self.agreement,
               "agreement_tokens": self.agreement_tokens}
        out.update({key: self.balance.get(key) for key in BALANCE_KEYS})
        out.update({"certificate": self.certificate, "certified_optimal": self.certified_optimal,
                    "certified_total": self.certified_total, "max_certificate_gap": self.max_certificate_gap,
                    "lp_checked": self.lp_checked, "lp_skipped": self.lp_skipped, "lp_failed": self.lp_failed,
                    "max_lp_gap": self.max_lp_gap, "lp_relative_gap": self.lp_relative_gap})
        return out

    def to_dict(self) -> dict:
        """JSON-ready: :meth:`row` plus ``expert_counts`` and ``experts_per_token`` as lists."""
        out = {key: _plain(v) for key, v in self.row().items()}
        out["expert_counts"] = [int(v) for v in self.expert_counts]
        out["experts_per_token"] = [int(v) for v in self.experts_per_token]
        return out


def _plain(v):
    if isinstance(v, float | np.floating):
        v = float(v)
        return v if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


@dataclass(frozen=True, eq=False)
class CounterfactualStats:
    """Per-config results of :class:`CounterfactualPartial` (one :class:`CounterfactualRecord` each).

    Attributes:
        num_experts: N. records: one per config, in config order. tokens: real tokens seen.
        updates: update calls merged in. score_function: the probabilities' score function
            (None if nothing was seen). lp_sample, lp_max_pairs: the LP cross-check settings.
    """

    num_experts: int
    records: tuple[CounterfactualRecord, ...]
    tokens: int
    updates: int
    score_function: str | None
    lp_sample: int
    lp_max_pairs: int

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(r.label for r in self.records)

    def __getitem__(self, label: str) -> CounterfactualRecord:
        for r in self.records:
            if r.label == label:
                return r
        raise KeyError(f"no config labelled {label!r}; labels: {', '.join(self.labels)}")

    @property
    def expert_counts(self) -> dict[str, np.ndarray]:
        """label -> (N,) int64 tokens per expert (for load histograms)."""
        return {r.label: r.expert_counts.copy() for r in self.records}

    @property
    def experts_per_token(self) -> dict[str, np.ndarray]:
        """label -> (N+1,) int64 histogram of experts per real token."""
        return {r.label: r.experts_per_token.copy() for r in self.records}

    def to_frame(self):
        """Tidy pandas DataFrame, one row per config (columns of :meth:`CounterfactualRecord.row`)."""
        import pandas as pd

        return pd.DataFrame([r.row() for r in self.records])

    def to_dict(self) -> dict:
        """JSON-ready plain Python (NaN -> None)."""
        return {"num_experts": self.num_experts, "tokens": self.tokens, "updates": self.updates,
                "score_function": self.score_function, "lp_sample": self.lp_sample,
                "lp_max_pairs": self.lp_max_pairs, "configs": [r.to_dict() for r in self.records]}


# ----------------------------------------------------------------------------- accumulation
@dataclass(eq=False)
class _Acc:
    """Mutable per-config sums (internal)."""

    n: int
    groups: int = 0
    pairs: int = 0
    objective: float = 0.0
    own_objective: float = 0.0
    dropped: int = 0
    budget_mismatch: int = 0
    agree_sum: float = 0.0
    cert_optimal: int = 0
    cert_total: int = 0
    cert_max_gap: float = -math.inf
    lp_checked: int = 0
    lp_skipped: int = 0
    lp_failed: int = 0
    lp_max_gap: float = -math.inf
    lp_opt_sum: float = 0.0
    lp_router_sum: float = 0.0
    counts: np.ndarray = field(default=None)
    ept: np.ndarray = field(default=None)

    def __post_init__(self) -> None:
        if self.counts is None:
            self.counts = np.zeros(self.n, dtype=np.int64)
        if self.ept is None:
            self.ept = np.zeros(self.n + 1, dtype=np.int64)

    def merged(self, other: _Acc) -> _Acc:
        out = _Acc(self.n)
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "n":
                continue
            if f.name in ("cert_max_gap", "lp_max_gap"):
                setattr(out, f.name, max(a, b))
            else:
                setattr(out, f.name, a + b)
        return out

    def add_certificate(self, optimal: bool, gap: float) -> None:
        self.cert_total += 1
        self.cert_optimal += int(optimal)
        self.cert_max_gap = max(self.cert_max_gap, float(gap))


def _model_mask(model_mask, shape3, squeeze: bool, device) -> torch.Tensor:
    """The model's selection as (B, T, N) bool on ``device``; must have the logits' own shape."""
    if isinstance(model_mask, torch.Tensor):
        m = model_mask.detach()
    else:
        try:
            m = torch.as_tensor(np.asarray(model_mask))
        except (TypeError, ValueError) as exc:
            raise InvalidParameter(f"model_mask could not be converted to an array: {exc}") from None
    expected = shape3[1:] if squeeze else shape3
    if tuple(m.shape) != expected:
        raise ShapeMismatch(f"model_mask has shape {tuple(m.shape)}; expected the logits' shape {expected}")
    if m.dtype != torch.bool:
        if m.is_complex() or (torch.is_floating_point(m) and not bool(torch.isfinite(m).all())):
            raise InvalidParameter("model_mask must be bool or 0/1 (True where the model selected the expert)")
        if not bool(((m == 0) | (m == 1)).all()):
            raise InvalidParameter("model_mask must be bool or 0/1 (True where the model selected the expert)")
        m = m != 0
    m = m.unsqueeze(0) if squeeze else m
    return m.to(device)


def _grouped(own: np.ndarray, mask: np.ndarray, valid: np.ndarray, by: str):
    """Real rows in group order: (S (n, N), X (n, N), keys (G,), bounds (G+1,)).

    ``by``: ``sequence`` (groups are sequences b), ``position`` (positions t, rows of all
    sequences), ``batch`` (one group, key 0). Rows of a group are contiguous.
    """
    if by == "position":
        own, mask, valid = own.transpose(1, 0, 2), mask.transpose(1, 0, 2), valid.T
    outer, inner = np.nonzero(valid)
    S, X = own[outer, inner], mask[outer, inner]
    if by == "batch":
        return S, X, np.zeros(1, np.int64), np.array([0, outer.size])
    keys, starts = np.unique(outer, return_index=True)
    return S, X, keys, np.append(starts, outer.size)


def _group_problem(config: RouterConfig, S: np.ndarray, key: int, params: dict) -> RoutingProblem:
    """The router's own program on one group's rows S (T_g, N)."""
    if config.router == "tc":
        return RoutingProblem.token_choice(S, config.k)
    if config.router == "ec":
        return RoutingProblem.expert_choice(S, int(np.atleast_1d(params["capacity"])[key]))
    if config.router == "capacity_tc":
        cap = int(np.atleast_1d(params["capacity"])[key])
        return RoutingProblem(S, token_max=config.k, expert_max=cap)
    return RoutingProblem.budget(S, int(np.atleast_1d(params["budget"])[key]), sense="==")


def _combined_problem(config: RouterConfig, S, keys, bounds, params) -> RoutingProblem | None:
    """All groups of an update as one program (None where the program has no such form: EC)."""
    if config.router == "tc":
        return RoutingProblem.token_choice(S, config.k)
    if config.router != "usmoe":
        return None
    budgets = np.atleast_1d(params["budget"])[keys]
    if keys.size == 1:
        return RoutingProblem.budget(S, int(budgets[0]), sense="==")
    gid = np.repeat(np.arange(keys.size), np.diff(bounds))
    return RoutingProblem.budget(S, budgets, sense="==", groups=gid)


class CounterfactualPartial:
    """Streaming accumulator of counterfactual re-routing (module docstring; usmoe-lp protocol).

    >>> import torch
    >>> p = CounterfactualPartial.empty(4, default_configs(1, alphas=(0.5,)), lp_sample=0)
    >>> p.update(torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(0)))
    >>> s = p.result()
    >>> s["tc k=1"].pairs, s["usmoe a=0.5 kbar=1 seq"].pairs, s["ec cf=1"].budget_mismatch
    (32, 32, 0)
    >>> all(r.certified_optimal == r.certified_total for r in s.records if r.config.router != "capacity_tc")
    True
    """

    def __init__(self, num_experts: int, configs: tuple[RouterConfig, ...], lp_sample: int,
                 lp_max_pairs: int, lp_time_limit: float | None) -> None:
        self.num_experts = num_experts
        self.configs = configs
        self.lp_sample = lp_sample
        self.lp_max_pairs = lp_max_pairs
        self.lp_time_limit = lp_time_limit
        self.score_function: str | None = None
        self.tokens = 0
        self.updates = 0
        self.mass = 0.0
        self.agree_tokens = 0
        self.accs = [_Acc(num_experts) for _ in configs]

    @classmethod
    def empty(cls, num_experts: int, configs, *, lp_sample: int = DEFAULT_LP_SAMPLE,
              lp_max_pairs: int = DEFAULT_LP_MAX_PAIRS, lp_time_limit: float | None = 60.0) -> CounterfactualPartial:
        """A partial with nothing seen.

        Args:
            num_experts: N (int >= 1).
            configs: non-empty sequence of :class:`RouterConfig` with distinct labels
                (``default_configs(k)`` is the standard grid).
            lp_sample: groups per config solved by the LP cross-check (the first ones this
                partial sees; 0 disables it, and capacity-TC is then not certified). Each solve
                of a 2048 x 64 group takes ~1-3 s with HiGHS (the budget program is the slowest).
            lp_max_pairs: groups with more token-expert pairs are not sampled (``lp_skipped``).
            lp_time_limit: seconds per LP solve (None: no limit); a solve that stops early
                counts in ``lp_failed``.
        """
        n = check_int(num_experts, "num_experts", low=1)
        cfgs = tuple(configs) if not isinstance(configs, RouterConfig) else (configs,)
        if not cfgs:
            raise InvalidParameter("configs is empty; pass default_configs(k) or a list of RouterConfig")
        labels: dict[str, RouterConfig] = {}
        for c in cfgs:
            if not isinstance(c, RouterConfig):
                raise InvalidParameter(f"configs must be RouterConfig objects, got {type(c).__name__}")
            c.check_experts(n)
            if c.label in labels:
                raise InvalidParameter(
                    f"two configs share the label {c.label!r} ({labels[c.label]} and {c}); "
                    "pass each router once, with one model k per partial")
            labels[c.label] = c
        sample = check_int(lp_sample, "lp_sample", low=0)
        max_pairs = check_int(lp_max_pairs, "lp_max_pairs", low=1)
        if lp_time_limit is not None and not _finite(lp_time_limit, "lp_time_limit") > 0:
            raise InvalidParameter(f"lp_time_limit must be > 0 seconds or None, got {lp_time_limit!r}")
        return cls(n, cfgs, sample, max_pairs, lp_time_limit)

    # ------------------------------------------------------------------------- update
    def update(self, logits, *, padding_mask=None, model_mask=None, score_function: str = "softmax") -> None:
        """Re-route one chunk of logits under every config and accumulate.

        Args:
            logits: (T, N) or (B, T, N) float (torch incl. bfloat16, or numpy); N = num_experts.
                B sequences of T positions; the routers' groups are defined in the module docstring.
            padding_mask: (T,) or (B, T) bool, True where the token is padding.
            model_mask: same shape as ``logits``, bool (or 0/1): the model's own selection, for
                ``agreement``. Padding rows are ignored.
            score_function: ``softmax`` or ``sigmoid`` (normalised per token); must be the same
                for every update of a partial.

        Raises:
            InvalidScores, ShapeMismatch, InvalidParameter: bad logits, masks or parameters.
        """
        _check_score_function(score_function)
        if self.score_function is not None and score_function != self.score_function:
            raise InvalidParameter(f"score_function {score_function!r} differs from the {self.score_function!r} "
                                   "of earlier updates; use one partial per score function")
        z3, valid, squeeze = _prepare_logits(logits, padding_mask)
        B, T, N = z3.shape
        if N != self.num_experts:
            raise ShapeMismatch(f"logits have N = {N} experts; this partial was built for {self.num_experts}")
        mm = None if model_mask is None else _model_mask(model_mask, tuple(z3.shape), squeeze, z3.device)
        self.score_function = score_function
        probs = _probabilities(z3, score_function)
        has_pad = not bool(valid.all())
        pad = ~valid if has_pad else None
        # Bookkeeping in numpy on the CPU: single-threaded, and several times faster than torch's
        # small reductions when the cores are shared.
        valid_np = valid.cpu().numpy()
        probs_np = probs.cpu().numpy()
        n_tokens = int(valid_np.sum())
        self.tokens += n_tokens
        self.updates += 1
        self.mass += float(probs_np[valid_np].sum(dtype=np.float64))
        mm_np = None
        if mm is not None:
            mm_np = mm.cpu().numpy() & valid_np[..., None]
            self.agree_tokens += n_tokens
        own_np: dict[object, np.ndarray] = {"probs": probs_np}
        unified: dict[float, torch.Tensor] = {}
        for config, acc in zip(self.configs, self.accs, strict=True):
            if config.router == "usmoe":
                if config.alpha not in unified:
                    unified[config.alpha] = unified_score(z3, config.alpha)
                    own_np[config.alpha] = unified[config.alpha].cpu().numpy()
                scores, key = unified[config.alpha], config.alpha
            else:
                scores, key = probs, "probs"
            route = _dispatch(config, scores, pad)
            mask = route.mask.cpu().numpy()
            if has_pad:
                mask = mask & valid_np[..., None]
            ept_real = mask.sum(-1)[valid_np]
            pairs = int(ept_real.sum())
            acc.pairs += pairs
            acc.objective += float(probs_np[mask].sum(dtype=np.float64))
            acc.own_objective += float(own_np[key][mask].sum(dtype=np.float64))
            acc.dropped += int((ept_real == 0).sum())
            acc.budget_mismatch += pairs - config.k * n_tokens
            acc.counts += mask.sum((0, 1), dtype=np.int64)
            acc.ept += np.bincount(ept_real, minlength=N + 1).astype(np.int64)
            if mm_np is not None:
                inter = (mask & mm_np).sum(-1)[valid_np]
                union = (mask | mm_np).sum(-1)[valid_np]
                jac = np.divide(inter, union, out=np.ones(union.shape), where=union > 0)
                acc.agree_sum += float(jac.sum(dtype=np.float64))
            self._certify(config, acc, own_np[key], mask, valid_np, route.params)

    def _certify(self, config: RouterConfig, acc: _Acc, own: np.ndarray, mask: np.ndarray,
                 valid: np.ndarray, params: dict) -> None:
        by = config.scope if config.router == "usmoe" else "sequence"
        S, X, keys, bounds = _grouped(own, mask, valid, by)
        G = keys.size
        acc.groups += G
        if G == 0:
            return
        N = S.shape[1]
        rows = [slice(bounds[g], bounds[g + 1]) for g in range(G)]
        if config.router != "capacity_tc":
            combined = _combined_problem(config, S, keys, bounds, params)
            cert = None if combined is None else certify(combined, X, backend="closed_form")
            if cert is not None and cert.optimal:
                acc.cert_total += G
                acc.cert_optimal += G
                acc.cert_max_gap = max(acc.cert_max_gap, 0.0)
            else:
                for g in range(G):
                    c = certify(_group_problem(config, S[rows[g]], int(keys[g]), params), X[rows[g]],
                                backend="closed_form")
                    acc.add_certificate(c.optimal, c.gap)
        for g in range(G):
            if acc.lp_checked >= self.lp_sample:
                break
            if (bounds[g + 1] - bounds[g]) * N > self.lp_max_pairs:
                acc.lp_skipped += 1
                continue
            problem = _group_problem(config, S[rows[g]], int(keys[g]), params)
            sol = solve(problem, backend="highs", time_limit=self.lp_time_limit, certify_solution=False)
            acc.lp_checked += 1
            if sol.status != "optimal":
                acc.lp_failed += 1
                continue
            router_obj = problem.objective(X[rows[g]])
            acc.lp_max_gap = max(acc.lp_max_gap, abs(sol.objective - router_obj))
            acc.lp_opt_sum += sol.objective
            acc.lp_router_sum += router_obj
            if config.router == "capacity_tc":
                c = certify_with_duals(problem, X[rows[g]], sol.duals, x=sol.x, backend="highs")
                acc.add_certificate(c.optimal, c.gap)

    # ------------------------------------------------------------------------- merge / result
    def merge(self, other: CounterfactualPartial) -> CounterfactualPartial:
        """A NEW partial holding both inputs' sums (neither input is modified).

        Partials with different ``lp_sample`` merge (e.g. layers where the LP cross-check ran and
        layers where it did not): the checked counts add up and the merged ``lp_sample`` is the larger.

        Raises:
            InvalidParameter: different num_experts, configs, lp_max_pairs / lp_time_limit or score functions.
        """
        if not isinstance(other, CounterfactualPartial):
            raise InvalidParameter(f"can only merge a CounterfactualPartial, got {type(other).__name__}")
        for name in ("num_experts", "configs", "lp_max_pairs", "lp_time_limit"):
            if getattr(self, name) != getattr(other, name):
                raise InvalidParameter(f"cannot merge partials with different {name}: "
                                       f"{getattr(self, name)!r} vs {getattr(other, name)!r}")
        sf = {self.score_function, other.score_function} - {None}
        if len(sf) > 1:
            raise InvalidParameter(f"cannot merge partials with different score functions: {sorted(sf)}")
        out = CounterfactualPartial(self.num_experts, self.configs, max(self.lp_sample, other.lp_sample),
                                    self.lp_max_pairs, self.lp_time_limit)
        out.score_function = next(iter(sf)) if sf else None
        out.tokens = self.tokens + other.tokens
        out.updates = self.updates + other.updates
        out.mass = self.mass + other.mass
        out.agree_tokens = self.agree_tokens + other.agree_tokens
        out.accs = [a.merged(b) for a, b in zip(self.accs, other.accs, strict=True)]
        return out

    def result(self) -> CounterfactualStats:
        """The :class:`CounterfactualStats` of everything seen (balance via ``load.balance_metrics``)."""

        records = []
        for config, a in zip(self.configs, self.accs, strict=True):
            checked_ok = a.lp_checked - a.lp_failed
            records.append(CounterfactualRecord(
                config=config, tokens=self.tokens, groups=a.groups, pairs=a.pairs, objective=a.objective,
                own_objective=a.own_objective, probability_mass=self.mass, dropped_tokens=a.dropped,
                budget_mismatch=a.budget_mismatch,
                agreement=a.agree_sum / self.agree_tokens if self.agree_tokens else None,
                agreement_tokens=self.agree_tokens, expert_counts=a.counts.copy(), experts_per_token=a.ept.copy(),
                balance=balance_metrics(a.counts),
                certificate="lp_sample" if config.router == "capacity_tc" else "closed_form",
                certified_optimal=a.cert_optimal, certified_total=a.cert_total,
                max_certificate_gap=a.cert_max_gap if a.cert_total else None,
                lp_checked=a.lp_checked, lp_skipped=a.lp_skipped, lp_failed=a.lp_failed,
                max_lp_gap=a.lp_max_gap if checked_ok else None,
                lp_relative_gap=((a.lp_opt_sum - a.lp_router_sum) / a.lp_opt_sum
                                 if checked_ok and a.lp_opt_sum > 0 else None),
            ))
        return CounterfactualStats(num_experts=self.num_experts, records=tuple(records), tokens=self.tokens,
                                   updates=self.updates, score_function=self.score_function,
                                   lp_sample=self.lp_sample, lp_max_pairs=self.lp_max_pairs)


def counterfactual(logits, configs, *, padding_mask=None, model_mask=None, score_function: str = "softmax",
                   lp_sample: int = DEFAULT_LP_SAMPLE, lp_max_pairs: int = DEFAULT_LP_MAX_PAIRS) -> CounterfactualStats:
    """Non-streaming counterfactual re-routing of one (T, N) or (B, T, N) logit tensor.

    ``CounterfactualPartial.empty(N, configs, ...)``, one ``update``, ``result()``; see those.

    >>> import torch
    >>> z = torch.log(torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]]))
    >>> s = counterfactual(z, [RouterConfig("tc", k=1), RouterConfig("ec", k=1)], lp_sample=0)
    >>> [round(r.objective, 6) for r in s.records], [r.budget_mismatch for r in s.records]
    ([2.2, 2.6], [0, 1])
    """
    z = logits if isinstance(logits, torch.Tensor) else np.asarray(logits)
    if z.ndim < 2 or z.shape[-1] == 0:
        raise InvalidScores(f"logits must be (T, N) or (B, T, N), got shape {tuple(z.shape)}")
    p = CounterfactualPartial.empty(int(z.shape[-1]), configs, lp_sample=lp_sample, lp_max_pairs=lp_max_pairs)
    p.update(logits, padding_mask=padding_mask, model_mask=model_mask, score_function=score_function)
    return p.result()
