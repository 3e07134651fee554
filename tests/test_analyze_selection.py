"""``analyze`` on a selection log (the experts each token was routed to, no logits).

Oracles: the load of the recorded selection against ``load_stats`` on masks built here with a plain loop over the
ids; the analyses that need logits are said to be unavailable (typed record, nulls in metrics.json, a sentence in
the report) instead of failing; the CLI exits 0.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from usmoe_lp.cli import app
from usmoe_lp.diagnostics import AnalyzeConfig, analyze
from usmoe_lp.diagnostics.analyze import NEEDS_LOGITS
from usmoe_lp.diagnostics.load import load_stats
from usmoe_lp.logs import LayerInfo, RouterLogWriter

N, K, T = 6, 2, 230


def _selection(seed: int) -> np.ndarray:
    """(T, K) ids: expert 5 never chosen (dead), token 7 with no expert, token 11 with one."""
    g = np.random.default_rng(seed)
    sel = np.stack([g.permutation(N - 1)[:K] for _ in range(T)]).astype(np.int16)
    sel[7] = -1
    sel[11, 0] = -1
    return sel


def _write(path) -> dict[str, np.ndarray]:
    sel = {"l0": _selection(0), "l1": _selection(1)}
    seq = np.arange(T) // 40
    with RouterLogWriter(path, [LayerInfo(n, num_experts=N, top_k=K) for n in sel], content="selection",
                         shard_tokens=70, fsync=False) as w:
        w.append(None, token_ids=np.arange(T) % 13, sequence_ids=seq, positions=np.arange(T) % 40, selected=sel)
    return sel


def _mask(ids: np.ndarray) -> np.ndarray:
    m = np.zeros((ids.shape[0], N), dtype=bool)
    for t, row in enumerate(ids):
        for e in row:
            if e >= 0:
                m[t, e] = True
    return m


@pytest.fixture(scope="module")
def selection_log(tmp_path_factory):
    path = tmp_path_factory.mktemp("sel") / "log"
    return path, _write(path)


LOAD_FIELDS = ("num_tokens", "entropy", "entropy_nats", "maxvio", "max_over_mean", "cv", "gini", "dead_experts",
               "cold_experts", "utilisation", "mean_experts_per_token", "zero_expert_rate")


def test_load_of_the_recorded_selection(selection_log):
    path, sel = selection_log
    res = analyze(path, config=AnalyzeConfig(chunk_tokens=32))
    for la in res.layers:
        want = load_stats(_mask(sel[la.layer]), top_k=K)
        got = la.load
        np.testing.assert_array_equal(got.counts, want.counts)
        np.testing.assert_array_equal(got.experts_per_token, want.experts_per_token)
        for f in LOAD_FIELDS:
            assert getattr(got, f) == getattr(want, f), f
        assert got.dead_experts == 1 and got.zero_expert_rate == 1 / T
        for f in ("token_entropy", "mean_prob_entropy", "aux_loss", "z_loss", "importance_cv2"):
            assert getattr(got, f) is None, f
        assert la.selection_source == "captured"
        assert la.collapse is None and la.margins is None and la.counterfactual is None
        assert la.leakage == {} and la.native_agreement is None and la.sample_tokens == 0
        assert set(la.unavailable) == set(NEEDS_LOGITS)
        assert all("no router logits" in why for why in la.unavailable.values())
    pooled = load_stats(np.concatenate([_mask(sel["l0"]), _mask(sel["l1"])]), top_k=K)
    np.testing.assert_array_equal(res.pooled_load.counts, pooled.counts)
    assert res.pooled_load.gini == pooled.gini and res.aux_loss_pooled is None
    assert res.aux_loss_per_layer_mean is None and set(res.unavailable) == set(NEEDS_LOGITS)
    assert res.collapse_frame().empty and res.spectrum_frame().empty and res.counterfactual_frame().empty


def test_switched_off_analyses_are_not_called_unavailable(selection_log):
    path, _ = selection_log
    res = analyze(path, config=AnalyzeConfig(counterfactual=False, leakage=False))
    assert "counterfactual" not in res.unavailable and "leakage" not in res.unavailable
    assert "collapse" in res.unavailable


def test_cli_reports_what_was_skipped(selection_log, tmp_path):
    path, sel = selection_log
    out = tmp_path / "report"
    run = CliRunner().invoke(app, ["analyze", str(path), "--out", str(out), "--chunk-tokens", "64"])
    assert run.exit_code == 0, run.output
    metrics = json.loads((out / "metrics.json").read_text())
    layer = metrics["layers"]["l0"]
    assert layer["collapse"] is None and layer["margins"] is None and layer["counterfactual"] is None
    assert layer["load"]["aux_loss"] is None and layer["load"]["counts"] == _mask(sel["l0"]).sum(0).tolist()
    assert set(layer["unavailable"]) == set(NEEDS_LOGITS) and "unavailable" in metrics["definitions"]
    assert set(metrics["unavailable"]) == set(NEEDS_LOGITS)
    report = (out / "report.md").read_text()
    assert "no router logits" in report and "counterfactual" in report.split("## Summary")[0]
    assert "no router logits" in (out / "report.html").read_text()
