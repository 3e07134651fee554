"""analyze reports, per layer, how often the registry's ``native`` router replays the logged selection.

Oracle: a log whose recorded selection is a hand-made top-2 of the softmax (ties absent), with a known
number of tokens altered by hand; the agreement must count exactly the unaltered tokens, and a layer
without recorded semantics or selection reports none.
"""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from usmoe_lp.cli import app
from usmoe_lp.diagnostics import AnalyzeConfig, analyze
from usmoe_lp.logs import LayerInfo, RouterLog, RouterLogWriter

N, K = 6, 2


def _log(path, altered: int):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(40, N, generator=g)
    top = torch.topk(z, K, dim=-1).indices  # softmax is monotone: top-2 of the logits
    sel = top.clone()
    sel[:altered, 1] = torch.topk(z[:altered], K + 1, dim=-1).indices[:, 2]  # third-best instead of second
    layers = [LayerInfo("moe", num_experts=N, top_k=K, score_function="softmax"),
              LayerInfo("plain", num_experts=N, top_k=K)]  # unknown semantics: no replay
    with RouterLogWriter(path, layers) as w:
        for s in range(4):
            rows = slice(10 * s, 10 * s + 10)
            w.append({"moe": z[rows], "plain": z[rows]}, torch.arange(10), torch.full((10,), s), torch.arange(10),
                     selected={"moe": sel[rows], "plain": top[rows]})
    return path


def test_native_agreement_counts_the_replayed_tokens(tmp_path):
    log = RouterLog.open(_log(tmp_path / "log", altered=7))
    res = analyze(log, config=AnalyzeConfig(counterfactual=False, leakage=False))
    moe = res.layer("moe").native_agreement
    assert (moe.tokens, moe.agreeing_tokens, moe.tied_tokens) == (40, 33, 0)
    assert moe.rate == 33 / 40
    assert res.layer("plain").native_agreement is None


def test_native_agreement_is_in_metrics_json(tmp_path):
    _log(tmp_path / "log", altered=0)
    out = CliRunner().invoke(app, ["analyze", str(tmp_path / "log"), "--out", str(tmp_path / "rep"),
                                   "--no-leakage", "--no-counterfactual"])
    assert out.exit_code == 0, out.output
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    layers = metrics["layers"]
    moe = layers["moe"] if isinstance(layers, dict) else next(la for la in layers if la["layer"] == "moe")
    assert moe["native_agreement"]["rate"] == 1.0 and moe["native_agreement"]["tokens"] == 40
