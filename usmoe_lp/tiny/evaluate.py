"""Held-out loss and router statistics of the tiny model (plain torch; independent of ``usmoe_lp.diagnostics``).

Evaluation windows: the token stream (``[BOS] + bytes + [EOS]`` per document, :func:`usmoe_lp.tiny.data.document_ids`)
is cut into windows of ``seq_len`` tokens with stride ``seq_len - 1``, so every token but the first is predicted
exactly once, with up to ``seq_len - 1`` tokens of context. Targets that are ``BOS`` (always right after ``EOS``)
are not scored. Units: **nats per token** for the loss (bytes and EOS targets), **bits per byte** over the byte
targets only, perplexity ``exp(loss)``.

Router statistics (load entropy as in moewatch, MaxVio as in DeepSeek's arXiv 2408.15664, the coefficient of
variation, OLMoE's vocabulary specialisation), per layer, over every token of the stream once (the window overlap
is counted once), with the model's own selection (top-k of the softmax of the raw router logits; OLMoE,
Muennighoff et al. 2024):

* ``load_share[e] = c_e / Σ c`` with ``c_e`` the number of tokens that selected expert ``e`` among their top-k;
* ``load_entropy = -Σ ℓ_e ln ℓ_e / ln E`` (normalised to [0, 1]; 1 = perfectly balanced);
* ``max_over_mean = max_e c_e / mean_e c_e`` (= MaxVio + 1) and ``cv = std_e c_e / mean_e c_e`` (population std);
* ``token_entropy = mean_t H(softmax(z_t)) / ln E`` (normalised mean per-token routing entropy; 1 = uniform
  router probabilities, i.e. the router expresses no preference) and ``top_k_mass`` = mean total probability of the
  k selected experts;
* ``byte_specialisation``: over byte values seen at least 10 times, the mean of ``max_e n(v, e) / n_v`` with
  ``n(v, e)`` the top-1 selections of expert ``e`` by tokens of byte ``v`` (OLMoE's vocabulary specialisation);
* ``top_bytes[e]``: among bytes seen at least 20 times, the byte ``v`` maximising ``P(e in top-k | v)``, and that
  probability (what an expert is for, at a glance);
* between layers, ``top1_nmi[i][j]``: normalised mutual information ``I(A_i; A_j) / sqrt(H(A_i) H(A_j))`` of the
  top-1 experts of the same tokens (permutation-invariant, since expert indices of different layers are unrelated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from usmoe_lp.errors import InvalidParameter
from usmoe_lp.tiny.data import BOS_ID, EOS_ID

__all__ = ["HeldoutLoss", "LayerRouting", "RoutingStats", "eval_windows", "evaluate", "scored_targets",
           "unigram_loss"]


@dataclass(frozen=True)
class HeldoutLoss:
    """Cross-entropy on held-out targets: ``loss`` nats/token (bytes and EOS), ``perplexity`` = exp(loss),
    ``bits_per_byte`` over the ``bytes`` byte targets; ``tokens`` targets scored in all."""

    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int

    def to_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "tokens": self.tokens, "bytes": self.bytes}


@dataclass(frozen=True)
class LayerRouting:
    """One layer's routing on the evaluation tokens (see the module docstring for the definitions)."""

    layer: int
    load_share: tuple[float, ...]
    load_entropy: float
    max_over_mean: float
    cv: float
    token_entropy: float
    top_k_mass: float
    byte_specialisation: float
    top_bytes: tuple[tuple[str, float], ...]  # per expert: the byte most often routed to it, P(expert in top-k | byte)

    def to_dict(self) -> dict:
        return {"layer": self.layer, "load_share": list(self.load_share), "load_entropy": self.load_entropy,
                "max_over_mean": self.max_over_mean, "cv": self.cv, "token_entropy": self.token_entropy,
                "top_k_mass": self.top_k_mass, "byte_specialisation": self.byte_specialisation,
                "top_bytes": [[b, p] for b, p in self.top_bytes]}


@dataclass(frozen=True)
class RoutingStats:
    """Per-layer routing of ``tokens`` tokens, and the top-1 NMI between layers (``top1_nmi[i][j]``)."""

    tokens: int
    num_experts: int
    top_k: int
    layers: tuple[LayerRouting, ...]
    top1_nmi: tuple[tuple[float, ...], ...]

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "num_experts": self.num_experts, "top_k": self.top_k,
                "layers": [layer.to_dict() for layer in self.layers],
                "top1_nmi": [list(row) for row in self.top1_nmi]}


def eval_windows(ids: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    """Windows of ``seq_len`` tokens with stride ``seq_len - 1`` covering the 1-d stream ``ids`` (the last one may
    be shorter, at least 2 tokens).

    >>> [w.tolist() for w in eval_windows(torch.arange(7), 3)]
    [[0, 1, 2], [2, 3, 4], [4, 5, 6]]
    """
    if seq_len < 2:
        raise InvalidParameter(f"seq_len must be at least 2 to predict anything, got {seq_len}")
    if ids.ndim != 1 or ids.numel() < 2:
        raise InvalidParameter(f"ids must be a 1-d stream of at least 2 tokens, got shape {tuple(ids.shape)}")
    stride = seq_len - 1
    return [ids[s:s + seq_len] for s in range(0, ids.numel() - 1, stride)]


def scored_targets(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scored, is_byte)``, (n,) bool each, for (n,) int64 target ids: a target is scored unless it is ``BOS``
    (always right after ``EOS``); a scored target is a byte unless it is ``EOS`` (bits per byte count bytes)."""
    scored = targets != BOS_ID
    return scored, scored & (targets != EOS_ID)


def _heldout(nll_sum: float, byte_nll_sum: float, tokens: int, nbytes: int) -> HeldoutLoss:
    loss = nll_sum / max(tokens, 1)
    return HeldoutLoss(loss=loss, perplexity=math.exp(loss), bits_per_byte=byte_nll_sum / max(nbytes, 1) / math.log(2),
                       tokens=tokens, bytes=nbytes)


def unigram_loss(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab_size: int) -> HeldoutLoss:
    """The baseline: a unigram model of the training stream (add-one smoothed counts over ``vocab_size`` ids, BOS
    excluded), scored on the same targets as :func:`evaluate` (every token of ``eval_ids`` but the first, BOS
    excluded). ``train_ids``, ``eval_ids``: 1-d long tensors.

    >>> stream = torch.tensor([257, 97, 97, 98, 258])
    >>> round(unigram_loss(stream, stream, 259).bits_per_byte, 3)  # (2 log2(263/3) + log2(263/2)) / 3
    6.649
    """
    counts = torch.bincount(train_ids[train_ids != BOS_ID], minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    targets = eval_ids[1:]
    scored, is_byte = scored_targets(targets)
    nll = -logp[targets]
    return _heldout(float(nll[scored].sum()), float(nll[is_byte].sum()), int(scored.sum()), int(is_byte.sum()))


def _nmi(a: np.ndarray, b: np.ndarray, n: int) -> float:
    joint = np.zeros((n, n), dtype=np.float64)
    np.add.at(joint, (a, b), 1.0)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())
    ha = float(-(pa[pa > 0] * np.log(pa[pa > 0])).sum())
    hb = float(-(pb[pb > 0] * np.log(pb[pb > 0])).sum())
    return mi / math.sqrt(ha * hb) if ha > 0 and hb > 0 else 0.0


def _byte_label(b: int) -> str:
    return {9: "\\t", 10: "\\n", 32: "␣"}.get(b, chr(b) if 33 <= b < 127 else f"0x{b:02x}")


def _layer_routing(layer: int, counts: np.ndarray, entropy_sum: float, mass_sum: float, topk: np.ndarray,
                   token_ids: np.ndarray, n_experts: int) -> LayerRouting:
    top1 = topk[:, 0]
    share = counts / counts.sum()
    nz = share[share > 0]
    n = top1.size
    byte_expert = np.zeros((256, n_experts), dtype=np.int64)
    is_byte = token_ids < 256
    np.add.at(byte_expert, (token_ids[is_byte], top1[is_byte]), 1)
    seen = byte_expert.sum(1)
    frequent = seen >= 10
    spec = float((byte_expert[frequent].max(1) / seen[frequent]).mean()) if frequent.any() else float("nan")
    byte_in_topk = np.zeros((256, n_experts), dtype=np.int64)
    for j in range(topk.shape[1]):
        np.add.at(byte_in_topk, (token_ids[is_byte], topk[is_byte, j]), 1)
    p_expert_given_byte = byte_in_topk / np.maximum(seen, 1)[:, None]
    top_bytes = []
    for e in range(n_experts):
        cand = np.where(seen >= 20, p_expert_given_byte[:, e], -1.0)
        b = int(cand.argmax())
        top_bytes.append((_byte_label(b), float(cand[b])))
    return LayerRouting(
        layer=layer, load_share=tuple(float(x) for x in share),
        load_entropy=float(-(nz * np.log(nz)).sum() / math.log(n_experts)),
        max_over_mean=float(counts.max() / counts.mean()), cv=float(counts.std() / counts.mean()),
        token_entropy=entropy_sum / n / math.log(n_experts), top_k_mass=mass_sum / n,
        byte_specialisation=spec, top_bytes=tuple(top_bytes))


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, *, seq_len: int, batch_size: int = 16) -> tuple[HeldoutLoss, RoutingStats]:
    """Held-out cross-entropy and router statistics of ``model`` (an MoE ``*ForCausalLM`` returning
    ``router_logits`` with ``output_router_logits=True``, e.g. OLMoE or Mixtral) on the 1-d long stream ``ids``.

    The model is run in eval mode in its own dtype; losses are accumulated in float64. See the module docstring
    for the windows, the scored targets and the router statistics.
    """
    if batch_size < 1:
        raise InvalidParameter(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    config = model.config
    n_experts = int(getattr(config, "num_experts", None) or config.num_local_experts)
    top_k = int(config.num_experts_per_tok)
    windows = eval_windows(ids, seq_len)
    groups: list[list[int]] = []
    for i, w in enumerate(windows):  # batches of equal-length windows (only the last window may be shorter)
        if groups and len(groups[-1]) < batch_size and windows[groups[-1][0]].numel() == w.numel():
            groups[-1].append(i)
        else:
            groups.append([i])
    nll_sum = byte_nll_sum = 0.0
    tokens = nbytes = 0
    n_layers = config.num_hidden_layers
    counts = np.zeros((n_layers, n_experts), dtype=np.float64)
    entropy_sum = np.zeros(n_layers, dtype=np.float64)
    mass_sum = np.zeros(n_layers, dtype=np.float64)
    selected: list[list[np.ndarray]] = [[] for _ in range(n_layers)]
    routed_ids: list[np.ndarray] = []
    for group in groups:
        batch = torch.stack([windows[i] for i in group])
        out = model(input_ids=batch, output_router_logits=True)
        logits = out.logits.float()
        targets = batch[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                reduction="none").double()
        scored, is_byte = scored_targets(targets.reshape(-1))
        nll_sum += float(nll[scored].sum())
        byte_nll_sum += float(nll[is_byte].sum())
        tokens += int(scored.sum())
        nbytes += int(is_byte.sum())
        # each token routed once: drop a window's last position unless it is the stream's last window
        keep = torch.ones(batch.shape, dtype=torch.bool)
        for row, index in enumerate(group):
            if index != len(windows) - 1:
                keep[row, -1] = False
        keep_flat = keep.reshape(-1)
        routed_ids.append(batch.reshape(-1)[keep_flat].numpy())
        for layer, z in enumerate(out.router_logits):
            z = z.float().reshape(-1, n_experts)[keep_flat]
            p = torch.softmax(z, dim=-1)
            top_p, top_i = torch.topk(p, top_k, dim=-1)
            counts[layer] += torch.bincount(top_i.reshape(-1), minlength=n_experts).double().numpy()
            entropy_sum[layer] += float(-(p * torch.log(p.clamp_min(1e-30))).sum(-1).double().sum())
            mass_sum[layer] += float(top_p.sum(-1).double().sum())
            selected[layer].append(top_i.numpy())
    if was_training:
        model.train()
    token_ids = np.concatenate(routed_ids)
    topks = [np.concatenate(t) for t in selected]
    firsts = [t[:, 0] for t in topks]
    layers = tuple(_layer_routing(i, counts[i], float(entropy_sum[i]), float(mass_sum[i]), topks[i], token_ids,
                                  n_experts) for i in range(n_layers))
    nmi = tuple(tuple(1.0 if i == j else _nmi(firsts[i], firsts[j], n_experts) for j in range(n_layers))
                for i in range(n_layers))
    routing = RoutingStats(tokens=int(token_ids.size), num_experts=n_experts, top_k=top_k, layers=layers,
                           top1_nmi=nmi)
    return _heldout(nll_sum, byte_nll_sum, tokens, nbytes), routing
