"""Selection logs: a router log of the experts each token was routed to, without logits (format version 2)."""

import json

import numpy as np
import pytest
import torch

from usmoe_lp.logs import InvalidLogInput, LayerInfo, RouterLog, RouterLogWriter
from usmoe_lp.logs.errors import CorruptLog
from usmoe_lp.logs.format import MANIFEST_NAME


def _ids(n, k, N, seed=0):
    g = np.random.default_rng(seed)
    return np.stack([g.permutation(N)[:k] for _ in range(n)]).astype(np.int32)


def _write(path, n=7, k=2, N=5, shard_tokens=3, **kw):
    layers = [LayerInfo("a", num_experts=N, top_k=k), LayerInfo("b", num_experts=N, top_k=k)]
    sel = {"a": _ids(n, k, N, 1), "b": _ids(n, k, N, 2)}
    with RouterLogWriter(path, layers, content="selection", shard_tokens=shard_tokens, fsync=False, **kw) as w:
        w.append(None, token_ids=np.arange(n) + 10, sequence_ids=[0] * 4 + [1] * (n - 4),
                 positions=list(range(4)) + list(range(n - 4)), selected=sel)
    return sel


def test_roundtrip_across_shards(tmp_path):
    sel = _write(tmp_path / "log")
    log = RouterLog.open(tmp_path / "log", verify="full")
    assert not log.has_logits and log.content == "selection" and log.dtype is None
    assert log.manifest.format_version == 2 and log.num_tokens == 7 and len(log.shards) == 3
    for layer in ("a", "b"):
        chunk = log.read(layer, 2, 6)  # crosses two shard boundaries
        assert chunk.logits is None and chunk.num_tokens == 4 and chunk.selected.dtype == torch.int32
        assert np.array_equal(chunk.selected.numpy(), sel[layer][2:6])
        assert chunk.token_ids.tolist() == [12, 13, 14, 15]
        assert log.check_finite(chunk) is chunk
        got = np.concatenate([c.selected.numpy() for c in log.iter_chunks(layer, 2)])
        assert np.array_equal(got, sel[layer])
    assert log.validate().ok
    m = json.loads((tmp_path / "log" / MANIFEST_NAME).read_text())
    assert m["content"] == "selection" and m["dtype"] is None
    assert not any(name.startswith("logits.") for name in m["tensors"])


def test_logits_logs_unchanged(tmp_path):
    with RouterLogWriter(tmp_path / "log", [LayerInfo("a", num_experts=3)], fsync=False) as w:
        w.append({"a": torch.zeros(2, 3)}, token_ids=[1, 2], sequence_ids=[0, 0], positions=[0, 1])
    m = json.loads((tmp_path / "log" / MANIFEST_NAME).read_text())
    assert m["format_version"] == 1 and m["content"] == "logits"
    assert RouterLog.open(tmp_path / "log").has_logits


@pytest.mark.parametrize(("selected", "match"), [
    ({"a": np.array([[0, 5]])}, r"expert id 5; ids must be in \[0, 5\)"),
    ({"a": np.array([[0, -2]])}, "expert id -2"),
    ({"a": np.array([[0.0, 1.0]])}, "must be integer expert ids"),
    ({"a": np.array([[0, 1, 2]])}, "3 experts per token but the layer says top_k = 2"),
    ({}, r"missing \['a'\]"),
])
def test_bad_selection_refused(tmp_path, selected, match):
    with RouterLogWriter(tmp_path / "log", [LayerInfo("a", num_experts=5, top_k=2)], content="selection",
                         fsync=False) as w, pytest.raises(InvalidLogInput, match=match):
        w.append(None, token_ids=[0], sequence_ids=[0], positions=[0], selected=selected)


def test_logits_refused_in_a_selection_log(tmp_path):
    w = RouterLogWriter(tmp_path / "log", [LayerInfo("a", num_experts=5)], content="selection", fsync=False)
    with pytest.raises(InvalidLogInput, match="pass logits=None"):
        w.append({"a": torch.zeros(1, 5)}, token_ids=[0], sequence_ids=[0], positions=[0])
    w.discard()
    with pytest.raises(InvalidLogInput, match="content must be one of logits, selection"):
        RouterLogWriter(tmp_path / "log2", [LayerInfo("a", num_experts=5)], content="ids")


def test_empty_slots_allowed(tmp_path):
    with RouterLogWriter(tmp_path / "log", [LayerInfo("a", num_experts=4, top_k=2)], content="selection",
                         fsync=False) as w:
        w.append(None, token_ids=[0, 1], sequence_ids=[0, 0], positions=[0, 1],
                 selected={"a": np.array([[3, -1], [-1, -1]], dtype=np.int64)})
    assert RouterLog.open(tmp_path / "log").read("a", 0, 2).selected.tolist() == [[3, -1], [-1, -1]]


def test_manifest_rules(tmp_path):
    _write(tmp_path / "log")
    path = tmp_path / "log" / MANIFEST_NAME
    good = json.loads(path.read_text())
    for edit, match in [
        (lambda m: m.update(format_version=1), "a selection log is format version 2"),
        (lambda m: m.update(dtype="float32"), "dtype must be null"),
        (lambda m: m["tensors"].pop("selected.a"), "lacks 'selected.a'"),
        (lambda m: m["tensors"]["selected.a"].update(dtype="float32"), "stores \\(k,\\) expert ids"),
        (lambda m: m.update(format_version=3), "upgrade usmoe-lp"),
    ]:
        bad = json.loads(json.dumps(good))
        edit(bad)
        path.write_text(json.dumps(bad))
        with pytest.raises(Exception, match=match) as info:
            RouterLog.open(tmp_path / "log")
        assert isinstance(info.value, CorruptLog) or "upgrade" in match
    path.write_text(json.dumps(good))
    assert RouterLog.open(tmp_path / "log").num_tokens == 7
