"""Counterfactual re-routing: what every registry router does with the same captured logits.

No MoE analysis tool we know of replays captured logits offline under other routers (USMoE changes
the model's forward pass, moe-routing-bench retrains toy models). One set of router logits Z
(T tokens x N experts per sequence) is re-routed under each :class:`~usmoe_lp.routers.RouterConfig`
(any router of :func:`usmoe_lp.routers.list_routers`, read from its registry entry: nothing here
switches on a router's name). Per config the module reports the objective in a common currency, how
much of the score mass it covers, dropped tokens, load balance, agreement with the model's own
selection and optimality certificates of the selection against the router's own program
(papers/routing-as-lp.md §1).

Scores (the choice made here; comparisons need one fixed S, papers/routing-as-lp.md §6):

* each router routes on its **own scores**, ``entry.scores(logits, params, ctx)``: the model's
  probabilities P for TC, EC and capacity-TC, the unified score for USMoE, ...;
* the **common currency** is the model's probabilities P =
  :func:`usmoe_lp.routing.probabilities` (logits, the layer's own score function): softmax, or
  for sigmoid routers (DeepSeek-V3 style) the sigmoid normalised per token, so that every token's
  probabilities sum to 1 and the coverage below is a share.

Common currency: ``objective`` is sum of P over the selected pairs for every router;
``own_objective`` is the sum of the router's own scores (U for USMoE; equal to ``objective`` for
the routers that route on P). ``coverage = objective / sum of P over real tokens`` (a share in
[0, 1]; for TC the mean top-k probability mass).

Matched budget (papers/routing-as-lp.md §1; the relaxation argument and EC's rounding in §4.3-4.4):
``budget_mismatch`` = selected pairs - k * real tokens (for EC exactly N*e - T*k summed over
sequences; negative for capacity-TC = dropped assignments).

Certificates, read from the entry (``exact``, ``problem``, ``group``):

* ``exact`` routers (the output is the optimum of ``entry.problem``) are certified on **every**
  group against their own program on their own scores: ``certificate = "closed_form"`` when the
  program is single-family (``usmoe_lp.lp.certify``, exact, O(T*N)); all groups of an update are
  certified as one program (their direct sum) where the programs allow it (no expert family: TC,
  USMoE), and only if that is not optimal are groups certified one by one to count them and find
  the largest gap. Programs with several binding families are certified per group with HiGHS
  duals made exact (``certificate = "lp_duals"``). A failed certificate of an exact router is a bug.
* heuristics (``exact=False``, e.g. capacity-TC) are certified with an LP solve (HiGHS duals)
  against their program on the LP-sampled groups only (``certificate = "lp_sample"``); their gap
  can be > 0 (a finding, not an error).
* routers without a program (``problem=None``) report ``certificate = None`` and None counts: no
  certificate is faked.
* LP cross-check: the first ``lp_sample`` groups of each config seen by a partial (groups with
  more than ``lp_max_pairs`` token-expert pairs are skipped and counted) are solved with
  ``usmoe_lp.lp.solve(problem, backend="highs")``; ``max_lp_gap = max |LP optimum - router
  objective|`` on the router's own scores.

Groups (``entry.group(params)``, :data:`usmoe_lp.routers.GROUPS`): ``sequence``; ``batch`` (the
whole update); ``position`` (one position across the update's sequences); ``token`` routers (rows
independent) are certified per sequence, the direct sum of their token programs. ``batch`` and
``position`` couple the sequences of one ``update`` call, so their results depend on how the stream
is batched (as they would in the model); the others are independent of batching.

Padding: rows marked in ``padding_mask`` (True = padding) are set to logit 0 before scoring (so
garbage such as NaN there is ignored), are never selected and count nowhere
(:func:`usmoe_lp.routers.prepare_logits`).

Precision: logits of any dtype (bfloat16, float16, float32: all exact in float64) are scored in
float64. torch's float32 elementwise functions (sigmoid, exp) can differ by an ulp with the
position of an element in the tensor, so float32 scores of one token would depend on how the
stream was chunked; in float64 such differences are ~1e-16 and sums agree to ~1e-15 relative.

Streaming: :class:`CounterfactualPartial` follows the mergeable-partial protocol
(:class:`usmoe_lp.diagnostics.partial.Partial`: ``empty``, ``update``, ``merge``, ``result``).
Counts and sums merge exactly; the LP sample is per partial, so a merge adds the partials' samples
(``lp_checked`` and sampled certificates may exceed the sample size of a single partial). Stateful
routers (``entry.stateful``, e.g. bias balancing) keep one state per config across updates, in
stream order; a merge keeps the state of the later partial (``other``, when it has seen an update).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from usmoe_lp._json import json_ready
from usmoe_lp._validate import check_int, check_real
from usmoe_lp.diagnostics.load import BALANCE_KEYS, balance_metrics
from usmoe_lp.errors import InvalidParameter, InvalidScores, ShapeMismatch, SolverError
from usmoe_lp.lp import RoutingProblem, certify, certify_with_duals, solve
from usmoe_lp.routers import RouterConfig, RouterContext, default_configs, prepare_logits, reroute, route_scores
from usmoe_lp.routing import probabilities
from usmoe_lp.routing.scores import PROBABILITY_FUNCTIONS

__all__ = ["DEFAULT_LP_MAX_PAIRS", "DEFAULT_LP_SAMPLE", "CounterfactualPartial", "CounterfactualRecord",
           "CounterfactualStats", "RouterConfig", "config_scores", "counterfactual", "default_configs", "reroute"]

DEFAULT_LP_SAMPLE = 1
DEFAULT_LP_MAX_PAIRS = 2**18


def config_scores(logits: torch.Tensor, config: RouterConfig, score_function: str = "softmax",
                  layer: Any = None) -> torch.Tensor:
    """The scores ``config`` routes on (``entry.scores``), (..., T, N) float like ``logits``."""
    return config.entry.scores(logits, config.param_dict,
                               RouterContext(config.k, int(logits.shape[-1]), score_function, layer))


def _resolve_score_function(score_function: str | None, layer: Any) -> str:
    if score_function is None:
        score_function = getattr(layer, "score_function", None) or "softmax"
    if score_function not in PROBABILITY_FUNCTIONS:
        raise InvalidParameter(f"score_function must be one of {', '.join(PROBABILITY_FUNCTIONS)}, "
                               f"got {score_function!r}")
    return score_function


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True, eq=False)
class CounterfactualRecord:
    """What one counterfactual router did with the logits (all updates of a partial).

    Attributes:
        config: the router setting (:class:`usmoe_lp.routers.RouterConfig`).
        tokens: real tokens routed (count). groups: groups routed (sequences; updates for
            ``batch`` groups; positions for ``position``), each with >= 1 real token.
        pairs: selected token-expert pairs. realised_kbar: pairs / tokens (experts per token).
        objective: sum of the model's probabilities P over the selected pairs (float64; common
            currency). own_objective: sum of the router's own scores over its selection.
        probability_mass: sum of P over real tokens (= tokens up to rounding).
        coverage: objective / probability_mass, share of the score mass covered, in [0, 1].
        dropped_tokens: real tokens with zero experts (count); drop_rate = dropped / tokens.
        budget_mismatch: pairs - k * tokens (EC: N*e - T*k summed over sequences).
        agreement: mean over real tokens of the Jaccard **similarity** |A & M| / |A | M| between
            the router's expert set A and the model's M (1 when both are empty); None without a
            model mask. agreement_tokens: tokens it averages over.
        expert_counts: (N,) int64 tokens routed to each expert. experts_per_token: (N+1,) int64
            histogram of experts per real token (index = number of experts).
        balance: ``usmoe_lp.diagnostics.load.balance_metrics(expert_counts)``.
        certificate: ``closed_form`` or ``lp_duals`` (exact routers: every group), ``lp_sample``
            (heuristics: the LP-sampled groups), None (the router has no program).
        certified_optimal / certified_total: groups whose selection is proven optimal for the
            program / groups certified (None without a program). max_certificate_gap: largest
            certificate gap (dual bound - objective, own scores) over certified groups; None when
            none was certified.
        lp_checked: groups solved by the LP cross-check; lp_skipped: groups passed over for being
            larger than ``lp_max_pairs``; lp_failed: LP solves that did not reach optimality.
        max_lp_gap: max |LP optimum - router objective| on own scores over the checked groups
            (None when none). lp_relative_gap: sum (LP optimum - router objective) / sum LP
            optimum over the checked groups (0 for exact routers; a heuristic's loss).
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
    certificate: str | None
    certified_optimal: int | None
    certified_total: int | None
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

    def row(self, param_names: tuple[str, ...] | None = None) -> dict:
        """Flat scalar columns (one DataFrame row): ``router``, ``label``, ``k``, the router's
        parameters (``param_names``: the columns to give, None where this router lacks one;
        default its own), ``group``, ``exact``, ``prefix_rule``, totals, balance, certificates."""
        cfg, entry = self.config, self.config.entry
        names = cfg.entry.param_names if param_names is None else param_names
        out = {"router": cfg.router, "label": cfg.label, "k": cfg.k, **{n: cfg.get(n) for n in names},
               "group": entry.group(cfg.param_dict), "exact": entry.exact, "prefix_rule": entry.prefix,
               "tokens": self.tokens, "groups": self.groups, "pairs": self.pairs,
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

    def to_dict(self, param_names: tuple[str, ...] | None = None) -> dict:
        """JSON-ready: :meth:`row` plus ``expert_counts`` and ``experts_per_token`` as lists."""
        out = json_ready(self.row(param_names))
        out["expert_counts"] = json_ready(self.expert_counts)
        out["experts_per_token"] = json_ready(self.experts_per_token)
        return out


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

    @property
    def param_names(self) -> tuple[str, ...]:
        """The union of the records' router parameters, in config order (the frame's columns)."""
        return tuple(dict.fromkeys(n for r in self.records for n in r.config.entry.param_names))

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
        """Tidy pandas DataFrame, one row per config (columns of :meth:`CounterfactualRecord.row`,
        the parameter columns being the union over the configs)."""
        import pandas as pd

        names = self.param_names
        return pd.DataFrame([r.row(names) for r in self.records])

    def to_dict(self) -> dict:
        """JSON-ready plain Python (NaN -> None)."""
        names = self.param_names
        return json_ready({"num_experts": self.num_experts, "tokens": self.tokens, "updates": self.updates,
                           "score_function": self.score_function, "lp_sample": self.lp_sample,
                           "lp_max_pairs": self.lp_max_pairs, "configs": [r.to_dict(names) for r in self.records]})


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
    backends: frozenset = frozenset()

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
            elif f.name == "backends":
                setattr(out, f.name, a | b)
            else:
                setattr(out, f.name, a + b)
        return out

    def add_certificate(self, optimal: bool, gap: float | None) -> None:
        self.cert_total += 1
        self.cert_optimal += int(optimal)
        if gap is not None and math.isfinite(gap):
            self.cert_max_gap = max(self.cert_max_gap, float(gap))


def _grouped(own: np.ndarray, mask: np.ndarray, valid: np.ndarray, by: str):
    """Real rows in group order: (S (n, N), X (n, N), keys (G,), bounds (G+1,)).

    ``by``: ``sequence`` and ``token`` (groups are sequences b), ``position`` (positions t, rows
    of all sequences), ``batch`` (one group, key 0). Rows of a group are contiguous.
    """
    if by == "position":
        own, mask, valid = own.transpose(1, 0, 2), mask.transpose(1, 0, 2), valid.T
    outer, inner = np.nonzero(valid)
    S, X = own[outer, inner], mask[outer, inner]
    if by == "batch":
        return S, X, np.zeros(1, np.int64), np.array([0, outer.size])
    keys, starts = np.unique(outer, return_index=True)
    return S, X, keys, np.append(starts, outer.size)


def _expert_binds(p: RoutingProblem) -> bool:
    return bool(np.any(p.expert_min > 0) or np.any(p.expert_max < p.shape[0]))


def _direct_sum(problems: list[RoutingProblem]) -> RoutingProblem | None:
    """The groups' programs as one program (rows stacked, one budget group per program), or None
    where that is not the same program (an expert family couples rows across groups, or mixed
    budget senses)."""
    if len(problems) == 1:
        return problems[0]
    if any(_expert_binds(p) for p in problems):
        return None
    has_budget = {p.budget is not None for p in problems}
    senses = {p.budget_sense for p in problems if p.budget is not None}
    if len(has_budget) > 1 or len(senses) > 1:
        return None
    S = np.concatenate([p.scores for p in problems])
    tmin = np.concatenate([p.token_min for p in problems])
    tmax = np.concatenate([p.token_max for p in problems])
    if not has_budget.pop():
        return RoutingProblem(S, token_min=tmin, token_max=tmax, name="direct_sum")
    gids, budgets, offset = [], [], 0
    for p in problems:
        gids.append(p.group_ids + offset)
        budgets.append(p.budget)
        offset += p.num_groups
    return RoutingProblem(S, token_min=tmin, token_max=tmax, budget=np.concatenate(budgets),
                          budget_sense=senses.pop(), groups=np.concatenate(gids), name="direct_sum")


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


class CounterfactualPartial:
    """Streaming accumulator of counterfactual re-routing (module docstring; mergeable partial).

    >>> import torch
    >>> p = CounterfactualPartial.empty(4, default_configs(1, alphas=(0.5,)), lp_sample=0)
    >>> p.update(torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(0)))
    >>> s = p.result()
    >>> s["tc k=1"].pairs, s["usmoe a=0.5 kbar=1 seq"].pairs, s["ec cf=1"].budget_mismatch
    (32, 32, 0)
    >>> all(r.certified_optimal == r.certified_total for r in s.records if r.config.entry.exact)
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
        self.states: list[Any] = [None] * len(configs)

    @classmethod
    def empty(cls, num_experts: int, configs, *, lp_sample: int = DEFAULT_LP_SAMPLE,
              lp_max_pairs: int = DEFAULT_LP_MAX_PAIRS, lp_time_limit: float | None = 60.0) -> CounterfactualPartial:
        """A partial with nothing seen.

        Args:
            num_experts: N (int >= 1).
            configs: non-empty sequence of :class:`~usmoe_lp.routers.RouterConfig` with distinct
                labels (:func:`usmoe_lp.routers.default_configs` is the standard grid).
            lp_sample: groups per config solved by the LP cross-check (the first ones this
                partial sees; 0 disables it, and heuristics are then not certified). Each solve
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
        if lp_time_limit is not None:
            lp_time_limit = check_real(lp_time_limit, "lp_time_limit", low=0.0, low_open=True)
        return cls(n, cfgs, sample, max_pairs, lp_time_limit)

    # ------------------------------------------------------------------------- update
    def update(self, logits, *, padding_mask=None, model_mask=None, score_function: str | None = None,
               layer: Any = None) -> None:
        """Re-route one chunk of logits under every config and accumulate.

        Args:
            logits: (T, N) or (B, T, N) float (torch incl. bfloat16, or numpy); N = num_experts.
                B sequences of T positions; the routers' groups are defined in the module docstring.
            padding_mask: (T,) or (B, T) bool, True where the token is padding.
            model_mask: same shape as ``logits``, bool (or 0/1): the model's own selection, for
                ``agreement``. Padding rows are ignored.
            score_function: how the model turns logits into probabilities (``softmax``,
                ``sigmoid``, ``softmax_topk``, ``unknown``; :func:`usmoe_lp.routing.probabilities`);
                default the layer's, else ``softmax``. Must be the same for every update.
            layer: the layer's :class:`usmoe_lp.logs.LayerInfo` (the model's routing semantics,
                read by routers such as ``native``), or None.

        Raises:
            InvalidScores, ShapeMismatch, InvalidParameter: bad logits, masks or parameters.
        """
        score_function = _resolve_score_function(score_function, layer)
        if self.score_function is not None and score_function != self.score_function:
            raise InvalidParameter(f"score_function {score_function!r} differs from the {self.score_function!r} "
                                   "of earlier updates; use one partial per score function")
        z3, valid, squeeze = prepare_logits(logits, padding_mask)
        B, T, N = z3.shape
        if N != self.num_experts:
            raise ShapeMismatch(f"logits have N = {N} experts; this partial was built for {self.num_experts}")
        mm = None if model_mask is None else _model_mask(model_mask, tuple(z3.shape), squeeze, z3.device)
        probs = probabilities(z3, score_function)
        has_pad = not bool(valid.all())
        pad = ~valid if has_pad else None
        ctxs = {c.k: RouterContext(c.k, N, score_function, layer) for c in self.configs}
        # Route every config before accumulating anything: a failing router leaves the partial unchanged.
        routed = []
        for i, config in enumerate(self.configs):
            ctx = ctxs[config.k]
            scores = config.entry.scores(z3, config.param_dict, ctx)
            routed.append((scores, route_scores(config, scores, ctx, pad, self.states[i]), ctx))
        self.score_function = score_function
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
        for i, (config, acc) in enumerate(zip(self.configs, self.accs, strict=True)):
            scores, route, ctx = routed[i]
            if config.entry.stateful:
                self.states[i] = route.params.get("state")
            own_np = scores.detach().cpu().numpy()
            mask = route.mask.cpu().numpy()
            if has_pad:
                mask = mask & valid_np[..., None]
            ept_real = mask.sum(-1)[valid_np]
            pairs = int(ept_real.sum())
            acc.pairs += pairs
            acc.objective += float(probs_np[mask].sum(dtype=np.float64))
            acc.own_objective += float(own_np[mask].sum(dtype=np.float64))
            acc.dropped += int((ept_real == 0).sum())
            acc.budget_mismatch += pairs - config.k * n_tokens
            acc.counts += mask.sum((0, 1), dtype=np.int64)
            acc.ept += np.bincount(ept_real, minlength=N + 1).astype(np.int64)
            if mm_np is not None:
                inter = (mask & mm_np).sum(-1)[valid_np]
                union = (mask | mm_np).sum(-1)[valid_np]
                jac = np.divide(inter, union, out=np.ones(union.shape), where=union > 0)
                acc.agree_sum += float(jac.sum(dtype=np.float64))
            self._certify(config, acc, own_np, mask, valid_np, route.params, ctx)

    def _certify(self, config: RouterConfig, acc: _Acc, own: np.ndarray, mask: np.ndarray,
                 valid: np.ndarray, routing_params: dict, ctx: RouterContext) -> None:
        entry, params = config.entry, config.param_dict
        by = entry.group(params)
        S, X, keys, bounds = _grouped(own, mask, valid, by)
        G = keys.size
        acc.groups += G
        if G == 0 or entry.problem is None:
            return
        N = S.shape[1]
        rows = [slice(bounds[g], bounds[g + 1]) for g in range(G)]
        problems: dict[int, RoutingProblem] = {}

        def problem(g: int) -> RoutingProblem:
            if g not in problems:
                problems[g] = entry.problem(S[rows[g]], params, routing_params, int(keys[g]), ctx)
            return problems[g]

        if entry.exact:
            every = [problem(g) for g in range(G)]
            combined = _direct_sum(every)
            if combined is not None and combined.is_single_block:
                cert = certify(combined, X, backend="closed_form")
                acc.backends |= {"closed_form"}
                if cert.optimal:
                    acc.cert_total += G
                    acc.cert_optimal += G
                    acc.cert_max_gap = max(acc.cert_max_gap, 0.0)
                    every = []
            for g, p in enumerate(every):
                backend = "closed_form" if p.is_single_block else "highs"
                acc.backends |= {"closed_form" if backend == "closed_form" else "lp_duals"}
                try:
                    c = certify(p, X[rows[g]], backend=backend)
                except SolverError:
                    acc.add_certificate(False, None)
                    continue
                acc.add_certificate(c.optimal, c.gap)
        for g in range(G):
            if acc.lp_checked >= self.lp_sample:
                break
            if (bounds[g + 1] - bounds[g]) * N > self.lp_max_pairs:
                acc.lp_skipped += 1
                continue
            p = problem(g)
            sol = solve(p, backend="highs", time_limit=self.lp_time_limit, certify_solution=False)
            acc.lp_checked += 1
            if sol.status != "optimal":
                acc.lp_failed += 1
                continue
            router_obj = p.objective(X[rows[g]])
            acc.lp_max_gap = max(acc.lp_max_gap, abs(sol.objective - router_obj))
            acc.lp_opt_sum += sol.objective
            acc.lp_router_sum += router_obj
            if not entry.exact:
                acc.backends |= {"lp_sample"}
                c = certify_with_duals(p, X[rows[g]], sol.duals, x=sol.x, backend="highs")
                acc.add_certificate(c.optimal, c.gap)

    # ------------------------------------------------------------------------- merge / result
    def merge(self, other: CounterfactualPartial) -> CounterfactualPartial:
        """A NEW partial holding both inputs' sums (neither input is modified).

        Partials with different ``lp_sample`` merge (e.g. layers where the LP cross-check ran and
        layers where it did not): the checked counts add up and the merged ``lp_sample`` is the
        larger. Stateful routers keep ``other``'s state when ``other`` has seen an update (it is
        taken to follow ``self`` in the stream), else ``self``'s.

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
        out.states = list(other.states if other.updates else self.states)
        return out

    def result(self) -> CounterfactualStats:
        """The :class:`CounterfactualStats` of everything seen (balance via ``load.balance_metrics``)."""
        records = []
        for config, a in zip(self.configs, self.accs, strict=True):
            entry = config.entry
            checked_ok = a.lp_checked - a.lp_failed
            if entry.problem is None:
                kind = None
            elif entry.exact:
                kind = "lp_duals" if "lp_duals" in a.backends else "closed_form"
            else:
                kind = "lp_sample"
            records.append(CounterfactualRecord(
                config=config, tokens=self.tokens, groups=a.groups, pairs=a.pairs, objective=a.objective,
                own_objective=a.own_objective, probability_mass=self.mass, dropped_tokens=a.dropped,
                budget_mismatch=a.budget_mismatch,
                agreement=a.agree_sum / self.agree_tokens if self.agree_tokens else None,
                agreement_tokens=self.agree_tokens, expert_counts=a.counts.copy(), experts_per_token=a.ept.copy(),
                balance=balance_metrics(a.counts), certificate=kind,
                certified_optimal=None if kind is None else a.cert_optimal,
                certified_total=None if kind is None else a.cert_total,
                max_certificate_gap=a.cert_max_gap if a.cert_total else None,
                lp_checked=a.lp_checked, lp_skipped=a.lp_skipped, lp_failed=a.lp_failed,
                max_lp_gap=a.lp_max_gap if checked_ok else None,
                lp_relative_gap=((a.lp_opt_sum - a.lp_router_sum) / a.lp_opt_sum
                                 if checked_ok and a.lp_opt_sum > 0 else None),
            ))
        return CounterfactualStats(num_experts=self.num_experts, records=tuple(records), tokens=self.tokens,
                                   updates=self.updates, score_function=self.score_function,
                                   lp_sample=self.lp_sample, lp_max_pairs=self.lp_max_pairs)


def counterfactual(logits, configs, *, padding_mask=None, model_mask=None, score_function: str | None = None,
                   layer: Any = None, lp_sample: int = DEFAULT_LP_SAMPLE,
                   lp_max_pairs: int = DEFAULT_LP_MAX_PAIRS) -> CounterfactualStats:
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
    p.update(logits, padding_mask=padding_mask, model_mask=model_mask, score_function=score_function, layer=layer)
    return p.result()

