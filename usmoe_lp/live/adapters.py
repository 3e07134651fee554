"""Where a family's MoE block runs its experts, and how live routing puts its own selection there.

An adapter makes one MoE block run the experts a live router chose (:class:`usmoe_lp.live.route.LiveLayer`'s
``pending`` selection) with the model's own expert weights. Which adapter a family takes is data
(:data:`FAMILY_ADAPTERS`), as capture's discovery is; the default is :class:`FusedExperts`.

* :class:`FusedExperts`: the block hands its ``experts`` module ``(hidden (n, d), top_k_index (n, k),
  top_k_weights (n, k))`` (positionally or by keyword; found by what they are: the integer tensor and the float
  tensor of the same shape), the transformers 5 layout of Mixtral, OLMoE, Qwen-MoE, DeepSeek, DBRX and most
  families. The experts module's ``forward`` is wrapped for the context: the model's index and weight tensors are
  replaced by the router's and :func:`usmoe_lp.live.dispatch.run_experts` computes only the selected pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from usmoe_lp.live.dispatch import run_experts

__all__ = ["FAMILY_ADAPTERS", "FusedExperts", "UnsupportedModel", "adapter_for"]


class UnsupportedModel(ValueError):
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


class FusedExperts:
    """The block's ``experts`` child takes (hidden, top_k_index, top_k_weights) (module docstring)."""

    name = "fused experts (hidden, top_k_index, top_k_weights)"

    def __init__(self, experts: nn.Module) -> None:
        self.experts = experts

    def install(self, layer: Any) -> Callable[[], None]:
        """Wrap the experts module's forward for ``layer``; returns the function that restores it."""
        experts = self.experts
        had = "forward" in experts.__dict__
        saved = experts.__dict__.get("forward")
        original = experts.forward
        num_experts = layer.info.num_experts

        def forward(*args, **kwargs):
            pending, layer.pending = layer.pending, None
            if pending is None:  # not a routed forward of this layer (e.g. called by hand)
                return original(*args, **kwargs)
            hidden_key, index_key, weights_key = _experts_inputs(args, kwargs)
            if index_key is None or weights_key is None or hidden_key is None:
                raise UnsupportedModel(f"layer {layer.info.name!r}: its experts module "
                                       f"({type(experts).__name__}) was not called with (hidden states, (n, k) expert "
                                       "indices, (n, k) weights); route() cannot put its selection there")
            model_index = _get(args, kwargs, index_key)
            if pending.index is None:  # the model's own selection runs unchanged
                layer.account_native(model_index)
                return original(*args, **kwargs)
            hidden = _get(args, kwargs, hidden_key)
            weights = pending.weights.to(_get(args, kwargs, weights_key).dtype)

            def call(h: torch.Tensor, i: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                a, kw = _put(args, kwargs, {hidden_key: h, index_key: i, weights_key: w})
                return original(*a, **kw)

            flat = hidden.reshape(-1, hidden.shape[-1])  # DBRX hands its experts (B, T, d)
            out, rows = run_experts(call, flat, pending.index, weights, num_experts)
            layer.counter.rows_computed += rows
            return out.reshape(hidden.shape)

        experts.forward = forward

        def restore() -> None:
            if had:
                experts.forward = saved
            else:
                del experts.forward
        return restore


FAMILY_ADAPTERS: dict[str, Callable[[nn.Module, nn.Module, Any], Any]] = {}
"""model_type -> ``make(model, block, spec)`` returning the adapter of a family whose block does not take the
default :class:`FusedExperts` layout."""


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
