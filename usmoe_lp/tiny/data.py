"""The tiny model's corpus: the documentation topics of the standard library's ``pydoc_data.topics``.

``pydoc_data.topics.topics`` maps a topic key (``"assert"``, ``"execmodel"``, ...) to a section of the
Python language reference as plain English text (about 465 kB, 79 topics on Python 3.11; the exact
text depends on the Python version). It ships with every CPython installation, so the model can be
trained and evaluated offline.

Split rule (deterministic, independent of the Python process and of ``PYTHONHASHSEED``):

* a topic is **held out** when ``int.from_bytes(sha256(b"usmoe-lp-tiny:" + key)[:8], "big") % 10 == 0``
  (9 of 79 topics, about 10% of the bytes, on Python 3.11);
* several topics repeat whole paragraphs of others (``specialnames`` contains ``customization``, ...),
  so a **training** topic keeps only its paragraphs (blocks separated by blank lines) whose
  whitespace-normalised text is not a paragraph of any held-out topic. Held-out documents are whole
  topics, unchanged; no held-out paragraph appears in the training text.

Tokens are bytes: token id ``b`` for the UTF-8 byte ``b`` (0-255), plus the specials
:data:`PAD_ID`, :data:`BOS_ID`, :data:`EOS_ID`; a document becomes ``[BOS] + bytes + [EOS]``.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "BOS_ID", "EOS_ID", "HELDOUT_MODULUS", "PAD_ID", "SPECIAL_TOKENS", "SPLIT_SALT", "VOCAB_SIZE", "encode",
    "document_ids", "heldout_documents", "heldout_keys", "heldout_text", "is_heldout", "topics", "train_documents",
    "train_text",
]

PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
VOCAB_SIZE = 259
SPECIAL_TOKENS = {"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>"}
SPLIT_SALT = b"usmoe-lp-tiny:"
HELDOUT_MODULUS = 10
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


def topics() -> dict[str, str]:
    """``pydoc_data.topics.topics`` (topic key -> reference text), sorted by key."""
    from pydoc_data.topics import topics as raw

    return {k: raw[k] for k in sorted(raw)}


def is_heldout(key: str) -> bool:
    """Whether topic ``key`` is in the held-out split: ``sha256(SPLIT_SALT + key)`` read as a big-endian
    integer from its first 8 bytes, modulo 10, is 0 (about 10% of the topics; stable across runs).

    >>> is_heldout("execmodel"), is_heldout("assert")
    (True, False)
    """
    digest = hashlib.sha256(SPLIT_SALT + key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_MODULUS == 0


def heldout_keys() -> list[str]:
    """The held-out topic keys, sorted."""
    return [k for k in topics() if is_heldout(k)]


def _paragraphs(text: str) -> list[str]:
    return [p for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def _normalise(paragraph: str) -> str:
    return " ".join(paragraph.split())


@lru_cache(maxsize=1)
def _split() -> tuple[tuple[str, ...], tuple[str, ...]]:
    docs = topics()
    held = tuple(docs[k] for k in docs if is_heldout(k))
    held_paragraphs = {_normalise(p) for doc in held for p in _paragraphs(doc)}
    train = []
    for key, doc in docs.items():
        if is_heldout(key):
            continue
        kept = [p for p in _paragraphs(doc) if _normalise(p) not in held_paragraphs]
        if kept:
            train.append("\n\n".join(kept))
    return tuple(train), held


def train_documents() -> list[str]:
    """Training documents (one per non-held-out topic, sorted by key, minus paragraphs shared with held-out
    topics)."""
    return list(_split()[0])


def heldout_documents() -> list[str]:
    """Held-out documents: the whole text of each held-out topic, sorted by key.

    >>> docs = heldout_documents()
    >>> len(docs) > 0 and all(isinstance(d, str) and d for d in docs)
    True
    """
    return list(_split()[1])


def train_text() -> str:
    """All training documents joined by a blank line (str, about 375 kB on Python 3.11)."""
    return "\n\n".join(train_documents())


def heldout_text() -> str:
    """All held-out documents joined by a blank line (str, about 48 kB on Python 3.11).

    >>> text = heldout_text()
    >>> text[:20] in train_text()
    False
    """
    return "\n\n".join(heldout_documents())


def encode(text: str) -> list[int]:
    """Token ids of ``text``: its UTF-8 bytes, one id per byte (0-255), no specials added.

    >>> encode("é!")
    [195, 169, 33]
    """
    return list(text.encode("utf-8"))


def document_ids(documents: list[str]) -> torch.Tensor:  # torch imported lazily: this module loads standalone
    """One token stream for ``documents``: ``[BOS] + bytes + [EOS]`` per document, concatenated.

    Returns a 1-d ``torch.long`` tensor of length ``sum(len(d.encode()) + 2)``.

    >>> document_ids(["hi"]).tolist()
    [257, 104, 105, 258]
    """
    import torch

    ids: list[int] = []
    for doc in documents:
        ids.append(BOS_ID)
        ids.extend(encode(doc))
        ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.long)
