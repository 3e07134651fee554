"""Route a live transformers MoE model with any router: :func:`route`.

>>> with route(model, "usmoe", kbar=1.5, alpha=0.5, scope="sequence") as r:     # doctest: +SKIP
...     out = model(**batch)
>>> r.stats["layer0"].kbar                                                        # doctest: +SKIP

Inside the context every routed MoE block of ``model`` runs the experts the router chooses, with the model's own
experts and the combine weights of the chosen rule (:mod:`usmoe_lp.live.weights`), computing only the selected
token-expert pairs (:mod:`usmoe_lp.live.dispatch`). The routers are the ones :func:`usmoe_lp.logs.find_routers`
finds (both stacks of an encoder-decoder model); their logits are the model's, unchanged.

Tokens: each forward of the model (of each stack of an encoder-decoder model) is read as capture reads it
(:class:`usmoe_lp.logs.stream.TokenStream`): the attention mask marks padding, which never selects an expert and
never takes budget; a forward that continues a KV cache (``generate()``) is a decode step, routed by the router's
decode rule (:mod:`usmoe_lp.live.selectors`). The hooks are removed on exit, also on error.

``native`` with ``weights="model"`` runs the model's own selection and weights unchanged (bitwise the unpatched
model) and checks, token by token, that the registry's replay of the model's router selects the same experts
(``stats[layer].native_mismatches``; its ``pairs`` are the replay's, the model's own up to those tokens).

What the experts run: each token's selected experts in (n, kmax) slots by decreasing weight, the models' own top-k
order (:func:`usmoe_lp.live.dispatch.pack`), so that a selection equal to the model's runs bitwise as the model (a
replayed log, Token Choice with the model's weights, without padding). The router's output is rewritten with that
selection plus a "no expert" column, so a :func:`usmoe_lp.logs.capture` inside or around the route logs the routing
that ran, as (n, N) masks and weights (the route's hook runs before any other).

Counts (:attr:`Route.stats`) are kept on the model's device and read back when asked for. One route at a time per
model (a second one on the same routers raises :class:`RouteFailed`); a :class:`Route` is entered once.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from usmoe_lp.errors import InvalidParameter, ShapeMismatch, UsmoeLpError
from usmoe_lp.live.adapters import UnsupportedModel, adapter_for
from usmoe_lp.live.dispatch import pack
from usmoe_lp.live.selectors import CallableSelector, LiveContext, RegistrySelector, ReplaySelector, Selection
from usmoe_lp.live.stats import RouteStats, _Counter
from usmoe_lp.live.weights import get_weight_rule
from usmoe_lp.logs.capture import RouterNotFound, RouterSpec, find_routers, router_logits
from usmoe_lp.logs.stream import Batch, Tokens, TokenStream
from usmoe_lp.routers.config import RouterConfig

__all__ = ["LiveLayer", "Route", "RouteFailed", "route"]


class RouteFailed(UsmoeLpError, RuntimeError):
    """A forward inside :func:`route` could not be routed (the message says why)."""


_ROUTED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
"""The router modules of every route context now entered: one route at a time per router (a second one would wrap
the first's experts call and run the first's selection under its own counts)."""


@dataclass
class _Pending:
    """A layer's selection for the experts call about to run. index/weights: (n, kmax), N = no expert; None: the
    model's own selection runs. expected: (n, N) bool, native's replay (checked against the model's), or None.
    real: (n,) bool."""

    index: torch.Tensor | None
    weights: torch.Tensor | None
    expected: torch.Tensor | None
    real: torch.Tensor


class LiveLayer:
    """One routed layer: its router (``spec``), semantics (``info``: a LayerInfo), MoE block, adapter, counts.

    ``pending``: the selection for the layer's next experts call (set by the router hook, taken by the adapter).
    ``pending_native``: for ``native`` with the model's weights, the registry's replay that :meth:`account_native`
    checks the model's own selection against.
    """

    def __init__(self, model: nn.Module, spec: RouterSpec) -> None:
        self.spec = spec
        self.info = spec.layer_info()
        self.block = model.get_submodule(spec.path.rsplit(".", 1)[0]) if "." in spec.path else None
        self.adapter = adapter_for(model, self.block, spec)
        self.counter = _Counter(spec.name, spec.num_experts, spec.top_k)
        self.pending: _Pending | None = None
        self.pending_native: _Pending | None = None

    def account_native(self, model_index: torch.Tensor) -> None:
        """Count the model's own selection (``native`` with the model's weights), called by the adapter with the
        (n, k) expert indices the model hands its experts (an index outside [0, N) is no expert): the expert rows it
        computes (padding included) and the real tokens whose experts differ from the registry's replay of the
        model's router (``LayerStats.native_mismatches``). Counted on the device, no host synchronisation."""
        pending, self.pending_native = self.pending_native, None
        n = self.info.num_experts
        idx = model_index.reshape(-1, model_index.shape[-1]).long() if model_index.ndim else model_index.reshape(1, 1)
        valid = (idx >= 0) & (idx < n)
        mismatches = None
        if pending is not None and pending.expected is not None:
            expected = pending.expected.to(idx.device)
            if idx.shape[0] != expected.shape[0]:
                raise RouteFailed(f"layer {self.info.name!r}: the model handed its experts {idx.shape[0]} tokens' "
                                  f"expert indices, but its router routed {expected.shape[0]} tokens")
            model_mask = torch.zeros(idx.shape[0], n + 1, dtype=torch.bool, device=idx.device)
            model_mask.scatter_(1, torch.where(valid, idx, torch.full_like(idx, n)), True)
            differ = (model_mask[:, :n] != expected).any(dim=-1) & pending.real.to(idx.device)
            mismatches = differ.sum()
        self.counter.add_native(valid.sum(), mismatches)


class _Stack:
    """The token stream of one hooked stack module (the model, or an encoder / decoder stack), and the tokens of
    the forward in flight (None between forwards)."""

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module = module
        self.name = name
        self.stream = TokenStream(track_cache=name != "encoder", error=RouteFailed, who="the routing",
                                  context="with route(...)")
        self.batch: Batch | None = None
        self.tokens: Tokens | None = None
        self._real: dict[torch.device, torch.Tensor] = {}

    def start(self, args: tuple, kwargs: dict) -> None:
        self.batch = self.stream.begin(args, kwargs)
        self.tokens = None if self.batch.shape is None else self.stream.tokens(self.batch)
        self._real = {}

    def end(self, failed: bool) -> None:
        if failed:
            self.stream.reset()  # a decode step cannot continue a forward that raised
        elif self.tokens is not None:
            self.stream.finish(self.batch, self.tokens)
        self.batch = self.tokens = None
        self._real = {}

    def real_on(self, device: torch.device) -> torch.Tensor:
        """(B * T,) bool, False for padding, on ``device`` (copied once per forward and device)."""
        if device not in self._real:
            self._real[device] = self.tokens.real.reshape(-1).to(device)
        return self._real[device]


def _selector(router: Any, k: int | None, log: Any, params: dict[str, Any]) -> Any:
    if isinstance(router, RouterConfig):
        if params or k is not None:
            raise InvalidParameter("pass the router's parameters either in the RouterConfig or as keywords, not both")
        return RegistrySelector(router.router, router.k, **router.param_dict)
    if isinstance(router, str):
        if router == "replay":
            if log is None:
                raise InvalidParameter('router "replay" needs log= (a RouterLog or its directory) with selections')
            if params or k is not None:
                raise InvalidParameter(f'router "replay" takes only log=, got {sorted(params) or ["k"]}')
            return ReplaySelector(log)
        if log is not None:
            raise InvalidParameter('log= is for router "replay" only')
        return RegistrySelector(router, k, **params)
    if callable(router):
        if params or k is not None or log is not None:
            raise InvalidParameter("a callable router takes no k=, log= or parameters: bind them in the callable")
        return CallableSelector(router)
    raise InvalidParameter(f"router must be a registry name (usmoe_lp.list_routers()), 'replay', a RouterConfig or a "
                           f"callable, got {type(router).__name__}")


def _find(model: nn.Module, layers: str | Sequence[str], module_pattern: str | None) -> list[RouterSpec]:
    if not isinstance(layers, str):  # a list may mix the encoder's and the decoder's routers (not a log's rule)
        wanted = list(layers)
        specs = _find(model, "auto", module_pattern)
        by_key = {key: s for s in specs for key in (s.name, s.path)}
        unknown = [w for w in wanted if w not in by_key]
        if unknown or not wanted:
            raise RouterNotFound(f"layers {unknown or '[]'} are not routers of {type(model).__name__}; routers: "
                                 f"{[s.name for s in specs]}")
        chosen = {by_key[w].path for w in wanted}
        return [s for s in specs if s.path in chosen]
    specs = find_routers(model, layers=layers, module_pattern=module_pattern)
    if layers == "auto" and specs and specs[0].stack == "encoder":  # an encoder-decoder model: route both stacks
        specs = specs + find_routers(model, layers="decoder", module_pattern=module_pattern)
    return specs


def _stack_module(model: nn.Module, stack: str) -> nn.Module:
    getter = {"encoder": "get_encoder", "decoder": "get_decoder"}.get(stack)
    if getter is None:
        return model
    module = getattr(model, getter, lambda: None)()
    if not isinstance(module, nn.Module) or module is model:
        raise UnsupportedModel(f"{type(model).__name__} has {stack} routers but no {getter}() returning its "
                               f"{stack} stack, whose forwards route() must see")
    return module


class Route:
    """The context manager :func:`route` returns: hooks, per-layer counts (:attr:`stats`) and the router."""

    def __init__(self, model: nn.Module, router: Any, *, k: int | None = None, weights: str = "model",
                 log: Any = None, layers: str | Sequence[str] = "auto", module_pattern: str | None = None,
                 on_select: Callable[[LiveContext, Selection], None] | None = None, **params: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if on_select is not None and not callable(on_select):
            raise InvalidParameter(f"on_select must be a callable (ctx, selection), got {type(on_select).__name__}")
        self.on_select = on_select
        self.model = model
        self.weight_rule = get_weight_rule(weights)
        if isinstance(router, str) and router == "replay" and weights != "model":
            raise InvalidParameter('router "replay" applies the weights the log recorded: leave weights="model"')
        self.selector = _selector(router, k, log, params)
        self.layers = [LiveLayer(model, spec) for spec in _find(model, layers, module_pattern)]
        if isinstance(self.selector, RegistrySelector):
            for layer in self.layers:
                self.selector.config(layer.info)  # every layer's parameters checked before any forward
        self._stacks = {s: _Stack(_stack_module(model, s), s) for s in dict.fromkeys(lay.spec.stack
                                                                                     for lay in self.layers)}
        self._undo: list[Callable[[], None]] = []
        self._entered = False

    # ------------------------------------------------------------------ context
    def __enter__(self) -> Route:
        if self._entered:
            raise RouteFailed("this route(...) object was already entered (a Route is entered once, and not nested "
                              "in itself); make a new one with route(...)")
        self._entered = True
        busy = [layer.spec.path for layer in self.layers if layer.spec.module in _ROUTED]
        if busy:
            raise RouteFailed(f"routers {busy} are already routed by another route(...) context; exit it first "
                              "(one route at a time per model)")
        try:
            for layer in self.layers:
                _ROUTED.add(layer.spec.module)
                self._undo.append(lambda module=layer.spec.module: _ROUTED.discard(module))
            for stack in self._stacks.values():
                self._undo.append(stack.module.register_forward_pre_hook(self._pre_hook(stack),
                                                                         with_kwargs=True).remove)
                # always_call: a forward that raises still ends (its tokens are forgotten, its stream reset)
                self._undo.append(stack.module.register_forward_hook(self._post_hook(stack), always_call=True).remove)
            for layer in self.layers:
                # prepend: the router's output is rewritten before any other hook (capture) reads it
                self._undo.append(layer.spec.module.register_forward_hook(self._router_hook(layer),
                                                                          prepend=True).remove)
                self._undo.append(layer.adapter.install(layer))
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._restore()

    def _restore(self) -> None:
        while self._undo:
            self._undo.pop()()
        for layer in self.layers:
            layer.pending = layer.pending_native = None

    # ------------------------------------------------------------------ results
    @property
    def stats(self) -> RouteStats:
        """Per-layer :class:`~usmoe_lp.live.stats.LayerStats` of every forward so far."""
        return RouteStats(tuple(layer.counter.freeze() for layer in self.layers))

    @property
    def label(self) -> str:
        """The router's label (``usmoe a=0.5 kbar=1.5 seq``, ``native``, ``replay``, a callable's name)."""
        return self.selector.label

    def set_batch(self, input_ids: Any = None, attention_mask: Any = None, *, stack: str | None = None) -> None:
        """Token ids and attention mask (B, T) of the next forward (of ``stack`` for an encoder-decoder model),
        for a model called without them (``inputs_embeds=``)."""
        names = list(self._stacks)
        name = stack if stack is not None else names[0]
        if name not in self._stacks:
            raise InvalidParameter(f"stack must be one of {names}, got {stack!r}")
        self._stacks[name].stream.set_batch(input_ids, attention_mask)

    # ------------------------------------------------------------------ hooks
    def _pre_hook(self, stack: _Stack):
        def hook(module, args, kwargs) -> None:
            for layer in self.layers:
                layer.pending = layer.pending_native = None
            stack.start(args, kwargs)
        return hook

    def _post_hook(self, stack: _Stack):
        def hook(module, args, output) -> None:
            stack.end(failed=output is None)  # torch hands an always-called hook None when the forward raised
        return hook

    def _router_hook(self, layer: LiveLayer):
        spec = layer.spec

        def hook(module, args, output):
            stack = self._stacks[spec.stack]
            tokens = stack.tokens
            if tokens is None:
                raise RouteFailed(f"router {spec.path!r} ran outside a forward of the model route() was given (or "
                                  "of its stack), so its tokens' padding and sequences are unknown: call the model "
                                  "itself, with input_ids= or inputs_embeds= (and route.set_batch(...))")
            logits = router_logits(output, spec, RouteFailed)
            B, T = tokens.real.shape
            if logits.numel() != B * T * spec.num_experts:
                raise RouteFailed(f"router {spec.path!r} gave {logits.numel() // spec.num_experts} rows for a batch of "
                                  f"{B}x{T} tokens")
            z = logits.detach().reshape(B, T, spec.num_experts)
            ids = stack.batch.input_ids
            ctx = LiveContext(layer=layer.info, real=tokens.real, sequence_ids=tokens.sequence_ids,
                              positions=tokens.positions, decode_step=tokens.decode_step,
                              token_ids=ids if ids is not None and tuple(ids.shape) == (B, T) else None)
            selection = self.selector.select(z, ctx)
            if self.on_select is not None:
                self.on_select(ctx, selection)
            rewritten = self._apply(layer, stack, z, selection, output)
            adapter_output = getattr(layer.adapter, "router_output", None)
            if adapter_output is not None:  # a family whose block reads the pairs from the router's output
                changed = adapter_output(layer, output if rewritten is None else rewritten)
                rewritten = rewritten if changed is None else changed
            return rewritten
        return hook

    def _apply(self, layer: LiveLayer, stack: _Stack, logits: torch.Tensor, selection: Selection, output: Any):
        """Turn a selection into the layer's pending experts call; returns the router's output rewritten (where the
        block or a capture reads the selection from it) or None.

        The rewritten output carries the (n, kmax + 1) expert indices and weights, the last column always "no
        expert" (index N, weight 0): what the experts run, in a form whose width says nothing about the model's k,
        so that a capture inside the route logs every forward as an (n, N) mask and weights."""
        spec = layer.spec
        B, T, N = logits.shape
        device = logits.device
        real = stack.real_on(device)
        mask = selection.mask
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (B, T, N):
            got = (f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__)
            raise ShapeMismatch(f"layer {spec.name!r}: router {self.label!r} selected {got}, not a (B, T, N) = "
                                f"{(B, T, N)} bool mask")
        flat = mask.to(device).reshape(-1, N) & real.unsqueeze(-1)  # padding never selected
        layer.counter.add(flat.sum(dim=-1), real, stack.tokens.decode_step)
        if selection.native and self.weight_rule.name == "model":
            layer.pending = _Pending(None, None, None, real)
            layer.pending_native = _Pending(None, None, flat, real)
            return None
        if selection.weights is not None:
            weights = selection.weights.to(device)
            if tuple(weights.shape) != (B, T, N):
                raise ShapeMismatch(f"layer {spec.name!r}: router {self.label!r} gave weights of shape "
                                    f"{tuple(weights.shape)}, not {(B, T, N)}")
        else:
            if selection.scores is None and self.weight_rule.name != "model":
                raise InvalidParameter(f"weights={self.weight_rule.name!r} needs the router's scores; router "
                                       f"{self.label!r} returned a mask only")
            scores = (selection.scores.to(device) if selection.scores is not None
                      else torch.zeros((B, T, N), dtype=torch.float64, device=device))
            weights = self.weight_rule.weights(logits, flat.reshape(B, T, N), scores, layer.info)
        index, packed = pack(flat, weights.reshape(-1, N), N)
        layer.pending = _Pending(index, packed, None, real)
        if spec.selection is not None and spec.selection_source == "router" and isinstance(output, tuple | list):
            w_at, i_at = spec.selection[:2]
            out = list(output)
            w_dtype = output[w_at].dtype if isinstance(output[w_at], torch.Tensor) else packed.dtype
            i_dtype = output[i_at].dtype if isinstance(output[i_at], torch.Tensor) else index.dtype
            out[w_at] = torch.cat([packed, packed.new_zeros(packed.shape[0], 1)], dim=1).to(w_dtype)
            out[i_at] = torch.cat([index, index.new_full((index.shape[0], 1), N)], dim=1).to(i_dtype)
            return type(output)(out) if isinstance(output, tuple) else out
        return None


def route(model: nn.Module, router: Any, *, k: int | None = None, weights: str = "model", log: Any = None,
          layers: str | Sequence[str] = "auto", module_pattern: str | None = None,
          on_select: Callable[[LiveContext, Selection], None] | None = None, **params: Any) -> Route:
    """A context manager that makes every MoE block of ``model`` route with ``router``.

    Args:
        model: a transformers MoE model (any family :func:`usmoe_lp.logs.find_routers` finds whose block an adapter
            of :mod:`usmoe_lp.live.adapters` fits), on any device, in any dtype.
        router: a registry name (:func:`usmoe_lp.list_routers`: ``"native"``, ``"tc"``, ``"usmoe"``, ...) with its
            parameters as keywords, a :class:`~usmoe_lp.routers.RouterConfig`, ``"replay"`` with ``log=`` (force
            the experts and weights a router log recorded), or a callable ``fn(logits (B, T, N), ctx:
            LiveContext)`` returning a (B, T, N) bool mask, a ``(mask, scores)`` pair or a
            :class:`~usmoe_lp.routing.Routing` (its ``weights`` are the scores); the scores, (B, T, N) float, are what
            ``weights="score"`` applies as they are and ``"reference"`` normalises (``"model"`` ignores them), so a
            mask alone takes ``weights="model"``. Padding is dropped from whatever a callable selects.
        k: the model's experts per token, the budget unit (default: each layer's top_k).
        weights: the combine-weight rule, ``"model"``, ``"reference"`` or ``"score"`` (:mod:`usmoe_lp.live.weights`).
        log: the router log replayed by ``"replay"``.
        layers, module_pattern: which routers, as for :func:`usmoe_lp.logs.capture` (``"auto"``: every router;
            both stacks of an encoder-decoder model; a list may name routers of both stacks).
        on_select: called as ``on_select(ctx, selection)`` with each layer's :class:`LiveContext` and
            :class:`Selection` of every forward (to record the routing, as ``evaluate`` does for decode mismatch).
        **params: the router's parameters (``kbar=1.5, alpha=0.5, scope="sequence"``).

    Returns:
        A :class:`Route`: enter it with ``with``; :attr:`Route.stats` reports, per layer, the realised pairs, k-bar,
        experts-per-token histogram, dropped tokens and expert rows computed.

    Errors are raised up front (unknown router or parameter, naming the routers that take it; k-bar above N;
    ``"replay"`` without ``log=``; an unknown ``weights`` rule; a model without routable blocks) or by the forward
    that cannot be routed (:class:`RouteFailed`: a router called outside a forward of ``model``, a decode step that
    continues no sequence of the route; :class:`~usmoe_lp.errors.ShapeMismatch`: a callable's wrong shape, a
    replay past the end of its log or on other token ids).
    """
    return Route(model, router, k=k, weights=weights, log=log, layers=layers, module_pattern=module_pattern,
                 on_select=on_select, **params)
