"""Train the tiny OLMoE byte-level language model on the ``pydoc_data`` topics (CPU, a few minutes).

``train_tiny(out, steps=..., seed=...)`` builds an :class:`transformers.OlmoeForCausalLM` (OLMoE, Muennighoff et
al. 2024, arXiv 2409.02060: softmax router, top-k without renormalisation, load-balancing auxiliary loss of
Switch/GShard, Fedus et al. 2022, HF ``load_balancing_loss_func``), trains it with AdamW on random windows of
the training stream (:mod:`usmoe_lp.tiny.data`), evaluates held-out loss / perplexity / bits per byte and the
routers (:mod:`usmoe_lp.tiny.evaluate`) against the same architecture at its random initialisation and a unigram
byte model, and writes ``out/``: ``config.json``, ``model.safetensors`` (float32), ``generation_config.json``,
``tokenizer.json``, ``tokenizer_config.json``, ``training.json`` and the model card ``README.md``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from usmoe_lp.errors import InvalidParameter
from usmoe_lp.tiny.data import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    VOCAB_SIZE,
    document_ids,
    heldout_documents,
    heldout_keys,
    train_documents,
)
from usmoe_lp.tiny.evaluate import evaluate, unigram_loss
from usmoe_lp.tiny.result import TrainResult

__all__ = ["DEFAULTS", "TrainResult", "tiny_config", "train_tiny"]

# the defaults of train_tiny / `usmoe-lp train-tiny` (the shipped model was trained with exactly these)
DEFAULTS: dict[str, float | int] = {
    "steps": 600, "seq_len": 256, "batch_size": 16, "lr": 3e-3, "seed": 0, "hidden_size": 128,
    "intermediate_size": 128, "num_layers": 4, "num_heads": 4, "num_experts": 8, "top_k": 2,
    "router_aux_loss_coef": 0.01, "warmup_steps": 30, "min_lr_ratio": 0.1, "weight_decay": 0.1, "grad_clip": 1.0,
}
_CLI_FLAGS = {"steps": "--steps", "seq_len": "--seq-len", "batch_size": "--batch-size", "lr": "--lr",
              "seed": "--seed", "hidden_size": "--hidden-size", "intermediate_size": "--intermediate-size",
              "num_layers": "--layers", "num_heads": "--heads", "num_experts": "--experts", "top_k": "--top-k",
              "router_aux_loss_coef": "--aux-loss-coef", "warmup_steps": "--warmup-steps"}


def tiny_config(*, hidden_size: int = 128, intermediate_size: int = 128, num_layers: int = 4, num_heads: int = 4,
                num_experts: int = 8, top_k: int = 2, router_aux_loss_coef: float = 0.01, max_positions: int = 4096):
    """The ``OlmoeConfig`` of the tiny model: byte vocabulary (259 = 256 bytes + PAD, BOS, EOS), ``num_layers``
    decoder layers of ``num_experts`` SwiGLU experts (``intermediate_size`` each), top-``top_k`` softmax routing
    (no top-k renormalisation, as OLMoE), untied embeddings, RoPE, QK-norm.

    >>> cfg = tiny_config()
    >>> cfg.model_type, cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok, cfg.vocab_size
    ('olmoe', 4, 8, 2, 259)
    """
    from transformers import OlmoeConfig

    if hidden_size % num_heads:
        raise InvalidParameter(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    if not 1 <= top_k <= num_experts:
        raise InvalidParameter(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    return OlmoeConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=False,
        router_aux_loss_coef=router_aux_loss_coef, output_router_logits=False, max_position_embeddings=max_positions,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=False,
    )


def _lr_at(step: int, *, steps: int, lr: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__,
            "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


def _data_summary(train_ids: torch.Tensor, eval_ids: torch.Tensor) -> dict:
    from usmoe_lp.tiny.data import topics

    return {"source": "pydoc_data.topics.topics (Python " + platform.python_version() + ")",
            "topics": len(topics()), "heldout_topics": heldout_keys(), "train_documents": len(train_documents()),
            "train_tokens": int(train_ids.numel()), "heldout_tokens": int(eval_ids.numel()),
            "split_rule": "held out iff int.from_bytes(sha256(b'usmoe-lp-tiny:' + key)[:8], 'big') % 10 == 0; "
                          "training topics drop paragraphs whose whitespace-normalised text is a held-out "
                          "paragraph"}


def _command(out: Path, hp: dict) -> str:
    parts = ["usmoe-lp", "train-tiny", "--out", str(out)]
    for key, flag in _CLI_FLAGS.items():
        if hp[key] != DEFAULTS[key]:
            parts += [flag, repr(hp[key]) if isinstance(hp[key], float) else str(hp[key])]
    if hp.get("threads") is not None:
        parts += ["--threads", str(hp["threads"])]
    api_only = {k: hp[k] for k in ("min_lr_ratio", "weight_decay", "grad_clip") if hp[k] != DEFAULTS[k]}
    if hp.get("heldout_tokens") is not None:
        api_only["heldout_tokens"] = hp["heldout_tokens"]
    if api_only:  # settings the command line does not expose: say how to reproduce them from Python
        parts.append("  # with train_tiny(..., " + ", ".join(f"{k}={v!r}" for k, v in api_only.items()) + ")")
    return " ".join(parts)


def train_tiny(out: str | os.PathLike, *, steps: int = 600, seq_len: int = 256, batch_size: int = 16,
               lr: float = 3e-3, seed: int = 0, hidden_size: int = 128, intermediate_size: int = 128,
               num_layers: int = 4, num_heads: int = 4, num_experts: int = 8, top_k: int = 2,
               router_aux_loss_coef: float = 0.01, warmup_steps: int = 30, min_lr_ratio: float = 0.1,
               weight_decay: float = 0.1, grad_clip: float = 1.0, log_every: int = 25, eval_batch_size: int = 16,
               heldout_tokens: int | None = None, threads: int | None = None,
               log: Callable[[str], None] | None = print) -> TrainResult:
    """Train the tiny OLMoE model and write it, its tokenizer, ``training.json`` and the model card to ``out``.

    Seeded: ``torch.manual_seed(seed)`` before the weights are initialised, and the training windows (``batch_size``
    windows of ``seq_len`` tokens per step, offsets uniform over the training stream) come from a
    ``torch.Generator`` seeded with ``seed``. Optimiser: AdamW (betas 0.9/0.95, ``weight_decay`` on matrices only),
    linear warm-up for ``warmup_steps`` then cosine decay to ``min_lr_ratio * lr``, gradient clipping at
    ``grad_clip``. Loss: cross-entropy (nats/token) + ``router_aux_loss_coef`` x the load-balancing loss, as
    ``OlmoeForCausalLM`` computes with ``output_router_logits=True``. ``heldout_tokens``: evaluate on the first
    that many tokens of the held-out stream (None: all of it). ``threads``: ``torch.set_num_threads`` for the run
    (restored afterwards). ``log``: receives progress lines (None: silent).

    >>> result = train_tiny("/tmp/tiny", steps=3, log=None)   # doctest: +SKIP
    >>> result.heldout.loss < result.unigram.loss             # doctest: +SKIP
    """
    from transformers import OlmoeForCausalLM

    from usmoe_lp.tiny.card import write_card
    from usmoe_lp.tiny.tokenizer import byte_level_tokenizer

    for name, value in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every),
                        ("eval_batch_size", eval_batch_size)):
        if not isinstance(value, int) or value < 1:
            raise InvalidParameter(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise InvalidParameter(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise InvalidParameter(f"lr must be a positive finite number, got {lr!r}")
    if warmup_steps < 0 or not 0 <= min_lr_ratio <= 1:
        raise InvalidParameter("warmup_steps must be >= 0 and min_lr_ratio in [0, 1]")
    out = Path(out)
    say = log or (lambda _line: None)
    hp = {"steps": steps, "seq_len": seq_len, "batch_size": batch_size, "lr": lr, "seed": seed,
          "hidden_size": hidden_size, "intermediate_size": intermediate_size, "num_layers": num_layers,
          "num_heads": num_heads, "num_experts": num_experts, "top_k": top_k,
          "router_aux_loss_coef": router_aux_loss_coef, "warmup_steps": warmup_steps, "min_lr_ratio": min_lr_ratio,
          "weight_decay": weight_decay, "grad_clip": grad_clip, "heldout_tokens": heldout_tokens, "threads": threads}
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        train_ids = document_ids(train_documents())
        eval_ids = document_ids(heldout_documents())
        if heldout_tokens is not None:
            eval_ids = eval_ids[:heldout_tokens]
        if train_ids.numel() <= seq_len:
            raise InvalidParameter(f"seq_len {seq_len} is longer than the training stream ({train_ids.numel()})")
        config = tiny_config(hidden_size=hidden_size, intermediate_size=intermediate_size, num_layers=num_layers,
                             num_heads=num_heads, num_experts=num_experts, top_k=top_k,
                             router_aux_loss_coef=router_aux_loss_coef)
        torch.manual_seed(seed)
        model = OlmoeForCausalLM(config).float()
        n_params = sum(p.numel() for p in model.parameters())
        say(f"tiny OLMoE: {n_params:,} parameters, {num_layers} layers x {num_experts} experts (top-{top_k}), "
            f"train {train_ids.numel():,} tokens, held-out {eval_ids.numel():,} tokens ({len(heldout_keys())} topics)")
        unigram = unigram_loss(train_ids, eval_ids, VOCAB_SIZE)
        heldout_init, routing_init = evaluate(model, eval_ids, seq_len=seq_len, batch_size=eval_batch_size)
        say(f"init: held-out loss {heldout_init.loss:.3f} nats/token; unigram baseline {unigram.loss:.3f} "
            f"nats/token ({unigram.bits_per_byte:.3f} bits/byte)")

        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
        optimiser = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
        generator = torch.Generator().manual_seed(seed)
        offsets_high = train_ids.numel() - seq_len
        model.train()
        curve: list[tuple[int, float]] = []
        losses: list[float] = []
        seconds = 0.0
        tokens_seen = 0
        window_start = time.perf_counter()
        window_tokens = 0
        for step in range(steps):
            t0 = time.perf_counter()
            starts = torch.randint(0, offsets_high + 1, (batch_size,), generator=generator)
            batch = torch.stack([train_ids[s:s + seq_len] for s in starts.tolist()])
            for group in optimiser.param_groups:
                group["lr"] = _lr_at(step, steps=steps, lr=lr, warmup=warmup_steps, min_ratio=min_lr_ratio)
            output = model(input_ids=batch, labels=batch, output_router_logits=True)
            output.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
            aux = float(output.aux_loss.detach()) if output.aux_loss is not None else 0.0
            ce = float(output.loss.detach()) - router_aux_loss_coef * aux
            if not math.isfinite(ce):
                raise InvalidParameter(f"training diverged at step {step + 1} (loss {ce}); lower --lr")
            losses.append(ce)
            seconds += time.perf_counter() - t0
            tokens_seen += batch.numel()
            window_tokens += batch.numel()
            if (step + 1) % log_every == 0 or step == 0 or step + 1 == steps:
                curve.append((step + 1, ce))
                rate = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                say(f"step {step + 1:5d}/{steps}  loss {ce:.4f}  aux {aux:.4f}  "
                    f"lr {optimiser.param_groups[0]['lr']:.2e}  {rate:,.0f} tokens/s  {seconds:6.1f} s")
                window_start, window_tokens = time.perf_counter(), 0
        model.eval()
        heldout, routing = evaluate(model, eval_ids, seq_len=seq_len, batch_size=eval_batch_size)
        tail = losses[-max(1, steps // 10):]
        say(f"held-out: loss {heldout.loss:.4f} nats/token, perplexity {heldout.perplexity:.3f}, "
            f"{heldout.bits_per_byte:.3f} bits/byte (unigram {unigram.bits_per_byte:.3f} bits/byte)")

        out.mkdir(parents=True, exist_ok=True)
        model.config.output_router_logits = False
        model.save_pretrained(out)
        byte_level_tokenizer().save_pretrained(out)
        result = TrainResult(
            out=out, hyperparameters=hp, num_parameters=n_params, train_tokens=tokens_seen, heldout=heldout,
            heldout_init=heldout_init, unigram=unigram, train_loss=sum(tail) / len(tail), first_loss=losses[0],
            seconds=seconds, tokens_per_second=tokens_seen / max(seconds, 1e-9), routing=routing,
            routing_init=routing_init, machine=_machine(), command=_command(out, hp), loss_curve=tuple(curve),
            data=_data_summary(train_ids, eval_ids))
        (out / "training.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
        write_card(out / "README.md", result)
        say(f"wrote {out} ({seconds:.1f} s of training, {result.tokens_per_second:,.0f} tokens/s)")
        return result
    finally:
        torch.set_num_threads(previous_threads)
