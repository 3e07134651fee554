"""Where a family's MoE block runs its experts, and how live routing puts its own selection there.

An adapter makes one MoE block run the experts a live router chose (:class:`usmoe_lp.live.route.LiveLayer`'s
``pending`` selection: (n, kmax) expert indices, N = no expert, and (n, kmax) weights; or None for "the model's own
selection runs unchanged", ``native``) with the model's own expert weights, computing only the selected
token-expert pairs and counting them in ``layer.counter.rows_computed``. Under ``native`` the adapter leaves the
model's computation untouched and reports the model's own selection (``LiveLayer.account_native``) with the expert
rows the model really computes. Which adapter a family takes is data (:data:`FAMILY_ADAPTERS`, model_type ->
factory), as capture's discovery is; the default is :class:`FusedExperts`. Each adapter's ``install(layer)``
wraps what it needs for the context and returns the function that undoes it.

* :class:`FusedExperts` (default): the block hands its ``experts`` module ``(hidden (n, d), top_k_index (n, k),
  top_k_weights (n, k))`` (positionally or by keyword; found by what they are: the integer tensor and the float
  tensor of the same shape), the transformers 5 layout of Mixtral, OLMoE, Qwen-MoE, DeepSeek, DBRX, GPT-OSS, Jamba,
  PhiMoE and most families. The experts module's ``forward`` is wrapped for the context: the model's index and
  weight tensors are replaced by the router's and :func:`usmoe_lp.live.dispatch.run_experts` computes only the
  selected pairs with the module's own implementation.
* :class:`OneHotExperts` (Switch Transformers): the experts take ``(hidden (n, d), dispatch (n, k, N) one-hot,
  weights (n, k))`` (k = 1 in the model; a token dropped by the capacity has an all-zero row). The router's
  selection is handed over as the one-hot of its indices, through the same pair dispatch.
* :class:`NllbExperts` (NLLB-MoE): the block hands its experts the router's (n, N) 0/1 top-1 dispatch mask and
  (n, N) combine weights; its experts module (transformers 5.x) one-hot-encodes the *values* of that mask, so the
  modules ``expert_0`` and ``expert_1`` run on every token (``expert_0`` once per expert the token did not take as
  its top-1, weighted by that expert's gate) instead of the experts the router selected. ``native`` runs that
  unchanged (bitwise the model; rows counted: n N) and checks the router's selection (the experts with a non-zero
  combine weight). Any other router hands the module its (n, k) expert indices, whose values are then the experts
  that run: each expert ``experts[f"expert_{j}"]`` on its selected rows, times the weight, with the module's own
  eval-time ``moe_token_dropout`` scaling.
* :class:`SortedPairs` (JetMoE): the router itself returns the token-expert pairs sorted by expert
  (``index_sorted_experts`` (n k,) flat slots, ``batch_index`` (n k,) tokens, ``batch_gates`` (n k,) weights,
  ``expert_size`` per-expert counts, logits), and the block (the MLP's ``JetMoeMoE`` or the attention's
  ``JetMoeMoA``) computes exactly those pairs: the router's output is rewritten with the live selection's pairs.
  JetMoE's attention experts (MoA) give each token ``top_k`` query slots (its attention heads), so a router that
  gives a token more than ``top_k`` experts cannot route them (:class:`UnsupportedModel` at that forward; route
  the MLP routers only with ``layers=``); fewer is fine (an empty slot's attention output is never read).
* :class:`DenseExperts` (Llama-4): the router returns (n, N) dense weights (the sigmoid of the selected logits, 0
  elsewhere), the block scales each token's input by them and runs every expert on every token (rows: n N). The
  router's weights are rewritten with the live selection's (so the model's rule, weight times *input*, is kept), and
  the experts module's forward computes only the selected pairs, each expert on its own rows with the module's own
  forward (:func:`torch.func.functional_call` on that expert's slice of the stacked weights).
* :class:`PaddedPairs` (LongCat-Flash): :class:`FusedExperts`, but the experts' eager loop cannot take k = 1 (its
  ``squeeze(0)`` drops the slot axis), so a pair call gets a second slot with weight 0 on a zero-computation
  (identity) expert, which multiplies no weights (on the same expert again, counted as rows, when the model has no
  zero-computation experts).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from usmoe_lp.errors import UsmoeLpError
from usmoe_lp.live.dispatch import pack, run_experts

__all__ = ["FAMILY_ADAPTERS", "DenseExperts", "FusedExperts", "NllbExperts", "OneHotExperts", "PaddedPairs",
           "SortedPairs", "UnsupportedModel", "adapter_for"]


class UnsupportedModel(UsmoeLpError, ValueError):
    """The model's MoE blocks cannot be routed live (the message says why and what would)."""


def _experts_inputs(args: tuple, kwargs: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """(key of the hidden states, key of the (n, k) expert indices, key of the (n, k) weights) among an experts
    module's arguments; a key is a position (int) or a keyword (str). None where not found."""
    items = [*enumerate(args), *kwargs.items()]
    tensors = [(key, v) for key, v in items if isinstance(v, torch.Tensor)]
    hidden = tensors[0][0] if tensors and tensors[0][1].is_floating_point() else None
    index = next((key for key, v in tensors if not v.is_floating_point() and v.ndim == 2), None)
    if index is None:
        return hidden, None, None
    shape = dict(tensors)[index].shape
    weights = next((key for key, v in tensors if key not in (hidden, index) and v.is_floating_point()
                    and v.shape == shape), None)
    return hidden, index, weights


def _get(args: tuple, kwargs: Mapping[str, Any], key: Any) -> Any:
    return args[key] if isinstance(key, int) else kwargs[key]


def _put(args: tuple, kwargs: dict[str, Any], values: Mapping[Any, Any]) -> tuple[tuple, dict[str, Any]]:
    a, kw = list(args), dict(kwargs)
    for key, value in values.items():
        if isinstance(key, int):
            a[key] = value
        else:
            kw[key] = value
    return tuple(a), kw


def _account_native(layer: Any, index: torch.Tensor, rows: int) -> None:
    """``layer.account_native(index)`` for a model whose experts compute ``rows`` expert rows, not one per selected
    pair (NLLB-MoE, Llama-4: every token through several experts); the difference is added on the device."""
    layer.account_native(index)
    n = layer.info.num_experts
    layer.counter.add_native(rows - ((index >= 0) & (index < n)).sum(), None)


def _wrap_forward(module: nn.Module, forward: Callable) -> Callable[[], None]:
    """Set ``module.forward`` to ``forward`` for the context; returns the function that restores it."""
    had = "forward" in module.__dict__
    saved = module.__dict__.get("forward")
    module.forward = forward

    def restore() -> None:
        if had:
            module.forward = saved
        else:
            del module.forward
    return restore


def _experts_of(block: nn.Module | None, spec: Any) -> nn.Module:
    experts = getattr(block, "experts", None) if block is not None else None
    if not isinstance(experts, nn.Module):
        raise UnsupportedModel(f"router {spec.path!r}: its MoE block ({type(block).__name__}) has no experts module")
    return experts


class FusedExperts:
    """The block's ``experts`` child takes (hidden, top_k_index, top_k_weights) (module docstring).

    What a layout changes is in four methods: :meth:`locate` (where the three inputs are), :meth:`native` (the
    model's own selection, reported to the layer), :meth:`encode` (the (m, k) indices as the module takes them) and
    :meth:`pair_call` (the call :func:`usmoe_lp.live.dispatch.run_experts` makes).
    """

    name = "fused experts (hidden, top_k_index, top_k_weights)"

    def __init__(self, experts: nn.Module) -> None:
        self.experts = experts

    def locate(self, args: tuple, kwargs: Mapping[str, Any]) -> tuple[Any, Any, Any]:
        """Keys (position or keyword) of the hidden states, the expert indices and the weights in the call."""
        return _experts_inputs(args, kwargs)

    def native(self, layer: Any, model_index: torch.Tensor, model_weights: torch.Tensor) -> None:
        """Report the model's own selection (the (n, k) indices it hands its experts) to ``layer``."""
        layer.account_native(model_index)

    def encode(self, index: torch.Tensor, model_index: torch.Tensor) -> torch.Tensor:
        """(m, k) int64 expert indices (all real) as the module takes them (here: as they are)."""
        return index

    def pair_call(self, call: Callable, layer: Any) -> Callable:
        """The experts call :func:`run_experts` makes (here: ``call`` itself)."""
        return call

    def install(self, layer: Any) -> Callable[[], None]:
        """Wrap the experts module's forward for ``layer``; returns the function that restores it."""
        experts = self.experts
        original = experts.forward
        num_experts = layer.info.num_experts

        def forward(*args, **kwargs):
            pending, layer.pending = layer.pending, None
            if pending is None:  # not a routed forward of this layer (e.g. called by hand)
                return original(*args, **kwargs)
            hidden_key, index_key, weights_key = self.locate(args, kwargs)
            if index_key is None or weights_key is None or hidden_key is None:
                raise UnsupportedModel(f"layer {layer.info.name!r}: its experts module ({type(experts).__name__}) "
                                       f"was not called as {self.name}; route() cannot put its selection there")
            model_index = _get(args, kwargs, index_key)
            if pending.index is None:  # the model's own selection runs unchanged
                self.native(layer, model_index, _get(args, kwargs, weights_key))
                return original(*args, **kwargs)
            hidden = _get(args, kwargs, hidden_key)
            weights = pending.weights.to(_get(args, kwargs, weights_key).dtype)

            def call(h: torch.Tensor, i: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                a, kw = _put(args, kwargs, {hidden_key: h, index_key: self.encode(i, model_index), weights_key: w})
                return original(*a, **kw)

            flat = hidden.reshape(-1, hidden.shape[-1])  # DBRX hands its experts (B, T, d)
            out, rows = run_experts(self.pair_call(call, layer), flat, pending.index, weights, num_experts)
            layer.counter.rows_computed += rows
            return out.reshape(hidden.shape)

        undo = [_wrap_forward(experts, forward)]
        if getattr(layer.spec, "selection_source", None) == "experts":
            undo.append(experts.register_forward_pre_hook(self._show_selection(layer), with_kwargs=True,
                                                          prepend=True).remove)

        def restore() -> None:
            for u in reversed(undo):
                u()
        return restore

    def _show_selection(self, layer: Any) -> Callable:
        """A pre-hook, first of the experts module's, that puts the route's selection into the call's arguments
        (the (n, kmax + 1) indices and weights, the last column "no expert", as the router output of the other
        families carries them), for a block that computes its selection itself (DBRX): a capture reading the
        experts' inputs logs the routing applied."""
        num_experts = layer.info.num_experts

        def hook(module, args, kwargs):
            pending = layer.pending
            if pending is None or pending.index is None:
                return None
            _, index_key, weights_key = self.locate(args, kwargs)
            if index_key is None or weights_key is None:
                return None
            model_index, model_weights = _get(args, kwargs, index_key), _get(args, kwargs, weights_key)
            index = torch.cat([pending.index, pending.index.new_full((pending.index.shape[0], 1), num_experts)], 1)
            weights = torch.cat([pending.weights, pending.weights.new_zeros(pending.weights.shape[0], 1)], 1)
            return _put(args, kwargs, {index_key: index.to(model_index.dtype),
                                       weights_key: weights.to(model_weights.dtype)})
        return hook


class OneHotExperts(FusedExperts):
    """Switch Transformers: experts called with (hidden (n, d), dispatch (n, k, N) one-hot, weights (n, k))."""

    name = "one-hot experts (hidden, dispatch (n, k, N), weights (n, k))"

    def locate(self, args: tuple, kwargs: Mapping[str, Any]) -> tuple[Any, Any, Any]:
        tensors = [(key, v) for key, v in [*enumerate(args), *kwargs.items()] if isinstance(v, torch.Tensor)]
        hidden = tensors[0][0] if tensors and tensors[0][1].is_floating_point() else None
        index = next((key for key, v in tensors if not v.is_floating_point() and v.ndim == 3), None)
        if index is None:
            return hidden, None, None
        shape = dict(tensors)[index].shape[:2]
        weights = next((key for key, v in tensors if key not in (hidden, index) and v.is_floating_point()
                        and v.shape == shape), None)
        return hidden, index, weights

    def native(self, layer: Any, model_index: torch.Tensor, model_weights: torch.Tensor) -> None:
        n = model_index.shape[-1]
        hit = model_index != 0  # (n, k, N); an all-zero row: dropped by the capacity
        index = torch.where(hit.any(dim=-1), hit.to(torch.int8).argmax(dim=-1), torch.full_like(hit[..., 0], n,
                                                                                           dtype=torch.int64))
        layer.account_native(index)

    def encode(self, index: torch.Tensor, model_index: torch.Tensor) -> torch.Tensor:
        n = model_index.shape[-1]
        return nn.functional.one_hot(index, num_classes=n).to(model_index.dtype)


class NllbExperts(FusedExperts):
    """NLLB-MoE: experts called with (hidden (n, d), top-1 mask (n, N) 0/1, combine weights (n, N)) (module
    docstring); other routers hand them (n, k) expert indices, which the module indexes its experts by."""

    name = "NLLB-MoE experts (hidden, router_mask, router_probs)"

    def native(self, layer: Any, model_index: torch.Tensor, model_weights: torch.Tensor) -> None:
        n = model_weights.shape[-1]
        selected = model_weights != 0  # the router's top-1 and top-2 within the capacity, padding none
        index, _ = pack(selected, model_weights, n)
        _account_native(layer, index, rows=model_weights.numel())  # expert_0 / expert_1 on every (token, expert)


class PaddedPairs(FusedExperts):
    """LongCat-Flash: :class:`FusedExperts` whose experts take k >= 2 only (module docstring)."""

    def __init__(self, experts: nn.Module, pad_expert: int | None) -> None:
        super().__init__(experts)
        self.pad_expert = pad_expert

    def pair_call(self, call: Callable, layer: Any) -> Callable:
        def widened(h: torch.Tensor, i: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            if i.shape[1] != 1:
                return call(h, i, w)
            if self.pad_expert is None:  # the same expert again, weight 0: computed, so counted
                layer.counter.rows_computed += i.shape[0]
                pad = i
            else:
                pad = torch.full_like(i, self.pad_expert)
            return call(h, torch.cat([i, pad], dim=1), torch.cat([w, torch.zeros_like(w)], dim=1))
        return widened


class SortedPairs:
    """JetMoE: the router returns the pairs sorted by expert, which its block computes (module docstring)."""

    name = "router output of pairs sorted by expert (JetMoE)"

    def __init__(self, router: nn.Module, top_k: int, slots: bool) -> None:
        self.router = router
        self.top_k = top_k
        self.slots = slots  # JetMoE's attention: every token has top_k slots, a selection must fit them

    def install(self, layer: Any) -> Callable[[], None]:
        """Nothing to wrap: the block computes the pairs the router's output lists (:meth:`router_output`)."""
        return lambda: None

    def router_output(self, layer: Any, output: Any) -> Any:
        """The router's output listing the route's pairs (route's router hook calls it, before any other hook, so
        a capture reads the pairs that run); None when the model's own pairs run."""
        num_experts = layer.info.num_experts
        pending, layer.pending = layer.pending, None
        if pending is None:
            return None
        slots, _, gates, sizes, logits = output
        n = logits.shape[0]
        if pending.index is None:  # native: the model's (n, k) selection from its sorted pairs
            expert = torch.repeat_interleave(torch.arange(num_experts, device=slots.device),
                                             torch.as_tensor(sizes, device=slots.device))
            index = torch.full((slots.numel(),), num_experts, dtype=torch.int64, device=slots.device)
            index[slots] = expert
            layer.account_native(index.reshape(n, -1))
            return None
        index, weights = pending.index, pending.weights
        if self.slots and index.shape[1] > self.top_k:
            raise UnsupportedModel(f"layer {layer.info.name!r}: JetMoE's attention experts give each token "
                                   f"{self.top_k} query slots, but the router gave a token {index.shape[1]} "
                                   "experts; route the MLP routers only (layers=[...])")
        token, slot = (index < num_experts).nonzero(as_tuple=True)
        expert = index[token, slot]
        order = torch.argsort(expert, stable=True)
        token, slot, expert = token[order], slot[order], expert[order]
        width = self.top_k if self.slots else index.shape[1]
        counts = torch.bincount(expert, minlength=num_experts).tolist()
        layer.counter.rows_computed += int(token.numel())
        return (token * width + slot, token, weights[token, slot].to(gates.dtype), counts, *output[4:])


class DenseExperts:
    """Llama-4: dense (n, N) router weights scale every expert's input; only the selected pairs are computed
    (module docstring)."""

    name = "dense router weights and experts on every token (Llama-4)"

    def __init__(self, router: nn.Module, experts: nn.Module) -> None:
        self.router = router
        self.experts = experts

    def install(self, layer: Any) -> Callable[[], None]:
        experts = self.experts
        original = experts.forward
        num_experts = layer.info.num_experts
        state: dict[str, torch.Tensor] = {}

        def router_output(lay: Any, output: Any) -> Any:
            pending, layer.pending = layer.pending, None
            state.clear()
            if pending is None:
                return None
            scores = output[0]  # (n, N), 0 off the selection
            if pending.index is None:  # native: every expert runs on every token
                index, _ = pack(scores != 0, scores, num_experts)
                _account_native(layer, index, rows=scores.numel())
                return None
            dense = torch.zeros(scores.shape[0], num_experts + 1, dtype=scores.dtype, device=scores.device)
            dense.scatter_(1, pending.index, pending.weights.to(scores.dtype))  # index N: the dropped column
            state["index"] = pending.index
            return (dense[:, :num_experts], *output[1:])

        def forward(*args, **kwargs):
            index = state.pop("index", None)
            if index is None:  # not routed (or one expert's call below)
                return original(*args, **kwargs)
            hidden = args[0] if args else next(iter(kwargs.values()))
            x = hidden.reshape(num_experts, -1, hidden.shape[-1])  # (N, n, d): token i's input to expert j
            out = torch.zeros_like(x)
            token, slot = (index < num_experts).nonzero(as_tuple=True)
            expert = index[token, slot]
            stacked = {name: p for name, p in experts.named_parameters(recurse=False)
                       if p.ndim and p.shape[0] == num_experts}
            for j in torch.unique(expert).tolist():
                rows = token[expert == j]
                one = {name: p[j:j + 1] for name, p in stacked.items()}
                out[j, rows] = torch.func.functional_call(experts, one, (x[j, rows],)).reshape(rows.numel(), -1)
            layer.counter.rows_computed += int(token.numel())
            return out.reshape(hidden.shape[0], -1)

        self.router_output = router_output
        restore_forward = _wrap_forward(experts, forward)

        def restore() -> None:
            restore_forward()
            self.__dict__.pop("router_output", None)
        return restore


def _longcat(model: nn.Module, block: nn.Module | None, spec: Any) -> PaddedPairs:
    experts = _experts_of(block, spec)
    routed, zero = getattr(experts, "num_routed_experts", None), getattr(experts, "zero_expert_num", 0)
    return PaddedPairs(experts, routed if isinstance(routed, int) and zero else None)


def _jetmoe(model: nn.Module, block: nn.Module | None, spec: Any) -> SortedPairs:
    attention = callable(getattr(block, "map", None)) and callable(getattr(block, "reduce", None))  # JetMoeMoA
    return SortedPairs(spec.module, spec.top_k, slots=attention)


FAMILY_ADAPTERS: dict[str, Callable[[nn.Module, nn.Module | None, Any], Any]] = {
    "switch_transformers": lambda model, block, spec: OneHotExperts(_experts_of(block, spec)),
    "nllb-moe": lambda model, block, spec: NllbExperts(_experts_of(block, spec)),
    "jetmoe": _jetmoe,
    "llama4_text": lambda model, block, spec: DenseExperts(spec.module, _experts_of(block, spec)),
    "llama4": lambda model, block, spec: DenseExperts(spec.module, _experts_of(block, spec)),
    "longcat_flash": _longcat,
}
"""model_type -> ``make(model, block, spec)`` returning the adapter of a family whose block does not take the
default :class:`FusedExperts` layout (module docstring)."""


def adapter_for(model: nn.Module, block: nn.Module | None, spec: Any) -> Any:
    """The adapter of the MoE block ``block`` holding router ``spec``; :class:`UnsupportedModel` when none fits."""
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family in FAMILY_ADAPTERS:
        return FAMILY_ADAPTERS[family](model, block, spec)
    experts = getattr(block, "experts", None) if block is not None else None
    if isinstance(experts, nn.Module) and not isinstance(experts, nn.ModuleList | nn.ModuleDict):
        return FusedExperts(experts)
    raise UnsupportedModel(
        f"router {spec.path!r} of {type(model).__name__} ({family or 'no transformers family'}): its MoE block has "
        "no fused experts module taking (hidden, top_k_index, top_k_weights), and no adapter is declared for the "
        "family in usmoe_lp.live.adapters.FAMILY_ADAPTERS")
