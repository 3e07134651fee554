"""The embedded tiny OLMoE model: shipped weights, data split, tokenizer, evaluation, capture, training."""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from usmoe_lp.errors import InvalidParameter
from usmoe_lp.tiny import TINY_MODEL_DIR, heldout_documents, heldout_text, load_tiny, train_text, train_tiny
from usmoe_lp.tiny import data as tiny_data
from usmoe_lp.tiny.evaluate import eval_windows, evaluate, unigram_loss

SAMPLE_TOKENS = 1500


@pytest.fixture(scope="module")
def shipped():
    return load_tiny()


@pytest.fixture(scope="module")
def sample_ids():
    return tiny_data.document_ids(heldout_documents())[:SAMPLE_TOKENS]


# ----------------------------------------------------------------------------- shipped weights
def test_shipped_model_loads_with_documented_sizes(shipped):
    model, tokenizer = shipped
    assert type(model).__name__ == "OlmoeForCausalLM"
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok) == ("olmoe", 4, 8, 2)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (259, 128, 128)
    assert cfg.router_aux_loss_coef == pytest.approx(0.01)
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (256, 257, 258)


def test_shipped_model_loads_with_plain_transformers(shipped):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR, local_files_only=True)
    ids = torch.tensor([tokenizer("The with statement")["input_ids"]])
    with torch.no_grad():
        ours = shipped[0](input_ids=ids).logits
        theirs = model(input_ids=ids).logits
    assert theirs.dtype == torch.float32
    torch.testing.assert_close(theirs, ours)


def test_shipped_files_small_and_documented():
    weights = TINY_MODEL_DIR / "model.safetensors"
    assert weights.stat().st_size <= 10 * 1024 * 1024
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    card = (TINY_MODEL_DIR / "README.md").read_text(encoding="utf-8")
    record = json.loads((TINY_MODEL_DIR / "training.json").read_text(encoding="utf-8"))
    assert "usmoe-lp train-tiny" in card and record["command"] in card
    assert record["hyperparameters"]["num_experts"] == 8 and record["hyperparameters"]["num_layers"] == 4
    assert record["heldout"]["loss"] < record["unigram"]["loss"]
    assert f"{record['heldout']['bits_per_byte']:.3f}" in card


# ----------------------------------------------------------------------------- data split
def test_split_rule_matches_an_independent_hash():
    keys = sorted(tiny_data.topics())
    expected = [k for k in keys if int(hashlib.sha256(("usmoe-lp-tiny:" + k).encode()).hexdigest()[:16], 16) % 10 == 0]
    assert tiny_data.heldout_keys() == expected
    assert 0 < len(expected) < len(keys) / 4


def test_split_is_deterministic_across_processes():
    # a fresh interpreter with another string-hash seed, loading data.py on its own (no torch import: fast)
    code = ("import hashlib, importlib.util, sys; spec = importlib.util.spec_from_file_location('d', sys.argv[1]); "
            "d = importlib.util.module_from_spec(spec); spec.loader.exec_module(d); "
            "print(d.heldout_keys(), hashlib.sha256(d.heldout_text().encode()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code, tiny_data.__file__], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": ""}).stdout.strip()
    assert out == f"{tiny_data.heldout_keys()} {hashlib.sha256(heldout_text().encode()).hexdigest()}"


def test_heldout_text_never_appears_in_training():
    train = train_text()
    normalised_train = " ".join(train.split())
    train_paragraphs = {" ".join(p.split()) for p in re.split(r"\n[ \t]*\n", train)}
    held = heldout_documents()
    assert held and heldout_text() == "\n\n".join(held)
    share = len(heldout_text()) / (len(heldout_text()) + len(train))
    assert 0.05 < share < 0.2
    for doc in held:
        for paragraph in re.split(r"\n[ \t]*\n", doc):
            norm = " ".join(paragraph.split())
            if not norm:
                continue
            assert norm not in train_paragraphs
            if len(norm) >= 60:
                assert norm not in normalised_train, norm[:60]


# ----------------------------------------------------------------------------- tokenizer
@settings(max_examples=40, deadline=None)
@given(st.text(max_size=60) | st.sampled_from(["<|eos|>", "a<|pad|>b", "<|bos|>\n", " \t\r\n", "é🎉\x00"]))
def test_tokenizer_round_trip_is_bytes(shipped, text):
    tokenizer = shipped[1]
    ids = tokenizer(text)["input_ids"]
    assert ids == tiny_data.encode(text) == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


def test_tokenizer_specials_match_the_data_stream(shipped):
    tokenizer = shipped[1]
    docs = ["ab", "é"]
    stream = [tokenizer.bos_token_id]
    for i, doc in enumerate(docs):
        stream += tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id] + ([tokenizer.bos_token_id] if i == 0 else [])
    assert tiny_data.document_ids(docs).tolist() == stream
    assert tokenizer.decode(stream, skip_special_tokens=True) == "abé"


# ----------------------------------------------------------------------------- evaluation
@settings(max_examples=40, deadline=None)
@given(st.integers(2, 60), st.integers(2, 12))
def test_eval_windows_predict_every_token_once(n, seq_len):
    windows = eval_windows(torch.arange(n), seq_len)
    targets = torch.cat([w[1:] for w in windows]).tolist()
    assert targets == list(range(1, n))
    assert all(2 <= w.numel() <= seq_len for w in windows)


def test_eval_windows_and_evaluate_reject_bad_input(shipped):
    with pytest.raises(InvalidParameter):
        eval_windows(torch.arange(5), 1)
    with pytest.raises(InvalidParameter):
        eval_windows(torch.arange(1), 4)
    with pytest.raises(InvalidParameter):
        evaluate(shipped[0], torch.arange(5), seq_len=4, batch_size=0)


def test_unigram_loss_by_hand():
    train = torch.tensor([257, 97, 97, 98, 258])
    held = torch.tensor([257, 98, 97, 258, 257, 97])
    counts = torch.ones(259, dtype=torch.float64)
    counts[97] += 2
    counts[98] += 1
    counts[258] += 1
    p = counts / counts.sum()
    nll = -torch.log(p[torch.tensor([98, 97, 258, 97])])  # BOS target (index 4) is not scored
    result = unigram_loss(train, held, 259)
    assert result.tokens == 4 and result.bytes == 3
    assert result.loss == pytest.approx(float(nll.mean()), rel=1e-12)
    assert result.bits_per_byte == pytest.approx(float(nll[[0, 1, 3]].sum()) / 3 / math.log(2), rel=1e-12)


def test_evaluate_matches_transformers_loss_and_topk_counts(shipped):
    model = shipped[0]
    ids = torch.tensor(tiny_data.encode("Assignment statements are used to (re)bind names to values."))
    loss, routing = evaluate(model, ids, seq_len=ids.numel())
    with torch.no_grad():
        out = model(input_ids=ids[None], labels=ids[None], output_router_logits=True)
    expected_loss = float(out.loss) - model.config.router_aux_loss_coef * float(out.aux_loss)
    assert loss.loss == pytest.approx(expected_loss, rel=1e-5)
    assert loss.perplexity == pytest.approx(math.exp(loss.loss))
    assert routing.tokens == ids.numel() and len(routing.layers) == 4
    for layer, z in zip(routing.layers, out.router_logits, strict=True):
        counts = torch.bincount(torch.topk(z, 2, dim=-1).indices.reshape(-1), minlength=8).double()
        assert layer.load_share == pytest.approx((counts / counts.sum()).tolist(), abs=1e-12)
        probs = torch.softmax(z.double(), -1)
        entropy = float(-(probs * probs.log()).sum(-1).mean() / math.log(8))
        assert layer.token_entropy == pytest.approx(entropy, rel=1e-4)


def test_shipped_model_beats_unigram_on_heldout_sample(shipped, sample_ids):
    model = shipped[0]
    train_ids = tiny_data.document_ids(tiny_data.train_documents())
    trained, routing = evaluate(model, sample_ids, seq_len=256)
    baseline = unigram_loss(train_ids, sample_ids, 259)
    assert trained.tokens == baseline.tokens
    assert trained.loss < baseline.loss - 0.5  # nats/token: a real margin, not noise
    assert trained.bits_per_byte < baseline.bits_per_byte
    # the trained routers are not uniform (a random router has normalised token entropy ~1)
    assert max(layer.token_entropy for layer in routing.layers) < 0.95
    assert all(sum(layer.load_share) == pytest.approx(1.0) for layer in routing.layers)


# ----------------------------------------------------------------------------- capture
def test_capture_of_heldout_batch_gives_4_layers_of_8_experts(shipped, sample_ids, tmp_path):
    from usmoe_lp import RouterLog, capture

    model = shipped[0]
    batch = sample_ids[: 2 * 128].reshape(2, 128)
    mask = torch.ones_like(batch)
    mask[1, 100:] = 0
    with capture(model, tmp_path / "log", fsync=False) as cap:
        logged = cap.run([{"input_ids": batch, "attention_mask": mask}])
    log = RouterLog.open(tmp_path / "log")
    assert logged == log.num_tokens == 228
    assert len(log.layers) == 4
    assert set(log.num_experts.values()) == {8}
    assert set(log.top_k.values()) == {2}
    chunk = log.read(log.layers[0], 0, 128)
    assert chunk.logits.shape == (128, 8)
    assert chunk.token_ids.tolist() == batch[0].tolist()


# ----------------------------------------------------------------------------- training
def test_short_training_run_writes_a_loadable_model(tmp_path):
    out = tmp_path / "tiny"
    lines: list[str] = []
    result = train_tiny(out, steps=3, seq_len=32, batch_size=2, hidden_size=16, intermediate_size=16, num_heads=2,
                        num_layers=2, num_experts=4, warmup_steps=1, lr=1e-2, heldout_tokens=600, log_every=1,
                        log=lines.append)
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "training.json"} <= {
        p.name for p in out.iterdir()}
    assert math.isfinite(result.heldout.loss) and math.isfinite(result.train_loss)
    assert result.heldout.loss < result.heldout_init.loss  # three steps already beat the random initialisation
    assert any(line.startswith("step ") and "tokens/s" in line for line in lines)
    card = (out / "README.md").read_text(encoding="utf-8")
    assert result.command in card and "--steps 3" in result.command
    record = json.loads((out / "training.json").read_text(encoding="utf-8"))
    assert record == json.loads(json.dumps(result.to_dict()))
    model, tokenizer = load_tiny(out)
    assert model.config.num_experts == 4 and tokenizer("x")["input_ids"] == [120]


def test_training_is_seeded(tmp_path):
    kwargs = dict(steps=2, seq_len=16, batch_size=2, hidden_size=8, intermediate_size=8, num_heads=1, num_layers=1,
                  num_experts=2, top_k=1, warmup_steps=1, heldout_tokens=100, log=None)
    a = train_tiny(tmp_path / "a", seed=3, **kwargs)
    b = train_tiny(tmp_path / "b", seed=3, **kwargs)
    assert a.first_loss == b.first_loss and a.heldout.loss == b.heldout.loss


def test_train_tiny_rejects_bad_parameters(tmp_path):
    with pytest.raises(InvalidParameter):
        train_tiny(tmp_path, steps=0, log=None)
    with pytest.raises(InvalidParameter):
        train_tiny(tmp_path, seq_len=1, log=None)
    with pytest.raises(InvalidParameter):
        train_tiny(tmp_path, top_k=9, num_experts=8, steps=1, log=None)


def test_cli_help_lists_the_options():
    import typer
    from typer.testing import CliRunner

    from usmoe_lp.tiny.cli import train_tiny_command

    app = typer.Typer()
    app.command()(train_tiny_command)
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for flag in ("--out", "--steps", "--seed", "--seq-len", "--threads"):
        assert flag in result.output


def test_defaults_agree_between_api_cli_and_shipped_model():
    import inspect

    from usmoe_lp.tiny.cli import train_tiny_command
    from usmoe_lp.tiny.train import DEFAULTS

    api = inspect.signature(train_tiny).parameters
    assert {k: api[k].default for k in DEFAULTS} == DEFAULTS
    cli = inspect.signature(train_tiny_command).parameters
    renamed = {"num_layers": "layers", "num_heads": "heads", "num_experts": "experts",
               "router_aux_loss_coef": "aux_loss_coef"}
    for key in ("steps", "seq_len", "batch_size", "lr", "seed", "hidden_size", "intermediate_size", "num_layers",
                "num_heads", "num_experts", "top_k", "router_aux_loss_coef", "warmup_steps"):
        assert cli[renamed.get(key, key)].default == DEFAULTS[key], key
    shipped = json.loads((TINY_MODEL_DIR / "training.json").read_text(encoding="utf-8"))["hyperparameters"]
    assert {k: shipped[k] for k in DEFAULTS} == DEFAULTS


def test_tiny_modules_import_no_cycle():
    """The modules of usmoe_lp.tiny import each other without a cycle, counting every import statement
    (lazy imports inside functions and ``if TYPE_CHECKING:`` imports included), read from the source."""
    import ast
    from pathlib import Path

    import usmoe_lp.tiny

    root = Path(usmoe_lp.tiny.__file__).parent
    modules = {p.stem: p for p in root.glob("*.py") if p.stem != "__init__"}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for full in names:
                parts = full.split(".")
                if parts[:2] == ["usmoe_lp", "tiny"] and len(parts) > 2 and parts[2] in modules:
                    targets.add(parts[2])
        edges[name] = targets - {name}
    assert edges["train"] >= {"card", "result"} and "result" in edges["card"]  # the walk sees real imports

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in edges[node]:
                if nxt == start:
                    return [*path, start]
                if nxt not in path:
                    stack.append((nxt, [*path, nxt]))
        return None

    cycles = [c for c in map(cycle_from, sorted(edges)) if c]
    assert not cycles, f"import cycles in usmoe_lp.tiny: {cycles}"
