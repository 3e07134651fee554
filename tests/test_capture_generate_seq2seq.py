"""capture(model, out, layers="decoder") inside generate() of encoder-decoder MoE models (Switch, NLLB-MoE).

Greedy, batch of 2 with left padding in the encoder input. Each decode step's single decoder token continues its
row's decoder sequence: one sequence id per row, true decoder positions (the decoder start token at 0). The logged
decoder router logits equal one full forward over the final decoder sequences (decoder router logits of
``output_router_logits=True``), and the logged token ids are generate()'s output.
"""

from __future__ import annotations

import pytest
import torch
from test_capture_families import PAD, B, padded_batch, reference_logits, tiny_model

from usmoe_lp.logs import RouterLog
from usmoe_lp.logs.capture import capture

NEW = 4


def _generate(model, batch):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)


@pytest.mark.parametrize("mt", ["switch_transformers", "nllb-moe"])
def test_decoder_routers_inside_generate(mt, tmp_path):
    model = tiny_model(mt)
    if mt == "nllb-moe":  # as in the real NLLB-MoE config: the decoder starts with eos (2), not the pad token (0),
        # which its positional embedding would count as padding in the full forward but not in the decode steps
        model.config.decoder_start_token_id = model.generation_config.decoder_start_token_id = 2
    batch = padded_batch(mt)
    del batch["decoder_input_ids"]
    assert int((batch["attention_mask"] == 0).sum()) == PAD  # padding in the encoder input
    plain = _generate(model, batch)
    with capture(model, tmp_path / "log", layers="decoder", fsync=False) as cap:
        out = _generate(model, batch)
    assert torch.equal(out, plain)  # capturing does not change generation
    assert out.shape == (B, 1 + NEW)  # decoder start token + NEW generated tokens
    assert cap.sequences == B and all(r.stack == "decoder" for r in cap.routers)

    # the last generated token never goes through the model: the decoder ran over out[:, :-1]
    dec = out[:, :-1]
    n = dec.shape[1]
    expected = reference_logits(model, {**batch, "decoder_input_ids": dec}, mt, stack="decoder")
    log = RouterLog.open(tmp_path / "log", verify="full")
    assert log.complete and log.validate().ok
    assert log.num_tokens == B * n
    assert len(log.layers) == len(expected) == len(cap.routers)
    for name, ref in zip(log.layers, expected, strict=True):
        chunk = log.read(name, 0, log.num_tokens)
        keys = list(zip(chunk.sequence_ids.tolist(), chunk.positions.tolist(), strict=True))
        assert sorted(keys) == [(b, t) for b in range(B) for t in range(n)]  # one sequence per row, positions 0..
        ref = ref.reshape(B, n, -1)
        for row, ((b, t), token) in enumerate(zip(keys, chunk.token_ids.tolist(), strict=True)):
            assert token == int(out[b, t]), (name, b, t)  # generate()'s ids, decoder start token included
            torch.testing.assert_close(chunk.logits[row], ref[b, t], atol=1e-5, rtol=0, msg=f"{name} {(b, t)}")


def test_two_seq2seq_generate_calls_get_new_sequences(tmp_path):
    model = tiny_model("switch_transformers")
    with capture(model, tmp_path / "log", layers="decoder", fsync=False) as cap:
        for seed in (1, 2):
            batch = padded_batch("switch_transformers", seed=seed)
            del batch["decoder_input_ids"]
            _generate(model, batch)
    assert cap.sequences == 2 * B
    chunk = RouterLog.open(tmp_path / "log").read("decoder.layer0", 0, cap.tokens)
    assert torch.bincount(chunk.sequence_ids).tolist() == [NEW] * (2 * B)
    for s in range(2 * B):
        assert chunk.positions[chunk.sequence_ids == s].tolist() == list(range(NEW))
