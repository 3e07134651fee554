"""Routing statistics during training: a ``transformers.TrainerCallback`` that logs per-layer load balance.

>>> trainer = Trainer(model=model, args=args, train_dataset=data)       # doctest: +SKIP
>>> trainer.add_callback(RoutingStatsCallback(trainer))                  # doctest: +SKIP
>>> trainer.train()                                                      # doctest: +SKIP

Every ``logging_steps`` (the Trainer's own logging schedule: ``logging_strategy``, ``logging_steps``,
``logging_first_step``), the callback logs, over the tokens of the training forwards since the previous
log (gradient-accumulation micro-batches included, padding excluded with the batch's ``attention_mask``):

=============================================== ================================================================
key                                             value (definitions: :class:`usmoe_lp.diagnostics.LoadStats`)
=============================================== ================================================================
``routing/<layer>/load_share/<e>``              share of the layer's token-expert assignments that went to expert e
``routing/<layer>/load_entropy``                H(load share) / log N, 1 at perfect balance
``routing/<layer>/token_entropy``               mean over tokens of the entropy of the routing distribution (nats)
``routing/<layer>/maxvio``                      max_e c_e / mean_e c_e - 1 (DeepSeek, arXiv 2408.15664)
``routing/<layer>/aux_loss``                    the layer's Switch aux loss N sum_e f_e P_e (arXiv 2101.03961)
``routing/<layer>/tokens``                      tokens counted
``routing/aux_loss_pooled``                     every layer's tokens pooled: transformers' ``load_balancing_loss_func``
``routing/aux_loss_layer_mean``                 the mean of the per-layer losses, as the OLMoE training scripts
=============================================== ================================================================

(``routing`` is the ``prefix``; ``<layer>`` the layer names of :func:`usmoe_lp.logs.capture.find_routers`,
``layer0``, ``layer1``, ...). The statistics are the diagnostics' own: one
:class:`~usmoe_lp.diagnostics.LoadPartial` per layer, fed the model's selection as
:func:`usmoe_lp.analyze` defines it (:func:`usmoe_lp.diagnostics.stream.model_mask`: the registry's ``native``
router replayed on the logits where the layer's routing semantics are known, else the top-k of the
routing probabilities) and the routing probabilities (:func:`usmoe_lp.routing.probabilities`); the pooled
loss merges the layers' partials, the layer mean averages their losses (:func:`usmoe_lp.diagnostics.aux_loss`
documents both).

**Where the logits come from.** Forward hooks on the routers that :func:`~usmoe_lp.logs.capture.find_routers`
finds (every MoE family of transformers, or ``module_pattern=``), the same modules ``usmoe-lp capture``
hooks. They read the router's output and detach it: the model's outputs, its loss and its gradients are
unchanged, whatever ``output_router_logits`` is (turning that on would add the aux loss to the training
loss of Mixtral-like models). Only forwards of the model in training mode count (not evaluation), and only
router calls inside a forward of the top model, so gradient checkpointing, which re-runs routers during
the backward pass, does not count tokens twice. Cost: one copy of each router's logits to the CPU per
forward, and the statistics of that chunk (numpy).

**How they reach TensorBoard, W&B and ``trainer.state.log_history``.** The Trainer hands ``on_log`` a
copy of what it already appended to ``log_history``, and calls the callbacks in order: the reporting
integrations (added first, from ``report_to``) before any callback of the user. Adding keys to ``logs``
in ``on_log`` would therefore reach neither the history nor the reporters. Instead the callback calls
``trainer.log(stats)`` itself, from ``on_step_end`` when the Trainer's flow has set ``control.should_log``
(and from ``on_epoch_end`` under ``logging_strategy="epoch"``): one more ``log_history`` entry at the
same step, just before the Trainer's own (loss, learning rate), and one more ``on_log`` call that every
reporter receives. That is why the callback needs the trainer. (``trainer.log`` clears
``control.should_log``; the callback sets it again, or the Trainer would skip its own log of that step.)
Tokens of the steps after the last logging step are not reported (nor is the Trainer's loss).
In distributed training each process counts its own share of the batch; the reporters run on the main
process, so they show its share.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from usmoe_lp._validate import check_int
from usmoe_lp.errors import InvalidParameter

__all__ = ["RoutingStatsCallback"]


class RoutingStatsCallback(TrainerCallback):
    """Log per-layer routing statistics of the training steps through the Trainer's logging (module docstring).

    Args:
        trainer: the ``transformers.Trainer`` the callback is added to (``trainer.add_callback(...)``); its
            ``log`` method is how the statistics reach ``log_history`` and the reporters.
        layers: which routers: ``"auto"`` (every router; an encoder-decoder's encoder), ``"encoder"``,
            ``"decoder"``, or layer names / module paths (:func:`usmoe_lp.logs.capture.find_routers`).
        module_pattern: a regex of router module names, for models whose routers are not found
            automatically (the modules must return the (tokens, N) logits).
        top_k: the model's experts per token where the model does not declare it.
        prefix: the first component of every key (default ``routing``).
        load_shares: log each expert's load share (N values per layer); False keeps the summaries only.

    The hooks are installed at ``on_train_begin`` on the Trainer's model and removed at ``on_train_end``.
    :meth:`current_stats` returns what the next log would hold.
    """

    def __init__(self, trainer: Any, *, layers: str | Sequence[str] = "auto", module_pattern: str | None = None,
                 top_k: int | None = None, prefix: str = "routing", load_shares: bool = True) -> None:
        if not callable(getattr(trainer, "log", None)):
            raise InvalidParameter(
                f"trainer must be the transformers.Trainer the callback is added to, got {type(trainer).__name__}: "
                "trainer.add_callback(RoutingStatsCallback(trainer))")
        if not isinstance(prefix, str) or not prefix or prefix.endswith("/"):
            raise InvalidParameter(f"prefix must be a non-empty string without a trailing '/', got {prefix!r}")
        self.trainer = trainer
        self.layers = layers
        self.module_pattern = module_pattern
        self.top_k = None if top_k is None else check_int(top_k, "top_k", low=1)
        self.prefix = prefix
        self.load_shares = bool(load_shares)
        self.logged = 0  # how many times the statistics were logged
        self._specs: list = []
        self._infos: dict[str, Any] = {}
        self._ks: dict[str, int] = {}
        self._partials: dict[str, Any] = {}
        self._handles: list = []
        self._active = False
        self._keep: torch.Tensor | None = None
        self._buffers: dict[str, list[torch.Tensor]] = {}
        self._warned = False

    # ------------------------------------------------------------------ hooks
    def install(self, model: torch.nn.Module) -> None:
        """Find the routers of ``model`` and hook them (done by ``on_train_begin``; idempotent)."""
        from usmoe_lp.diagnostics.analyze import resolve_top_k
        from usmoe_lp.logs.capture import find_routers

        self.remove()
        specs = find_routers(model, layers=self.layers, module_pattern=self.module_pattern)
        infos = {s.name: s.layer_info() for s in specs}
        self._ks = resolve_top_k(list(infos.values()), self.top_k)
        self._infos = {n: info if info.top_k is not None else replace(info, top_k=self._ks[n])
                       for n, info in infos.items()}
        self._specs = specs
        self._reset()
        self._handles.append(model.register_forward_pre_hook(self._begin, with_kwargs=True))
        for spec in specs:
            self._handles.append(spec.module.register_forward_hook(self._router_hook(spec)))
        self._handles.append(model.register_forward_hook(self._end))

    def remove(self) -> None:
        """Remove the hooks (done by ``on_train_end``)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._active = False
        self._buffers = {}

    def _reset(self) -> None:
        from usmoe_lp.diagnostics import LoadPartial

        self._partials = {n: LoadPartial.empty(info.num_experts, top_k=self._ks[n]) for n, info in self._infos.items()}

    def _begin(self, module, args, kwargs) -> None:
        if not module.training:
            return
        mask = kwargs.get("attention_mask")
        self._keep = (mask.detach().reshape(-1) != 0) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._buffers = {}
        self._active = True

    def _router_hook(self, spec):
        from usmoe_lp.logs.capture import router_logits

        def hook(module, args, output) -> None:
            if self._active:
                self._buffers.setdefault(spec.name, []).append(router_logits(output, spec).detach())
        return hook

    def _end(self, module, args, output) -> None:
        if not self._active:
            return
        self._active = False
        buffers, self._buffers = self._buffers, {}
        for name, parts in buffers.items():
            z = torch.cat([p.reshape(-1, p.shape[-1]) for p in parts])
            keep = self._keep
            if keep is not None and keep.numel() != z.shape[0]:
                if not self._warned:
                    warnings.warn(f"RoutingStatsCallback: layer {name!r} routed {z.shape[0]} rows but the batch's "
                                  f"attention_mask has {keep.numel()} tokens; counting every row (padding "
                                  "included)", stacklevel=2)
                    self._warned = True
                keep = None
            if keep is not None:
                z = z[keep.to(z.device)]
            self._update(name, z.float().cpu())

    def _update(self, name: str, logits: torch.Tensor) -> None:
        """Feed one forward's (n, N) float32 logits of a layer to its partial."""
        from usmoe_lp.diagnostics.stream import model_mask, selection_scores
        from usmoe_lp.logs.reader import Chunk
        from usmoe_lp.routing import probabilities

        if logits.shape[0] == 0:
            return
        info, k = self._infos[name], self._ks[name]
        probs = probabilities(logits, info.score_function)
        empty = torch.empty(0, dtype=torch.int64)  # model_mask reads the logits (and a captured selection) only
        chunk = Chunk(logits=logits, token_ids=empty, sequence_ids=empty, positions=empty, token_start=0, layer=name)
        mask, _ = model_mask(chunk, selection_scores(logits, info), k, None, info)
        self._partials[name].update(mask.numpy(), probs, logits)

    # ------------------------------------------------------------------ statistics
    def current_stats(self) -> dict[str, float]:
        """The statistics of the tokens seen since the last log, keyed as in the module docstring (empty when
        no token was seen)."""
        p = self.prefix
        out: dict[str, float] = {}
        results = {n: part.result() for n, part in self._partials.items() if part.num_tokens}
        for name, s in results.items():
            if self.load_shares:
                for e, share in enumerate(s.load_share.tolist()):
                    out[f"{p}/{name}/load_share/{e}"] = float(share)
            out[f"{p}/{name}/load_entropy"] = float(s.entropy)
            out[f"{p}/{name}/token_entropy"] = float(s.token_entropy)
            out[f"{p}/{name}/maxvio"] = float(s.maxvio)
            out[f"{p}/{name}/aux_loss"] = float(s.aux_loss)
            out[f"{p}/{name}/tokens"] = int(s.num_tokens)
        if results:
            parts = [self._partials[n] for n in results]
            if len({(q.num_experts, q.top_k) for q in parts}) == 1:  # pooling needs one N and one k
                pooled = parts[0]
                for other in parts[1:]:
                    pooled = pooled.merge(other)
                out[f"{p}/aux_loss_pooled"] = float(pooled.result().aux_loss)
            out[f"{p}/aux_loss_layer_mean"] = float(np.mean([s.aux_loss for s in results.values()]))
        return out

    def flush(self) -> dict[str, float]:
        """Log :meth:`current_stats` through ``trainer.log`` (if any token was seen) and start a new window."""
        stats = self.current_stats()
        if stats:
            self.trainer.log(dict(stats))
            self.logged += 1
        self._reset()
        return stats

    # ------------------------------------------------------------------ TrainerCallback
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            model = getattr(self.trainer, "model", None)
        self.install(model)

    def on_step_end(self, args, state, control, **kwargs):
        return self._log_if_due(control)

    def on_epoch_end(self, args, state, control, **kwargs):
        return self._log_if_due(control)

    def _log_if_due(self, control):
        """Flush when the Trainer's flow asks for a log. ``trainer.log`` runs the callbacks' ``on_log``, whose
        handler clears ``control.should_log``; it is set again so that the Trainer still logs its loss."""
        if control.should_log:
            self.flush()
            control.should_log = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.remove()
