"""A damaged router log fails with the right error, naming the file and the problem."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from usmoe_lp.errors import UsmoeLpError
from usmoe_lp.logs import (
    CorruptLog,
    LayerInfo,
    LogNotFound,
    MissingLayer,
    RouterLog,
    RouterLogWriter,
    UnsupportedVersion,
)
from usmoe_lp.logs.format import MANIFEST_NAME, sha256_file, shard_file

LAYERS = (LayerInfo("l0", num_experts=4), LayerInfo("l1", num_experts=4))


@pytest.fixture
def log_path(tmp_path):
    path = tmp_path / "log"
    g = torch.Generator().manual_seed(0)
    with RouterLogWriter(path, LAYERS, shard_tokens=10) as w:
        w.append({"l0": torch.randn(30, 4, generator=g), "l1": torch.randn(30, 4, generator=g)},
                 torch.arange(30), torch.arange(30) // 10, torch.arange(30) % 10)
        w.write_router_weights({"l0": torch.randn(4, 8, generator=g)})
    return path


def edit_manifest(path, change):
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    change(manifest)
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))


def read_everything(path, verify):
    log = RouterLog.open(path, verify=verify)
    for layer in log.layers:
        list(log.iter_chunks(layer, chunk_tokens=7))
    return log


@pytest.mark.parametrize("verify", ["lazy", "full"])
def test_truncated_shard(log_path, verify):
    shard = log_path / shard_file(1)
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(CorruptLog, match=rf"{re.escape(str(shard))}: truncated shard \({len(data) - 100} of "
                                         rf"{len(data)} bytes\)"):
        RouterLog.open(log_path, verify=verify)


@pytest.mark.parametrize("verify", ["lazy", "full"])
def test_flipped_byte_is_a_checksum_mismatch(log_path, verify):
    shard = log_path / shard_file(2)
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01                                     # inside the tensor data: still a valid safetensors file
    shard.write_bytes(bytes(data))
    log = RouterLog.open(log_path, verify="lazy") if verify == "lazy" else None
    if log is not None:
        assert torch.equal(log.read("l0", 0, 20).token_ids, torch.arange(20))   # undamaged shards still read
    with pytest.raises(CorruptLog, match=rf"{re.escape(str(shard))}: checksum mismatch"):
        read_everything(log_path, verify)


def test_none_skips_checksums_but_still_names_a_damaged_header(log_path):
    shard = log_path / shard_file(0)
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01
    shard.write_bytes(bytes(data))
    read_everything(log_path, "none")                    # trusted: no checksum
    shard.write_bytes(b"\x00" * 20)
    with pytest.raises(CorruptLog, match=rf"{re.escape(str(shard))}: not a readable safetensors file"):
        read_everything(log_path, "none")


@pytest.mark.parametrize("verify", ["lazy", "full"])
def test_deleted_shard(log_path, verify):
    shard = log_path / shard_file(1)
    shard.unlink()
    with pytest.raises(CorruptLog, match=rf"{re.escape(str(shard))}: missing, but manifest.json lists it"):
        RouterLog.open(log_path, verify=verify)


@pytest.mark.parametrize("verify", ["none", "lazy", "full"])
def test_version_too_new(log_path, verify):
    edit_manifest(log_path, lambda m: m.update(format_version=99))
    with pytest.raises(UnsupportedVersion, match=rf"{re.escape(str(log_path / MANIFEST_NAME))} was written by "
                                                 "format version 99; this usmoe-lp reads up to 2: upgrade"):
        RouterLog.open(log_path, verify=verify)


@pytest.mark.parametrize("verify", ["lazy", "full"])
def test_layer_removed_from_a_shard(log_path, verify):
    """A shard rewritten without layer l1 (and the manifest's checksum updated to match)."""
    shard = log_path / shard_file(1)
    tensors = load_file(shard)
    del tensors["logits.l1"]
    save_file(tensors, shard)

    def fix(m):
        m["shards"][1].update(sha256=sha256_file(shard), bytes=shard.stat().st_size)

    edit_manifest(log_path, fix)
    with pytest.raises(MissingLayer, match=rf"{re.escape(str(shard))}: layer 'l1' is missing"):
        read_everything(log_path, verify)


def test_layer_missing_from_the_log(log_path):
    log = RouterLog.open(log_path)
    with pytest.raises(MissingLayer, match=rf"{re.escape(str(log_path))}: no layer 'l7'.*\['l0', 'l1'\]"):
        log.iter_chunks("l7")
    with pytest.raises(MissingLayer):
        log.layer_info("l7")


def test_shard_with_wrong_shape_or_dtype(log_path):
    shard = log_path / shard_file(0)
    tensors = load_file(shard)
    tensors["logits.l0"] = tensors["logits.l0"].half()
    save_file(tensors, shard)
    edit_manifest(log_path, lambda m: m["shards"][0].update(sha256=sha256_file(shard), bytes=shard.stat().st_size))
    with pytest.raises(CorruptLog, match=rf"{re.escape(str(shard))}: tensor 'logits.l0' is \(10, 4\) float16; "
                                         r"manifest.json expects \(10, 4\) float32"):
        RouterLog.open(log_path, verify="full")


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / MANIFEST_NAME).write_text('{"format_version": 1, "layers": ['), "not valid JSON"),
    (lambda p: (p / MANIFEST_NAME).write_bytes(b"\xff\xfe\x00"), "not UTF-8"),
    (lambda p: edit_manifest(p, lambda m: m.pop("layers")), "field layers is missing"),
    (lambda p: edit_manifest(p, lambda m: m.update(format_version="one")),
     "field format_version is \"one\", expected an integer >= 1"),
    (lambda p: edit_manifest(p, lambda m: m.update(num_tokens=31)), "num_tokens is 31 but the shards cover 30"),
    (lambda p: edit_manifest(p, lambda m: m["shards"][1].update(token_start=11)), "must be contiguous"),
    (lambda p: edit_manifest(p, lambda m: m["shards"][0].update(file="../../etc/passwd")),
     "expected a path of the form shards/NNNNN.safetensors"),
    (lambda p: edit_manifest(p, lambda m: m["shards"][0].update(sha256="abc")),
     "field shards\\[0\\].sha256 is \"abc\", expected 64 lowercase hex digits"),
    (lambda p: edit_manifest(p, lambda m: m["layers"][0].update(num_experts=5)), "layer says \\(5,\\)"),
    (lambda p: edit_manifest(p, lambda m: m["layers"][0].update(top_k=9)), "top_k must be"),
])
def test_damaged_manifest(log_path, damage, message):
    damage(log_path)
    with pytest.raises(CorruptLog, match=rf"{re.escape(str(log_path / MANIFEST_NAME))}: .*{message}"):
        RouterLog.open(log_path)


def test_shard_in_the_wrong_place(log_path):
    """Two shards swapped on disk, checksums swapped too: the header's token range catches it."""
    a, b = log_path / shard_file(0), log_path / shard_file(1)
    tmp = log_path / "swap"
    shutil.move(a, tmp)
    shutil.move(b, a)
    shutil.move(tmp, b)

    def swap(m):
        s0, s1 = m["shards"][0], m["shards"][1]
        s0["sha256"], s1["sha256"] = s1["sha256"], s0["sha256"]
        s0["bytes"], s1["bytes"] = s1["bytes"], s0["bytes"]

    edit_manifest(log_path, swap)
    with pytest.raises(CorruptLog, match=rf"{re.escape(str(a))}: header says token_start=10"):
        RouterLog.open(log_path, verify="full")


def test_damaged_router_weights(log_path):
    rw = log_path / "router_weights.safetensors"
    data = bytearray(rw.read_bytes())
    data[-1] ^= 0xFF
    rw.write_bytes(bytes(data))
    log = RouterLog.open(log_path)
    with pytest.raises(CorruptLog, match=rf"{re.escape(str(rw))}: checksum mismatch"):
        log.router_weights()
    with pytest.raises(CorruptLog, match="router_weights.safetensors: checksum mismatch"):
        log.validate()


def test_not_a_log(tmp_path, log_path):
    with pytest.raises(LogNotFound, match="no such router log"):
        RouterLog.open(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LogNotFound, match="has no manifest.json"):
        RouterLog.open(tmp_path / "empty")
    (log_path / MANIFEST_NAME).unlink()
    with pytest.raises(CorruptLog, match="manifest.json is missing but .*shards exists"):
        RouterLog.open(log_path)
    assert issubclass(LogNotFound, UsmoeLpError) and issubclass(LogNotFound, FileNotFoundError)


def test_unlisted_files_are_warnings_not_errors(log_path):
    shutil.copy(log_path / shard_file(0), log_path / shard_file(7))
    (log_path / (shard_file(3) + ".tmp")).write_bytes(b"partial")
    (log_path / "shards" / "notes.txt").write_text("x")
    (log_path / (MANIFEST_NAME + ".tmp")).write_text("{")
    log = RouterLog.open(log_path, verify="full")
    warnings = log.validate().warnings
    assert len(warnings) == 4
    assert any(shard_file(7) in w and "does not list" in w for w in warnings)
    assert any(shard_file(3) + ".tmp" in w and "not part of the log" in w for w in warnings)
    assert log.num_tokens == 30 and log.complete
