"""The embedded tiny MoE language model: a byte-level ``OlmoeForCausalLM`` trained on the ``pydoc_data`` topics.

:data:`TINY_MODEL_DIR` holds the shipped weights (``save_pretrained`` layout with its tokenizer and model card),
:func:`load_tiny` loads them, :func:`train_tiny` retrains them (``usmoe-lp train-tiny``), and
:func:`heldout_text` / :func:`heldout_documents` give the held-out text never seen in training.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from usmoe_lp.tiny.data import heldout_documents, heldout_text, train_text
from usmoe_lp.tiny.train import TrainResult, train_tiny

__all__ = ["TINY_MODEL_DIR", "TrainResult", "heldout_documents", "heldout_text", "load_tiny", "train_text",
           "train_tiny"]

TINY_MODEL_DIR: Path = Path(__file__).resolve().parent / "model"


def load_tiny(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` of the tiny model at ``path`` (default :data:`TINY_MODEL_DIR`), offline.

    ``model``: ``transformers.OlmoeForCausalLM`` in eval mode on CPU, parameters in ``dtype`` (default float32);
    ``tokenizer``: its byte-level tokenizer (token id = UTF-8 byte, pad 256, bos 257, eos 258).

    >>> model, tokenizer = load_tiny()
    >>> model.config.model_type, model.config.num_hidden_layers, model.config.num_experts, model.training
    ('olmoe', 4, 8, False)
    >>> tokenizer("hi")["input_ids"]
    [104, 105]
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from usmoe_lp.errors import InvalidParameter

    directory = TINY_MODEL_DIR if path is None else Path(path)
    if not (directory / "config.json").is_file():
        raise InvalidParameter(f"no tiny model at {directory} (config.json missing): pass the directory written by "
                               "`usmoe-lp train-tiny --out DIR`, or reinstall usmoe-lp for the shipped weights")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model.eval(), tokenizer
