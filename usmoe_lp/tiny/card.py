"""The model card (``README.md``) of a tiny model, generated from a :class:`usmoe_lp.tiny.result.TrainResult`.

Every number and every observation in the card is computed from the result, so re-running the training
command regenerates the card exactly for the new weights.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from usmoe_lp.tiny.evaluate import RoutingStats
    from usmoe_lp.tiny.result import TrainResult

__all__ = ["render_card", "write_card"]


def _f(x: float, digits: int = 3) -> str:
    return "nan" if math.isnan(x) else f"{x:.{digits}f}"


def _routing_table(trained: RoutingStats, init: RoutingStats) -> list[str]:
    rows = ["| layer | load entropy (norm.) | max/mean load | CV of load | token entropy (norm.) | top-k prob. mass "
            "| byte specialisation |", "|---|---|---|---|---|---|---|"]
    for t, i in zip(trained.layers, init.layers, strict=True):
        rows.append(f"| {t.layer} | {_f(t.load_entropy)} ({_f(i.load_entropy)}) | {_f(t.max_over_mean, 2)} "
                    f"({_f(i.max_over_mean, 2)}) | {_f(t.cv)} ({_f(i.cv)}) | {_f(t.token_entropy)} "
                    f"({_f(i.token_entropy)}) | {_f(t.top_k_mass)} ({_f(i.top_k_mass)}) | "
                    f"{_f(t.byte_specialisation)} ({_f(i.byte_specialisation)}) |")
    return rows


def _share_table(stats: RoutingStats) -> list[str]:
    head = "| layer | " + " | ".join(f"e{e}" for e in range(stats.num_experts)) + " |"
    rows = [head, "|---" * (stats.num_experts + 1) + "|"]
    for layer in stats.layers:
        rows.append(f"| {layer.layer} | " + " | ".join(f"{100 * s:.1f}" for s in layer.load_share) + " |")
    return rows


def _nmi_table(stats: RoutingStats) -> list[str]:
    n = len(stats.layers)
    rows = ["| layer | " + " | ".join(str(j) for j in range(n)) + " |", "|---" * (n + 1) + "|"]
    for i in range(n):
        rows.append(f"| {i} | " + " | ".join(_f(stats.top1_nmi[i][j], 2) for j in range(n)) + " |")
    return rows


def _off_diagonal(stats: RoutingStats) -> list[float]:
    n = len(stats.layers)
    return [stats.top1_nmi[i][j] for i in range(n) for j in range(i + 1, n)]


def _observations(r: TrainResult) -> list[str]:
    t, i = r.routing.layers, r.routing_init.layers
    k, n = r.routing.top_k, r.routing.num_experts
    lines = []
    ent = [x.load_entropy for x in t]
    mom = [x.max_over_mean for x in t]
    dead = sum(share <= 0.001 for x in t for share in x.load_share)
    lines.append(
        f"- **Load is {'not ' if min(ent) < 0.99 else ''}uniform.** Normalised load entropy per layer "
        f"{_f(min(ent))}-{_f(max(ent))} and max/mean load {_f(min(mom), 2)}-{_f(max(mom), 2)} (perfect balance: "
        f"1 and 1; at random initialisation {_f(min(x.load_entropy for x in i))}-"
        f"{_f(max(x.load_entropy for x in i))} and {_f(min(x.max_over_mean for x in i), 2)}-"
        f"{_f(max(x.max_over_mean for x in i), 2)}"
        + ("; random routers are uneven too, because the top-k of almost equal logits follows the byte frequencies: "
           "what training changes is the confidence, next point" if min(x.load_entropy for x in i) < 0.95 else "")
        + f"). The busiest expert of a layer takes up to "
        f"{100 * max(max(x.load_share) for x in t):.1f}% of the selections and the idlest down to "
        f"{100 * min(min(x.load_share) for x in t):.1f}% (uniform: {100 / n:.1f}%). With the auxiliary "
        f"loss (coefficient {r.hyperparameters['router_aux_loss_coef']}) "
        + ("every expert stays in use (none below 0.1% of the selections)." if dead == 0 else
           f"{dead} expert(s) get below 0.1% of their layer's selections (dead by moewatch's threshold)."))
    tok = [x.token_entropy for x in t]
    lines.append(
        ("- **The routers are confident, unlike random ones.**" if max(tok) < min(x.token_entropy for x in i) - 0.05
         else "- **The routers are hardly more confident than random ones.**")
        + f" Mean per-token routing entropy (normalised by ln {n}) "
        f"is {_f(min(tok))}-{_f(max(tok))} after training versus {_f(min(x.token_entropy for x in i))}-"
        f"{_f(max(x.token_entropy for x in i))} at initialisation (1 = uniform probabilities); the {k} selected "
        f"experts carry {_f(min(x.top_k_mass for x in t))}-{_f(max(x.top_k_mass for x in t))} of the probability "
        f"({_f(min(x.top_k_mass for x in i))}-{_f(max(x.top_k_mass for x in i))} at init; uniform: {_f(k / n)}).")
    spec = [x.byte_specialisation for x in t]
    lines.append(
        "- **Layers differ.** Byte specialisation (share of a byte's occurrences sent to its most frequent top-1 "
        "expert, mean over bytes) is " + ", ".join(f"{_f(s, 2)}" for s in spec) + " for layers 0-"
        f"{len(t) - 1} (init: " + ", ".join(f"{_f(x.byte_specialisation, 2)}" for x in i) + "): "
        + ("the first layer routes mostly by the input byte and deeper layers by context. " if spec[0] == max(spec)
           else "specialisation is not highest in the first layer. ")
        + (f"Top-1 choices of different layers share {_f(min(_off_diagonal(r.routing)), 2)}-"
           f"{_f(max(_off_diagonal(r.routing)), 2)} normalised mutual information (init: "
           f"{_f(min(_off_diagonal(r.routing_init)), 2)}-{_f(max(_off_diagonal(r.routing_init)), 2)})."
           if len(t) > 1 else ""))
    first = t[0]
    picks = ", ".join(f"e{e}: `{b}` ({100 * p:.0f}%)" for e, (b, p) in enumerate(first.top_bytes))
    lines.append(f"- **What layer-0 experts take** (per expert, the byte, among those seen >= 20 times, that "
                 f"selects it most often, and P(expert in top-{k} | byte)): {picks}.")
    return lines


def render_card(r: TrainResult) -> str:
    """The model card as Markdown (str) for the result ``r`` of :func:`usmoe_lp.tiny.train.train_tiny`."""
    hp, d = r.hyperparameters, r.data
    held, uni, init = r.heldout, r.unigram, r.heldout_init
    size_mb = sum(p.stat().st_size for p in Path(r.out).glob("*.safetensors")) / 1e6 if Path(r.out).exists() else 0
    lines = [
        "---", "library_name: transformers", "license: apache-2.0", "pipeline_tag: text-generation",
        "tags: [olmoe, mixture-of-experts, byte-level, usmoe-lp]", "---", "",
        "# usmoe-lp tiny OLMoE: a byte-level MoE language model trained on the Python reference", "",
        f"A {r.num_parameters / 1e6:.2f} M-parameter `OlmoeForCausalLM` ({hp['num_layers']} layers x "
        f"{hp['num_experts']} experts, top-{hp['top_k']}) trained on CPU by `usmoe_lp.tiny.train_tiny` on the "
        "documentation topics of the standard library (`pydoc_data.topics`). It ships with usmoe-lp so that the "
        "router analyses run on a trained router, offline and without a GPU: random routers route almost "
        "uniformly and teach nothing. It is a research fixture, not a useful language model.", "",
        "## Use", "", "```python",
        "from usmoe_lp.tiny import load_tiny, heldout_text",
        "model, tokenizer = load_tiny()          # float32, eval mode, from usmoe_lp.tiny.TINY_MODEL_DIR",
        "# or: transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR)", "```", "",
        "`usmoe-lp capture --model <this directory> --text FILE --out LOG` logs its router logits like any "
        "transformers model (router modules `model.layers.<i>.mlp.gate`, softmax scores, top-2, no renormalisation).",
        "",
        "## Architecture", "",
        "| field | value |", "|---|---|",
        "| class | `OlmoeForCausalLM` (`model_type: olmoe`) |",
        f"| parameters | {r.num_parameters:,} (float32, {size_mb:.1f} MB safetensors) |",
        f"| layers / hidden / heads | {hp['num_layers']} / {hp['hidden_size']} / {hp['num_heads']} |",
        f"| experts per layer / top-k / expert FFN size | {hp['num_experts']} / {hp['top_k']} / "
        f"{hp['intermediate_size']} (SwiGLU) |",
        "| router | linear, softmax over experts, top-k, gate weights not renormalised |",
        "| vocabulary | 259: bytes 0-255 (token id = byte value), `<|pad|>` 256, `<|bos|>` 257, `<|eos|>` 258 |",
        "| positions | RoPE (theta 10000), trained on windows of "
        f"{hp['seq_len']} tokens |", "",
        "The tokenizer (`tokenizer.json`) is byte-level with no merges: every UTF-8 byte is one token, any text "
        "round-trips, special-token strings in text are split into bytes, and no BOS/EOS is added on encoding.", "",
        "## Data and split", "",
        f"- Source: {d.get('source', 'pydoc_data.topics')}, {d.get('topics', '?')} topics of the Python language "
        "reference (English prose with code examples). The text depends on the Python version.",
        f"- Split: {d.get('split_rule', '')}.",
        f"- Held-out topics ({len(d.get('heldout_topics', []))}): "
        + ", ".join(f"`{k}`" for k in d.get("heldout_topics", [])) + ".",
        f"- Tokens (`[BOS] + bytes + [EOS]` per topic): {d.get('train_tokens', 0):,} training, "
        f"{d.get('heldout_tokens', 0):,} held-out.", "",
        "## Training", "",
        "| hyperparameter | value |", "|---|---|",
        *[f"| {key} | {value} |" for key, value in hp.items()],
        "| optimiser | AdamW (betas 0.9, 0.95; weight decay on matrices only), linear warm-up then cosine decay, "
        "gradient clipping |",
        "| loss | cross-entropy + router_aux_loss_coef x load-balancing loss (`OlmoeForCausalLM`, "
        "`output_router_logits=True`) |",
        "| batches | windows at uniform random offsets of the training stream, from `torch.Generator().manual_seed"
        "(seed)`; weights from `torch.manual_seed(seed)` |", "",
        f"{r.train_tokens:,} training tokens ({r.train_tokens / max(d.get('train_tokens', 1), 1):.1f} passes over "
        f"the training stream) in {r.seconds:.0f} s ({r.tokens_per_second:,.0f} tokens/s, evaluation excluded) on "
        f"{r.machine.get('processor')} with {r.machine.get('torch_threads')} torch threads "
        f"({r.machine.get('cpu_count')} CPUs visible, 1-minute load average {r.machine.get('load_average', 'n/a')} "
        "when training ended: a shared machine slows this down; "
        f"{r.machine.get('platform')}; Python "
        f"{r.machine.get('python')}, torch {r.machine.get('torch')}).", "",
        "Reproduce (from a usmoe-lp checkout or install):", "", "```", r.command, "```", "",
        "## Results (held-out topics)", "",
        "Loss in nats per token over every held-out token but BOS (bytes and EOS); bits per byte over the byte "
        "targets; windows of seq_len tokens with stride seq_len - 1 (every token predicted once, up to seq_len - 1 "
        "tokens of context).", "",
        "| model | loss (nats/token) | perplexity | bits/byte |", "|---|---|---|---|",
        f"| **trained** | **{_f(held.loss, 4)}** | **{_f(held.perplexity)}** | **{_f(held.bits_per_byte)}** |",
        f"| unigram byte model of the training text (add-one) | {_f(uni.loss, 4)} | {_f(uni.perplexity)} | "
        f"{_f(uni.bits_per_byte)} |",
        f"| same architecture at initialisation | {_f(init.loss, 4)} | {_f(init.perplexity)} | "
        f"{_f(init.bits_per_byte)} |", "",
        f"Training loss (language-model part, mean of the last 10% of steps): {_f(r.train_loss, 4)} nats/token "
        f"(first step: {_f(r.first_loss, 4)}); held-out: {_f(held.loss, 4)} over {held.tokens:,} tokens.", "",
        "## Routers", "",
        f"Measured on the {r.routing.tokens:,} held-out tokens with the model's own selection (top-{r.routing.top_k} "
        "of the softmax of the raw router logits). Each cell: trained (random initialisation of the same "
        "architecture, same seed). Load entropy = -sum_e l_e ln l_e / ln E over the load shares l_e of top-k "
        "selections; max/mean = MaxVio + 1; CV uses the population std; token entropy = mean over tokens of the "
        "router's softmax entropy / ln E; byte specialisation as OLMoE's vocabulary specialisation over bytes seen "
        ">= 10 times (top-1).", "",
        *_routing_table(r.routing, r.routing_init), "",
        "Load share (% of the top-k selections) per expert, trained model:", "",
        *_share_table(r.routing), "",
        "Normalised mutual information between the top-1 experts of two layers on the same tokens "
        "(1 on the diagonal):", "",
        *_nmi_table(r.routing), "",
        "### What we see", "",
        *_observations(r), "",
        "## Limitations", "",
        "- Trained for a few CPU minutes on ~0.4 MB of text: it generates locally plausible reference-manual "
        "English, not coherent text. Use it to study routing, not for generation.",
        "- Held-out topics share vocabulary and style with the training topics (the same manual); paragraphs "
        "shared between topics were removed from training, so no held-out paragraph is in the training text.",
        "- Numbers are for the shipped weights on this Python version's `pydoc_data`; another Python version "
        "changes the text a little.", "",
        "Weights: Apache-2.0 (as usmoe-lp). Training text: the Python documentation, (c) Python Software "
        "Foundation, PSF License.", "",
    ]
    return "\n".join(lines)


def write_card(path: str | Path, result: TrainResult) -> Path:
    """Write :func:`render_card` of ``result`` to ``path`` (UTF-8); returns the path."""
    path = Path(path)
    path.write_text(render_card(result), encoding="utf-8")
    return path
