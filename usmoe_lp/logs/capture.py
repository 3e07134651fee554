"""Capture router logits from a live torch model into a router log, with forward hooks.

>>> with capture(model, "run/log") as cap:          # doctest: +SKIP
...     cap.run(dataloader)                          # each batch: a dict of model(**batch) kwargs

Discovery (:func:`find_routers`), in this order:

1. ``module_pattern=``: every module whose full name matches the regex (``re.fullmatch``), e.g.
   ``r"model\\.layers\\.\\d+\\.mlp\\.gate"``. A module of a known transformers router class gives its
   logits entry; any other module must return the logits (a tensor, or a tuple whose first
   element is the logits).
2. transformers models: the model's own ``_can_record_outputs["router_logits"]`` recorders (the
   router class and the index of the logits in its output), so the logged tensor is exactly what
   ``output_router_logits=True`` returns: raw ``x·Wᵀ (+b)`` before any softmax, sigmoid or
   selection bias. This covers every MoE family of the installed transformers with a router
   module (Mixtral, OLMoE, Qwen2/3-MoE, DeepSeek-V2/V3, GPT-OSS, Granite-MoE, PhiMoE, Jamba,
   DBRX, Switch Transformers, NLLB-MoE, ...).
3. Structural fallback: inside each module with an ``experts`` child (N experts: a ModuleList
   of N, or an ``num_experts`` attribute), the one ``nn.Linear`` (outside the experts) with
   ``out_features == N``.

Nothing found raises :class:`RouterNotFound`, whose message says how to point at the router.

Routing semantics: each layer's :class:`LayerInfo` records how the model's router selects and weights its experts
(score function, what its top-k ranks and in which dtype, selection bias, group limits, expert capacity, combine
weights, shared experts), so that the registry's ``native`` router replays the selection from the logits. What a
family's code fixes is data (:data:`FAMILY_SCORE_FUNCTIONS`, :data:`FAMILY_ROUTING`); what the model holds is read
from its modules: the router's ``norm_topk_prob``, ``routed_scaling_factor`` / ``router_scaling_factor``,
``num_group`` / ``topk_group`` (and DeepSeek-V2's ``topk_method``), Switch's ``expert_capacity``, the bias
(:data:`SELECTION_BIAS_ATTRS`) and its dtype, the shared experts (:data:`SHARED_EXPERT_MODULES`). Not recorded:
NLLB-MoE's eval capacity ``ceil(moe_eval_capacity_token_fraction * tokens of the forward)``, which drops nothing at
the default fraction 1, and its random second-expert policies (``second_expert_policy`` other than ``"all"``).

Per forward of the top model, each router's output is copied (to pinned CPU memory with
``non_blocking=True`` on CUDA), padding rows are dropped with the attention mask, and the real
tokens are appended to a :class:`RouterLogWriter` with their token ids, sequence ids (a running
counter over batch rows, across batches) and positions (real tokens before the token in its row,
so left padding still starts at 0). Logits keep the dtype the router produced (bf16 included).
Hooks only read; the model's outputs are unchanged. Encoder-decoder models (Switch, NLLB-MoE)
have two token streams, so one log holds one stack: ``layers="auto"`` takes the encoder,
``layers="decoder"`` the decoder (tokens from ``decoder_input_ids`` / ``decoder_attention_mask``).
``generate()`` with a KV cache works. The cache is found among the forward's arguments by what it is
(a ``transformers.cache_utils.Cache``, or any object with ``get_seq_length()``), whatever carries it
(``cache=`` as transformers >= 5.24 passes it, ``past_key_values=``, a positional argument), with or
without ``cache_position``. A forward whose cache is empty (or that has none) starts new sequences. A
forward whose cache already holds tokens is a decode step: the cache must be the one the previous
logged forward filled, untouched since (same object, same length, same tensors, same batch size);
then its tokens (the new columns of the attention mask, all of them when there is no mask) get the
rows' sequence ids and the positions after their real tokens so far, so a prompt and its generated
tokens form one sequence of the log. Any other decode step (a cache filled outside the capture, a
changed batch size, a cache cropped by assisted decoding or reordered by beam search) raises
:class:`CaptureFailed` saying why. The last token ``generate()`` returns never goes through the
model, so it has no router logits. The same holds
for the decoder of an encoder-decoder model (``layers="decoder"``): each decode step continues its
row's decoder sequence (the decoder start token at position 0). ``generate()`` runs the encoder
outside the model's forward, so an encoder log (``layers="auto"``) gets nothing from it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from usmoe_lp.logs.errors import LogError
from usmoe_lp.logs.format import SCORE_FUNCTIONS, LayerInfo, ModelInfo, _is_int, _is_number
from usmoe_lp.logs.reader import RouterLog
from usmoe_lp.logs.stream import Batch, TokenStream
from usmoe_lp.logs.writer import RouterLogWriter, _device_name

__all__ = ["Capture", "CaptureFailed", "RouterNotFound", "RouterSpec", "capture", "find_routers"]


class RouterNotFound(LogError, LookupError):
    """No router could be found in the model (or the given ``layers`` / ``module_pattern`` matched none)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CaptureFailed(LogError, RuntimeError):
    """A forward pass could not be logged: router outputs that do not match the batch, no batch info, ..."""


# model_type -> the family's routing distribution (LayerInfo.score_function): "softmax": softmax over all experts,
# then top-k; "sigmoid": sigmoid (+ selection bias), then top-k; "softmax_topk": top-k on the logits, then softmax
# over the k selected (PhiMoE: top-2 of the logits in eval, its sparsemixer weights; Llama-4: top-k of the logits,
# sigmoid weights, see FAMILY_ROUTING)
FAMILY_SCORE_FUNCTIONS: dict[str, str] = {
    "mixtral": "softmax", "olmoe": "softmax", "qwen2_moe": "softmax", "qwen3_moe": "softmax",
    "qwen3_next": "softmax", "qwen3_5_moe_text": "softmax", "qwen3_vl_moe_text": "softmax",
    "deepseek_v2": "softmax", "deepseek_v3": "sigmoid", "deepseek_v32": "sigmoid",
    "gpt_oss": "softmax_topk", "granitemoe": "softmax_topk", "granitemoeshared": "softmax_topk",
    "granitemoehybrid": "softmax_topk", "granitemoe_swa": "softmax_topk", "jetmoe": "softmax_topk",
    "jamba": "softmax", "dbrx": "softmax", "switch_transformers": "softmax", "nllb-moe": "softmax",
    "minimax": "softmax", "minimax_m2": "sigmoid", "hunyuan_v1_moe": "softmax", "flex_olmo": "softmax",
    "glm4_moe": "sigmoid", "glm4_moe_lite": "sigmoid", "dots1": "sigmoid", "aria_text": "softmax_topk",
    "phimoe": "softmax_topk", "llama4_text": "sigmoid", "ernie4_5_moe": "softmax", "lfm2_moe": "sigmoid",
    "exaone_moe": "sigmoid", "hy_v3": "sigmoid", "mellum": "softmax", "longcat_flash": "softmax",
    # cohere2_moe: from its router's expert_selection_fn (FAMILY_ROUTING)
}
# model_type -> how the family's router selects and weights, as its code fixes it (what the model holds in its modules
# is read from them: norm_topk_prob, routed/router_scaling_factor, num_group/topk_group, expert_capacity, the bias):
#   score_dtype: where the dtype its selection scores are ranked in comes from: "float32" (the router computes in
#     float32 whatever the model's dtype), "logits" (the dtype of the router's weight: it scores in the logits'
#     dtype) or "model" (the dtype of the model's hidden states, to which Switch and NLLB cast their probabilities);
#     promoted with the selection bias's dtype where there is one (the model adds the bias in that dtype);
#   LayerInfo fields the code fixes (selection_score, weight_function, norm_topk_prob, group_score);
#   "capacity": the router's expert_capacity attribute drops tokens beyond it in position order (Switch);
#   "attrs": router attribute -> {its value -> LayerInfo fields it implies}; "norm_p_attr": the MoE block's attribute
#     holding the p of the weights' norm (None: not normalised; DBRX); "eps_attr": the router's sparsemixer threshold.
# Not modelled (documented in the module docstring): NLLB-MoE's eval capacity when moe_eval_capacity_token_fraction < 1
# and its random second-expert policies.
FAMILY_ROUTING: dict[str, dict[str, Any]] = {
    "mixtral": {"score_dtype": "float32", "norm_topk_prob": True},
    "olmoe": {"score_dtype": "float32"}, "qwen2_moe": {"score_dtype": "float32"},
    "qwen3_moe": {"score_dtype": "float32"}, "qwen3_next": {"score_dtype": "float32"},
    "flex_olmo": {"score_dtype": "float32"}, "mellum": {"score_dtype": "float32"},
    "deepseek_v2": {"score_dtype": "float32", "norm_topk_prob": False, "group_score": "max",
                    "attrs": {"topk_method": {"greedy": {"n_group": 1, "topk_group": None},
                                              "group_limited_greedy": {}}}},
    "deepseek_v3": {"score_dtype": "float32", "group_score": "top2_sum"},
    "deepseek_v32": {"score_dtype": "float32", "group_score": "top2_sum"},
    "glm4_moe": {"score_dtype": "float32", "group_score": "top2_sum"},
    "dots1": {"score_dtype": "float32", "group_score": "top2_sum"},
    "exaone_moe": {"score_dtype": "float32", "group_score": "top2_sum"},
    "gpt_oss": {"score_dtype": "logits"}, "aria_text": {"score_dtype": "logits"},
    "granitemoe": {"score_dtype": "float32"}, "granitemoeshared": {"score_dtype": "float32"},
    "granitemoe_swa": {"score_dtype": "float32"}, "jetmoe": {"score_dtype": "float32"},
    "phimoe": {"score_dtype": "logits", "weight_function": "sparsemixer", "norm_topk_prob": False,
               "eps_attr": "router_jitter_noise"},
    "jamba": {"score_dtype": "float32", "norm_topk_prob": False},
    "dbrx": {"score_dtype": "logits", "norm_p_attr": "moe_normalize_expert_weights"},
    "switch_transformers": {"score_dtype": "model", "norm_topk_prob": False, "capacity": True},
    "nllb-moe": {"score_dtype": "model", "norm_topk_prob": True},
    "llama4_text": {"score_dtype": "logits", "selection_score": "logits", "weight_function": "sigmoid",
                    "norm_topk_prob": False},
    "minimax_m2": {"score_dtype": "float32", "norm_topk_prob": True},
    "minimax": {"score_dtype": "float32", "norm_topk_prob": True},
    "qwen3_5_moe_text": {"score_dtype": "float32", "norm_topk_prob": True},
    "qwen3_vl_moe_text": {"score_dtype": "float32", "norm_topk_prob": True},
    "hunyuan_v1_moe": {"score_dtype": "float32", "norm_topk_prob": True},
    "ernie4_5_moe": {"score_dtype": "float32", "norm_topk_prob": True},
    "lfm2_moe": {"score_dtype": "logits"},
    "cohere2_moe": {"score_dtype": "logits", "selection_score": "logits",
                    "attrs": {"expert_selection_fn": {
                        "softmax": {"score_function": "softmax_topk", "weight_function": "softmax_topk"},
                        "sigmoid": {"score_function": "sigmoid", "weight_function": "sigmoid"}}}},
    "hy_v3": {"score_dtype": "float32", "norm_topk_prob": True},
    "longcat_flash": {"score_dtype": "float32", "norm_topk_prob": False},
}
# model_type -> experts per token when neither the router module nor the config says it
FAMILY_TOP_K: dict[str, int] = {"switch_transformers": 1, "nllb-moe": 2}
# attributes holding a per-expert bias added to the scores for selection only (on the router, its MoE block or a
# child of the router: ERNIE-4.5's moe_statics)
SELECTION_BIAS_ATTRS = ("e_score_correction_bias", "expert_bias")
# router attributes holding the factor the combine weights are multiplied by (HY-V3 names it router_scaling_factor)
SCALING_ATTRS = ("routed_scaling_factor", "router_scaling_factor")
# children of the MoE block (or of the layer holding it) that every token goes through besides the routed experts,
# and the config keys saying how many experts they stand for (1 when none does)
SHARED_EXPERT_MODULES = ("shared_experts", "shared_expert", "shared_mlp")
_SHARED_EXPERT_KEYS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")
# model_type -> (index of the weights, index of the expert indices) in the router's output, for the families
# whose MoE block hands exactly those two tensors to its experts (checked against the experts' inputs in
# tests/test_capture_generate.py and tests/test_capture_selections_more.py): what the model selected (n, k) and
# the gate weights it applied (n, k)
FAMILY_SELECTIONS: dict[str, tuple[int, int]] = {
    "mixtral": (1, 2), "olmoe": (1, 2), "qwen2_moe": (1, 2), "qwen3_moe": (1, 2), "deepseek_v2": (1, 2),
    "deepseek_v3": (1, 2), "gpt_oss": (1, 2), "granitemoe": (1, 2), "phimoe": (1, 2), "jamba": (1, 2),
    "qwen3_next": (1, 2), "deepseek_v32": (1, 2), "granitemoeshared": (1, 2), "granitemoe_swa": (1, 2),
    "minimax_m2": (1, 2), "hunyuan_v1_moe": (1, 2), "glm4_moe": (1, 2), "dots1": (1, 2), "ernie4_5_moe": (1, 2),
    "flex_olmo": (1, 2), "lfm2_moe": (1, 2), "cohere2_moe": (1, 2), "exaone_moe": (1, 2), "hy_v3": (1, 2),
    "aria_text": (1, 2), "mellum": (1, 2), "longcat_flash": (1, 2), "minimax": (1, 2), "qwen3_5_moe_text": (1, 2),
    "qwen3_vl_moe_text": (1, 2),
}
# model_type -> (index of the weights, index of the expert indices) among the positional inputs of the MoE block's
# ``experts`` module (the router's sibling), read by a forward pre-hook, for the families whose router returns only
# the logits and whose block computes the selection itself (DBRX: softmax, top-k, p-norm of the selected weights)
FAMILY_EXPERTS_SELECTIONS: dict[str, tuple[int, int]] = {"dbrx": (2, 1)}
# model_type -> (index of the weights, index of the dispatch mask) in the router's output, for the capacity-limited
# routers that return a one-hot (..., N) dispatch mask (all zero for a token dropped by the expert capacity) and the
# (..., 1) gate weight of the token's expert: logged as an (n, N) bool mask of the experts that processed the token and
# the (n, N) weights they were multiplied by (0 elsewhere, so a dropped token has no expert and no weight).
# NLLB-MoE stays out: its experts module (transformers 5.x) indexes experts by the values of its 0/1 dispatch mask, so
# the experts that run are not the ones its router selects.
FAMILY_DISPATCH_SELECTIONS: dict[str, tuple[int, int]] = {"switch_transformers": (1, 0)}
# model_type -> index in the router's output of (n, N) dense weights, 0 for an expert not selected (Llama-4: the
# sigmoid of the selected logits, sigmoid(-inf) = 0 elsewhere; every expert runs on every token times its weight):
# logged as an (n, N) bool mask (weight != 0) and the (n, N) weights
FAMILY_DENSE_SELECTIONS: dict[str, int] = {"llama4_text": 0}
# model_type -> (index of the weights, of the slots, of the per-expert counts) in the router's output, for routers
# that hand their experts the token-expert pairs sorted by expert (JetMoE: batch_gates (n k,), index_sorted_experts
# (n k,) the flat (token, slot) index of each pair, expert_size the pairs per expert): logged as (n, k) indices and
# weights in slot order
FAMILY_SORTED_SELECTIONS: dict[str, tuple[int, int, int]] = {"jetmoe": (2, 0, 3)}
_TOP_K_CONFIG_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_top_k", "top_k", "moe_k", "moe_topk")
_EXAMPLE = 'capture(model, out, module_pattern=r"model\\.layers\\.\\d+\\.mlp\\.gate")'


@dataclass(frozen=True)
class RouterSpec:
    """One router to hook.

    ``path``: module name in the model; ``name``: layer name in the log; ``index``: where the
    logits are in the module's output (None: the output is the logits tensor, or a tuple whose
    first element is); ``stack``: ``"encoder"``, ``"decoder"`` or ``""`` (decoder-only);
    ``source``: ``"transformers"``, ``"structural"`` or ``"module_pattern"``; ``selection``: where the
    gate weights and the selected expert indices the model used are in the output (None: not logged).
    """

    path: str
    name: str
    num_experts: int
    index: int | None = None
    top_k: int | None = None
    score_function: str = "unknown"
    selection_bias: tuple[float, ...] | None = None
    stack: str = ""
    source: str = "transformers"
    module: nn.Module | None = field(default=None, repr=False, compare=False)
    selection: tuple[int, ...] | None = None  # (weights index, expert indices index, ...) in the output, if known
    # where ``selection`` points: "router" (the router's output, (n, k) indices), "experts" (the positional inputs
    # of ``experts_module``, (n, k) indices), "dispatch" (the router's output, a one-hot dispatch mask), "dense"
    # (the router's output, (n, N) weights, 0 where not selected) or "sorted" (the router's output, pairs sorted by
    # expert: weights, flat slots, per-expert counts)
    selection_source: str = "router"
    experts_module: nn.Module | None = field(default=None, repr=False, compare=False)
    # the other routing-semantics fields of LayerInfo (selection_score, score_dtype, group limits, capacity, weights)
    routing: dict[str, Any] = field(default_factory=dict, compare=False)

    def layer_info(self) -> LayerInfo:
        return LayerInfo(self.name, num_experts=self.num_experts, top_k=self.top_k, module_path=self.path,
                         score_function=self.score_function, selection_bias=self.selection_bias, **self.routing)


# ----------------------------------------------------------------------------- discovery
def find_routers(model: nn.Module, *, layers: str | Sequence[str] = "auto",
                 module_pattern: str | None = None) -> list[RouterSpec]:
    """The routers :func:`capture` would hook, in module order (see the module docstring).

    ``layers``: ``"auto"`` (every router; for encoder-decoder models the encoder's), ``"encoder"``,
    ``"decoder"``, or a sequence of layer names or module paths to keep.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if module_pattern is not None:
        specs = _pattern_routers(model, module_pattern)
    else:
        specs = _transformers_routers(model) or _structural_routers(model)
    if not specs:
        raise RouterNotFound(
            f"no router found in {type(model).__name__}: it is not a transformers MoE model with router_logits, "
            "and no nn.Linear with out_features == number of experts sits next to an `experts` module. Point at "
            "the router with module_pattern=, a regex matched (re.fullmatch) against module names from "
            f"model.named_modules(), e.g. {_EXAMPLE}; the matched modules must return the raw router logits "
            "(n_tokens, N) (a Linear gate does).")
    return _select(specs, layers, type(model).__name__)


def _model_config(model: nn.Module) -> Any:
    return getattr(model, "config", None)


def _known_recorders(model: nn.Module) -> list[tuple[type | None, str | None, str | None, int]]:
    """(target_class, class_name, layer_name, index) of every transformers router_logits recorder."""
    found = []
    for module in model.modules():
        try:
            can_record = getattr(type(module), "_can_record_outputs", None)
            if isinstance(can_record, property):
                can_record = module._can_record_outputs
        except Exception:  # noqa: BLE001 - a broken property means no recorders
            continue
        if not isinstance(can_record, Mapping):
            continue
        for key, specs in can_record.items():
            if "router_logits" not in key:
                continue
            for spec in specs if isinstance(specs, list | tuple) else [specs]:
                if isinstance(spec, type):
                    found.append((spec, None, None, 1))  # transformers' default index for non-hidden-state keys
                elif isinstance(spec, str):
                    found.append((None, spec, None, 1))
                elif hasattr(spec, "target_class"):
                    found.append((spec.target_class, spec.class_name, spec.layer_name, int(spec.index)))
    return list(dict.fromkeys(found))


def _recorder_index(recorders, name: str, module: nn.Module) -> int | None | bool:
    """The output index of the recorder matching this module, or False when none matches."""
    for target, class_name, layer_name, index in recorders:
        if (target is not None and isinstance(module, target)) or (class_name and name.endswith(class_name)):
            if layer_name is not None and "." + layer_name.strip(".") + "." not in "." + name + ".":
                continue
            return index
    return False


def _transformers_routers(model: nn.Module) -> list[RouterSpec]:
    recorders = _known_recorders(model)
    if not recorders:
        return []
    specs = []
    for name, module in model.named_modules():
        index = _recorder_index(recorders, name, module)
        if index is not False:
            specs.append(_make_spec(model, name, module, index, "transformers"))
    # a recorder on a block that passes on its inner router's logits (JetMoE's attention) would log them twice
    paths = [s.path for s in specs]
    return [s for s in specs if not any(p.startswith(s.path + ".") for p in paths)]


def _structural_routers(model: nn.Module) -> list[RouterSpec]:
    specs = []
    seen: set[str] = set()
    for block_name, block in model.named_modules():
        experts = getattr(block, "experts", None)
        if not isinstance(experts, nn.Module):
            continue
        listed = isinstance(experts, nn.ModuleList | nn.Sequential)
        n = len(experts) if listed else getattr(experts, "num_experts", None)
        if not isinstance(n, int) or n < 1:
            continue
        expert_ids = {id(m) for m in experts.modules()}
        candidates = [(f"{block_name}.{sub}" if block_name else sub, m) for sub, m in block.named_modules()
                      if isinstance(m, nn.Linear) and m.out_features == n and id(m) not in expert_ids]
        if len(candidates) == 1 and candidates[0][0] not in seen:
            seen.add(candidates[0][0])
            specs.append(_make_spec(model, candidates[0][0], candidates[0][1], None, "structural", num_experts=n))
    return specs


def _pattern_routers(model: nn.Module, pattern: str) -> list[RouterSpec]:
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise RouterNotFound(f"module_pattern {pattern!r} is not a valid regex: {exc}") from None
    recorders = _known_recorders(model)
    specs = []
    for name, module in model.named_modules():
        if name and regex.fullmatch(name):
            index = _recorder_index(recorders, name, module)
            specs.append(_make_spec(model, name, module, None if index is False else index, "module_pattern"))
    if not specs:
        names = [n for n, _ in model.named_modules() if n][:8]
        raise RouterNotFound(f"module_pattern {pattern!r} matches no module of {type(model).__name__} (re.fullmatch "
                             f"against names from model.named_modules(), e.g. {names}); e.g. {_EXAMPLE}")
    return specs


def _num_experts(module: nn.Module) -> int | None:
    """Columns of the router's logits: its Linear's out_features or its (N, d) weight (which may include extra
    columns such as LongCat's zero-computation experts), else its ``num_experts`` attribute."""
    if isinstance(module, nn.Linear):
        return module.out_features
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2:
        return int(weight.shape[0])
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            return sub.out_features
    n = getattr(module, "num_experts", None)
    if isinstance(n, int) and not isinstance(n, bool) and n > 0:
        return n
    return None


def _make_spec(model: nn.Module, path: str, module: nn.Module, index: int | None, source: str,
               num_experts: int | None = None) -> RouterSpec:
    n = num_experts or _num_experts(module)
    if n is None:
        raise RouterNotFound(f"cannot tell the number of experts of router {path!r} ({type(module).__name__}): it "
                             "has no Linear, no num_experts attribute and no 2-D weight; point module_pattern= at "
                             "its Linear gate instead")
    config = _model_config(model)
    family = getattr(config, "model_type", None)
    top_k = _top_k(module, config, family, n)
    parts = path.split(".")
    stack = "encoder" if "encoder" in parts else "decoder" if "decoder" in parts else ""
    bias = _selection_bias(model, path, module, n)
    routing = _routing(model, path, module, config, family, None if bias is None else bias.dtype)
    score = routing.pop("score_function", None) or getattr(config, "scoring_func", None)
    if score not in SCORE_FUNCTIONS:
        score = FAMILY_SCORE_FUNCTIONS.get(family, "unknown")
    selection, selection_source, experts = _selection(model, path, family, index, top_k)
    return RouterSpec(path=path, name=path, num_experts=n, index=index, top_k=top_k, score_function=score,
                      selection_bias=None if bias is None else tuple(float(b) for b in bias.reshape(-1)), stack=stack,
                      source=source, module=module, selection=selection, selection_source=selection_source,
                      experts_module=experts, routing=routing)


def _parent(model: nn.Module, path: str) -> nn.Module | None:
    return model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else None


def _routing(model: nn.Module, path: str, module: nn.Module, config: Any, family: str | None,
             bias_dtype: torch.dtype | None) -> dict[str, Any]:
    """The routing semantics of one router (LayerInfo fields, plus ``score_function`` where a router attribute sets
    it): what the family's code fixes (FAMILY_ROUTING), then what the router and its MoE block hold."""
    rule = FAMILY_ROUTING.get(family, {})
    block = _parent(model, path)
    out: dict[str, Any] = {key: rule[key] for key in ("selection_score", "weight_function", "norm_topk_prob",
                                                      "group_score") if key in rule}
    norm = getattr(module, "norm_topk_prob", None)
    if isinstance(norm, bool):
        out["norm_topk_prob"] = norm
    for attr in SCALING_ATTRS:
        value = getattr(module, attr, None)
        if _is_number(value):
            out["routed_scaling_factor"] = float(value)
            break
    groups, topk_group = getattr(module, "num_group", None), getattr(module, "topk_group", None)
    if _is_int(groups) and groups > 1:
        out["n_group"] = groups
        out["topk_group"] = topk_group if _is_int(topk_group) else None
    for attr, values in rule.get("attrs", {}).items():  # router attribute values the family's code branches on
        out.update(values.get(getattr(module, attr, None), {}))
    if out.get("n_group", 1) == 1:
        out.pop("group_score", None)
    if rule.get("capacity") and _is_int(getattr(module, "expert_capacity", None)):
        out["expert_capacity"] = module.expert_capacity
    if "norm_p_attr" in rule and block is not None:
        p = getattr(block, rule["norm_p_attr"], None)
        out["norm_topk_prob"] = p is not None
        if _is_number(p):
            out["norm_topk_p"] = float(p)
    if "eps_attr" in rule and _is_number(getattr(module, rule["eps_attr"], None)):
        out["sparsemixer_eps"] = float(getattr(module, rule["eps_attr"]))
    dtype = _score_dtype(model, module, rule.get("score_dtype"))
    if dtype is not None:
        dtype = dtype if bias_dtype is None else torch.promote_types(dtype, bias_dtype)
        out["score_dtype"] = str(dtype).removeprefix("torch.")
    shared = _num_shared_experts(model, path, config)
    if shared:
        out["num_shared_experts"] = shared
    return out


def _score_dtype(model: nn.Module, module: nn.Module, rule: str | None) -> torch.dtype | None:
    """The dtype a router ranks its selection scores in, by its family's rule (FAMILY_ROUTING's score_dtype)."""
    if rule == "float32":
        return torch.float32
    params = module.parameters() if rule == "logits" else model.parameters() if rule == "model" else ()
    return next((p.dtype for p in params if p.is_floating_point()), None)


def _num_shared_experts(model: nn.Module, path: str, config: Any) -> int:
    """Experts every token gets besides the routed ones: a shared-expert child of the router's MoE block or of the
    layer holding it (SHARED_EXPERT_MODULES), standing for the config's n_shared_experts (or alike) experts, else 1."""
    block = _parent(model, path)
    owners = [block, _parent(model, path.rsplit(".", 1)[0])] if block is not None else []
    if not any(isinstance(getattr(o, name, None), nn.Module) for o in owners if o is not None
               for name in SHARED_EXPERT_MODULES):
        return 0
    counts = [getattr(config, key, None) for key in _SHARED_EXPERT_KEYS]
    return next((c for c in counts if _is_int(c) and c >= 1), 1)



def _selection(model: nn.Module, path: str, family: str | None, index: int | None,
               top_k: int | None) -> tuple[tuple[int, ...] | None, str, nn.Module | None]:
    """Where the family's MoE block exposes what it selected and applied (see FAMILY_SELECTIONS and co.)."""
    if top_k is None or family is None:
        return None, "router", None
    if index == 0 and family in FAMILY_SELECTIONS:
        return FAMILY_SELECTIONS[family], "router", None
    if index is not None and family in FAMILY_DISPATCH_SELECTIONS and index not in FAMILY_DISPATCH_SELECTIONS[family]:
        return FAMILY_DISPATCH_SELECTIONS[family], "dispatch", None
    if index is not None and family in FAMILY_DENSE_SELECTIONS and index != FAMILY_DENSE_SELECTIONS[family]:
        return (FAMILY_DENSE_SELECTIONS[family],) * 2, "dense", None
    if index is not None and family in FAMILY_SORTED_SELECTIONS and index not in FAMILY_SORTED_SELECTIONS[family]:
        return FAMILY_SORTED_SELECTIONS[family], "sorted", None
    if index == 0 and family in FAMILY_EXPERTS_SELECTIONS and "." in path:
        experts = getattr(model.get_submodule(path.rsplit(".", 1)[0]), "experts", None)
        if isinstance(experts, nn.Module):
            return FAMILY_EXPERTS_SELECTIONS[family], "experts", experts
    return None, "router", None


def _top_k(module: nn.Module, config: Any, family: str | None, n: int) -> int | None:
    candidates = [getattr(module, "top_k", None)]
    if config is not None:
        candidates += [getattr(config, key, None) for key in _TOP_K_CONFIG_KEYS]
        ffn = getattr(config, "ffn_config", None)  # DBRX
        candidates.append(getattr(ffn, "moe_top_k", None))
    candidates.append(FAMILY_TOP_K.get(family))
    for k in candidates:
        if isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= n:
            return k
    return None


def _selection_bias(model: nn.Module, path: str, module: nn.Module, n: int) -> torch.Tensor | None:
    """The (N,) bias the model adds to its scores for selection only (SELECTION_BIAS_ATTRS on the router, its MoE
    block or a child of the router: ERNIE-4.5's moe_statics), a CPU tensor in its own dtype (the dtype the model adds
    it in: :func:`_routing` reads it)."""
    owners = [module, *([_parent(model, path)] if "." in path else []), *module.children()]
    for owner in owners:
        for attr in SELECTION_BIAS_ATTRS:
            bias = getattr(owner, attr, None)
            if isinstance(bias, torch.Tensor) and bias.is_floating_point() and bias.numel() == n:
                return bias.detach().cpu().reshape(-1)
    return None


def _select(specs: list[RouterSpec], layers: str | Sequence[str], model_name: str) -> list[RouterSpec]:
    seq2seq = {"encoder", "decoder"} <= {s.stack for s in specs}
    if not seq2seq:  # "encoder"/"decoder" in a decoder-only model's paths mean nothing
        specs = [_replace(s, stack="") for s in specs]
    if isinstance(layers, str):
        if layers not in ("auto", "encoder", "decoder"):
            raise ValueError(f'layers must be "auto", "encoder", "decoder" or a list of layer names, got {layers!r}')
        if layers != "auto" and not seq2seq:
            raise RouterNotFound(f'layers="{layers}" needs an encoder-decoder model; {model_name} has one stack of '
                                 'routers: use layers="auto"')
        if seq2seq:
            stack = "encoder" if layers == "auto" else layers
            specs = [s for s in specs if s.stack == stack]
    else:
        wanted = list(layers)
        by_key = {}
        for s in _name_layers(specs):
            by_key[s.name] = by_key[s.path] = s
        unknown = [w for w in wanted if w not in by_key]
        if unknown:
            raise RouterNotFound(f"layers {unknown} are not routers of {model_name}; routers: "
                                 f"{[s.name for s in _name_layers(specs)]}")
        if not wanted:
            raise RouterNotFound("layers=[] selects no router")
        chosen = {by_key[w].path for w in wanted}
        specs = [s for s in specs if s.path in chosen]
        if len({s.stack for s in specs}) > 1:
            raise RouterNotFound("encoder and decoder routers see different tokens and cannot share one log; "
                                 "capture them into two logs (layers=\"encoder\", layers=\"decoder\")")
    return _name_layers(specs)


def _replace(spec: RouterSpec, **changes: Any) -> RouterSpec:
    return dataclasses.replace(spec, **changes)


def _name_layers(specs: list[RouterSpec]) -> list[RouterSpec]:
    """Layer names ``layer{i}`` from the block index in the path (``encoder.layer{i}`` / ``decoder.layer{i}``
    for a stack); the module path itself when that would not be unique."""
    names = []
    for s in specs:
        digits = [p for p in s.path.split(".") if p.isdigit()]
        names.append((f"{s.stack}." if s.stack else "") + f"layer{digits[0]}" if digits else s.path)
    if len(set(names)) != len(names):
        names = [s.path for s in specs]
    return [_replace(s, name=name) for s, name in zip(specs, names, strict=True)]


# ----------------------------------------------------------------------------- capture
class Capture:
    """Hooks on every router of ``model`` that stream to a router log at ``out``; see :func:`capture`."""

    def __init__(self, model: nn.Module, out: str | os.PathLike, *, layers: str | Sequence[str] = "auto",
                 hidden: bool = False, router_weights: bool = True, shard_tokens: int = 65536,
                 module_pattern: str | None = None, dtype: torch.dtype | None = None, overwrite: bool = False,
                 model_name: str | None = None, fsync: bool = True, selections: bool = True) -> None:
        self.model = model
        self.path = out
        self.routers = find_routers(model, layers=layers, module_pattern=module_pattern)
        self.hidden = bool(hidden)
        self.router_weights = bool(router_weights)
        self.selections = bool(selections)
        self.stack = self.routers[0].stack
        config = _model_config(model)
        name = model_name or getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None) or None
        self._model_info = ModelInfo(name=name or None, family=getattr(config, "model_type", None),
                                     revision=getattr(config, "_commit_hash", None))
        self._settings = {
            "method": "forward_hooks", "source": self.routers[0].source,
            "layers": layers if isinstance(layers, str) else list(layers), "stack": self.stack or "decoder-only",
            "module_pattern": module_pattern, "hidden": self.hidden, "router_weights": self.router_weights,
            "selections": sorted({r.name for r in self.routers if r.selection and self.selections}),
            "padding": "excluded (attention mask)", "positions": "real tokens before the token in its row",
            "sequence_ids": "running count of batch rows; KV-cache decode steps keep their prompt's",
            "logits": "raw router output before softmax, sigmoid "
            "or selection bias (what output_router_logits returns)",
        }
        self._writer_args = {"shard_tokens": shard_tokens, "dtype": dtype, "overwrite": overwrite, "fsync": fsync}
        self._writer: RouterLogWriter | None = None
        self._handles: list[Any] = []
        self._stream = TokenStream(prefix="decoder_" if self.stack == "decoder" else "",
                                   track_cache=self.stack != "encoder", error=CaptureFailed,
                                   who="the capture", context="with capture(...)")
        self._current: Batch | None = None
        self._outputs: dict[str, list[torch.Tensor]] = {}
        self._hidden: dict[str, list[torch.Tensor]] = {}
        self._chosen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._active = False
        self._sync = False
        self.tokens = 0

    # ------------------------------------------------------------------ context
    def __enter__(self) -> Capture:
        # the model's device: the logits reach the writer as CPU copies, so it cannot infer it
        device = next((p.device for p in self.model.parameters()), None)
        self._writer = RouterLogWriter(self.path, [r.layer_info() for r in self.routers], model=self._model_info,
                                       capture=self._settings, device=None if device is None else _device_name(device),
                                       **self._writer_args)
        try:
            if self.router_weights:
                weights = {r.name: w for r in self.routers if (w := _router_weight(r)) is not None}
                if weights:
                    self._writer.write_router_weights(weights)
            for r in self.routers:
                self._handles.append(r.module.register_forward_hook(self._router_hook(r)))
                if r.selection is not None and r.selection_source == "experts" and self.selections:
                    self._handles.append(r.experts_module.register_forward_pre_hook(self._experts_hook(r)))
            self._handles.append(self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(self._post_hook))
        except BaseException as exc:
            self._remove_hooks()
            self._writer.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._remove_hooks()
        if self._writer is not None:
            self._writer.__exit__(exc_type, exc, tb)

    def _remove_hooks(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    @property
    def sequences(self) -> int:
        """Sequences logged so far (batch rows that started a sequence)."""
        return self._stream.sequences

    @property
    def log(self) -> RouterLog:
        """The router log written so far (complete once the context has exited)."""
        return RouterLog.open(self.path)

    # ------------------------------------------------------------------ API
    def set_batch(self, input_ids: Any = None, attention_mask: Any = None) -> None:
        """Token ids (B, T) and attention mask (B, T), 1 = real token, for the next forward of the model
        (instead of reading ``input_ids`` / ``attention_mask`` from its arguments). Either may be None."""
        self._stream.set_batch(input_ids, attention_mask)

    def run(self, batches: Iterable[Mapping[str, Any]]) -> int:
        """``model(**batch)`` under ``torch.no_grad()`` for every batch (a dict of keyword arguments, e.g.
        from a DataLoader; tensors are moved to the device of the model's first parameter); returns the
        number of tokens logged by these batches."""
        if self._writer is None or self._writer.closed:
            raise CaptureFailed("Capture.run() must be called inside `with capture(...) as cap:`")
        before = self.tokens
        device = next((p.device for p in self.model.parameters()), None)
        with torch.no_grad():
            for batch in batches:
                if not isinstance(batch, Mapping):
                    raise CaptureFailed(f"run() needs batches that are dicts of model keyword arguments, got "
                                        f"{type(batch).__name__}")
                if device is not None:  # a CPU data loader feeding a GPU model
                    batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and v.device != device
                             else v for k, v in batch.items()}
                self.model(**batch)
        return self.tokens - before

    # ------------------------------------------------------------------ hooks
    def _pre_hook(self, module, args, kwargs) -> None:
        self._active = True  # a forward that raised left stale state behind: start afresh
        self._sync = False
        self._outputs = {}
        self._hidden = {}
        self._chosen = {}
        self._current = self._stream.begin(args, kwargs)

    def _router_hook(self, spec: RouterSpec):
        def hook(module, args, output) -> None:
            if not self._active:
                return  # the router was called outside a forward of the captured model
            logits = router_logits(output, spec)
            self._sync = self._sync or logits.is_cuda
            self._outputs.setdefault(spec.name, []).append(_to_cpu(logits))
            if spec.selection is not None and self.selections and spec.selection_source != "experts":
                weights, indices = (output[i] if isinstance(output, tuple | list) and len(output) > i else None
                                    for i in spec.selection[:2])
                if spec.selection_source == "dispatch":
                    weights, indices = _dispatch_selection(spec, weights, indices)
                elif spec.selection_source == "dense":
                    weights, indices = _dense_selection(spec, weights)
                elif spec.selection_source == "sorted":
                    weights, indices = _sorted_selection(spec, weights, indices, output[spec.selection[2]]
                                                         if isinstance(output, tuple | list) else None,
                                                         tokens=output[1] if isinstance(output, tuple | list)
                                                         and len(output) > 1 else None,
                                                         rows=logits.reshape(-1, logits.shape[-1]).shape[0])
                self._record_selection(spec, weights, indices, "router", "(logits, weights, indices)")
            if self.hidden:
                x = args[0] if args else None
                if not isinstance(x, torch.Tensor):
                    raise CaptureFailed(f"router {spec.path!r}: hidden=True needs the hidden states as its first "
                                        "positional input")
                self._hidden.setdefault(spec.name, []).append(_to_cpu(x))
        return hook

    def _experts_hook(self, spec: RouterSpec):
        def hook(module, args) -> None:
            if not self._active:
                return
            weights, indices = (args[i] if len(args) > i else None for i in spec.selection)
            self._record_selection(spec, weights, indices, "experts module of router",
                                   "(hidden states, expert indices, weights) positionally")
        return hook

    def _record_selection(self, spec: RouterSpec, weights: Any, indices: Any, where: str, wanted: str) -> None:
        if not (isinstance(weights, torch.Tensor) and isinstance(indices, torch.Tensor)
                and weights.is_floating_point() and not indices.is_floating_point()
                and weights.shape == indices.shape and weights.ndim >= 1):
            raise CaptureFailed(f"{where} {spec.path!r} did not get {wanted}; capture with selections=False")
        if bool((indices >= spec.num_experts).any()):  # "no expert" slots (usmoe_lp.live.route): an (n, N) mask
            weights, indices = _padded_selection(spec, weights, indices)
        self._chosen.setdefault(spec.name, []).append((_to_cpu(weights), _to_cpu(indices)))

    def _post_hook(self, module, args, output) -> None:
        outputs, hidden, chosen, batch = self._outputs, self._hidden, self._chosen, self._current
        self._outputs, self._hidden, self._chosen, self._current, self._active = {}, {}, {}, None, False
        if not outputs:  # no router ran (e.g. a forward that only used another part of the model)
            return
        if self._sync:  # the non-blocking copies into pinned memory must have landed
            torch.cuda.synchronize()
        self._append(outputs, hidden, batch, chosen)

    def _append(self, outputs: dict[str, list[torch.Tensor]], hidden: dict[str, list[torch.Tensor]],
                batch: Batch | None, chosen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] | None = None) -> None:
        missing = [r.name for r in self.routers if r.name not in outputs]
        if missing:
            raise CaptureFailed(f"routers {missing} did not run in this forward while "
                                f"{sorted(outputs)} did; capture a subset with layers=[...]")
        logits = {}
        for r in self.routers:
            parts = outputs[r.name]
            if len(parts) != 1:
                raise CaptureFailed(f"router {r.path!r} ran {len(parts)} times in one forward; hook a module that "
                                    "runs once per forward (module_pattern=)")
            t = parts[0]
            if t.shape[-1] != r.num_experts:
                raise CaptureFailed(f"router {r.path!r} returned {tuple(t.shape)}, not (..., N={r.num_experts})")
            logits[r.name] = t.reshape(-1, r.num_experts)
        n_rows = next(iter(logits.values())).shape[0]
        tokens = self._stream.tokens(batch)
        b, t = batch.shape
        if n_rows != b * t:
            raise CaptureFailed(f"router {self.routers[0].path!r} gave {n_rows} rows for a batch of {b}x{t} tokens; "
                                "pass cap.set_batch(input_ids, attention_mask) describing the router's tokens")
        keep = tokens.real.reshape(-1)
        ids = torch.full((b, t), -1, dtype=torch.int64) if batch.input_ids is None else batch.input_ids.cpu().long()
        seq = tokens.sequence_ids.unsqueeze(1).expand(b, t)
        pos = tokens.positions
        hid = None
        if self.hidden:
            hid = {name: hidden[name][0].reshape(n_rows, -1)[keep] for name in logits if name in hidden}
        selected = weights = None
        if chosen:
            selected, weights = {}, {}
            for name, [(w, i)] in chosen.items():
                if w.numel() != n_rows * w.shape[-1]:
                    raise CaptureFailed(f"router of layer {name!r} selected experts for {w.numel() // w.shape[-1]} "
                                        f"tokens, not {n_rows}")
                weights[name] = w.reshape(n_rows, -1)[keep]
                i = i.reshape(n_rows, -1)[keep]
                selected[name] = i if i.dtype == torch.bool else i.long()
        self._writer.append({name: x[keep] for name, x in logits.items()}, token_ids=ids.reshape(-1)[keep],
                            sequence_ids=seq.reshape(-1)[keep], positions=pos.reshape(-1)[keep], hidden=hid,
                            selected=selected, weights=weights)
        self.tokens += int(keep.sum())
        self._stream.finish(batch, tokens)


def router_logits(output: Any, spec: RouterSpec, error: type[Exception] | None = None) -> torch.Tensor:
    """The router logits tensor (tokens, N) in the output of ``spec``'s router module: the output itself, or
    its element ``spec.index`` (0 when None) of a tuple/list. Raises ``error`` (default :class:`CaptureFailed`)
    naming the module when that is not a tensor. Capture, live routing and the Trainer callback read the
    router's output through this one function."""
    value = output
    if isinstance(output, tuple | list):
        value = output[spec.index if spec.index is not None else 0] if output else None
    if not isinstance(value, torch.Tensor):
        raise (error or CaptureFailed)(
            f"router {spec.path!r} returned {type(value).__name__}, not the logits tensor; point module_pattern= "
            "at the module (e.g. the gate's Linear) that returns them")
    return value


def _dispatch_selection(spec: RouterSpec, weights: Any, mask: Any) -> tuple[Any, Any]:
    """(one-hot dispatch mask (..., N), gate weight of the token's expert (..., 1)) -> ((..., N) weights applied,
    0 where not dispatched; (..., N) bool mask of the experts that process the token)."""
    if not (isinstance(weights, torch.Tensor) and isinstance(mask, torch.Tensor) and weights.is_floating_point()
            and not mask.is_floating_point() and mask.shape[-1] == spec.num_experts and weights.shape[-1] == 1
            and weights.shape[:-1] == mask.shape[:-1]):
        raise CaptureFailed(f"router {spec.path!r} did not return (dispatch mask, weight, logits); capture with "
                            "selections=False")
    chosen = mask != 0
    return torch.where(chosen, weights, torch.zeros((), dtype=weights.dtype, device=weights.device)), chosen


def _padded_selection(spec: RouterSpec, weights: torch.Tensor, indices: torch.Tensor) -> tuple[Any, Any]:
    """(n, k) weights and expert indices where the index N means "no expert" (transformers' experts modules skip it;
    :func:`usmoe_lp.live.route` gives a token fewer than k experts so) -> ((n, N) weights applied, 0 elsewhere;
    (n, N) bool mask of the experts that process the token)."""
    n_flat = indices.reshape(-1, indices.shape[-1]).long()
    w_flat = weights.reshape(-1, weights.shape[-1])
    real = n_flat < spec.num_experts
    slot = torch.where(real, n_flat, torch.full_like(n_flat, spec.num_experts))
    mask = torch.zeros(n_flat.shape[0], spec.num_experts + 1, dtype=torch.bool, device=indices.device)
    mask.scatter_(1, slot, True)
    dense = torch.zeros(n_flat.shape[0], spec.num_experts + 1, dtype=weights.dtype, device=weights.device)
    dense.scatter_add_(1, slot, torch.where(real, w_flat, torch.zeros((), dtype=weights.dtype, device=weights.device)))
    return dense[:, :-1], mask[:, :-1]


def _dense_selection(spec: RouterSpec, weights: Any) -> tuple[Any, Any]:
    """(n, N) dense weights, 0 for an expert not selected -> (the weights, the (n, N) bool mask weight != 0)."""
    if not (isinstance(weights, torch.Tensor) and weights.is_floating_point()
            and weights.shape[-1] == spec.num_experts):
        raise CaptureFailed(f"router {spec.path!r} did not return its (n, N) dense weights; capture with "
                            "selections=False")
    return weights, weights != 0


def _sorted_selection(spec: RouterSpec, gates: Any, slots: Any, counts: Any, tokens: Any = None,
                      rows: int | None = None) -> tuple[Any, Any]:
    """Pairs sorted by expert (gates (n k,), the flat (token, slot) index of each pair (n k,), pairs per expert (N,))
    -> ((n, k) weights, (n, k) expert indices) in slot order. Pairs that do not give every one of the ``rows``
    tokens k experts (a live route: :func:`usmoe_lp.live.route`) -> the (n, N) weights and bool mask, from the
    token of each pair (``tokens``, (pairs,) int: the router's second output)."""
    k = spec.top_k
    counts = torch.as_tensor(counts) if isinstance(counts, list | tuple) else counts
    if not (isinstance(gates, torch.Tensor) and isinstance(slots, torch.Tensor) and isinstance(counts, torch.Tensor)
            and gates.is_floating_point() and gates.ndim == slots.ndim == counts.ndim == 1
            and gates.numel() == slots.numel() == int(counts.sum()) and counts.numel() == spec.num_experts):
        raise CaptureFailed(f"router {spec.path!r} did not return its pairs sorted by expert (slots, ..., gates, "
                            "pairs per expert); capture with selections=False")
    experts = torch.repeat_interleave(torch.arange(spec.num_experts, device=slots.device), counts.to(slots.device))
    if rows is None or gates.numel() == rows * k:
        indices = torch.empty_like(slots).scatter_(0, slots, experts)
        weights = torch.empty_like(gates).scatter_(0, slots, gates)
        return weights.reshape(-1, k), indices.reshape(-1, k)
    if not (isinstance(tokens, torch.Tensor) and tokens.shape == gates.shape):
        raise CaptureFailed(f"router {spec.path!r} did not return the token of each pair; capture with "
                            "selections=False")
    mask = torch.zeros(rows, spec.num_experts, dtype=torch.bool, device=gates.device)
    mask[tokens.long(), experts] = True
    weights = torch.zeros(rows, spec.num_experts, dtype=gates.dtype, device=gates.device)
    weights[tokens.long(), experts] = gates
    return weights, mask


def _to_cpu(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.device.type == "cuda":
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        out.copy_(t, non_blocking=True)
        return out
    return t.to("cpu").clone()


def _router_weight(spec: RouterSpec) -> torch.Tensor | None:
    module = spec.module
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2 and weight.shape[0] == spec.num_experts:
        return weight.detach()
    for sub in module.modules():
        if isinstance(sub, nn.Linear) and sub.out_features == spec.num_experts:
            return sub.weight.detach()
    return None


def capture(model: nn.Module, out: str | os.PathLike, *, layers: str | Sequence[str] = "auto", hidden: bool = False,
            router_weights: bool = True, shard_tokens: int = 65536, module_pattern: str | None = None,
            dtype: torch.dtype | None = None, overwrite: bool = False, model_name: str | None = None,
            fsync: bool = True, selections: bool = True) -> Capture:
    """A context manager that hooks every router of ``model`` and streams its raw logits to a router log at ``out``.

    ``layers``: ``"auto"``, ``"encoder"``, ``"decoder"`` or a list of layer names / module paths
    (see :func:`find_routers`). ``hidden``: also store each router's input hidden states.
    ``router_weights``: store each router's (N, d) weight once. ``shard_tokens``: tokens per shard.
    ``module_pattern``: regex (``re.fullmatch`` on module names) choosing the routers of any torch
    model. ``dtype``: cast the stored logits (None keeps the captured dtype, bf16 included).
    ``overwrite``: replace an existing router log. ``model_name``: stored in the manifest.
    ``selections``: also store, as ``selected.<layer>`` / ``weights.<layer>`` (n, k), the expert indices
    the model selected and the gate weights it applied, for the families of :data:`FAMILY_SELECTIONS`
    (routers returning ``(logits, weights, indices)``; DeepSeek-V3's selection includes its bias) and
    :data:`FAMILY_EXPERTS_SELECTIONS` (DBRX: read from its experts module's inputs); for
    :data:`FAMILY_DISPATCH_SELECTIONS` (Switch Transformers, capacity-limited) an (n, N) bool mask of the experts
    that processed each token (none for a dropped token) and the (n, N) weights applied (0 elsewhere); for
    :data:`FAMILY_DENSE_SELECTIONS` (Llama-4: dense weights, 0 off the selection) the same (n, N) mask and weights;
    for :data:`FAMILY_SORTED_SELECTIONS` (JetMoE: pairs sorted by expert) (n, k) indices and weights.

    Inside the block, every forward of ``model`` is logged (padding excluded with the attention
    mask from its ``attention_mask`` argument or :meth:`Capture.set_batch`); :meth:`Capture.run`
    feeds a data loader. The hooks are removed on exit, also on error; the log is marked complete
    only on a clean exit. Raises :class:`RouterNotFound` when no router can be found.
    """
    return Capture(model, out, layers=layers, hidden=hidden, router_weights=router_weights, shard_tokens=shard_tokens,
                   module_pattern=module_pattern, dtype=dtype, overwrite=overwrite, model_name=model_name, fsync=fsync,
                   selections=selections)
