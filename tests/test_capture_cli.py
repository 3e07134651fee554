"""``usmoe-lp capture --model DIR --text FILE --out LOG`` through typer's CliRunner on tiny saved models.

Each model directory is written with ``save_pretrained`` plus a WordLevel tokenizer built in code, so
nothing is downloaded. The logged logits must equal, token by token, what the model itself returns
with ``output_router_logits=True`` on the same tokenized, padded batches (padding dropped).
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
from typer.testing import CliRunner

from usmoe_lp.cli import app
from usmoe_lp.logs import RouterLog

runner = CliRunner(env={"COLUMNS": "200"})
WORDS = [f"w{i}" for i in range(40)]
TEXT = " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(83))  # 83 tokens: last sequence is padded
SEQ_LEN, BATCH = 16, 2
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, vocab_size=64, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = {"mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
       "olmoe": dict(num_experts=8, num_experts_per_tok=2)}


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3} | {w: i + 4 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]",
                                   eos_token="[EOS]")


def _save(path, model_type: str | None, tokenizer: bool = True):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type or "llama", **TINY, **MOE.get(model_type, {}))
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    if tokenizer:
        _tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(TEXT + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=sorted(MOE))
def moe_dir(request, tmp_path_factory):
    return _save(tmp_path_factory.mktemp(request.param) / "model", request.param)


def _capture(model_dir, text_file, out, *extra):
    return runner.invoke(app, ["capture", "--model", str(model_dir), "--text", str(text_file), "--out", str(out),
                               "--seq-len", str(SEQ_LEN), "--batch-size", str(BATCH), "--device", "cpu", *extra])


def _reference(model_dir, max_tokens: int) -> list[torch.Tensor]:
    """Per MoE layer, (n_real_tokens, N) router logits from output_router_logits=True, padding dropped."""
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"][:max_tokens]
    seqs = [ids[i:i + SEQ_LEN] for i in range(0, len(ids), SEQ_LEN)]
    per_layer: list[list[torch.Tensor]] = []
    for b in range(0, len(seqs), BATCH):
        rows = seqs[b:b + BATCH]
        input_ids = torch.zeros(len(rows), SEQ_LEN, dtype=torch.long)
        mask = torch.zeros(len(rows), SEQ_LEN, dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        input_ids, mask = input_ids[:, :mask.sum(1).max()], mask[:, :mask.sum(1).max()]
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=mask, output_router_logits=True)
        keep = mask.reshape(-1).bool()
        for li, x in enumerate(out.router_logits):
            if len(per_layer) <= li:
                per_layer.append([])
            per_layer[li].append(x.reshape(-1, x.shape[-1])[keep])
    return [torch.cat(parts) for parts in per_layer]


@pytest.mark.parametrize("max_tokens", [None, 40])
def test_capture_logs_what_output_router_logits_returns(moe_dir, text_file, tmp_path, max_tokens):
    extra = [] if max_tokens is None else ["--max-tokens", str(max_tokens), "--shard-tokens", "16"]
    result = _capture(moe_dir, text_file, tmp_path / "log", *extra)
    assert result.exit_code == 0, result.output
    expected_tokens = 83 if max_tokens is None else max_tokens
    for field in ("tokens", "layers", "experts", "bytes on disk", "tokens/s", "MB/s"):
        assert field in result.stdout, field
    assert f"{expected_tokens:,} in" in result.stdout

    log = RouterLog.open(tmp_path / "log")
    assert log.complete and log.num_tokens == expected_tokens
    log.validate()
    reference = _reference(moe_dir, expected_tokens)
    assert len(log.layers) == len(reference) == 2
    assert set(log.num_experts.values()) == {8} and set(log.top_k.values()) == {2}
    for layer, ref in zip(log.layers, reference, strict=True):
        chunk = log.read(layer, 0, log.num_tokens)
        assert chunk.logits.dtype == torch.float32
        torch.testing.assert_close(chunk.logits, ref, rtol=0, atol=0)
    ids = PreTrainedTokenizerFast.from_pretrained(moe_dir)(TEXT, add_special_tokens=False)["input_ids"]
    assert chunk.token_ids.tolist() == ids[:expected_tokens]
    assert chunk.positions.tolist() == [i % SEQ_LEN for i in range(expected_tokens)]
    if max_tokens is not None:
        assert len(log.shards) == 3  # 40 tokens in shards of 16

    # an existing log is kept unless --overwrite
    again = _capture(moe_dir, text_file, tmp_path / "log", *extra)
    assert again.exit_code == 2 and "Traceback" not in again.output
    assert _capture(moe_dir, text_file, tmp_path / "log", *extra, "--overwrite").exit_code == 0


def test_capture_bf16(moe_dir, text_file, tmp_path):
    result = _capture(moe_dir, text_file, tmp_path / "log", "--dtype", "bf16", "--max-tokens", "20")
    assert result.exit_code == 0, result.output
    log = RouterLog.open(tmp_path / "log")
    assert log.dtype == torch.bfloat16 and log.num_tokens == 20


def _error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    for needle in needles:
        assert needle in text, (needle, text)


def test_missing_text_file(moe_dir, tmp_path):
    _error(_capture(moe_dir, tmp_path / "nope.txt", tmp_path / "log"), "text file", "not found")
    assert not (tmp_path / "log").exists()


def test_missing_model_dir(text_file, tmp_path):
    _error(_capture(tmp_path / "no-model", text_file, tmp_path / "log"), "model directory", "not found")


def test_model_dir_without_tokenizer(text_file, tmp_path):
    model_dir = _save(tmp_path / "model", "olmoe", tokenizer=False)
    _error(_capture(model_dir, text_file, tmp_path / "log"), "has no tokenizer",
           "AutoTokenizer.from_pretrained(BASE_MODEL).save_pretrained(")


def test_model_without_router(text_file, tmp_path):
    model_dir = _save(tmp_path / "model", None)  # a dense llama
    _error(_capture(model_dir, text_file, tmp_path / "log"), "no router found in LlamaForCausalLM",
           "--module-pattern")
    result = _capture(model_dir, text_file, tmp_path / "log", "--module-pattern", r"model\.nothing")
    _error(result, "matches no module")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_unavailable(moe_dir, text_file, tmp_path):
    result = runner.invoke(app, ["capture", "--model", str(moe_dir), "--text", str(text_file), "--out",
                                 str(tmp_path / "log"), "--device", "cuda"])
    _error(result, "CUDA is not available", "--device cpu")


def test_bad_dtype(moe_dir, text_file, tmp_path):
    _error(_capture(moe_dir, text_file, tmp_path / "log", "--dtype", "int8"), "Invalid value for '--dtype'",
           "float32, bfloat16, float16")


def test_hub_id_without_hub(text_file, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = _capture("no-such-org/no-such-model", text_file, tmp_path / "log")
    _error(result, "Hugging Face Hub", "not reachable", "--model DIR")


# ----------------------------------------------------------------------------- --generate
@pytest.mark.parametrize("new_tokens", [1, 3])
def test_capture_generate_logs_prompt_and_continuation(moe_dir, text_file, tmp_path, new_tokens):
    """--generate N: every sequence holds its prompt plus N - 1 generated tokens (the last generated
    token is never fed back), at contiguous positions; the logits equal one full forward over the
    final sequences (the oracle: the model's own output_router_logits)."""
    out = tmp_path / "gen.log"
    max_tokens = 40
    result = _capture(moe_dir, text_file, out, "--max-tokens", str(max_tokens), "--generate", str(new_tokens))
    assert result.exit_code == 0, result.output
    log = RouterLog.open(out, verify="full")
    n_seqs = len(log.sequences)
    assert log.num_tokens == max_tokens + n_seqs * (new_tokens - 1)
    chunk = log.read(log.layers[0], 0, log.num_tokens)
    for s in log.sequences.tolist():
        pos = chunk.positions[chunk.sequence_ids == s]
        assert sorted(pos.tolist()) == list(range(pos.numel()))

    # oracle: rebuild each final sequence (logged prompt + continuation ids) and run one forward
    model = AutoModelForCausalLM.from_pretrained(moe_dir).eval()
    for s in log.sequences.tolist():
        sel = chunk.sequence_ids == s
        order = torch.argsort(chunk.positions[sel])
        ids = chunk.token_ids[sel][order].unsqueeze(0)
        with torch.no_grad():
            ref = model(input_ids=ids, output_router_logits=True).router_logits
        for li, layer in enumerate(log.layers):
            got = log.read(layer, 0, log.num_tokens).logits[sel][order].float()
            torch.testing.assert_close(got, ref[li].float(), atol=1e-5, rtol=1e-5)
