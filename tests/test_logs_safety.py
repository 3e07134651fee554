"""The router log never reads outside itself, never accepts a corrupt log, never loses a log.

Regression tests for a bad-input sweep: links and non-regular files, a typed manifest schema,
token metadata (negative, wrapped, duplicated), NaN/Inf logits, file permissions, a refused
overwrite, incomplete logs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from usmoe_lp.logs import (
    CorruptLog,
    InvalidLogInput,
    LayerInfo,
    LogExists,
    Manifest,
    NonFiniteLogits,
    RouterLog,
    RouterLogWriter,
)
from usmoe_lp.logs.errors import OVERWRITE_FLAG, NonFiniteLog
from usmoe_lp.logs.format import (
    FILE_FIELDS,
    LAYER_FIELDS,
    MANIFEST_FIELDS,
    MANIFEST_NAME,
    MODEL_FIELDS,
    SHARD_FIELDS,
    TENSOR_FIELDS,
    TokenOrder,
    sha256_file,
    shard_file,
)

LAYERS = (LayerInfo("l0", num_experts=4), LayerInfo("l1", num_experts=4))
T, SHARD = 30, 10


def make_log(path, seed=0, router_weights=True):
    g = torch.Generator().manual_seed(seed)
    logits = {"l0": torch.randn(T, 4, generator=g), "l1": torch.randn(T, 4, generator=g)}
    with RouterLogWriter(path, LAYERS, shard_tokens=SHARD) as w:
        w.append(logits, torch.arange(T), torch.arange(T) // 10, torch.arange(T) % 10)
        if router_weights:
            w.write_router_weights({"l0": torch.randn(4, 8, generator=g)})
    return logits


@pytest.fixture
def log_path(tmp_path):
    path = tmp_path / "log"
    make_log(path)
    return path


def edit_manifest(path, change):
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    change(manifest)
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))


def rewrite_shard(path, index, change):
    """Rewrite shard ``index`` with ``change(tensors)`` applied, header kept, checksum recomputed to match."""
    shard = path / shard_file(index)
    tensors = load_file(shard)
    from safetensors import safe_open
    with safe_open(str(shard), framework="pt") as f:
        meta = f.metadata()
    change(tensors)
    save_file(tensors, shard, metadata=meta)
    edit_manifest(path, lambda m: m["shards"][index].update(sha256=sha256_file(shard), bytes=shard.stat().st_size))


def read_everything(path, verify):
    log = RouterLog.open(path, verify=verify)
    for layer in log.layers:
        list(log.iter_chunks(layer, chunk_tokens=7))
    log.router_weights()
    return log.sequences


def snapshot(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ============================================================================ 1. reading outside the log
def outside_copy(tmp_path, log_path, rel):
    """A byte-identical copy of the log's ``rel`` outside the log (a valid file: only the link is wrong)."""
    target = tmp_path / "outside" / rel.replace("/", "_")
    target.parent.mkdir(exist_ok=True)
    shutil.copy(log_path / rel, target)
    return target


@pytest.mark.parametrize("verify", ["none", "lazy", "full"])
@pytest.mark.parametrize("rel", [shard_file(1), MANIFEST_NAME, "router_weights.safetensors"])
def test_a_linked_file_is_refused_even_when_its_content_is_valid(tmp_path, log_path, verify, rel):
    target = outside_copy(tmp_path, log_path, rel)
    (log_path / rel).unlink()
    (log_path / rel).symlink_to(target)
    with pytest.raises(CorruptLog, match=rf"{re.escape(str(log_path / rel))}: a symbolic link; a router log never "
                                         "follows links"):
        read_everything(log_path, verify)


@pytest.mark.parametrize("verify", ["none", "lazy", "full"])
def test_a_linked_shards_directory_is_refused(tmp_path, log_path, verify):
    shutil.copytree(log_path / "shards", tmp_path / "elsewhere")
    shutil.rmtree(log_path / "shards")
    (log_path / "shards").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CorruptLog, match=rf"{re.escape(str(log_path / 'shards'))}: a symbolic link"):
        read_everything(log_path, verify)


def test_an_empty_log_with_a_linked_shards_directory_lists_nothing_outside(tmp_path):
    path = tmp_path / "log"
    RouterLogWriter(path, LAYERS).close()
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "secret-name.txt").write_text("x")
    (path / "shards").rmdir()
    (path / "shards").symlink_to(tmp_path / "private")
    with pytest.raises(CorruptLog, match="shards: a symbolic link") as info:
        RouterLog.open(path, verify="full")
    assert "secret-name" not in str(info.value)


@pytest.mark.parametrize("verify", ["lazy", "full"])
def test_a_link_to_a_system_file_reveals_neither_its_size_nor_its_hash(tmp_path, log_path, verify):
    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(4321))
    digest = hashlib.sha256(secret.read_bytes()).hexdigest()
    shard = log_path / shard_file(0)
    shard.unlink()
    shard.symlink_to(secret)
    with pytest.raises(CorruptLog) as info:
        read_everything(log_path, verify)
    message = str(info.value) + "".join(getattr(info.value, "__notes__", []))
    assert "symbolic link" in message and "4321" not in message and digest[:8] not in message


@pytest.mark.parametrize("rel", [shard_file(1), MANIFEST_NAME])
def test_a_fifo_is_refused_without_blocking(log_path, rel):
    (log_path / rel).unlink()
    os.mkfifo(log_path / rel)
    outcome = []

    def run():
        try:
            outcome.append(RouterLog.open(log_path, verify="none").sequences)
        except CorruptLog as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)   # a blocked open would hang only this thread
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "opening a FIFO blocked"
    assert outcome and isinstance(outcome[0], CorruptLog)
    assert re.search(rf"{re.escape(str(log_path / rel))}: a FIFO, not a file", str(outcome[0]))


@pytest.mark.parametrize("verify", ["none", "lazy", "full"])
def test_shards_being_a_file_is_a_corrupt_log_not_a_traceback(log_path, verify):
    shutil.rmtree(log_path / "shards")
    (log_path / "shards").write_text("not a directory")
    with pytest.raises(CorruptLog, match=rf"{re.escape(str(log_path / 'shards'))}: a regular file, not a directory"):
        read_everything(log_path, verify)


@pytest.mark.parametrize("change, field", [
    (lambda m: m["shards"][0].update(file="../../etc/passwd"), r"shards\[0\].file"),
    (lambda m: m["shards"][0].update(file="shards/../../00000.safetensors"), r"shards\[0\].file"),
    (lambda m: m["shards"][0].update(file="/etc/passwd"), r"shards\[0\].file"),
    (lambda m: m["router_weights"].update(file="../router_weights.safetensors"), r"router_weights.file"),
])
def test_path_traversal_is_refused(log_path, change, field):
    edit_manifest(log_path, change)
    with pytest.raises(CorruptLog, match=rf"manifest.json: field {field} is "):
        RouterLog.open(log_path, verify="none")


def test_the_log_directory_itself_may_be_a_link_the_user_made(tmp_path, log_path):
    (tmp_path / "alias").symlink_to(log_path)
    assert RouterLog.open(tmp_path / "alias", verify="full").num_tokens == T


# ============================================================================ 2. the manifest schema
@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(complete="false"), 'field complete is "false", expected true or false'),
    (lambda m: m["layers"][0].update(selection_bias="12345678"),
     r'field layers\[0\].selection_bias is "12345678", expected null or a list of finite numbers'),
    (lambda m: m["layers"][0].update(selection_bias=[1.0, "2", 3.0, 4.0]), r"layers\[0\].selection_bias"),
    (lambda m: m["layers"][0].update(selection_bias=[1.0, 2.0]), "selection_bias must be 4 finite numbers"),
    (lambda m: m.update(device=5), "field device is 5, expected null or a string"),
    (lambda m: m.update(device=["cuda"]), "field device is list"),
    (lambda m: m.update(created="yesterday"), "field created is \"yesterday\", expected null or an ISO 8601"),
    (lambda m: m.update(created=1700000000), "field created is 1700000000"),
    (lambda m: m["model"].update(name=3), "field model.name is 3"),
    (lambda m: m.update(model="mixtral"), "field model is \"mixtral\", expected an object"),
    (lambda m: m.update(capture=[1]), "field capture is list"),
    (lambda m: m.update(versions={"torch": 2}), "field versions is dict, expected null or an object of strings"),
    (lambda m: m["layers"][0].update(top_k=True), r"field layers\[0\].top_k is true"),
    (lambda m: m["layers"][0].update(num_experts=4.0), r"field layers\[0\].num_experts is 4.0"),
    (lambda m: m["layers"][0].update(score_function="relu"), r"field layers\[0\].score_function is \"relu\""),
    (lambda m: m["layers"][0].update(module_path=7), r"field layers\[0\].module_path is 7"),
    (lambda m: m["layers"].append(7), r"field layers\[2\] is 7, expected an object"),
    (lambda m: m.update(num_tokens=-30), "field num_tokens is -30, expected an integer >= 0"),
    (lambda m: m["shards"][0].update(bytes="12"), r"field shards\[0\].bytes is \"12\""),
    (lambda m: m["shards"][0].update(token_stop=10.0), r"field shards\[0\].token_stop is 10.0"),
    (lambda m: m["tensors"].update(junk={"dtype": "int64", "row_shape": []}), "field tensors.junk names no tensor"),
    (lambda m: m["tensors"]["positions"].update(row_shape=[True]), "field tensors.positions.row_shape"),
    (lambda m: m.update(format="something else"), "field format is \"something else\""),
    (lambda m: m.update(router_weights=[]), "field router_weights is list"),
    (lambda m: m["shards"][2].update(sha256=m["shards"][0]["sha256"]), r"repeats the sha256 of shards\[0\]"),
    (lambda m: m["shards"][1].update(file=m["shards"][0]["file"]), r"repeats the file of shards\[0\]"),
])
def test_a_malformed_field_is_a_corrupt_log_naming_file_and_field(log_path, change, message):
    edit_manifest(log_path, change)
    with pytest.raises(CorruptLog, match=rf"{re.escape(str(log_path / MANIFEST_NAME))}: .*{message}"):
        RouterLog.open(log_path, verify="none")


TABLES = {"": MANIFEST_FIELDS, "model.": MODEL_FIELDS, "layers[0].": LAYER_FIELDS, "shards[0].": SHARD_FIELDS,
          "router_weights.": FILE_FIELDS, "tensors.positions.": TENSOR_FIELDS}
BAD_VALUES = ([], {}, "x", 1.5, -1, 0, True, None, [True], "2024-13-45", float("inf"))


def _at(manifest, where):
    obj = manifest
    for part in filter(None, re.split(r"[.\[\]]+", where)):
        obj = obj[int(part)] if part.isdigit() else obj[part]
    return obj


@pytest.mark.parametrize("where", list(TABLES))
def test_every_field_of_the_schema_refuses_every_value_of_the_wrong_kind(log_path, where):
    """The whole schema, not a sample: each field, each value its kind rejects -> CorruptLog naming the field."""
    good = json.loads((log_path / MANIFEST_NAME).read_text())
    checked = 0
    for f in TABLES[where]:
        for value in BAD_VALUES:
            if f.kind.test(value) or f.key == "format_version" and value is None:
                continue
            data = json.loads(json.dumps(good))
            _at(data, where)[f.key] = value
            with pytest.raises(CorruptLog, match=rf"src: field {re.escape(where + f.key)} is "):
                Manifest.from_dict(data, source="src")
            checked += 1
        if f.required:
            data = json.loads(json.dumps(good))
            del _at(data, where)[f.key]
            with pytest.raises(CorruptLog, match=rf"src: field {re.escape(where + f.key)} is missing"):
                Manifest.from_dict(data, source="src")
    assert checked >= len(TABLES[where])


def test_the_schema_covers_what_the_writer_writes(log_path):
    data = json.loads((log_path / MANIFEST_NAME).read_text())
    for where, table in TABLES.items():
        assert set(_at(data, where)) == {f.key for f in table}, where
    assert Manifest.from_dict(data).to_dict() == data                 # and the parser keeps every field


def test_layer_info_takes_no_string_for_numbers():
    with pytest.raises(InvalidLogInput, match="selection_bias must be 8 finite numbers"):
        LayerInfo("l", num_experts=8, selection_bias="12345678")
    with pytest.raises(InvalidLogInput, match="selection_bias"):
        LayerInfo("l", num_experts=2, selection_bias=[True, 1.0])
    assert LayerInfo("l", num_experts=2, selection_bias=torch.tensor([0.5, 1.0])).selection_bias == (0.5, 1.0)


# ============================================================================ 2. token metadata
@pytest.mark.parametrize("verify", ["lazy", "full"])
def test_negative_positions_are_refused_when_read(log_path, verify):
    rewrite_shard(log_path, 1, lambda t: t["positions"].__setitem__(4, -3))
    with pytest.raises(CorruptLog, match=rf"{re.escape(str(log_path / shard_file(1)))}: token 14 of the log "
                                         r"\(row 4 of this shard\) has position -3"):
        read_everything(log_path, verify)


@pytest.mark.parametrize("verify", ["lazy", "full"])
def test_a_wrapped_sequence_id_is_refused(log_path, verify):
    """Shard 2 says sequence 0 again, positions from 0: an id reused for a new sequence."""
    rewrite_shard(log_path, 2, lambda t: t["sequence_ids"].zero_())
    with pytest.raises(CorruptLog, match=rf"{re.escape(str(log_path / shard_file(2)))}: token 20 of the log .*"
                                         r"\(sequence 0, position 0\) comes after position 9 of the same sequence"):
        read_everything(log_path, verify)


def test_a_negative_sequence_id_is_refused(log_path):
    rewrite_shard(log_path, 0, lambda t: t["sequence_ids"].__setitem__(slice(None), -1))
    with pytest.raises(CorruptLog, match=r"token 0 of the log \(row 0 of this shard\) has sequence id -1"):
        RouterLog.open(log_path, verify="full")


@pytest.mark.parametrize("verify", ["lazy", "full"])
def test_a_duplicated_shard_is_refused(log_path, verify):
    """Shard 1 replaced by the tokens of shard 0 (header token range and checksums made consistent)."""
    first = load_file(log_path / shard_file(0))
    rewrite_shard(log_path, 1, lambda t: t.update(first))
    with pytest.raises(CorruptLog, match=rf"{re.escape(str(log_path / shard_file(1)))}: holds the same tokens .* as "
                                         rf"{re.escape(str(log_path / shard_file(0)))}; a duplicated shard"):
        read_everything(log_path, verify)


def test_the_writer_refuses_what_the_reader_would(tmp_path):
    logits = {"l0": torch.zeros(4, 4), "l1": torch.zeros(4, 4)}
    w = RouterLogWriter(tmp_path / "log", LAYERS)
    with pytest.raises(InvalidLogInput, match=r"token 2 of this batch has position -1"):
        w.append(logits, torch.arange(4), torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, -1, 2]))
    w.append(logits, torch.arange(4), torch.zeros(4, dtype=torch.long), torch.arange(4))
    with pytest.raises(InvalidLogInput, match=r"token 0 of this batch \(sequence 0, position 0\) comes after "
                                              r"position 3"):
        w.append(logits, torch.arange(4), torch.zeros(4, dtype=torch.long), torch.arange(4))   # the same tokens
    w.append(logits, torch.arange(4), torch.zeros(4, dtype=torch.long), torch.arange(4, 8))    # refused: not kept
    w.close()
    assert RouterLog.open(tmp_path / "log", verify="full").read("l0", 0, 8).positions.tolist() == list(range(8))


def test_interleaved_sequences_of_generate_decode_steps_are_valid(tmp_path):
    """Prompts of 3 sequences, then decode steps continuing all three at once (sequence ids 0,1,2,0,1,2,...)."""
    seq = torch.tensor([0, 0, 1, 1, 1, 2] + [0, 1, 2] * 4)
    pos = torch.tensor([0, 1, 0, 1, 2, 0] + [p for step in range(4) for p in (2 + step, 3 + step, 1 + step)])
    n = len(seq)
    with RouterLogWriter(tmp_path / "log", LAYERS, shard_tokens=4) as w:
        for a in range(0, n, 3):
            w.append({"l0": torch.zeros(3, 4), "l1": torch.zeros(3, 4)}, torch.arange(a, a + 3), seq[a:a + 3],
                     pos[a:a + 3])
    log = RouterLog.open(tmp_path / "log", verify="full")
    assert torch.equal(log.read("l1", 0, n).sequence_ids, seq) and log.sequences.tolist() == [0, 1, 2]


def _brute_force_problem_rows(seq, pos):
    """Index of the first token breaking the rule, by a plain loop (the oracle), or None."""
    last = {}
    for i, (s, p) in enumerate(zip(seq, pos, strict=True)):
        if s < 0 or p < 0 or (s in last and p <= last[s]):
            return i
        last[s] = p
    return None


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(-1, 3), st.integers(-1, 6)), min_size=1, max_size=30),
       st.lists(st.integers(1, 8), min_size=1, max_size=6))
def test_token_order_matches_a_brute_force_oracle(tokens, cuts):
    seq = np.array([s for s, _ in tokens], dtype=np.int64)
    pos = np.array([p for _, p in tokens], dtype=np.int64)
    expected = _brute_force_problem_rows(seq.tolist(), pos.tolist())
    order, a, found = TokenOrder(), 0, None
    for size in [*cuts, len(seq)]:                      # the rule holds across pieces as within one
        piece = slice(a, min(a + size, len(seq)))
        problem = order.check(seq[piece], pos[piece])
        if problem is not None:
            found = a + problem[0]
            break
        a = piece.stop
        if a >= len(seq):
            break
    assert found == expected          # the first token breaking the rule, whichever piece it is in


# ============================================================================ 3. NaN / Inf logits
def test_full_verification_finds_nan_and_names_shard_layer_token(log_path):
    rewrite_shard(log_path, 2, lambda t: t["logits.l1"].__setitem__((3, 1), float("nan")))
    shard = re.escape(str(log_path / shard_file(2)))
    pattern = rf"{shard}: logits of layer 'l1' have 1 NaN and 0 Inf entries .* first at token 23 of the log " \
              r"\(row 3 of this shard\), expert 1"
    with pytest.raises(NonFiniteLog, match=pattern):
        RouterLog.open(log_path, verify="full")
    log = RouterLog.open(log_path, verify="lazy")
    with pytest.raises(NonFiniteLog, match=pattern):
        log.validate()
    assert len(log.read("l1", 20, 30)) == 10                   # plain reads give what is there ...
    with pytest.raises(NonFiniteLog, match=rf"{shard}: logits of layer 'l1' .* token 23 of the log"):
        list(log.iter_chunks("l1", chunk_tokens=7, check_finite=True))      # ... the check names it
    assert issubclass(NonFiniteLog, CorruptLog) and issubclass(NonFiniteLog, NonFiniteLogits)


def test_inf_in_a_bf16_log_is_found(tmp_path):
    path = tmp_path / "log"
    with RouterLogWriter(path, LAYERS, shard_tokens=SHARD, dtype=torch.bfloat16) as w:
        w.append({"l0": torch.randn(T, 4), "l1": torch.randn(T, 4)}, torch.arange(T), torch.zeros(T, dtype=torch.long),
                 torch.arange(T))
    rewrite_shard(path, 0, lambda t: t["logits.l0"].__setitem__((0, 0), -float("inf")))
    with pytest.raises(NonFiniteLog, match=r"layer 'l0' have 0 NaN and 1 Inf .* token 0 of the log"):
        RouterLog.open(path, verify="full")


def test_analyze_names_shard_and_layer_of_non_finite_logits(log_path):
    from usmoe_lp.diagnostics.analyze import analyze

    rewrite_shard(log_path, 1, lambda t: t["logits.l0"].__setitem__((5, 2), float("inf")))
    with pytest.raises(NonFiniteLog, match=rf"{re.escape(str(log_path / shard_file(1)))}: logits of layer 'l0'"):
        analyze(log_path, top_k=2)


def test_log_info_reports_non_finite_logits_as_invalid(log_path):
    from typer.testing import CliRunner

    from usmoe_lp.cli import app

    rewrite_shard(log_path, 0, lambda t: t["logits.l1"].__setitem__((2, 0), float("nan")))
    result = CliRunner().invoke(app, ["log", "info", str(log_path)])
    assert result.exit_code == 2
    assert "invalid router log" in result.stderr and "layer 'l1'" in result.stderr
    assert shard_file(0) in result.stderr.replace("\n", "")


# ============================================================================ 4. permissions
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
@pytest.mark.parametrize("replace", [False, True])
def test_every_file_gets_the_permissions_of_a_normally_created_file(tmp_path, umask, replace):
    path = tmp_path / "log"
    old = os.umask(umask)
    try:
        if replace:
            make_log(path, seed=1)
        make_log(path, router_weights=True) if not replace else None
        if replace:
            with RouterLogWriter(path, LAYERS, shard_tokens=SHARD, overwrite=True) as w:
                w.append({"l0": torch.zeros(T, 4), "l1": torch.zeros(T, 4)}, torch.arange(T),
                         torch.zeros(T, dtype=torch.long), torch.arange(T))
                w.write_router_weights({"l1": torch.zeros(4, 3)})
        reference = tmp_path / "reference"
        reference.write_text("x")
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert stat.S_IMODE(os.stat(reference).st_mode) == expected
    files = [p for p in path.rglob("*") if p.is_file()]
    assert {p.relative_to(path).as_posix() for p in files} >= {MANIFEST_NAME, shard_file(0), shard_file(2),
                                                                "router_weights.safetensors"}
    assert {p.relative_to(path).as_posix(): oct(stat.S_IMODE(os.stat(p).st_mode)) for p in files} == \
        {p.relative_to(path).as_posix(): oct(expected) for p in files}


# ============================================================================ 5. never lose a log
def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


@pytest.mark.parametrize("failure", ["nan", "exception", "interrupt", "bad_order"])
def test_a_refused_overwrite_leaves_the_old_log_untouched(tmp_path, log_path, failure):
    before, siblings = snapshot(log_path), _siblings(log_path)
    logits = {"l0": torch.zeros(5, 4), "l1": torch.zeros(5, 4)}
    if failure == "nan":
        logits["l1"][0, 0] = float("nan")
    error = {"nan": NonFiniteLogits, "exception": RuntimeError, "interrupt": KeyboardInterrupt,
             "bad_order": InvalidLogInput}[failure]
    with pytest.raises(error):
        with RouterLogWriter(log_path, LAYERS, shard_tokens=2, overwrite=True) as w:
            assert snapshot(log_path) == before          # nothing deleted up front
            ok = {"l0": torch.ones(5, 4), "l1": torch.ones(5, 4)}
            w.append(ok, torch.arange(5), torch.zeros(5, dtype=torch.long), torch.arange(5))   # shards written aside
            assert RouterLog.open(log_path, verify="full").num_tokens == T                   # old log still there
            positions = torch.arange(5) if failure == "bad_order" else torch.arange(5, 10)
            w.append(logits, torch.arange(5), torch.zeros(5, dtype=torch.long), positions)
            if failure == "exception":
                raise RuntimeError("the capture failed")
            if failure == "interrupt":
                raise KeyboardInterrupt
    assert snapshot(log_path) == before and _siblings(log_path) == siblings      # temporary log removed too
    assert RouterLog.open(log_path, verify="full").complete


def test_a_successful_overwrite_swaps_the_new_log_in(tmp_path, log_path):
    siblings = _siblings(log_path)
    w = RouterLogWriter(log_path, LAYERS, shard_tokens=4, overwrite=True)
    assert w.staged and w.path == log_path
    w.append({"l0": torch.ones(6, 4), "l1": torch.ones(6, 4)}, torch.arange(6), torch.zeros(6, dtype=torch.long),
             torch.arange(6))
    assert RouterLog.open(log_path).num_tokens == T           # until close, the old log
    w.close()
    log = RouterLog.open(log_path, verify="full")
    assert log.num_tokens == 6 and log.complete and log.validate().warnings == ()
    assert _siblings(log_path) == siblings and not w.staged


def test_a_failing_import_with_overwrite_keeps_the_old_log(tmp_path, log_path):
    from usmoe_lp.logs import import_array

    before = snapshot(log_path)
    bad = np.zeros((8, 4), dtype=np.float32)
    bad[5, 1] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(NonFiniteLogits):
        import_array(tmp_path / "bad.npy", log_path, top_k=2, overwrite=True, shard_tokens=4)
    assert snapshot(log_path) == before and ".partial-" not in "".join(_siblings(log_path))


def test_an_overwrite_never_deletes_foreign_files(log_path):
    (log_path / "notes.txt").write_text("mine")
    with pytest.raises(LogExists, match=r"notes.txt.*refusing to delete them even with overwrite=True"):
        RouterLogWriter(log_path, LAYERS, overwrite=True)
    assert (log_path / "notes.txt").read_text() == "mine" and RouterLog.open(log_path).num_tokens == T


# ============================================================================ 6. incomplete logs
def _fail_in_with(path):
    with RouterLogWriter(path, LAYERS, shard_tokens=4) as w:
        w.append({"l0": torch.ones(6, 4), "l1": torch.ones(6, 4)}, torch.arange(6), torch.zeros(6, dtype=torch.long),
                 torch.arange(6))
        raise RuntimeError("the model crashed")


def _fail_on_bad_input(path):
    with RouterLogWriter(path, LAYERS, shard_tokens=4) as w:
        w.append({"l0": torch.ones(6, 4), "l1": torch.ones(6, 4)}, torch.arange(6), torch.zeros(6, dtype=torch.long),
                 torch.arange(6))
        w.append({"l0": torch.full((2, 4), float("nan")), "l1": torch.ones(2, 4)}, torch.arange(2),
                 torch.ones(2, dtype=torch.long), torch.arange(2))


def _fail_at_close(path, monkeypatch=None):
    w = RouterLogWriter(path, LAYERS, shard_tokens=4)
    w.append({"l0": torch.ones(6, 4), "l1": torch.ones(6, 4)}, torch.arange(6), torch.zeros(6, dtype=torch.long),
             torch.arange(6))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    w._write_safetensors = disk_full                          # the last (short) shard cannot be written
    w.close()


def _fail_without_with(path):
    w = RouterLogWriter(path, LAYERS, shard_tokens=4)
    w.append({"l0": torch.ones(6, 4), "l1": torch.ones(6, 4)}, torch.arange(6), torch.zeros(6, dtype=torch.long),
             torch.arange(6))
    raise RuntimeError("the process stopped here")   # never closed: as after a kill


@pytest.mark.parametrize("fail", [_fail_in_with, _fail_on_bad_input, _fail_at_close, _fail_without_with])
def test_every_failure_leaves_a_log_marked_incomplete(tmp_path, fail):
    path = tmp_path / "log"
    with pytest.raises((RuntimeError, OSError, NonFiniteLogits)):
        fail(path)
    assert json.loads((path / MANIFEST_NAME).read_text())["complete"] is False
    log = RouterLog.open(path, verify="full")                # readable, and says so
    assert not log.complete and log.num_tokens >= 4
    assert any("did not close" in w for w in log.validate().warnings)


def test_reopening_an_incomplete_log_says_what_happened_and_what_to_do(tmp_path):
    path = tmp_path / "log"
    with pytest.raises(RuntimeError):
        _fail_in_with(path)
    before = snapshot(path)
    with pytest.raises(LogExists, match=r"holds an incomplete router log of 6 tokens \(from an interrupted run.*"
                                        r"there is no resume: pass overwrite=True to start the run again"):
        RouterLogWriter(path, LAYERS)
    with pytest.raises(LogExists, match=r"no resume: pass --overwrite to start") as info:
        RouterLogWriter(path, LAYERS, overwrite_flag="--overwrite")
    assert OVERWRITE_FLAG not in str(info.value) and snapshot(path) == before
    with RouterLogWriter(path, LAYERS, overwrite=True) as w:            # starting again works
        w.append({"l0": torch.ones(2, 4), "l1": torch.ones(2, 4)}, torch.arange(2), torch.zeros(2, dtype=torch.long),
                 torch.arange(2))
    assert RouterLog.open(path, verify="full").complete


def test_a_complete_log_is_refused_with_the_usual_message(log_path):
    with pytest.raises(LogExists, match=r"is not empty .*pass overwrite=True to replace an earlier router log") as info:
        RouterLogWriter(log_path, LAYERS)
    assert "incomplete" not in str(info.value)
