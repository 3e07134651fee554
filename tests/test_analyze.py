"""End to end: capture a tiny transformers MoE, analyse the log, check the report against the API and oracles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import OlmoeConfig, OlmoeForCausalLM
from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func
from typer.testing import CliRunner

from usmoe_lp import capture
from usmoe_lp.cli import app
from usmoe_lp.diagnostics import AnalyzeConfig, analyze, analyze_logits, aux_loss
from usmoe_lp.errors import InvalidParameter
from usmoe_lp.logs import RouterLog
from usmoe_lp.report import write_analyze_report

N, K, LAYERS = 8, 2, 2
CORE = ("tc", "ec", "usmoe", "capacity_tc")  # every registry router: tests/test_registry_consumers.py
GRID = {"routers": CORE, "alphas": (0.5,), "scopes": ("sequence", "batch", "position")}


@pytest.fixture(scope="module")
def model_and_batch():
    torch.manual_seed(0)
    cfg = OlmoeConfig(vocab_size=120, hidden_size=32, intermediate_size=32, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=4, num_experts=N, num_experts_per_tok=K,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = OlmoeForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 120, (5, 37), generator=g)
    att = torch.ones(5, 37, dtype=torch.long)
    att[1, :9] = 0  # left padding
    att[3, :20] = 0
    ids[att == 0] = 0
    return model, ids, att


@pytest.fixture(scope="module")
def log_and_result(model_and_batch, tmp_path_factory):
    model, ids, att = model_and_batch
    path = tmp_path_factory.mktemp("analyze") / "log"
    with capture(model, path, fsync=False), torch.inference_mode():
        out = model(input_ids=ids, attention_mask=att, output_router_logits=True)
    cfg = AnalyzeConfig(**GRID, chunk_tokens=50, batch_size=3)
    return path, out, analyze(path, config=cfg)


def test_pooled_and_per_layer_aux_loss_match_transformers(model_and_batch, log_and_result):
    _, _, att = model_and_batch
    _, out, result = log_and_result
    hf = load_balancing_loss_func(out.router_logits, N, K, att)
    assert result.aux_loss_pooled == pytest.approx(float(hf), rel=1e-5)
    per_layer = aux_loss(out.router_logits, K, padding_mask=att == 0, pooled=False)
    assert result.aux_loss_per_layer_mean == pytest.approx(per_layer, rel=1e-5)
    assert result.aux_loss_pooled != pytest.approx(result.aux_loss_per_layer_mean, rel=1e-9)  # pooled vs OLMoE


def test_counts_are_the_models_captured_topk(model_and_batch, log_and_result):
    _, out, result = log_and_result
    _, _, att = model_and_batch
    keep = att.reshape(-1).bool()
    for i, la in enumerate(result.layers):
        assert la.selection_source == "captured"
        z = out.router_logits[i][keep]
        idx = torch.topk(torch.softmax(z.float(), -1), K, dim=-1).indices
        expected = np.bincount(idx.reshape(-1).numpy(), minlength=N)
        np.testing.assert_array_equal(np.asarray(la.load.counts), expected)
        assert la.num_tokens == int(keep.sum())
        assert la.load.experts_per_token[K] == la.num_tokens


def test_counterfactual_tc_reproduces_the_model_and_does_not_leak(log_and_result):
    _, _, result = log_and_result
    cf = result.counterfactual_frame()
    tc = cf[cf["router"] == "tc"]
    assert len(tc) == LAYERS + 1  # each layer and pooled
    assert (tc["agreement"] == 1.0).all()  # OLMoE routes by top-k of softmax: TC on the probabilities
    assert (tc["certified_optimal"] == tc["certified_total"]).all()
    assert (tc["flip_rate"] == 0.0).all()
    ec = cf[(cf["router"] == "ec") & (cf["layer"] == "pooled")]
    assert float(ec["flip_rate"].iloc[0]) > 0  # EC is non-causal
    usm = cf[cf["router"] == "usmoe"]
    assert set(usm["scope"]) == {"sequence", "batch", "position"}
    assert (usm["certified_optimal"] == usm["certified_total"]).all()
    for la in result.layers:
        assert set(la.cross_sequence) == set(usm[(usm["scope"] != "sequence") & (usm["layer"] == la.layer)]["label"])


def test_chunking_does_not_change_the_numbers(log_and_result):
    path, _, result = log_and_result
    other = analyze(path, config=AnalyzeConfig(**GRID, chunk_tokens=100000, batch_size=3))
    for a, b in zip(result.layers, other.layers, strict=True):
        np.testing.assert_array_equal(np.asarray(a.load.counts), np.asarray(b.load.counts))
        assert a.load.token_entropy == pytest.approx(b.load.token_entropy, rel=1e-9)
        assert a.load.z_loss == pytest.approx(b.load.z_loss, rel=1e-9)
        assert a.collapse.logit_effective_rank == pytest.approx(b.collapse.logit_effective_rank, rel=1e-6)
        assert a.margins.mean_margin == pytest.approx(b.margins.mean_margin, rel=1e-9)
    cf_a, cf_b = result.counterfactual_frame(), other.counterfactual_frame()
    np.testing.assert_allclose(cf_a["objective"], cf_b["objective"], rtol=1e-9)
    np.testing.assert_allclose(cf_a["flip_rate"].fillna(-1), cf_b["flip_rate"].fillna(-1), rtol=1e-12)


def test_in_memory_logits_give_the_same_analysis(model_and_batch, log_and_result):
    _, ids, att = model_and_batch
    _, out, result = log_and_result
    mem = analyze_logits(out.router_logits, top_k=K, padding_mask=att == 0,
                         config=AnalyzeConfig(**GRID, batch_size=3))
    assert mem.aux_loss_pooled == pytest.approx(result.aux_loss_pooled, rel=1e-6)
    for a, b in zip(result.layers, mem.layers, strict=True):
        np.testing.assert_array_equal(np.asarray(a.load.counts), np.asarray(b.load.counts))
        assert a.load.gini == pytest.approx(b.load.gini, abs=1e-12)
    cf_a, cf_b = result.counterfactual_frame(), mem.counterfactual_frame()
    np.testing.assert_allclose(cf_a["coverage"], cf_b["coverage"], rtol=1e-6)


def test_report_files_match_the_api(log_and_result, tmp_path):
    _, _, result = log_and_result
    written = write_analyze_report(result, tmp_path / "rep")
    for name in ("metrics.json", "report.md", "report.html", "load_heatmap.png", "layer_balance.png",
                 "experts_per_token.png", "leakage_per_offset.png", "sweeps.png", "collapse_spectra.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 0, name
        assert name in written
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert metrics["schema"] == "usmoe-lp/analyze/1"
    assert metrics["pooled"]["aux_loss_pooled"] == pytest.approx(result.aux_loss_pooled)
    for key in ("load_entropy", "maxvio", "gini", "aux_loss_pooled", "flip_rate"):
        assert key in metrics["definitions"]
    for la in result.layers:
        m = metrics["layers"][la.layer]
        assert m["load"]["entropy"] == pytest.approx(la.load.entropy)
        assert m["load"]["gini"] == pytest.approx(la.load.gini)
        assert m["collapse"]["logit_effective_rank"] == pytest.approx(la.collapse.logit_effective_rank)
        for label, stats in la.leakage.items():
            assert m["leakage"][label]["flip_rate"] == pytest.approx(stats.flip_rate)
        rows = {r["label"]: r for r in m["counterfactual"]}
        assert rows["tc k=2"]["agreement"] == 1.0
    html = (tmp_path / "rep" / "report.html").read_text()
    pngs = [n for n in written if n.endswith(".png")]
    assert {"coactivation_lift.png", "layer_transitions.png", "expert_locality.png"} <= set(pngs)  # routing patterns
    assert html.count("data:image/png;base64,") == len(pngs)  # self-contained: every figure embedded
    assert "src='http" not in html and 'src="http' not in html


def test_cli_analyze(log_and_result, tmp_path):
    path, _, result = log_and_result
    res = CliRunner().invoke(app, ["analyze", str(path), "--out", str(tmp_path / "cli"), "--routers", ",".join(CORE),
                                   "--alpha", "0.5", "--kbar", "1,1.5,2", "--scope", "sequence"])
    assert res.exit_code == 0, res.output
    assert "report:" in res.output
    metrics = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    labels = {r["label"] for r in metrics["pooled"]["counterfactual"]}
    assert {"usmoe a=0.5 kbar=1 seq", "usmoe a=0.5 kbar=1.5 seq", "usmoe a=0.5 kbar=2 seq"} <= labels
    assert list(metrics["layers"]) == list(result.layer_names)
    first = result.layers[0]
    assert metrics["layers"][first.layer]["load"]["counts"] == [int(c) for c in first.load.counts]


def test_cli_analyze_errors(tmp_path):
    res = CliRunner().invoke(app, ["analyze", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "error" in res.output
    res = CliRunner().invoke(app, ["analyze", str(tmp_path / "missing"), "--routers", "bogus"])
    assert res.exit_code == 2
    assert "bogus" in res.output


def test_bad_requests(log_and_result):
    path, out, _ = log_and_result
    log = RouterLog.open(path)
    with pytest.raises(InvalidParameter, match="not in the log"):
        analyze(log, layers=["nope"])
    with pytest.raises(InvalidParameter, match="unknown router.*'sinkhron'.*choose among .*tc"):
        AnalyzeConfig(routers=("tc", "sinkhron"))
    with pytest.raises(InvalidParameter, match="alphas"):
        AnalyzeConfig(alphas=(1.5,))
    with pytest.raises(InvalidParameter, match="no router of routers"):
        AnalyzeConfig(routers=("tc",), sweep={"kbar": (1.0,)})
    with pytest.raises(InvalidParameter, match="given twice"):
        AnalyzeConfig(routers=CORE, kbars=(1.0,), sweep={"kbar": (2.0,)})
    with pytest.raises(InvalidParameter, match="kbar 9 exceed the number of experts"):
        analyze(log, config=AnalyzeConfig(routers=CORE, sweep={"kbar": (9.0,)}))
    with pytest.raises(InvalidParameter, match="padding_mask = attention_mask == 0"):
        analyze_logits(out.router_logits, top_k=K, attention_mask=torch.ones(5, 37))


def test_config_defaults_and_generic_sweep():
    from usmoe_lp.routers import ROUTERS

    assert AnalyzeConfig().routers == tuple(n for n, r in ROUTERS.items() if r.in_default_sweep)
    cfg = AnalyzeConfig(routers=("capacity_tc", "usmoe"), sweep={"policy": ("position", "priority")},
                        kbars=(1, 2), alphas=(0.5,))
    labels = [c.label for c in cfg.configs(K, N)]
    assert labels == ["captc cf=1.25", "captc cf=1.25 priority", "usmoe a=0.5 kbar=1 seq", "usmoe a=0.5 kbar=2 seq"]
    assert cfg.sweep == {"policy": ("position", "priority")}
    cf = AnalyzeConfig(routers=("ec", "capacity_tc"), capacity_factor=2.0).configs(K, N)
    assert [c.label for c in cf] == ["ec cf=2", "captc cf=1.25"]  # the shorthand is Expert Choice's only


def test_recomputed_selection_breaks_ties_to_the_lowest_index():
    """Where the log has no selection, the model's top-k is recomputed with the documented tie rule
    (lowest expert index first, as token_choice): [.1, .3, .3, .3], k = 2 -> experts 1 and 2."""
    from usmoe_lp.diagnostics.analyze import model_mask
    from usmoe_lp.logs.reader import Chunk
    from usmoe_lp.routing import token_choice

    scores = torch.tensor([[0.1, 0.3, 0.3, 0.3], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
    chunk = Chunk(logits=scores, token_ids=torch.zeros(3, dtype=torch.long), sequence_ids=torch.zeros(3),
                  positions=torch.arange(3), token_start=0, selected=None, layer="l")
    want = token_choice(scores, 2).mask
    assert want[0].int().tolist() == [0, 1, 1, 0]
    for sorted_rows in (None, np.sort(scores.numpy(), axis=1)):
        mask, source = model_mask(chunk, scores, 2, sorted_rows)
        assert source == "recomputed top-k"
        assert torch.equal(mask, want)


def test_hidden_states_and_router_weights_feed_collapse(model_and_batch, tmp_path):
    model, ids, att = model_and_batch
    path = tmp_path / "hlog"
    with capture(model, path, hidden=True, fsync=False), torch.inference_mode():
        model(input_ids=ids, attention_mask=att)
    result = analyze(path, config=AnalyzeConfig(counterfactual=False, leakage=False))
    log = RouterLog.open(path)
    weights = log.router_weights()
    for la in result.layers:
        c = la.collapse
        H = torch.cat([ch.hidden.double() for ch in log.iter_chunks(la.layer, with_hidden=True)]).numpy()
        W = weights[la.layer].double().numpy()
        # oracle: projector onto the row space of W from numpy's pseudo-inverse
        P = np.linalg.pinv(W) @ W
        expected = np.linalg.norm(H @ P) ** 2 / np.linalg.norm(H) ** 2
        assert c.span_energy == pytest.approx(expected, rel=1e-5)
        s = np.linalg.svd(H, compute_uv=False)
        q = s / s.sum()
        assert c.hidden_effective_rank == pytest.approx(float(np.exp(-(q * np.log(q)).sum())), rel=1e-4)
        cos = W / np.linalg.norm(W, axis=1, keepdims=True)
        sim = np.abs(cos @ cos.T)[~np.eye(N, dtype=bool)].mean()
        assert c.router_row_similarity == pytest.approx(sim, rel=1e-5)
    assert result.layers[0].counterfactual is None and result.layers[0].leakage == {}


def test_imported_log_with_unknown_score_function(model_and_batch, log_and_result, tmp_path):
    """A log imported from a plain transformers tuple has score_function 'unknown': re-routing uses the softmax."""
    from usmoe_lp.logs import import_hf_router_logits

    _, ids, att = model_and_batch
    _, out, result = log_and_result
    log = import_hf_router_logits(out.router_logits, tmp_path / "imp", att, top_k=K)
    assert {log.layer_info(n).score_function for n in log.layers} == {"unknown"}
    imp = analyze(log, config=AnalyzeConfig(routers=CORE, alphas=(0.5,), batch_size=3))
    cf = imp.counterfactual_frame()
    assert (cf[cf["router"] == "tc"]["agreement"] == 1.0).all()
    ours = result.counterfactual_frame()
    for label in ("tc k=2", "ec cf=1", "usmoe a=0.5 kbar=2 seq"):
        a = cf[(cf["label"] == label) & (cf["layer"] == "pooled")]["coverage"].iloc[0]
        b = ours[(ours["label"] == label) & (ours["layer"] == "pooled")]["coverage"].iloc[0]
        assert a == pytest.approx(b, rel=1e-6)


def test_topc_margins_match_a_sort(log_and_result):
    """The global-threshold margin of each sequence: c-th minus (c+1)-th largest unified score, by sorting."""
    from usmoe_lp.routing import unified_score

    path, _, result = log_and_result
    log = RouterLog.open(path)
    la = result.layers[0]
    chunk = log.read(la.layer, 0, log.num_tokens)
    margins = []
    for sid in torch.unique(chunk.sequence_ids).tolist():
        sel = chunk.sequence_ids == sid
        z = chunk.logits[sel][torch.argsort(chunk.positions[sel])].double()
        u = np.sort(unified_score(z, alpha=0.5).numpy().reshape(-1))[::-1]
        c = int(np.floor(2.5 * z.shape[0] + 0.5))
        margins.append(u[c - 1] - u[c])
    cf = result.counterfactual_frame()
    row = cf[(cf["layer"] == la.layer) & (cf["label"] == "usmoe a=0.5 kbar=2.5 seq")]
    assert float(row["topc_margin_mean"].iloc[0]) == pytest.approx(float(np.mean(margins)), rel=1e-9)


def test_lp_cross_check_runs_on_the_first_layers_only(log_and_result):
    _, _, result = log_and_result
    first, second = (la.counterfactual.to_frame() for la in result.layers[:2])
    assert (first["lp_checked"] >= 1).all() and (first["max_lp_gap"] < 1e-9).sum() >= len(first) - 1
    assert (second["lp_checked"] == 0).all()
    assert (second["certified_optimal"][second["router"] != "capacity_tc"] >= 1).all()  # closed form everywhere


def test_kv_cache_decoding_mismatch(model_and_batch, log_and_result):
    """With a KV cache each decode step is a group of one token: USMoE decodes as TC with k' = round(k-bar).
    Oracle: for k-bar = k, decode-time routing is the model's own top-k, so the mismatch is 1 - (share of tokens
    whose full-sequence top-c set equals the captured top-2)."""
    from usmoe_lp.routing import global_topc, unified_score

    path, _, result = log_and_result
    log = RouterLog.open(path)
    la = result.layers[1]
    chunk = log.read(la.layer, 0, log.num_tokens)
    same = total = 0
    for sid in torch.unique(chunk.sequence_ids).tolist():
        sel = chunk.sequence_ids == sid
        order = torch.argsort(chunk.positions[sel])
        z = chunk.logits[sel][order].double()
        full = global_topc(unified_score(z, alpha=0.5), kbar=2).mask
        model = torch.zeros_like(full).scatter_(1, chunk.selected[sel][order].long(), True)
        same += int((full == model).all(dim=1).sum())
        total += z.shape[0]
    cf = result.counterfactual_frame()
    row = cf[(cf["layer"] == la.layer) & (cf["label"] == "usmoe a=0.5 kbar=2 seq")]
    assert float(row["kv_decode_token_flip_rate"].iloc[0]) == pytest.approx(1 - same / total, abs=1e-12)
    assert 0 < float(row["kv_decode_token_flip_rate"].iloc[0]) < 1
