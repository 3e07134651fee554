"""How a live router chooses experts: one class per kind of router (registry, replay, callable).

Each selector's :meth:`select` gets one layer's router logits for the tokens of one forward, (B, T, N) in the model's
dtype and device, and a :class:`LiveContext` (padding, sequence ids, positions, whether the forward is a KV-cache
decode step), and returns a :class:`Selection`: the (B, T, N) bool experts of every token (padding selects none) and
the router's (B, T, N) scores, from which the combine-weight rule (:mod:`usmoe_lp.live.weights`) makes the weights.

* :class:`RegistrySelector`: a registry router (:func:`usmoe_lp.list_routers`). A forward that starts sequences is
  routed as one call of the router (its group: a sequence, the batch, a position). A decode step follows the
  router's decode rule (``Router.decode``): with a ``decode_route`` function, the rule applied to the sequence's
  scores so far (the prompt forward's and every decode step's, kept per sequence until the next forward that
  starts sequences), the new tokens' rows taken; without one, each new token is routed as a sequence of one token
  (one call per token for routers whose group couples sequences). A stateful router (bias balancing) carries its
  state from forward to forward, per layer; decode steps do not move it and route each new token as a sequence of
  one token with the current state (``aux_free_bias``: the top-k of score + the bias carried so far, its decode
  rule in words; its decode function, which knows only the initial bias, serves before any state exists).
* :class:`ReplaySelector`: the experts and weights a router log recorded (``selected.<layer>`` / ``weights.<layer>``,
  written by :func:`usmoe_lp.logs.capture`), consumed in the log's token order: the forwards must feed the logged
  tokens in the logged order (checked on the token ids where both are known).
* :class:`CallableSelector`: any function ``fn(logits, ctx)`` returning a bool mask, a ``(mask, scores)`` pair or a
  :class:`usmoe_lp.routing.Routing` (its weights taken as the scores), (B, T, N) each; the scores are what the
  ``score`` and ``reference`` weight rules read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from usmoe_lp.errors import InvalidParameter, ShapeMismatch
from usmoe_lp.routers.config import RouterConfig, prepare_logits, route_scores
from usmoe_lp.routers.spec import RouterContext
from usmoe_lp.routing import Routing

__all__ = ["CallableSelector", "LiveContext", "RegistrySelector", "ReplaySelector", "Selection"]


@dataclass(frozen=True)
class LiveContext:
    """What a live router knows about the tokens it routes in one forward of one layer.

    layer: the layer's :class:`usmoe_lp.logs.LayerInfo` (name, N, the model's k, its routing semantics).
    real: (B, T) bool, False for padding. sequence_ids: (B,) int64, a running count of the rows that started a
    sequence inside the route (a decode step keeps its prompt's). positions: (B, T) int64 (real tokens before the
    token in its sequence, so left padding still starts at 0). decode_step: the forward continues sequences held
    in a KV cache (one new token per row under ``generate()``). token_ids: (B, T) int64 or None (a forward given
    ``inputs_embeds=``). ``real``, ``sequence_ids`` and ``positions`` are CPU tensors
    (:class:`usmoe_lp.logs.stream.Tokens`); ``token_ids`` is on the device the model got it on.
    """

    layer: Any
    real: torch.Tensor
    sequence_ids: torch.Tensor
    positions: torch.Tensor
    decode_step: bool
    token_ids: torch.Tensor | None = None

    @property
    def padding_mask(self) -> torch.Tensor | None:
        """(B, T) bool, True for padding; None when every token is real."""
        return None if bool(self.real.all()) else ~self.real


@dataclass(frozen=True)
class Selection:
    """A selector's answer for one forward of one layer.

    mask: (B, T, N) bool, the experts of each token (the route drops padding from it). scores: (B, T, N) float, the
    router's own scores over all experts (the ``score`` and ``reference`` weights read them; float64 for a registry
    router, on the logits' device), or None. weights: (B, T, N) float, combine weights fixed by the selector (replay),
    or None (the route's weight rule makes them). native: the selection is the model's own router's (its own
    tensors may run unchanged).
    """

    mask: torch.Tensor
    scores: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    native: bool = False


class RegistrySelector:
    """A registry router by name with its parameters; ``k``: the model's experts per token (default each layer's)."""

    def __init__(self, name: str, k: int | None = None, **params: Any) -> None:
        self.name = name
        self.k = k
        self.params = params
        self._configs: dict[str, RouterConfig] = {}
        self._state: dict[str, Any] = {}
        self._history: dict[str, _History] = {}
        if k is not None:
            RouterConfig(name, k, **params)  # validate up front when k is known
        else:
            RouterConfig(name, 1, **{p: v for p, v in params.items() if p != "kbar"})  # names and types

    def config(self, layer: Any) -> RouterConfig:
        """The layer's :class:`RouterConfig` (k = the layer's top_k unless given)."""
        if layer.name not in self._configs:
            k = self.k if self.k is not None else layer.top_k
            if k is None:
                raise InvalidParameter(f"layer {layer.name!r}: the model's experts per token is unknown; pass k=")
            config = RouterConfig(self.name, k, **self.params)
            config.check_experts(layer.num_experts)
            self._configs[layer.name] = config
        return self._configs[layer.name]

    @property
    def label(self) -> str:
        if self._configs:
            return next(iter(self._configs.values())).label
        return self.name

    def select(self, logits: torch.Tensor, ctx: LiveContext) -> Selection:
        """The router's (B, T, N) selection and scores (float64, on the logits' device) for one forward."""
        config = self.config(ctx.layer)
        rctx = RouterContext(k=config.k, num_experts=ctx.layer.num_experts, score_function=ctx.layer.score_function,
                             layer=ctx.layer)
        name = ctx.layer.name
        if ctx.decode_step:
            mask, scores = self._decode(config, logits, ctx, rctx)
        else:
            # reroute's steps, the scores kept: logits checked and padding rows zeroed, scored once in float64
            pad = ctx.padding_mask
            z, _, _ = prepare_logits(logits, pad)
            scores = config.entry.scores(z, config.param_dict, rctx)
            r = route_scores(config, scores, rctx, pad, self._state.get(name))
            if config.entry.stateful:
                self._state[name] = r.params.get("state")
            mask = r.mask
            if config.entry.decode_route is not None:  # the prompt's scores, read if decode steps follow
                self._history[name] = _History(scores, ctx.real, ctx.sequence_ids)
        return Selection(mask=mask, scores=scores, native=config.router == "native")

    def _decode(self, config: RouterConfig, logits: torch.Tensor, ctx: LiveContext, rctx: RouterContext):
        """The router's decode rule on a decode step's (B, T, N) logits (module docstring)."""
        entry, params = config.entry, config.param_dict
        z, _, _ = prepare_logits(logits, ctx.padding_mask)
        scores = entry.scores(z, params, rctx)
        real = ctx.real.to(scores.device)
        mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        state = self._state.get(ctx.layer.name)  # a stateful router's current state, not moved by decode steps
        # a stateful router decodes each token with the state its route carried so far (its decode function knows
        # only its initial state): the one-token path below, with that state
        if entry.decode_route is not None and not (entry.stateful and state is not None):
            history = self._history.get(ctx.layer.name)
            if history is None:
                raise InvalidParameter(f"layer {ctx.layer.name!r}: a decode step, but no forward of this route "
                                       "started its sequences")
            for b, seq in enumerate(history.extend(scores, ctx.real, ctx.sequence_ids)):
                new = int(ctx.real[b].sum())
                if new:
                    routed = entry.decode_route(seq[None], params, rctx)[0]
                    mask[b, real[b]] = routed[-new:].to(torch.bool)
            return mask, scores
        rows = scores[real]  # (M, N): every new token is a sequence of its own
        if entry.group(params) in ("token", "sequence"):
            routed = route_scores(config, rows[:, None, :], rctx, state=state).mask[:, 0, :]
        else:  # a batch or position group would couple the one-token sequences of one call
            routed = torch.cat([route_scores(config, rows[i:i + 1, None, :], rctx, state=state).mask[0]
                                for i in range(rows.shape[0])]) if rows.shape[0] else rows.to(torch.bool)
        mask[real] = routed.to(torch.bool)
        return mask, scores


class _History:
    """The scores of the real tokens of each sequence so far, for a router's decode rule: the prefill forward's
    (B, T, N) scores kept as they are (read only if decode steps follow), then, per row, its real rows with each
    decode step's appended."""

    def __init__(self, scores: torch.Tensor, real: torch.Tensor, sequence_ids: torch.Tensor) -> None:
        self._prefill: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = (scores, real, sequence_ids)
        self._rows: dict[int, torch.Tensor] = {}

    def extend(self, scores: torch.Tensor, real: torch.Tensor, sequence_ids: torch.Tensor) -> list[torch.Tensor]:
        """Append a decode step's (B, T, N) real rows to their sequences; each row's sequence so far, (t, N)."""
        if self._prefill is not None:
            self._append(*self._prefill)
            self._prefill = None
        self._append(scores, real, sequence_ids)
        return [self._rows[sid] for sid in sequence_ids.tolist()]

    def _append(self, scores: torch.Tensor, real: torch.Tensor, sequence_ids: torch.Tensor) -> None:
        for b, sid in enumerate(sequence_ids.tolist()):
            rows = scores[b][real[b].to(scores.device)]
            self._rows[sid] = rows if sid not in self._rows else torch.cat([self._rows[sid], rows])


class ReplaySelector:
    """The selections a router log recorded, replayed in the log's token order (module docstring)."""

    def __init__(self, log: Any) -> None:
        from usmoe_lp.logs import RouterLog

        self.log = log if isinstance(log, RouterLog) else RouterLog.open(log)
        self._cursor: dict[str, int] = {}
        self.label = "replay"

    def select(self, logits: torch.Tensor, ctx: LiveContext) -> Selection:
        layer = ctx.layer
        name = self._layer_name(layer)
        if not self.log.has(name, "selected") or not self.log.has(name, "weights"):
            raise InvalidParameter(f"the router log at {self.log.path} has no selections of layer {name!r}: capture "
                                   "it with selections=True from a family whose selections are logged")
        B, T, N = logits.shape
        real = ctx.real
        n = int(real.sum())
        start = self._cursor.get(name, 0)
        if start + n > self.log.num_tokens:
            raise ShapeMismatch(f"replay: the forwards carry more real tokens than the router log at {self.log.path} "
                                f"holds ({self.log.num_tokens}); feed the logged batches in the logged order")
        chunk = self.log.read(name, start, start + n)
        if ctx.token_ids is not None:
            self._check_tokens(start, chunk.token_ids, ctx.token_ids.cpu().long()[real.cpu()])
        self._cursor[name] = start + n
        device = logits.device
        selected, weights = chunk.selected.to(device), chunk.weights.to(device)
        if selected.dtype == torch.bool:
            m = selected
            w = torch.where(m, weights, torch.zeros((), dtype=weights.dtype, device=device))
        else:
            m = torch.zeros(n, N, dtype=torch.bool, device=device).scatter_(1, selected.long(), True)
            w = torch.zeros(n, N, dtype=weights.dtype, device=device).scatter_(1, selected.long(), weights)
        mask = torch.zeros(B, T, N, dtype=torch.bool, device=device)
        full = torch.zeros(B, T, N, dtype=weights.dtype, device=device)
        real_d = real.to(device)
        mask[real_d], full[real_d] = m, w
        return Selection(mask=mask, weights=full)

    @staticmethod
    def _check_tokens(start: int, logged: torch.Tensor, fed: torch.Tensor) -> None:
        """Raise when the forward's token ids differ from the log's at the same place (unknown ids, -1, pass)."""
        known = (logged >= 0) & (fed >= 0)
        differ = known & (logged != fed)
        if bool(differ.any()):
            first = int(differ.nonzero()[0])
            raise ShapeMismatch(f"replay: token {start + first} of the forwards is {int(fed[first])} but the router "
                                f"log has {int(logged[first])} there; feed the logged batches in the logged order")

    def _layer_name(self, layer: Any) -> str:
        if layer.name in self.log.layers:
            return layer.name
        by_path = {self.log.layer_info(n).module_path: n for n in self.log.layers}
        if layer.module_path in by_path:
            return by_path[layer.module_path]
        raise InvalidParameter(f"the router log at {self.log.path} has no layer {layer.name!r} "
                               f"(its layers: {list(self.log.layers)})")


class CallableSelector:
    """Any ``fn(logits (B, T, N), ctx: LiveContext)`` returning a (B, T, N) bool mask, ``(mask, scores)`` or a
    Routing (module docstring); a wrong type or shape raises :class:`ShapeMismatch` naming the function."""

    def __init__(self, fn: Callable[[torch.Tensor, LiveContext], Any]) -> None:
        self.fn = fn
        self.label = getattr(fn, "__name__", type(fn).__name__)

    def select(self, logits: torch.Tensor, ctx: LiveContext) -> Selection:
        out = self.fn(logits, ctx)
        if isinstance(out, Routing):
            mask, scores = out.mask, out.weights
        elif isinstance(out, tuple) and len(out) == 2:
            mask, scores = out
        else:
            mask, scores = out, None
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(logits.shape):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ShapeMismatch(f"router {self.label!r} must return a (B, T, N) = {tuple(logits.shape)} bool mask "
                                f"(alone, with weights, or as a Routing), got {got}")
        if scores is not None and (not isinstance(scores, torch.Tensor) or not scores.is_floating_point()
                                   or tuple(scores.shape) != tuple(logits.shape)):
            got = (f"{tuple(scores.shape)} {scores.dtype}" if isinstance(scores, torch.Tensor)
                   else type(scores).__name__)
            raise ShapeMismatch(f"router {self.label!r} returned weights of shape {got}, not (B, T, N) = "
                                f"{tuple(logits.shape)} float")
        mask = mask.to(logits.device) & ctx.real.to(logits.device).unsqueeze(-1)  # padding never selected
        return Selection(mask=mask, scores=None if scores is None else scores.to(logits.device))
