"""Importers: transformers router_logits, .npy/.npz and safetensors become ordinary router logs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from usmoe_lp.logs import (
    ImportFailed,
    InvalidLogInput,
    LogExists,
    NonFiniteLogits,
    RouterLog,
    import_array,
    import_file,
    import_hf_router_logits,
    import_safetensors,
    load_tensor,
)

B, T, N, L = 3, 5, 8, 4
# 1 = real token. Row 0 full, row 1 right-padded, row 2 left-padded.
MASK = torch.tensor([[1, 1, 1, 1, 1],
                     [1, 1, 1, 0, 0],
                     [0, 0, 1, 1, 1]])


def hf_tuple(dtype=torch.float32, seed=0):
    """What transformers returns with output_router_logits=True: per layer (B*T, N), row b*T + t."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B * T, N, generator=g).to(dtype) for _ in range(L))


def expected_real_tokens():
    """(b, t, position) of each real token, batch-major, with positions counted from the first real token."""
    out = []
    for b in range(B):
        pos = 0
        for t in range(T):
            if MASK[b, t]:
                out.append((b, t, pos))
                pos += 1
    return out


def read_all(log, layer):
    return log.read(layer, 0, log.num_tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hf_tuple_with_padding_and_mask(tmp_path, dtype):
    logits = hf_tuple(dtype)
    input_ids = torch.arange(B * T).reshape(B, T) + 100
    path = tmp_path / "router_logits.pt"
    torch.save(logits, path)
    log = import_hf_router_logits(path, tmp_path / "log", attention_mask=MASK, input_ids=input_ids,
                                  model_name="tiny-moe", top_k=2, shard_tokens=4)
    real = expected_real_tokens()
    assert log.num_tokens == int(MASK.sum()) == len(real) == 11
    assert log.layers == tuple(f"layer{i}" for i in range(L)) and set(log.num_experts.values()) == {N}
    assert set(log.top_k.values()) == {2} and log.manifest.model.name == "tiny-moe" and log.dtype == dtype
    rows = [b * T + t for b, t, _ in real]
    for i, layer in enumerate(log.layers):
        chunk = read_all(log, layer)
        assert torch.equal(chunk.logits, logits[i][rows])
    chunk = read_all(log, "layer0")
    assert chunk.sequence_ids.tolist() == [b for b, _, _ in real]
    assert chunk.positions.tolist() == [p for _, _, p in real]
    assert chunk.token_ids.tolist() == [100 + b * T + t for b, t, _ in real]
    assert log.manifest.capture["padding_dropped"] == 4 and log.complete
    assert RouterLog.open(tmp_path / "log", verify="full").validate().warnings == ()


def test_hf_variants_live_tuple_3d_dict_list_and_already_dropped(tmp_path):
    logits = hf_tuple()
    real_rows = MASK.reshape(-1).bool()
    # Switch Transformers style: (B, T, N) per layer, (logits, expert_index) pairs, None for dense layers
    switch = [None, (logits[0].reshape(B, T, N), torch.zeros(B, T)), logits[1].reshape(B, T, N)]
    log = import_hf_router_logits(switch, tmp_path / "switch", attention_mask=MASK.numpy())
    assert log.layers == ("layer1", "layer2")
    assert torch.equal(read_all(log, "layer2").logits, logits[1][real_rows])
    # no mask, 3-D: B sequences of T tokens
    log = import_hf_router_logits([x.reshape(B, T, N) for x in logits], tmp_path / "nomask")
    chunk = read_all(log, "layer3")
    assert log.num_tokens == B * T and torch.equal(chunk.logits, logits[3])
    assert chunk.sequence_ids.tolist() == [b for b in range(B) for _ in range(T)]
    assert chunk.positions.tolist() == list(range(T)) * B and set(chunk.token_ids.tolist()) == {-1}
    # a dict saved with its mask, rows already stripped of padding, custom layer names
    torch.save({"router_logits": [x[real_rows] for x in logits], "attention_mask": MASK}, tmp_path / "d.pt")
    log = import_hf_router_logits(tmp_path / "d.pt", tmp_path / "dropped", layer_names=list("abcd"))
    assert log.layers == tuple("abcd") and torch.equal(read_all(log, "c").logits, logits[2][real_rows])
    assert read_all(log, "a").positions.tolist() == [p for _, _, p in expected_real_tokens()]
    # 2-D without a mask: batch_size splits the rows batch-major
    log = import_hf_router_logits(logits, tmp_path / "bs", batch_size=B)
    assert log.sequences.tolist() == [0, 1, 2] and read_all(log, "layer0").positions.tolist() == list(range(T)) * B
    # a model output object with a router_logits attribute
    output = type("Output", (), {"router_logits": logits})()
    assert import_hf_router_logits(output, tmp_path / "obj").num_tokens == B * T


def test_hf_errors(tmp_path):
    logits = hf_tuple()
    with pytest.raises(ImportFailed, match="40 rows .* \\(3, 5\\) = 15 positions with 11 real tokens"):
        import_hf_router_logits(tuple(torch.randn(40, N) for _ in range(2)), tmp_path / "a", attention_mask=MASK)
    assert not (tmp_path / "a").exists()
    with pytest.raises(ImportFailed, match="layer 'layer1' has 14 tokens but layer 'layer0' has 15"):
        import_hf_router_logits((logits[0], logits[1][:14]), tmp_path / "b")
    with pytest.raises(ImportFailed, match="layer 1 has shape \\(15,\\)"):
        import_hf_router_logits((logits[0], logits[1][:, 0]), tmp_path / "c")
    with pytest.raises(ImportFailed, match="one tensor of shape"):
        import_hf_router_logits(torch.stack(logits), tmp_path / "d")
    with pytest.raises(ImportFailed, match="only 0 \\(padding\\) and 1"):
        import_hf_router_logits(logits, tmp_path / "e", attention_mask=MASK * 2)
    with pytest.raises(ImportFailed, match="attention_mask is \\(B, T\\)=\\(5, 3\\)"):
        import_hf_router_logits([x.reshape(B, T, N) for x in logits], tmp_path / "f", attention_mask=MASK.T)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ImportFailed, match="junk.pt: cannot be read as a torch.save file"):
        import_hf_router_logits(tmp_path / "junk.pt", tmp_path / "g")
    with pytest.raises(ImportFailed, match="no such file"):
        import_hf_router_logits(tmp_path / "missing.pt", tmp_path / "h")
    with pytest.raises(ImportFailed, match="integers \\(int64\\), which looks like the expert ids"):
        import_hf_router_logits((torch.zeros(3, 2, dtype=torch.long),), tmp_path / "i")
    bad = list(logits)
    bad[2] = bad[2].clone()
    bad[2][7, 1] = float("nan")
    with pytest.raises(NonFiniteLogits, match="layer 'layer2'"):
        import_hf_router_logits(bad, tmp_path / "j", shard_tokens=4)
    assert not (tmp_path / "j").exists()                     # a failed import leaves no log behind
    with pytest.raises(InvalidLogInput, match="top_k"):
        import_hf_router_logits(logits, tmp_path / "k", top_k=N + 1)
    import_hf_router_logits(logits, tmp_path / "l")
    with pytest.raises(LogExists):
        import_hf_router_logits(logits, tmp_path / "l")
    assert RouterLog.open(tmp_path / "l", verify="full").num_tokens == B * T


def test_npy_2d_and_3d(tmp_path):
    rng = np.random.default_rng(0)
    two = rng.standard_normal((50, 6)).astype(np.float16)
    np.save(tmp_path / "two.npy", two)
    log = import_array(tmp_path / "two.npy", tmp_path / "log2", top_k=2, shard_tokens=16)
    assert log.layers == ("layer0",) and log.dtype == torch.float16 and len(log.shards) == 4
    chunk = read_all(log, "layer0")
    assert np.array_equal(chunk.logits.numpy(), two)
    assert chunk.positions.tolist() == list(range(50)) and set(chunk.sequence_ids.tolist()) == {0}
    three = rng.standard_normal((3, 50, 6))
    np.save(tmp_path / "three.npy", three)
    log = import_array(tmp_path / "three.npy", tmp_path / "log3", layout="ltn", shard_tokens=16)
    assert log.layers == ("layer0", "layer1", "layer2") and log.dtype == torch.float64
    for i in range(3):
        assert np.array_equal(read_all(log, f"layer{i}").logits.numpy(), three[i])


def test_npz_with_metadata(tmp_path):
    rng = np.random.default_rng(1)
    layers = {"blocks.0": rng.standard_normal((12, 4)).astype(np.float32),
              "blocks.1": rng.standard_normal((12, 4)).astype(np.float32)}
    seq = np.array([0, 0, 0, 1, 1, 0, 2, 2, 2, 2, 1, 1])
    np.savez(tmp_path / "x.npz", **layers, sequence_ids=seq, token_ids=np.arange(12) * 7)
    log = import_array(tmp_path / "x.npz", tmp_path / "log", shard_tokens=5)
    assert log.layers == ("blocks.0", "blocks.1")
    chunk = read_all(log, "blocks.1")
    assert np.array_equal(chunk.logits.numpy(), layers["blocks.1"])
    assert chunk.sequence_ids.tolist() == seq.tolist() and chunk.token_ids.tolist() == list(range(0, 84, 7))
    assert chunk.positions.tolist() == [0, 1, 2, 0, 1, 3, 0, 1, 2, 3, 2, 3]   # positions restart per sequence


def test_array_errors(tmp_path):
    np.save(tmp_path / "ints.npy", np.zeros((4, 3), dtype=np.int32))
    with pytest.raises(ImportFailed, match="holds integers \\(int32\\), which looks like the expert ids"):
        import_array(tmp_path / "ints.npy", tmp_path / "a")
    np.save(tmp_path / "rank1.npy", np.zeros(4))
    with pytest.raises(ImportFailed, match="shape \\(4,\\); expected \\(T, N\\), or a 3-D array with its layout"):
        import_array(tmp_path / "rank1.npy", tmp_path / "b")
    np.savez(tmp_path / "uneven.npz", a=np.zeros((4, 3)), b=np.zeros((5, 3)))
    with pytest.raises(ImportFailed, match="layer 'b' has 5 tokens but layer 'a' has 4"):
        import_array(tmp_path / "uneven.npz", tmp_path / "c")
    np.savez(tmp_path / "cube.npz", a=np.zeros((2, 4, 3)))
    with pytest.raises(ImportFailed, match="each layer of an .npz is \\(T, N\\)"):
        import_array(tmp_path / "cube.npz", tmp_path / "d")
    np.savez(tmp_path / "meta.npz", a=np.zeros((4, 3)), positions=np.zeros(3, dtype=int))
    with pytest.raises(ImportFailed, match="'positions' must be \\(4,\\) integers"):
        import_array(tmp_path / "meta.npz", tmp_path / "e")
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    with pytest.raises(ImportFailed, match="bad.npy: not a readable .npy file"):
        import_array(tmp_path / "bad.npy", tmp_path / "f")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ImportFailed, match="obj.npy: holds Python objects .* never unpickles"):
        import_array(tmp_path / "obj.npy", tmp_path / "g")      # never unpickles
    with pytest.raises(ImportFailed, match="no such file"):
        import_array(tmp_path / "none.npy", tmp_path / "h")


def test_safetensors_layouts(tmp_path):
    g = torch.Generator().manual_seed(2)
    per_layer = {"moe.3": torch.randn(20, 6, generator=g).bfloat16(), "moe.7": torch.randn(20, 6, generator=g)
                 .bfloat16(), "sequence_ids": torch.arange(20) // 4}
    save_file(per_layer, tmp_path / "a.safetensors")
    log = import_safetensors(tmp_path / "a.safetensors", tmp_path / "la", shard_tokens=6)
    assert log.layers == ("moe.3", "moe.7") and log.dtype == torch.bfloat16
    chunk = read_all(log, "moe.7")
    assert torch.equal(chunk.logits, per_layer["moe.7"]) and chunk.positions.tolist() == [0, 1, 2, 3] * 5
    stacked = torch.randn(3, 20, 6, generator=g)
    save_file({"router_logits": stacked}, tmp_path / "b.safetensors")
    log = import_safetensors(tmp_path / "b.safetensors", tmp_path / "lb", shard_tokens=7)
    assert log.layers == ("layer0", "layer1", "layer2")
    assert all(torch.equal(read_all(log, f"layer{i}").logits, stacked[i]) for i in range(3))
    # a shard of a router log imports as a log of its own
    shard = sorted((tmp_path / "lb" / "shards").glob("*.safetensors"))[0]
    log = import_safetensors(shard, tmp_path / "lc")
    assert log.layers == ("layer0", "layer1", "layer2") and log.num_tokens == 7
    assert torch.equal(read_all(log, "layer1").logits, stacked[1, :7])
    save_file({"a": torch.zeros(4, 3), "b": torch.zeros(4)}, tmp_path / "bad.safetensors")
    with pytest.raises(ImportFailed, match="tensor 'b' has shape \\(4,\\)"):
        import_safetensors(tmp_path / "bad.safetensors", tmp_path / "ld")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ImportFailed, match="junk.safetensors: not a readable safetensors file"):
        import_safetensors(tmp_path / "junk.safetensors", tmp_path / "le")


def test_import_file_dispatch_and_load_tensor(tmp_path):
    logits = hf_tuple()
    torch.save(list(logits), tmp_path / "r.pth")
    np.save(tmp_path / "mask.npy", MASK.numpy())
    log = import_file(tmp_path / "r.pth", tmp_path / "a", attention_mask=tmp_path / "mask.npy")
    assert log.num_tokens == 11
    np.save(tmp_path / "x.npy", np.zeros((4, 2), dtype=np.float32))
    with pytest.raises(ImportFailed, match="attention_mask apply to transformers"):
        import_file(tmp_path / "x.npy", tmp_path / "b", attention_mask=MASK)
    with pytest.raises(ImportFailed, match="unknown file type .csv"):
        import_file(tmp_path / "x.csv", tmp_path / "c")
    save_file({"attention_mask": MASK, "input_ids": MASK.clone()}, tmp_path / "m.safetensors")
    assert torch.equal(load_tensor(tmp_path / "m.safetensors"), MASK)
    torch.save({"other": MASK}, tmp_path / "m.pt")
    assert torch.equal(load_tensor(tmp_path / "m.pt"), MASK)
    np.savez(tmp_path / "m.npz", a=MASK.numpy(), b=MASK.numpy())
    with pytest.raises(ImportFailed, match="expected a single tensor or one named 'attention_mask'"):
        load_tensor(tmp_path / "m.npz")


# ----------------------------------------------------------------------------- layouts and sequence boundaries
def test_3d_npy_needs_a_layout_and_ltn_btn_read_the_axes_they_name(tmp_path):
    rng = np.random.default_rng(3)
    cube = rng.standard_normal((3, 5, 4)).astype(np.float32)     # read as (L, T, N) or as (B, T, N)
    np.save(tmp_path / "cube.npy", cube)
    with pytest.raises(ImportFailed, match="3-D array \\(3, 5, 4\\) is ambiguous: pass layout='ltn' or 'btn'"):
        import_array(tmp_path / "cube.npy", tmp_path / "none")
    assert not (tmp_path / "none").exists()
    ltn = import_array(tmp_path / "cube.npy", tmp_path / "ltn", layout="ltn", shard_tokens=2)
    assert ltn.layers == ("layer0", "layer1", "layer2") and ltn.num_tokens == 5 and len(ltn.sequences) == 1
    btn = import_array(tmp_path / "cube.npy", tmp_path / "btn", layout="btn", shard_tokens=4)
    assert btn.layers == ("layer0",) and btn.num_tokens == 15 and btn.manifest.capture["sequences"] == "layout btn"
    chunk = read_all(btn, "layer0")
    for b in range(3):                                          # oracle: row b of the cube is sequence b
        rows = chunk.sequence_ids == b
        assert np.array_equal(chunk.logits[rows].numpy(), cube[b])
        assert chunk.positions[rows].tolist() == list(range(5))
    # the same cube stored Fortran-ordered (not C-contiguous on disk) reads the same
    np.save(tmp_path / "fortran.npy", np.asfortranarray(cube))
    f = import_array(tmp_path / "fortran.npy", tmp_path / "f", layout="btn", shard_tokens=4)
    assert torch.equal(read_all(f, "layer0").logits, chunk.logits)
    with pytest.raises(ImportFailed, match="layout='tn' is \\(T, N\\) but the array is 3-D"):
        import_array(tmp_path / "cube.npy", tmp_path / "tn", layout="tn")
    with pytest.raises(ImportFailed, match="is not one of"):
        import_array(tmp_path / "cube.npy", tmp_path / "bad", layout="tbn")
    np.save(tmp_path / "flat.npy", cube[0])
    assert import_array(tmp_path / "flat.npy", tmp_path / "flat", layout="tn").manifest.capture["layout"] == "tn"
    with pytest.raises(ImportFailed, match="2-D \\(5, 4\\), which is \\(T, N\\), one layer"):
        import_array(tmp_path / "flat.npy", tmp_path / "flat-ltn", layout="ltn")


def test_sequence_length_and_npz_sequence_ids(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((12, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    log = import_array(tmp_path / "x.npy", tmp_path / "l4", sequence_length=4)
    chunk = read_all(log, "layer0")
    assert chunk.sequence_ids.tolist() == [i // 4 for i in range(12)]
    assert chunk.positions.tolist() == [i % 4 for i in range(12)] and log.manifest.capture["sequences"] == \
        "sequence_length"
    with pytest.raises(ImportFailed, match="12 tokens are not a whole number of sequences of sequence_length=5"):
        import_array(tmp_path / "x.npy", tmp_path / "l5", sequence_length=5)
    assert import_array(tmp_path / "x.npy", tmp_path / "one").manifest.capture["sequences"] == "none"
    # .npz: sequence_ids (and positions) from the file; btn layers
    seq, pos = np.repeat([0, 1, 2], 4), np.tile([0, 1, 2, 3], 3)
    np.savez(tmp_path / "m.npz", a=x, sequence_ids=seq, positions=pos)
    log = import_array(tmp_path / "m.npz", tmp_path / "m")
    assert read_all(log, "a").sequence_ids.tolist() == seq.tolist() and log.manifest.capture["sequences"] == \
        "sequence_ids"
    with pytest.raises(ImportFailed, match="given twice"):
        import_array(tmp_path / "m.npz", tmp_path / "m2", sequence_length=4)
    np.savez(tmp_path / "p.npz", a=x, positions=pos)
    with pytest.raises(ImportFailed, match="'positions' without 'sequence_ids'"):
        import_array(tmp_path / "p.npz", tmp_path / "p")
    np.savez(tmp_path / "b.npz", a=x.reshape(3, 4, 3), b=x.reshape(3, 4, 3) * 2)
    log = import_array(tmp_path / "b.npz", tmp_path / "b", layout="btn")
    assert log.layers == ("a", "b") and read_all(log, "b").sequence_ids.tolist() == seq.tolist()
    assert torch.equal(read_all(log, "b").logits, torch.from_numpy(x * 2))
    with pytest.raises(ImportFailed, match="each layer of an .npz is \\(T, N\\) \\(for \\(B, T, N\\) layers pass "
                                           "layout 'btn'"):
        import_array(tmp_path / "b.npz", tmp_path / "b2")


def test_sequence_length_for_hf_tuples_and_safetensors(tmp_path):
    logits = hf_tuple()                                        # (B*T, N) rows, B=3, T=5
    log = import_hf_router_logits(logits, tmp_path / "hf", sequence_length=T)
    assert read_all(log, "layer0").sequence_ids.tolist() == [i // T for i in range(B * T)]
    with pytest.raises(ImportFailed, match="15 rows are not a whole number of sequences of sequence_length=4"):
        import_hf_router_logits(logits, tmp_path / "hf4", sequence_length=4)
    with pytest.raises(ImportFailed, match="sequence_length=4 but the attention mask give sequences of 5"):
        import_hf_router_logits(logits, tmp_path / "hfm", attention_mask=MASK, sequence_length=4)
    save_file({"l0": torch.randn(10, 4)}, tmp_path / "s.safetensors")
    log = import_safetensors(tmp_path / "s.safetensors", tmp_path / "st", sequence_length=5)
    assert read_all(log, "l0").positions.tolist() == [0, 1, 2, 3, 4] * 2


# ----------------------------------------------------------------------------- what is not router logits
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8])
def test_expert_id_dumps_are_named_as_such_in_every_format(tmp_path, dtype):
    ids = np.random.default_rng(5).integers(0, 8, (6, 2)).astype(dtype)
    np.save(tmp_path / "ids.npy", ids)
    np.savez(tmp_path / "ids.npz", layer0=ids)
    save_file({"layer0": torch.from_numpy(ids.astype(np.int64))}, tmp_path / "ids.safetensors")
    torch.save((torch.from_numpy(ids.astype(np.int64)),), tmp_path / "ids.pt")
    for name in ("ids.npy", "ids.npz", "ids.safetensors", "ids.pt"):
        with pytest.raises(ImportFailed, match="expert ids .* \\(vLLM and SGLang .*`usmoe-lp capture`.*--format vllm"):
            import_file(tmp_path / name, tmp_path / f"out-{name}")
        assert not (tmp_path / f"out-{name}").exists()


def test_big_endian_is_converted_exactly_and_other_dtypes_refused(tmp_path):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((7, 3))
    for dt in (">f4", ">f8", ">f2"):
        np.save(tmp_path / "be.npy", x.astype(dt))
        log = import_array(tmp_path / "be.npy", tmp_path / f"be{dt[-1]}", shard_tokens=3)
        got = read_all(log, "layer0").logits.numpy()
        assert got.dtype == np.dtype(dt).newbyteorder("=") and np.array_equal(got, x.astype(dt))
    for arr, message in [(np.ones((3, 2), dtype=np.complex128), "complex numbers"),
                         (np.array([["a", "b"]]), "strings"), (np.ones((3, 2), dtype=bool), "booleans"),
                         (np.zeros((3, 2), dtype=[("a", "<f4")]), "structured records")]:
        np.save(tmp_path / "bad.npy", arr)
        with pytest.raises(ImportFailed, match=message):
            import_array(tmp_path / "bad.npy", tmp_path / "bad")


# ----------------------------------------------------------------------------- refused input keeps the old log
def _snapshot(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("bad", ["nan", "inf-after-cast", "ids"])
def test_refused_input_with_overwrite_leaves_the_old_log_byte_identical(tmp_path, bad):
    from typer.testing import CliRunner

    from usmoe_lp.cli import app

    old = np.random.default_rng(7).standard_normal((9, 4)).astype(np.float32)
    np.save(tmp_path / "old.npy", old)
    runner = CliRunner()
    assert runner.invoke(app, ["import", str(tmp_path / "old.npy"), "--out", str(tmp_path / "old.log")]).exit_code == 0
    before = _snapshot(tmp_path / "old.log")
    new = old.copy()
    extra = []
    if bad == "nan":
        new[8, 3] = np.nan                                      # in the last shard: the writer would have begun
    elif bad == "inf-after-cast":
        new[5, 0], extra = 1e6, ["--dtype", "float16"]
    else:
        new = new.astype(np.int64)
    np.save(tmp_path / "new.npy", new)
    result = runner.invoke(app, ["import", str(tmp_path / "new.npy"), "--out", str(tmp_path / "old.log"),
                                 "--overwrite", "--shard-tokens", "4", *extra])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert _snapshot(tmp_path / "old.log") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.npy", "old.log", "old.npy"]   # no leftovers
    assert RouterLog.open(tmp_path / "old.log", verify="full").num_tokens == 9


def test_live_numpy_layers_with_negative_strides_and_big_endian_masks(tmp_path):
    logits = [x.numpy() for x in hf_tuple(torch.float64)]
    flipped = [np.ascontiguousarray(x[::-1])[::-1] for x in logits]          # negative row strides, same values
    assert all(x.strides[0] < 0 for x in flipped)
    be = [x.astype(">f8") for x in logits]
    mask = MASK.numpy().astype(">i4")[:, ::-1][:, ::-1]
    for variant in (flipped, be):
        log = import_hf_router_logits(variant, tmp_path / f"v{id(variant)}", attention_mask=mask)
        rows = MASK.reshape(-1).bool().numpy()
        for i, layer in enumerate(log.layers):
            assert np.array_equal(read_all(log, layer).logits.numpy(), logits[i][rows])
    with pytest.raises(ImportFailed, match="layer 0 holds integers"):
        import_hf_router_logits([np.zeros((4, 2), dtype=np.int64)], tmp_path / "ids")
    with pytest.raises(ImportFailed, match="attention_mask has dtype <U1; expected integers or booleans"):
        import_hf_router_logits(logits, tmp_path / "m", attention_mask=np.full((B, T), "1"))
