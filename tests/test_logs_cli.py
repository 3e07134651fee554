"""``usmoe-lp log info LOG`` and ``usmoe-lp import SRC --out LOG`` through typer's CliRunner."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from usmoe_lp.errors import InvalidParameter
from usmoe_lp.logs import LayerInfo, RouterLog, RouterLogWriter
from usmoe_lp.logs.cli import import_command, log_app
from usmoe_lp.logs.errors import CorruptLog
from usmoe_lp.logs.format import MANIFEST_NAME, shard_file

# mounted exactly as usmoe_lp/cli.py mounts them
app = typer.Typer()
app.add_typer(log_app, name="log")
app.command("import")(import_command)

runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture
def log_path(tmp_path):
    path = tmp_path / "log"
    layers = [LayerInfo("l0", num_experts=8, top_k=2, module_path="model.layers.0.mlp.gate", score_function="softmax"),
              LayerInfo("l1", num_experts=8, top_k=2, score_function="sigmoid", selection_bias=[0.1] * 8)]
    with RouterLogWriter(path, layers, shard_tokens=10, model={"name": "tiny-moe", "family": "mixtral"},
                         capture={"batch_size": 4}) as w:
        w.append({"l0": torch.randn(45, 8).bfloat16(), "l1": torch.randn(45, 8).bfloat16()},
                 torch.arange(45), torch.arange(45) // 9, torch.arange(45) % 9)
    return path


def test_info_prints_the_manifest_and_validates(log_path):
    for cli, args in ((app, ["log", "info", str(log_path)]), (log_app, ["info", str(log_path)])):
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, result.output
        out = result.output
        for text in ("tiny-moe", "mixtral", "bfloat16", "45", "model.layers.0.mlp.gate", "softmax", "sigmoid",
                     "8 values in [0.1, 0.1]", shard_file(4), "[40, 45)", '"batch_size": 4', "torch"):
            assert text in out, text
        assert "valid: 5 shards, 45 tokens in 5 sequences; checked sizes, sha256 checksums" in out
        assert "warning" not in out


def test_info_truncates_long_shard_lists_and_can_skip_checksums(log_path):
    result = runner.invoke(app, ["log", "info", str(log_path), "--shards", "3", "--no-checksums"])
    assert result.exit_code == 0, result.output
    assert shard_file(0) in result.output and shard_file(4) in result.output and shard_file(2) not in result.output
    assert "..." in result.output and "checksums skipped" in result.output


def test_info_on_corrupt_logs_exits_2_naming_the_file(log_path, tmp_path):
    shard = log_path / shard_file(3)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x10
    shard.write_bytes(bytes(data))
    (log_path / (shard_file(5) + ".tmp")).write_bytes(b"half")
    result = runner.invoke(app, ["log", "info", str(log_path)])
    assert result.exit_code == 2
    assert "tiny-moe" in result.stdout                       # the manifest is still shown
    assert "invalid router log" in result.stderr and "checksum mismatch" in result.stderr
    assert "00003.safetensors" in result.stderr
    manifest = json.loads((log_path / MANIFEST_NAME).read_text())
    manifest["format_version"] = 3
    (log_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    result = runner.invoke(app, ["log", "info", str(log_path)])
    assert result.exit_code == 2
    assert "written by format version 3; this usmoe-lp reads up to 2: upgrade" in result.stderr
    result = runner.invoke(app, ["log", "info", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "no such router log" in result.stderr


def test_info_reports_unlisted_files_as_warnings(log_path):
    (log_path / (shard_file(5) + ".tmp")).write_bytes(b"half")
    result = runner.invoke(app, ["log", "info", str(log_path)])
    assert result.exit_code == 0
    assert "warning:" in result.output and "00005.safetensors.tmp" in result.output


def test_validation_report_ok_is_false_when_collected_problems(log_path):
    """``ValidationReport.ok``: True for a sound log (warnings are not problems), False when
    ``validate(collect=True)`` found damaged shards, each named once; the default still raises."""
    (log_path / (shard_file(5) + ".tmp")).write_bytes(b"half")
    sound = RouterLog.open(log_path, verify="none").validate(collect=True)
    assert sound.ok and sound.problems == () and sound.warnings  # the stray .tmp is a warning only
    for i, damage in ((1, "flip"), (3, "truncate")):
        shard = log_path / shard_file(i)
        data = bytearray(shard.read_bytes())
        if damage == "flip":
            data[-3] ^= 0x10
        else:
            data = data[: len(data) // 2]
        shard.write_bytes(bytes(data))
    log = RouterLog.open(log_path, verify="none")
    with pytest.raises(CorruptLog, match="00001.safetensors"):
        log.validate()
    report = log.validate(collect=True)
    assert not report.ok
    assert len(report.problems) == 2
    assert "00001.safetensors" in report.problems[0] and "checksum mismatch" in report.problems[0]
    assert "00003.safetensors" in report.problems[1]
    assert report.shards_checked == 5
    quick = log.validate(checksums=False, collect=True)   # sizes only: the flipped byte goes unseen
    assert not quick.ok and len(quick.problems) == 1 and "00003.safetensors" in quick.problems[0]
    with pytest.raises(InvalidParameter, match="collect"):
        log.validate(collect="yes")


def test_import_command(tmp_path):
    g = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(2 * 4, 6, generator=g) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    torch.save(logits, tmp_path / "router_logits.pt")
    torch.save(mask, tmp_path / "mask.pt")
    result = runner.invoke(app, ["import", str(tmp_path / "router_logits.pt"), "--out", str(tmp_path / "log"),
                                 "--attention-mask", str(tmp_path / "mask.pt"), "--model-name", "m", "--top-k", "2",
                                 "--shard-tokens", "3", "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert "3 layers x 6 experts, 7 tokens in 2 sequences, 3 shards, bfloat16" in result.output
    log = RouterLog.open(tmp_path / "log", verify="full")
    assert log.top_k == {"layer0": 2, "layer1": 2, "layer2": 2} and log.manifest.model.name == "m"
    keep = mask.reshape(-1).bool()
    assert torch.equal(log.read("layer1", 0, 7).logits, logits[1][keep].bfloat16())
    # refusing to overwrite, then --overwrite
    result = runner.invoke(app, ["import", str(tmp_path / "router_logits.pt"), "--out", str(tmp_path / "log")])
    assert result.exit_code == 2 and "not empty" in result.stderr and "--overwrite" in result.stderr
    result = runner.invoke(app, ["import", str(tmp_path / "router_logits.pt"), "-o", str(tmp_path / "log"),
                                 "--overwrite"])
    assert result.exit_code == 0 and RouterLog.open(tmp_path / "log").num_tokens == 8
    np.save(tmp_path / "x.npy", np.ones((5, 4, 3), dtype=np.float32))
    result = runner.invoke(app, ["import", str(tmp_path / "x.npy"), "--out", str(tmp_path / "npy"), "--layout", "ltn"])
    assert result.exit_code == 0 and "5 layers x 3 experts, 4 tokens" in result.output
    for args, message in [
        (["import", str(tmp_path / "x.npy"), "--out", str(tmp_path / "e1"), "--attention-mask",
          str(tmp_path / "mask.pt")], "apply to transformers"),
        (["import", str(tmp_path / "x.csv"), "--out", str(tmp_path / "e2")], "unknown file type"),
        (["import", str(tmp_path / "router_logits.pt"), "--out", str(tmp_path / "e3"), "--top-k", "9"],
         "--top-k must be"),
        (["import", str(tmp_path / "x.npy"), "--out", str(tmp_path / "e4"), "--dtype", "int8"],
         "Invalid value for '--dtype'"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, args
        assert message in result.stderr, result.stderr


def test_import_layout_boundaries_score_function_and_the_one_sequence_warning(tmp_path):
    cube = np.random.default_rng(1).standard_normal((2, 6, 4)).astype(np.float32)
    np.save(tmp_path / "cube.npy", cube)
    result = runner.invoke(app, ["import", str(tmp_path / "cube.npy"), "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "--layout 'ltn' or 'btn'" in result.stderr
    assert "ltn = (L, T, N)" in result.stderr and not (tmp_path / "a").exists()
    result = runner.invoke(app, ["import", str(tmp_path / "cube.npy"), "--out", str(tmp_path / "btn"), "--layout",
                                 "btn", "--score-function", "sigmoid", "--top-k", "2"])
    assert result.exit_code == 0, result.output
    assert "(layout btn): 1 layers x 4 experts, 12 tokens in 2 sequences" in result.output
    assert "warning" not in result.output
    log = RouterLog.open(tmp_path / "btn")
    assert log.manifest.layers[0].score_function == "sigmoid" and log.top_k == {"layer0": 2}
    np.save(tmp_path / "flat.npy", cube[0])
    result = runner.invoke(app, ["import", str(tmp_path / "flat.npy"), "--out", str(tmp_path / "flat")])
    assert result.exit_code == 0 and "(layout tn)" in result.output
    assert "warning: all 6 tokens are one sequence" in " ".join(result.stderr.split())
    result = runner.invoke(app, ["import", str(tmp_path / "flat.npy"), "--out", str(tmp_path / "l3"),
                                 "--sequence-length", "3"])
    assert result.exit_code == 0 and "6 tokens in 2 sequences" in result.output and "warning" not in result.output
    assert RouterLog.open(tmp_path / "l3").read("layer0", 0, 6).positions.tolist() == [0, 1, 2, 0, 1, 2]


def test_info_on_a_selection_log(tmp_path):
    path = tmp_path / "sel"
    with RouterLogWriter(path, [LayerInfo("l0", num_experts=8, top_k=2)], content="selection", fsync=False) as w:
        w.append(None, token_ids=[1, 2, 3], sequence_ids=[0, 0, 1], positions=[0, 1, 0],
                 selected={"l0": np.array([[1, 2], [3, 4], [5, -1]], dtype=np.int32)})
    result = runner.invoke(app, ["log", "info", str(path)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "content │ selection (no logits)" in text and "dtype │ - (no logits)" in text
    assert "3 tokens in 2 sequences (content: selection, no logits)" in text
    assert "also captured │ -" in text  # the selection is the content, not an extra


def test_import_help_lists_the_formats():
    result = runner.invoke(app, ["import", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for name in ("sglang", "vllm", "megatron", "olmoe", "--num-experts", "auto"):
        assert name in text
