"""Parquet export of a router log's per-token table: read back with pyarrow and pandas, compared with the log.

Oracles: the log's own tensors (metadata, logits, the captured selection) and the selection and
probabilities recomputed here from the logits with plain torch (softmax / normalised sigmoid,
``torch.topk``) on float32 logits without ties.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from usmoe_lp.errors import InvalidParameter, OutputExists
from usmoe_lp.export import COLUMNS, export_parquet
from usmoe_lp.logs import CorruptLog, LayerInfo, MissingLayer, RouterLog, RouterLogWriter
from usmoe_lp.logs.format import shard_file

T, N, K = 23, 6, 2


def _write(path, *, dtype=torch.float32, experts=(N, N), tokens=T, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = [LayerInfo("model.layers.0.mlp.gate", num_experts=experts[0], top_k=K, score_function="softmax"),
              LayerInfo("model.layers.1.mlp.gate", num_experts=experts[1], top_k=K, score_function="sigmoid")]
    logits = {la.name: torch.randn(tokens, la.num_experts, generator=g).to(dtype) for la in layers}
    # layer 1 records what the model used: the two largest logits, listed in the *reverse* order
    sel = {layers[1].name: torch.topk(logits[layers[1].name].float(), K).indices.flip(1)}
    seq = torch.arange(tokens) // 5
    with RouterLogWriter(path, layers, shard_tokens=7) as w:
        w.append(logits, torch.arange(tokens) + 1000, seq, torch.arange(tokens) % 5, selected=sel)
    return RouterLog.open(path)


@pytest.fixture
def log(tmp_path):
    return _write(tmp_path / "log")


def _oracle(log, layer):
    """(experts, probabilities) per token, most probable first, from plain torch on the logits."""
    z = log.read(layer, 0, log.num_tokens).logits.double()
    info = log.layer_info(layer)
    p = torch.softmax(z, -1) if info.score_function == "softmax" else torch.sigmoid(z) / torch.sigmoid(z).sum(-1,
                                                                                                          True)
    top = torch.topk(p, K)
    return top.indices.tolist(), top.values.tolist()


def test_the_table_matches_the_log(log, tmp_path):
    out = tmp_path / "log.parquet"
    result = export_parquet(log, out, include_logits=True, chunk_tokens=10)
    assert result.rows == 2 * T and result.num_tokens == T and result.layers == log.layers
    assert result.row_groups == 2 * math.ceil(T / 10) == pq.ParquetFile(out).num_row_groups
    assert result.selection_source == {log.layers[0]: "recomputed native", log.layers[1]: "captured"}

    table = pq.read_table(out)
    assert tuple(table.column_names) == COLUMNS
    assert table.schema.field("logits").type == pa.list_(pa.field("element", pa.float32(), False), N)
    df = pd.read_parquet(out)
    assert len(df) == 2 * T and str(df["layer"].dtype) == "category"
    assert df["layer_index"].tolist() == [0] * T + [1] * T       # sorted by (layer_index, token_index)
    for i, layer in enumerate(log.layers):
        part = df[df["layer"] == layer]
        assert (part["layer_index"] == i).all()
        chunk = log.read(layer, 0, T)
        assert part["token_index"].tolist() == list(range(T))
        assert part["token_id"].tolist() == chunk.token_ids.tolist()
        assert part["sequence_id"].tolist() == chunk.sequence_ids.tolist()
        assert part["position"].tolist() == chunk.positions.tolist()
        np.testing.assert_array_equal(np.stack(part["logits"].to_list()), chunk.logits.numpy())
        experts, probs = _oracle(log, layer)
        assert [list(e) for e in part["experts"]] == experts
        np.testing.assert_allclose(np.stack(part["probabilities"].to_list()), np.array(probs), rtol=1e-6)
    # the captured selection of layer 1 (stored most-probable-last) comes out as the same set, re-ordered
    captured = log.read(log.layers[1], 0, T).selected
    assert [sorted(e) for e in df[df["layer_index"] == 1]["experts"]] == sorted_rows(captured)

    meta = json.loads(pq.read_metadata(out).metadata[b"usmoe_lp"])
    assert meta["row_order"] == ["layer_index", "token_index"] and meta["num_tokens"] == T
    assert meta["layers"][log.layers[1]] == {"index": 1, "num_experts": N, "top_k": K, "score_function": "sigmoid",
                                             "selection_source": "captured"}
    sorting = pq.ParquetFile(out).metadata.row_group(0).sorting_columns
    assert [c.column_index for c in sorting] == [0, 2]


def sorted_rows(t: torch.Tensor) -> list[list[int]]:
    return [sorted(r) for r in t.tolist()]


def test_ties_list_the_lower_expert_first(tmp_path):
    # "unknown": no routing semantics recorded, so the selection is the top-k, ties to the lowest index;
    # "softmax": the native replay, whose torch.topk breaks the tie as the model's kernel does
    layers = [LayerInfo("plain", num_experts=4, top_k=2, score_function="unknown"),
              LayerInfo("native", num_experts=4, top_k=2, score_function="softmax")]
    z = torch.tensor([[0.0, 1.0, 1.0, 0.5], [2.0, 0.0, 2.0, 2.0]])  # row 1: a three-way tie for two places
    with RouterLogWriter(tmp_path / "log", layers) as w:
        w.append({"plain": z, "native": z}, [0, 1], [0, 0], [0, 1])
    result = export_parquet(tmp_path / "log", tmp_path / "t.parquet")
    assert result.selection_source == {"plain": "recomputed top-k", "native": "recomputed native"}
    rows = pq.read_table(tmp_path / "t.parquet").to_pylist()
    assert [r["experts"] for r in rows[:2]] == [[1, 2], [0, 2]]
    native = rows[3]["experts"]
    assert len(native) == 2 and set(native) <= {0, 2, 3} and native == sorted(native)  # equal probabilities
    p = torch.softmax(z[1].double(), -1)[0].item()
    assert rows[1]["probabilities"] == rows[3]["probabilities"] == pytest.approx([p, p], rel=1e-6)


def test_layers_subset_and_differing_n_and_float64(tmp_path):
    log = _write(tmp_path / "log", dtype=torch.float64, experts=(6, 4))
    out = tmp_path / "x.parquet"
    export_parquet(log, out, layers=[log.layers[1]], include_logits=True)
    table = pq.read_table(out)
    assert table.num_rows == T and set(table.column("layer_index").to_pylist()) == {1}
    assert table.schema.field("logits").type == pa.list_(pa.field("element", pa.float64(), False), 4)
    export_parquet(log, out, include_logits=True, overwrite=True)
    table = pq.read_table(out)  # layers of 6 and 4 experts: a variable-size list column
    assert table.schema.field("logits").type == pa.list_(pa.field("element", pa.float64(), False))
    assert [len(v) for v in table.column("logits").to_pylist()] == [6] * T + [4] * T
    np.testing.assert_array_equal(np.array(table.column("logits").to_pylist()[T:]),
                                  log.read(log.layers[1], 0, T).logits.numpy())
    assert "logits" not in pq.read_table(export_parquet(log, out, overwrite=True).path).column_names


def test_bfloat16_logits_are_exported_exactly(tmp_path):
    log = _write(tmp_path / "log", dtype=torch.bfloat16)
    export_parquet(log, tmp_path / "x.parquet", include_logits=True)
    logits = np.array(pq.read_table(tmp_path / "x.parquet").column("logits").to_pylist()[:T], dtype=np.float32)
    np.testing.assert_array_equal(logits, log.read(log.layers[0], 0, T).logits.float().numpy())


def test_a_log_without_k_needs_top_k(tmp_path):
    with RouterLogWriter(tmp_path / "log", [LayerInfo("l0", num_experts=3)]) as w:
        w.append({"l0": torch.tensor([[0.0, 2.0, 1.0]])}, [5], [0], [0])
    with pytest.raises(InvalidParameter, match="does not record the model's top-k; pass top_k"):
        export_parquet(tmp_path / "log", tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()
    export_parquet(tmp_path / "log", tmp_path / "x.parquet", top_k=2)
    assert pq.read_table(tmp_path / "x.parquet").column("experts").to_pylist() == [[1, 2]]


def test_an_empty_log_gives_an_empty_table(tmp_path):
    with RouterLogWriter(tmp_path / "log", [LayerInfo("l0", num_experts=3, top_k=1)]):
        pass
    result = export_parquet(tmp_path / "log", tmp_path / "x.parquet", include_logits=True)
    table = pq.read_table(tmp_path / "x.parquet")
    assert result.rows == table.num_rows == 0 and tuple(table.column_names) == COLUMNS


def _files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_destination_rules(log, tmp_path):
    out = tmp_path / "x.parquet"
    export_parquet(log, out)
    before = out.read_bytes()
    with pytest.raises(OutputExists, match="exists; refusing to overwrite it.*overwrite=True"):
        export_parquet(log, out)
    assert out.read_bytes() == before
    export_parquet(log, out, overwrite=True, include_logits=True)   # an earlier Parquet file is replaced
    assert "logits" in pq.read_table(out).column_names
    notes = tmp_path / "notes.parquet"
    notes.write_text("my notes")
    with pytest.raises(OutputExists, match="not a Parquet file; refusing to replace it even with overwrite=True"):
        export_parquet(log, notes, overwrite=True)
    assert notes.read_text() == "my notes"
    with pytest.raises(OutputExists, match="is a directory"):
        export_parquet(log, tmp_path, overwrite=True)
    with pytest.raises(OutputExists, match="is a file, so"):
        export_parquet(log, notes / "x.parquet")
    assert _files(tmp_path) == ["log", "notes.parquet", "x.parquet"]   # no temporary file left anywhere


def test_a_failed_export_leaves_no_file_and_keeps_the_old_one(log, tmp_path):
    out = tmp_path / "x.parquet"
    export_parquet(log, out)
    before = out.read_bytes()
    shard = log.path / shard_file(2)
    data = bytearray(shard.read_bytes())
    data[-8:] = b"\xff" * 8
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptLog, match=shard_file(2).split("/")[-1]):
        export_parquet(log.path, out, overwrite=True)
    assert out.read_bytes() == before and _files(tmp_path) == ["log", "x.parquet"]
    with pytest.raises(CorruptLog):
        export_parquet(log.path, tmp_path / "new.parquet")
    assert _files(tmp_path) == ["log", "x.parquet"]


def test_argument_errors(log, tmp_path):
    with pytest.raises(MissingLayer, match="no layer 'nope'"):
        export_parquet(log, tmp_path / "x.parquet", layers=["nope"])
    with pytest.raises(InvalidParameter, match="layers is empty"):
        export_parquet(log, tmp_path / "x.parquet", layers=[])
    with pytest.raises(InvalidParameter, match="names a layer twice"):
        export_parquet(log, tmp_path / "x.parquet", layers=[log.layers[0]] * 2)
    with pytest.raises(InvalidParameter, match="chunk_tokens must be >= 1"):
        export_parquet(log, tmp_path / "x.parquet", chunk_tokens=0)
    assert _files(tmp_path) == ["log"]


# ----------------------------------------------------------------------------- usmoe-lp log export
from usmoe_lp.cli import app  # noqa: E402  (the real app: `log export` is mounted on the log group there)

runner = CliRunner(env={"COLUMNS": "200"})


def test_cli_exports_and_refuses_to_overwrite(log, tmp_path):
    out = tmp_path / "x.parquet"
    result = runner.invoke(app, ["log", "export", str(log.path), "--out", str(out), "--logits", "--chunk-tokens",
                                 "8"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"{2 * T:,} rows (2 layers x {T} tokens), 6 row groups" in text
    assert "selection: captured, recomputed native" in text
    assert pq.read_table(out).num_rows == 2 * T
    again = runner.invoke(app, ["log", "export", str(log.path), "--out", str(out)])
    assert again.exit_code == 2 and "pass --overwrite to replace it" in again.output
    sub = runner.invoke(app, ["log", "export", str(log.path), "--out", str(out), "--overwrite", "--layers",
                              log.layers[1]])
    assert sub.exit_code == 0, sub.output
    assert set(pq.read_table(out).column("layer").to_pylist()) == {log.layers[1]}
    bad = runner.invoke(app, ["log", "export", str(log.path), "--out", str(out), "--overwrite", "--top-k", "3"])
    assert bad.exit_code == 2 and "--top-k = 3, but the log records k = 2" in bad.output
    missing = runner.invoke(app, ["log", "export", str(tmp_path / "nolog"), "--out", str(tmp_path / "y.parquet")])
    assert missing.exit_code == 2 and "no such router log" in missing.output


# ----------------------------------------------------------------------------- selection logs
def _selection_log(path, *, with_weights: bool):
    """A selection log (imported expert ids, no logits) over two layers, with -1 (empty) slots."""
    sel = {"a": np.array([[3, 1], [0, -1], [5, 2], [-1, -1], [4, 0]], dtype=np.int32),
           "b": np.array([[1, 2], [2, 1], [0, 3], [3, 0], [5, 4]], dtype=np.int32)}
    weights = {name: np.where(ids >= 0, 0.25 + 0.5 * (ids % 2), 0.0).astype(np.float32) for name, ids in sel.items()}
    layers = [LayerInfo("a", num_experts=N, top_k=2), LayerInfo("b", num_experts=N, top_k=2)]
    with RouterLogWriter(path, layers, content="selection", shard_tokens=2, fsync=False) as w:
        w.append(None, token_ids=[9, 8, 7, 6, 5], sequence_ids=[0, 0, 0, 1, 1], positions=[0, 1, 2, 0, 1],
                 selected=sel, weights=weights if with_weights else None)
    return RouterLog.open(path), sel, weights


@pytest.mark.parametrize("with_weights", [False, True])
def test_a_selection_log_exports_its_recorded_experts(tmp_path, with_weights):
    log, sel, weights = _selection_log(tmp_path / "log", with_weights=with_weights)
    result = export_parquet(log, tmp_path / "s.parquet", chunk_tokens=3)
    assert result.selection_source == {"a": "captured", "b": "captured"} and result.rows == 10
    table = pq.read_table(tmp_path / "s.parquet")
    expected = ["layer_index", "layer", "token_index", "sequence_id", "position", "token_id", "experts"]
    assert table.column_names == expected + (["weights"] if with_weights else [])
    rows = table.to_pylist()
    for row in rows:  # oracle: the written arrays, slot by slot, empty (-1) slots left out
        ids = sel[row["layer"]][row["token_index"]]
        assert row["experts"] == [int(e) for e in ids if e >= 0]
        if with_weights:
            assert row["weights"] == [float(w) for e, w in zip(ids, weights[row["layer"]][row["token_index"]],
                                                                strict=True) if e >= 0]
    assert [r["token_id"] for r in rows[:5]] == [9, 8, 7, 6, 5]
    assert [(r["sequence_id"], r["position"]) for r in rows[:5]] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    meta = json.loads(pq.read_metadata(tmp_path / "s.parquet").metadata[b"usmoe_lp"])
    assert meta["content"] == "selection" and meta["dtype"] is None


def test_a_selection_log_has_no_logits_to_export(tmp_path):
    log, _, _ = _selection_log(tmp_path / "log", with_weights=False)
    with pytest.raises(InvalidParameter, match="selection log"):
        export_parquet(log, tmp_path / "s.parquet", include_logits=True)
    result = runner.invoke(app, ["log", "export", str(log.path), "--out", str(tmp_path / "s.parquet"), "--logits"])
    assert result.exit_code == 2 and "--logits has no logits to export" in " ".join(result.output.split())
    assert not (tmp_path / "s.parquet").exists()
    ok = runner.invoke(app, ["log", "export", str(log.path), "--out", str(tmp_path / "s.parquet")])
    assert ok.exit_code == 0 and "selection: captured" in ok.output
