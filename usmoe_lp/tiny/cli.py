"""``usmoe-lp train-tiny``: the typer command that retrains the embedded tiny MoE model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from usmoe_lp.tiny.train import DEFAULTS

__all__ = ["train_tiny_command"]


def train_tiny_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="directory to write the model, tokenizer, training.json "
                                                          "and model card README.md to")],
    steps: Annotated[int, typer.Option("--steps", min=1, help="optimiser steps")] = int(DEFAULTS["steps"]),
    seed: Annotated[int, typer.Option("--seed", help="seed of the weights and of the data order")] = 0,
    seq_len: Annotated[int, typer.Option("--seq-len", min=2, help="tokens (bytes) per training window")] = int(
        DEFAULTS["seq_len"]),
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="windows per step")] = int(
        DEFAULTS["batch_size"]),
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="peak learning rate (AdamW, cosine decay)")] = float(
        DEFAULTS["lr"]),
    hidden_size: Annotated[int, typer.Option("--hidden-size", min=8, help="model width")] = int(
        DEFAULTS["hidden_size"]),
    intermediate_size: Annotated[int, typer.Option("--intermediate-size", min=1, help="FFN width of each "
                                                                                       "expert")] = int(
        DEFAULTS["intermediate_size"]),
    layers: Annotated[int, typer.Option("--layers", min=1, help="decoder layers")] = int(DEFAULTS["num_layers"]),
    heads: Annotated[int, typer.Option("--heads", min=1, help="attention heads")] = int(DEFAULTS["num_heads"]),
    experts: Annotated[int, typer.Option("--experts", min=1, help="experts per layer")] = int(
        DEFAULTS["num_experts"]),
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="experts per token")] = int(DEFAULTS["top_k"]),
    aux_loss_coef: Annotated[float, typer.Option("--aux-loss-coef", min=0.0, help="weight of the load-balancing "
                                                                                   "loss")] = float(
        DEFAULTS["router_aux_loss_coef"]),
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", min=0, help="linear warm-up steps")] = int(
        DEFAULTS["warmup_steps"]),
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="torch CPU threads (default: torch's "
                                                                         "choice)")] = None,
) -> None:
    """Train the tiny byte-level OLMoE model on the pydoc_data topics (CPU, a few minutes) and write it to --out.

    Seeded and reproducible; prints step, loss and tokens/s, then the held-out loss, perplexity and bits per
    byte against a unigram baseline. --out gets config.json, model.safetensors, the tokenizer, training.json and
    a model card (README.md) with the hyperparameters, results, router statistics and the command to reproduce.
    The defaults are those of the model shipped in usmoe_lp/tiny/model.
    """
    from usmoe_lp.cli_errors import fail
    from usmoe_lp.errors import UsmoeLpError
    from usmoe_lp.tiny.train import train_tiny

    try:
        train_tiny(out, steps=steps, seed=seed, seq_len=seq_len, batch_size=batch_size, lr=lr,
                   hidden_size=hidden_size, intermediate_size=intermediate_size, num_layers=layers, num_heads=heads,
                   num_experts=experts, top_k=top_k, router_aux_loss_coef=aux_loss_coef, warmup_steps=warmup_steps,
                   threads=threads, log=lambda line: print(line, flush=True))
    except (UsmoeLpError, OSError) as exc:
        raise fail(exc, aliases=_KEYWORD_FLAGS) from None


# train_tiny's keywords that the options spell differently
_KEYWORD_FLAGS = {"num_layers": "--layers", "num_heads": "--heads", "num_experts": "--experts",
                  "router_aux_loss_coef": "--aux-loss-coef"}
