"""capture() recognises KV-cache decode steps by the cache object itself, whatever carries it.

transformers 5.24 hands ``generate()``'s cache to the model as ``cache=`` (``past_key_values`` is deprecated) and
passes per-row ``position_ids`` instead of ``cache_position``; 5.23 passes ``past_key_values=``. Either way a decode
step continues its prompt's sequence (same sequence id, the next position), with or without padding, with any batch
size, for the cache under either keyword or positionally, and for a non-transformers cache (duck-typed on
``get_seq_length``). The oracle is one full forward over the final sequences. A forward whose cache already holds
tokens that do not continue the logged stream (filled outside the capture, a changed batch size, a cropped or
reordered cache, beam search) raises CaptureFailed saying why, never a silent one-token sequence at position 0.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from test_capture_families import V, reference_logits, tiny_model
from test_capture_generate import _logged
from torch import nn
from transformers import DynamicCache

from usmoe_lp.logs import RouterLog
from usmoe_lp.logs.capture import CaptureFailed, capture

NEW = 4


def _batch(pads: list[int], t: int = 8, seed: int = 3) -> dict[str, torch.Tensor]:
    """Left-padded prompts, one row per entry of ``pads`` (that many padding tokens in the row)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (len(pads), t), generator=g)
    mask = torch.ones(len(pads), t, dtype=torch.long)
    for row, pad in enumerate(pads):
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _generate(model, batch, **kw):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0,
                              **kw)


def _check_one_sequence_per_row(log: RouterLog, ids: torch.Tensor, mask: torch.Tensor, expected, fed: int) -> None:
    """Sequence b of the log is row b of ``ids`` (B, W): its first ``fed`` columns' real tokens (those that went
    through the model), at positions 0.., with the logits of ``expected`` (per layer (B*W, N), one full forward)."""
    b_rows, width = ids.shape
    keep = mask.bool()
    positions = torch.cumsum(mask, 1) - 1
    want = {(b, int(positions[b, t])): (b, t) for b in range(b_rows) for t in range(fed) if keep[b, t]}
    rows, tokens = _logged(log)
    assert log.num_tokens == len(want)
    assert set(tokens) == set(want)  # one sequence per row, no one-token sequence at position 0
    for key, (b, t) in want.items():
        assert tokens[key] == int(ids[b, t]), key
    assert len(log.layers) == len(expected)
    for name, ref in zip(log.layers, expected, strict=True):
        ref = ref.reshape(b_rows, width, -1)
        for key, (b, t) in want.items():
            torch.testing.assert_close(rows[name][key], ref[b, t], atol=1e-5, rtol=0, msg=f"{name} {key}")


# ----------------------------------------------------------------------------- generate(), matched
@pytest.mark.parametrize(("mt", "pads"), [("mixtral", [0, 0, 0]), ("olmoe", [0, 2, 5]), ("qwen3_moe", [4, 0, 1])])
def test_generate_continues_each_row_with_and_without_padding(mt, pads, tmp_path):
    """3 rows, no padding (generate() drops the all-ones mask) or left padding (a (B, past + 1) mask per step)."""
    model = tiny_model(mt)
    batch = _batch(pads)
    plain = _generate(model, batch)
    with capture(model, tmp_path / "log", fsync=False) as cap:
        out = _generate(model, batch)
    assert torch.equal(out, plain)
    assert cap.sequences == len(pads)
    full_mask = torch.cat([batch["attention_mask"], torch.ones(len(pads), NEW, dtype=torch.long)], dim=1)
    expected = reference_logits(model, {"input_ids": out, "attention_mask": full_mask}, mt)
    log = RouterLog.open(tmp_path / "log", verify="full")
    assert log.complete
    _check_one_sequence_per_row(log, out, full_mask, expected, fed=out.shape[1] - 1)


def test_generate_from_inputs_embeds_continues_each_row(tmp_path):
    """A prompt given as embeddings (logged with token id -1), then decode steps with token ids."""
    mt = "olmoe"
    model = tiny_model(mt)
    batch = _batch([0, 3])
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach()
    with capture(model, tmp_path / "log", fsync=False) as cap:
        out = _generate(model, {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"]})
    assert out.shape == (2, NEW) and cap.sequences == 2  # generate() returns only the new tokens here
    ids = torch.cat([torch.full_like(batch["input_ids"], -1), out], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(out)], dim=1)
    with torch.no_grad():
        full = torch.cat([embeds, model.get_input_embeddings()(out)], dim=1)
    expected = reference_logits(model, {"inputs_embeds": full, "attention_mask": mask}, mt)
    _check_one_sequence_per_row(RouterLog.open(tmp_path / "log", verify="full"), ids, mask, expected,
                                fed=ids.shape[1] - 1)


def test_seq2seq_generate_without_padding_continues_each_decoder_row(tmp_path):
    model = tiny_model("switch_transformers")
    batch = _batch([0, 0, 0])
    with capture(model, tmp_path / "log", layers="decoder", fsync=False) as cap:
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    assert cap.sequences == 3
    dec = out[:, :-1]  # the last generated token never goes through the model
    expected = reference_logits(model, {**batch, "decoder_input_ids": dec}, "switch_transformers", stack="decoder")
    log = RouterLog.open(tmp_path / "log", verify="full")
    _check_one_sequence_per_row(log, dec, torch.ones_like(dec), expected, fed=dec.shape[1])


# ----------------------------------------------------------------------------- manual decode loops
def _cache_parameter(model) -> str:
    """The name under which the installed transformers' forward takes the KV cache (``cache`` or
    ``past_key_values``)."""
    names = list(inspect.signature(model.forward).parameters)
    return next(n for n in ("cache", "past_key_values") if n in names)


def _call(model, carrier: str, ids, mask, cache, cache_position):
    """One forward with the cache passed as ``carrier``: "keyword" (the forward's own parameter name),
    "past_key_values" (deprecated on 5.24, the name on 5.23) or "positional"."""
    position_ids = (torch.cumsum(mask, 1) - 1).clamp(min=0)[:, -ids.shape[1]:]
    kw = {"cache_position": cache_position} if cache_position is not None else {}
    name = _cache_parameter(model)
    if carrier == "positional":
        names = [n for n in inspect.signature(model.forward).parameters if n != "self"]
        args = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids, name: cache}
        return model(*(args[n] for n in names[:names.index(name) + 1]), use_cache=True, **kw)
    key = name if carrier == "keyword" else "past_key_values"
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, **{key: cache}, **kw)


def _decode_loop(model, batch, carrier: str, with_cache_position: bool, cache=None, steps: int = NEW - 1):
    """Prefill, then ``steps`` greedy decode steps of one token; returns (ids (B, T + steps + 1), mask, cache)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    cache = DynamicCache(config=model.config) if cache is None else cache
    new = ids
    with torch.no_grad():
        for _ in range(steps + 1):
            past = cache.get_seq_length()
            pos = torch.arange(past, past + new.shape[1]) if with_cache_position else None
            logits = _call(model, carrier, new, mask, cache, pos).logits
            new = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, new], dim=1)
            mask = torch.cat([mask, torch.ones_like(new)], dim=1)
    return ids, mask, cache


@pytest.mark.parametrize("carrier", ["keyword", "past_key_values", "positional"])
@pytest.mark.parametrize("with_cache_position", [False, True])
def test_manual_decode_loop_whatever_carries_the_cache(carrier, with_cache_position, tmp_path):
    mt = "mixtral"
    model = tiny_model(mt)
    batch = _batch([0, 3])
    with capture(model, tmp_path / "log", fsync=False) as cap:
        ids, mask, _ = _decode_loop(model, batch, carrier, with_cache_position)
    assert cap.sequences == 2
    position_ids = (torch.cumsum(mask, 1) - 1).clamp(min=0)
    expected = reference_logits(model, {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}, mt)
    _check_one_sequence_per_row(RouterLog.open(tmp_path / "log", verify="full"), ids, mask, expected,
                                fed=ids.shape[1] - 1)


# ----------------------------------------------------------------------------- unmatched decode steps
def _fails(model, log, why: str, body) -> None:
    """``body(model)`` inside a capture raises CaptureFailed naming the KV cache and ``why``; no complete log."""
    with pytest.raises(CaptureFailed, match="KV cache already holding") as info:
        with capture(model, log, fsync=False):
            body(model)
    assert why in str(info.value), str(info.value)
    assert not RouterLog.open(log).complete if log.exists() else True


def test_cache_filled_before_the_capture_fails(tmp_path):
    model = tiny_model("mixtral")
    batch = _batch([0, 3])
    _, _, cache = _decode_loop(model, batch, "keyword", False, steps=0)  # prefill outside the capture
    ids = torch.tensor([[5], [6]])
    mask = torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)

    def step(m):
        with torch.no_grad():
            _call(m, "keyword", ids, mask, cache, None)
    _fails(model, tmp_path / "log", "filled outside the capture", step)


def test_another_cache_than_the_logged_one_fails(tmp_path):
    model = tiny_model("mixtral")
    batch = _batch([0, 3])
    _, _, outside = _decode_loop(model, batch, "keyword", False, steps=0)
    ids = torch.tensor([[5], [6]])
    mask = torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)

    def body(m):
        _decode_loop(m, batch, "keyword", False, steps=0)  # logged prefill into a fresh cache
        with torch.no_grad():
            _call(m, "keyword", ids, mask, outside, None)  # then a decode step on another cache
    _fails(model, tmp_path / "log", "not the cache the last forward filled", body)


@pytest.mark.parametrize(("change", "why"), [
    (lambda cache: cache.batch_select_indices(torch.tensor([0])), "the batch has 1 rows"),
    (lambda cache: cache.crop(-1), "the last forward left"),
    (lambda cache: cache.reorder_cache(torch.tensor([1, 0])), "contents were replaced"),
])
def test_cache_changed_between_logged_forwards_fails(change, why, tmp_path):
    """Rows dropped, tokens cropped, rows swapped in place of the cache between two logged forwards."""
    model = tiny_model("mixtral")
    batch = _batch([0, 3])

    def body(m):
        ids, mask, cache = _decode_loop(m, batch, "keyword", False, steps=1)  # prefill + one decode step: logged
        change(cache)
        rows = cache.layers[0].keys.shape[0]
        past = cache.get_seq_length()
        with torch.no_grad():
            _call(m, "keyword", ids[:rows, -1:], torch.ones(rows, past + 1, dtype=torch.long), cache, None)
    _fails(model, tmp_path / "log", why, body)


def test_beam_search_fails_instead_of_mixing_rows(tmp_path):
    """Beam search reorders the cache's rows between decode steps: the logged rows would no longer be sequences."""
    model = tiny_model("mixtral")
    batch = _batch([0, 3])
    _generate(model, batch, num_beams=2)  # beam search itself works on this model

    def body(m):
        _generate(m, batch, num_beams=2)
    _fails(model, tmp_path / "log", "beam search", body)


def test_static_cache_fails_clearly(tmp_path):
    """generate() with a static cache hands the model a 4-D mask, which does not say which tokens are padding."""
    model = tiny_model("mixtral")
    with pytest.raises(CaptureFailed, match="4-D mask .* static cache"):
        with capture(model, tmp_path / "log", fsync=False):
            _generate(model, _batch([0, 3]), cache_implementation="static")


def test_two_caches_in_one_forward_fail(tmp_path):
    model = tiny_model("mixtral")
    batch = _batch([0, 3])
    with pytest.raises(CaptureFailed, match="two KV caches"):
        with capture(model, tmp_path / "log", fsync=False), torch.no_grad():
            model(**batch, cache=DynamicCache(config=model.config), past_key_values=DynamicCache(config=model.config))


# ----------------------------------------------------------------------------- a non-transformers cache
class _LengthCache:
    """A KV cache of another library: only its length matters here."""

    def __init__(self) -> None:
        self.length = 0

    def get_seq_length(self) -> int:
        return self.length


class _TinyMoE(nn.Module):
    """Embedding -> router gate; ``forward(ids, mask, cache)`` advances the cache by the tokens it saw."""

    def __init__(self, n_experts: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(V, 16)
        self.gate = nn.Linear(16, n_experts, bias=False)

    def forward(self, input_ids, attention_mask=None, state=None):
        logits = self.gate(self.embed(input_ids))
        if state is not None:
            state.length += input_ids.shape[1]
        return logits


@pytest.mark.parametrize("positional", [True, False])
def test_duck_typed_cache_continues_rows(positional, tmp_path):
    model = _TinyMoE()
    batch = _batch([0, 2])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    state = _LengthCache()
    steps = torch.tensor([[7, 8, 9], [10, 11, 12]])
    with capture(model, tmp_path / "log", module_pattern="gate", fsync=False) as cap, torch.no_grad():
        model(ids, mask, state) if positional else model(input_ids=ids, attention_mask=mask, state=state)
        for s in range(steps.shape[1]):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            new = steps[:, s:s + 1]
            model(new, mask, state) if positional else model(input_ids=new, attention_mask=mask, state=state)
            ids = torch.cat([ids, new], dim=1)
    assert cap.sequences == 2
    with torch.no_grad():
        expected = [model.gate(model.embed(ids)).reshape(-1, 4)]
    _check_one_sequence_per_row(RouterLog.open(tmp_path / "log"), ids, mask, expected, fed=ids.shape[1])


def test_duck_typed_cache_filled_outside_fails(tmp_path):
    model = _TinyMoE()
    state = _LengthCache()
    state.length = 5

    def body(m):
        with torch.no_grad():
            m(torch.tensor([[7], [8]]), None, state)
    with pytest.raises(CaptureFailed, match="KV cache already holding 5 tokens") as info:
        with capture(model, tmp_path / "log", module_pattern="gate", fsync=False):
            body(model)
    assert "filled outside the capture" in str(info.value)
