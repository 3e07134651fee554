"""Bad input to ``usmoe-lp import``, ``capture``, ``log info`` and ``train-tiny``: a usage error (exit 2)
or an error (exit 1/2) with a one-line message in CLI words, never a traceback.

One row per bad input: ``(id, argv, needles)``. ``{d}`` in an argument is the fixture directory
(see ``files``); every needle must appear in the single error line. A new bad input is one row.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from typer.main import get_command
from typer.testing import CliRunner

from usmoe_lp.cli import app
from usmoe_lp.logs import LayerInfo, RouterLogWriter

runner = CliRunner(env={"COLUMNS": "80"})
USAGE = "Invalid value for"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    rng = np.random.default_rng(0)
    np.save(d / "good.npy", rng.standard_normal((6, 4)).astype(np.float32))
    np.save(d / "cube.npy", rng.standard_normal((2, 6, 4)).astype(np.float32))
    np.save(d / "ids.npy", rng.integers(0, 8, (6, 2)))
    np.save(d / "mask.npy", np.ones((6, 4), dtype=bool))
    np.save(d / "complex.npy", np.ones((6, 4), dtype=np.complex64))
    np.save(d / "strings.npy", np.array([["a", "b"], ["c", "d"]]))
    np.save(d / "objects.npy", np.array([[{"a": 1}]], dtype=object), allow_pickle=True)
    np.save(d / "rank1.npy", np.zeros(4, dtype=np.float32))
    np.save(d / "rank4.npy", np.zeros((1, 2, 3, 4), dtype=np.float32))
    np.save(d / "empty_rows.npy", np.zeros((0, 4), dtype=np.float32))
    nan = rng.standard_normal((6, 4)).astype(np.float32)
    nan[3, 1] = np.nan
    np.save(d / "nan.npy", nan)
    np.save(d / "huge.npy", np.full((6, 4), 1e6, dtype=np.float32))
    np.savez(d / "both.npz", a=rng.standard_normal((6, 4)), sequence_ids=np.arange(6) // 3)
    np.savez(d / "metaonly.npz", sequence_ids=np.arange(6))
    torch.save(tuple(torch.randn(6, 4) for _ in range(2)), d / "tuple.pt")
    torch.save(torch.ones(3, 3), d / "mask.pt")
    torch.save((torch.randint(0, 8, (6, 2)), torch.randint(0, 8, (6, 2))), d / "ids.pt")
    for name in ("empty.npy", "empty.npz", "empty.pt", "empty.safetensors", "empty.txt"):
        (d / name).write_bytes(b"")
    (d / "afile").write_text("not a directory")
    (d / "text.txt").write_text("some words\n")
    (d / "adir.npy").mkdir()
    (d / "models").mkdir()
    (d / "model-file").write_text("{}")
    full = d / "full"
    full.mkdir()
    (full / "mine.txt").write_text("a file of the user's")
    with RouterLogWriter(d / "log", [LayerInfo("l0", num_experts=4)]) as w:
        w.append({"l0": torch.randn(3, 4)}, torch.arange(3), torch.zeros(3, dtype=torch.long), torch.arange(3))
    (d / "emptydir").mkdir()
    shards_file = d / "shards-file"
    with RouterLogWriter(shards_file, [LayerInfo("l0", num_experts=4)]) as w:
        w.append({"l0": torch.randn(3, 4)}, torch.arange(3), torch.zeros(3, dtype=torch.long), torch.arange(3))
    for shard in (shards_file / "shards").iterdir():
        shard.unlink()
    (shards_file / "shards").rmdir()
    (shards_file / "shards").write_text("a file where the shards directory belongs")
    return d


def imp(src, *extra):
    return ["import", "{d}/" + src, "--out", "{d}/new-log", *extra]


def an(*extra):
    return ["analyze", "{d}/log", "--out", "{d}/an-out", *extra]


def cap(*extra, model="{d}/models/typo", text="{d}/text.txt", out="{d}/cap-log"):
    return ["capture", "--model", model, "--text", text, "--out", out, *extra]


ROWS = [
    # ------------------------------------------------------------------ import: the source
    ("import-missing", imp("nope.npy"), ["nope.npy: no such file"]),
    ("import-dir", imp("adir.npy"), ["adir.npy: is a directory"]),
    ("import-unknown-suffix", imp("afile"), ["unknown file type"]),
    ("import-empty-npy", imp("empty.npy"), ["empty.npy: not a readable .npy file"]),
    ("import-empty-npz", imp("empty.npz"), ["empty.npz: not a readable .npz file"]),
    ("import-empty-pt", imp("empty.pt"), ["empty.pt: cannot be read as a torch.save file"]),
    ("import-empty-safetensors", imp("empty.safetensors"), ["not a readable safetensors file"]),
    ("import-3d-without-layout", imp("cube.npy"), ["is ambiguous", "--layout 'ltn' or 'btn'", "ltn = (L, T, N)"]),
    ("import-2d-with-ltn", imp("good.npy", "--layout", "ltn"), ["(T, N), one layer (layout 'tn')",
                                                                "--layout 'ltn' is for 3-D"]),
    ("import-3d-as-tn", imp("cube.npy", "--layout", "tn"), ["--layout 'tn' is (T, N)"]),
    ("import-bad-layout", imp("cube.npy", "--layout", "lbt"), [USAGE, "--layout", "ltn, btn"]),
    ("import-rank1", imp("rank1.npy"), ["shape (4,)", "expected (T, N)"]),
    ("import-rank4", imp("rank4.npy"), ["shape (1, 2, 3, 4)"]),
    ("import-no-rows", imp("empty_rows.npy"), ["no tokens to import"]),
    ("import-expert-ids", imp("ids.npy"), ["integers (int64)", "expert ids", "vLLM", "usmoe-lp capture",
                                           "--format vllm|sglang|megatron|olmoe --num-experts N"]),
    ("import-expert-ids-pt", imp("ids.pt"), ["expert ids"]),
    ("import-one-tensor-pt", imp("mask.pt"), ["one tensor of shape (3, 3)", "--layout 'ltn'"]),
    ("import-booleans", imp("mask.npy"), ["booleans"]),
    ("import-complex", imp("complex.npy"), ["complex numbers"]),
    ("import-strings", imp("strings.npy"), ["strings (<U1)"]),
    ("import-objects", imp("objects.npy"), ["Python objects", "never unpickles"]),
    ("import-nan", imp("nan.npy"), ["1 NaN", "layer 'layer0'"]),
    ("import-overflow-on-cast", imp("huge.npy", "--dtype", "float16"), ["after casting to float16"]),
    ("import-metadata-only", imp("metaonly.npz"), ["no layer arrays"]),
    # ------------------------------------------------------------------ import: options
    ("import-bad-dtype", imp("good.npy", "--dtype", "int8"), [USAGE, "--dtype", "float32, bfloat16, float16"]),
    ("import-bad-score-function", imp("good.npy", "--score-function", "relu"), [USAGE, "--score-function"]),
    ("import-negative-shards", imp("good.npy", "--shard-tokens", "-1"), [USAGE, "--shard-tokens"]),
    ("import-zero-shards", imp("good.npy", "--shard-tokens", "0"), [USAGE, "--shard-tokens"]),
    ("import-shards-not-int", imp("good.npy", "--shard-tokens", "lots"), [USAGE, "--shard-tokens"]),
    ("import-zero-top-k", imp("good.npy", "--top-k", "0"), [USAGE, "--top-k"]),
    ("import-huge-top-k", imp("good.npy", "--top-k", str(10 ** 20)), ["--top-k must be", "1..4"]),
    ("import-top-k-above-n", imp("good.npy", "--top-k", "5"), ["--top-k must be"]),
    ("import-sequence-length-not-dividing", imp("good.npy", "--sequence-length", "4"),
     ["not a whole number of sequences of --sequence-length 4"]),
    ("import-huge-sequence-length", imp("good.npy", "--sequence-length", str(10 ** 12)), ["--sequence-length"]),
    ("import-zero-sequence-length", imp("good.npy", "--sequence-length", "0"), [USAGE, "--sequence-length"]),
    ("import-boundaries-twice", imp("both.npz", "--sequence-length", "3"), ["given twice", "--sequence-length 3"]),
    ("import-btn-and-sequence-length", imp("cube.npy", "--layout", "btn", "--sequence-length", "3"),
     ["given twice"]),
    ("import-layout-on-pt", imp("tuple.pt", "--layout", "btn"), ["--layout applies to .npy/.npz"]),
    ("import-mask-on-npy", imp("good.npy", "--attention-mask", "{d}/mask.pt"), ["--attention-mask apply to"]),
    ("import-missing-mask", imp("tuple.pt", "--attention-mask", "{d}/nope.pt"), ["nope.pt: no such file"]),
    ("import-mask-shape", imp("tuple.pt", "--attention-mask", "{d}/mask.pt"), ["rows"]),
    ("import-sequence-length-vs-rows-pt", imp("tuple.pt", "--sequence-length", "4"),
     ["not a whole number of sequences"]),
    # ------------------------------------------------------------------ import: the destination
    ("import-out-is-file", ["import", "{d}/good.npy", "--out", "{d}/afile"], ["exists and is not a directory"]),
    ("import-out-under-file", ["import", "{d}/good.npy", "--out", "{d}/afile/log"], ["is a file, so"]),
    ("import-out-not-empty", ["import", "{d}/good.npy", "--out", "{d}/log"], ["not empty", "--overwrite"]),
    ("import-out-foreign-files", ["import", "{d}/good.npy", "--out", "{d}/full", "--overwrite"],
     ["mine.txt", "refusing to delete them even with --overwrite"]),
    ("import-out-shards-is-file", ["import", "{d}/good.npy", "--out", "{d}/shards-file", "--overwrite"],
     ["shards", "refusing to delete"]),
    ("import-out-unwritable", ["import", "{d}/good.npy", "--out", "/proc/usmoe-lp-sweep/log"], ["/proc"]),
    # ------------------------------------------------------------------ capture
    ("capture-missing-text", cap(text="{d}/nope.txt"), ["--text", "not found"]),
    ("capture-text-is-dir", cap(text="{d}/models"), ["is not a file"]),
    ("capture-out-is-file", cap(out="{d}/afile"), ["exists and is not a directory"]),
    ("capture-out-under-file", cap(out="{d}/afile/log"), ["is a file, so"]),
    ("capture-out-not-empty", cap(out="{d}/log"), ["not empty", "--overwrite"]),
    ("capture-model-typo-beside-dir", cap(), ["no such directory"]),
    ("capture-model-dot-path", cap(model="./no-such-model-dir"), ["no such directory"]),
    ("capture-model-file", cap(model="{d}/model-file"), ["is a file"]),
    ("capture-model-without-config", cap(model="{d}/emptydir"), ["has no config.json"]),
    ("capture-bad-dtype", cap("--dtype", "fp8"), [USAGE, "--dtype"]),
    ("capture-bad-device", cap("--device", "tpu"), ["--device must be cuda or cpu"]),
    ("capture-zero-tokens", cap("--max-tokens", "0"), [USAGE, "--max-tokens"]),
    ("capture-negative-batch", cap("--batch-size", "-2"), [USAGE, "--batch-size"]),
    ("capture-negative-seq-len", cap("--seq-len", "-1"), [USAGE, "--seq-len"]),
    ("capture-negative-shards", cap("--shard-tokens", "-1"), [USAGE, "--shard-tokens"]),
    ("capture-negative-generate", cap("--generate", "-1"), [USAGE, "--generate"]),
    # ------------------------------------------------------------------ log info
    ("log-info-missing", ["log", "info", "{d}/nope"], ["no such router log"]),
    ("log-info-file", ["log", "info", "{d}/afile"], ["no such router log"]),
    ("log-info-empty-dir", ["log", "info", "{d}/emptydir"], ["no manifest.json"]),
    ("log-info-shards-is-file", ["log", "info", "{d}/shards-file"], ["invalid router log", "shards",
                                                                     "not a directory"]),
    ("log-info-negative-shards", ["log", "info", "{d}/log", "--shards", "-2"], [USAGE, "--shards"]),
    # ------------------------------------------------------------------ train-tiny
    ("train-tiny-zero-steps", ["train-tiny", "--out", "{d}/tiny", "--steps", "0"], [USAGE, "--steps"]),
    ("train-tiny-negative-lr", ["train-tiny", "--out", "{d}/tiny", "--lr", "-1"], [USAGE, "--lr"]),
    # ------------------------------------------------------------------ analyze: routers and parameters
    ("analyze-unknown-router", an("--routers", "sinkhron"), ["--routers sinkhron: unknown router", "choose one of",
                                                            "tc"]),
    ("analyze-param-no-router", an("--routers", "tc", "--param", "kbar=1"),
     ["--param kbar: no router of --routers (tc) takes it", "usmoe"]),
    ("analyze-param-unknown", an("--param", "kbra=1"), ["--param kbra", "no registered router"]),
    ("analyze-param-malformed", an("--param", "kbar"), ["--param 'kbar': expected NAME=V1,V2"]),
    ("analyze-param-not-a-number", an("--routers", "usmoe", "--param", "kbar=lots"),
     ["--param kbar: 'lots' is not a number"]),
    ("analyze-param-out-of-range", an("--routers", "usmoe", "--param", "kbar=-1"), ["--param kbar", "kbar must be"]),
    ("analyze-param-twice", an("--routers", "usmoe", "--param", "kbar=1", "--param", "kbar=2"), ["given twice"]),
    ("analyze-param-and-shorthand", an("--routers", "usmoe", "--param", "kbar=1", "--kbar", "2"),
     ["kbar is given twice: in --param and as --kbar"]),
    ("analyze-alpha-out-of-range", an("--alpha", "1.5"), ["--alpha", "alpha must"]),
    # ------------------------------------------------------------------ the app
    ("unknown-command", ["frobnicate"], ["No such command"]),
]


def api_words(argv: list[str]) -> re.Pattern:
    """The Python keywords of the invoked command's options (``top_k=``, ``overwrite=True``...)."""
    group = get_command(app)
    command = group.commands[argv[0]]
    if argv[0] == "log":
        command = command.commands[argv[1]]
    names = [p.name for p in command.params if p.name and ("_" in p.name or p.name == "overwrite")]
    return re.compile("|".join(rf"(?<![\w.-]){n}(=|\b)" if "_" in n else rf"\b{n}=" for n in names) or "$^")


@pytest.mark.parametrize("row_id, argv, needles", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_gives_one_line_and_no_traceback(files, row_id, argv, needles, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = sorted(p.name for p in files.iterdir())
    result = runner.invoke(app, [a.replace("{d}", str(files)) for a in argv])
    assert result.exit_code in (1, 2), (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.lower().startswith("error:")]
    assert len(lines) == 1, result.stderr                    # one message, on one line
    line = lines[0]
    for needle in needles:
        assert needle in line, (needle, line)
    if argv[0] in get_command(app).commands:
        assert not api_words(argv).search(line), line      # CLI flags, not Python keywords
    assert sorted(p.name for p in files.iterdir()) == before  # a refused run writes nothing


def test_out_under_read_only_directory(files, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        result = runner.invoke(app, ["import", str(files / "good.npy"), "--out", str(ro / "log")])
    finally:
        ro.chmod(0o755)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "Permission denied" in result.stderr
