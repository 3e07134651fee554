"""A byte-level transformers tokenizer for the tiny model: one token per UTF-8 byte, no merges.

Token id ``b`` is the byte ``b`` (0-255), as in :mod:`usmoe_lp.tiny.data`; ids 256-258 are
``<|pad|>``, ``<|bos|>``, ``<|eos|>``. Built with the ``tokenizers`` library: a BPE model over the
GPT-2 byte-to-unicode alphabet (Radford et al. 2019, the ``bytes_to_unicode`` table) with no merges,
a ``ByteLevel`` pre-tokenizer (no prefix space, no regex split) and a ``ByteLevel`` decoder, wrapped
in ``PreTrainedTokenizerFast`` so that ``save_pretrained`` writes ``tokenizer.json`` and
``AutoTokenizer.from_pretrained(dir)`` loads it offline. No special token is added on encoding
(``add_special_tokens`` has nothing to add), so ``tokenizer(text)["input_ids"] == list(text.encode())``.
"""

from __future__ import annotations

from usmoe_lp.tiny.data import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, VOCAB_SIZE

__all__ = ["byte_level_tokenizer", "bytes_to_unicode"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table (256 entries), as used by the
    ``ByteLevel`` pre-tokenizer of ``tokenizers``.

    >>> table = bytes_to_unicode()
    >>> len(table), table[ord("a")], table[ord(" ")]
    (256, 'a', 'Ġ')
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def byte_level_tokenizer(model_max_length: int = 1_000_000_000):
    """A ``transformers.PreTrainedTokenizerFast`` with vocabulary 259: bytes 0-255 then PAD, BOS, EOS.

    >>> tok = byte_level_tokenizer()
    >>> tok("héllo")["input_ids"] == list("héllo".encode())
    True
    >>> tok.decode(tok("héllo")["input_ids"]), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    ('héllo', 256, 257, 258)
    >>> tok("<|eos|>")["input_ids"] == list(b"<|eos|>")
    True
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    specials = [SPECIAL_TOKENS["pad_token"], SPECIAL_TOKENS["bos_token"], SPECIAL_TOKENS["eos_token"]]
    core.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    ids = [core.token_to_id(s) for s in specials]
    if ids != [PAD_ID, BOS_ID, EOS_ID] or core.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"byte-level tokenizer built with special ids {ids} and vocabulary "
                           f"{core.get_vocab_size()}; expected {[PAD_ID, BOS_ID, EOS_ID]} and {VOCAB_SIZE}")
    # split_special_tokens: "<|eos|>" written in a text is 7 bytes, not the EOS token, so every text round-trips
    return PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=model_max_length,
                                   clean_up_tokenization_spaces=False, split_special_tokens=True, **SPECIAL_TOKENS)
