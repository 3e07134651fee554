"""The compact Jupyter views of analyze and evaluate results (usmoe_lp.report.notebook_html).

Oracles: the table cells are parsed back out of the HTML and compared with values computed here from the logits
(top-k counts, MaxVio, TC's covered probability mass) or with the values put into a hand-built result; the page is
checked to be well formed, escaped, scoped and free of external resources by an HTML parser.
"""

from __future__ import annotations

import dataclasses
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
import torch

from usmoe_lp.diagnostics import AnalyzeConfig
from usmoe_lp.diagnostics.analyze import analyze_logits
from usmoe_lp.live.evaluate import EvaluateResult, evaluate
from usmoe_lp.report.notebook_html import CLASS, analyze_result_html, evaluate_result_html
from usmoe_lp.tiny import load_tiny

VOID = {"br", "hr", "img", "meta", "link", "input", "col", "wbr"}
EVIL = "<script>alert('x')</script>&"


class Page(HTMLParser):
    """Tags (balanced check), tables as lists of rows of cell texts, the <style> text, every attribute value."""

    def __init__(self, text: str):
        super().__init__()
        self.stack, self.tables, self.style, self.attrs, self.text = [], [], "", [], []
        self._cell = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.attrs += [v or "" for _, v in attrs]
        if tag not in VOID:
            self.stack.append(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self.stack and self.stack[-1] == "style":
            self.style += data
        elif self._cell is not None:
            self._cell.append(data)
        else:
            self.text.append(data)

    def frame(self, i: int) -> pd.DataFrame:
        head, *rows = self.tables[i]
        return pd.DataFrame(rows, columns=head)


def check_page(text: str) -> Page:
    page = Page(text)
    assert page.stack == [], "unclosed tags"
    assert text.startswith(f"<div class='{CLASS}'>") and text.endswith("</div>")
    low = text.lower()
    for bad in ("<script", "<img", "<link", "<iframe", "http:", "https:", "url(", "@import", "src="):
        assert bad not in low, bad
    rules = [r for r in page.style.split("}") if r.strip()]
    assert rules and all(sel.strip().startswith(f".{CLASS}") for r in rules for sel in r.split("{")[0].split(","))
    assert f".{CLASS}{{" in page.style and "max-width:1000px" in page.style and "overflow-x:auto" in page.style
    return page



pytestmark = pytest.mark.usefixtures("one_torch_thread_module")   # small forwards on one torch thread

@pytest.fixture(scope="module")
def logits():
    g = torch.Generator().manual_seed(3)
    return tuple(torch.randn(4, 30, 8, generator=g) for _ in range(2))  # 2 layers, 4 sequences x 30 tokens


@pytest.fixture(scope="module")
def analyzed(logits):
    cfg = AnalyzeConfig(routers=("tc", "ec", "usmoe", "capacity_tc"), alphas=(0.5,), kbars=(1.5, 2.0))
    return analyze_logits(logits, top_k=2, config=cfg)


def test_analyze_view_numbers_from_the_logits(logits, analyzed):
    page = check_page(analyze_result_html(analyzed))
    assert analyzed._repr_html_() == analyze_result_html(analyzed)   # what Jupyter shows
    layers = page.frame(0)
    assert list(layers["layer"]) == ["layer0", "layer1", "pooled"]
    for i, z in enumerate(logits):
        top = z.reshape(-1, 8).softmax(-1).topk(2, dim=-1).indices.reshape(-1).numpy()
        counts = np.bincount(top, minlength=8)
        row = layers.iloc[i]
        assert int(row["tokens"]) == 120
        assert float(row["maxvio"]) == pytest.approx(counts.max() / counts.mean() - 1, rel=1e-3)
        assert int(row["dead_experts"]) == int((counts == 0).sum())
    cf = page.frame(1).set_index("label")
    p = torch.cat([z.reshape(-1, 8) for z in logits]).double().softmax(-1)
    tc_mass = p.topk(2, dim=-1).values.sum(-1).mean().item()  # TC k=2 covers each token's top-2 probability
    assert float(cf.loc["tc k=2", "coverage"]) == pytest.approx(tc_mass, rel=1e-3)
    assert float(cf.loc["tc k=2", "realised_kbar"]) == 2
    # exact routers: every group of both layers certified in closed form; capacity-TC: the LP sample only
    for label in ("tc k=2", "ec cf=1", "usmoe a=0.5 kbar=1.5 seq"):
        done, total = re.fullmatch(r"(\d+)/(\d+) \(closed_form\)", cf.loc[label, "certified"]).groups()
        assert done == total and int(total) >= 2
    assert cf.loc["captc cf=1.25", "certified"].endswith("(lp_sample)")


def test_analyze_view_escapes_every_text(analyzed):
    evil = dataclasses.replace(analyzed, source=EVIL, model={"name": EVIL, "family": "fam<ily>"})
    text = analyze_result_html(evil)
    page = check_page(text)
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;" in text
    assert EVIL in "".join(page.text) and "fam<ily>" in "".join(page.text)  # shown as text, not markup


def test_analyze_view_without_counterfactual(logits):
    res = analyze_logits(logits, top_k=2, config=AnalyzeConfig(counterfactual=False, leakage=False))
    page = check_page(analyze_result_html(res))
    assert len(page.tables) == 1
    assert "off" in "".join(page.text)


def hand_result(label: str) -> EvaluateResult:
    q = pd.DataFrame([
        {"label": "native", "router": "native", "corrupt": 0.0, "ce": 1.25, "ce_low": 1.2, "ce_high": 1.3, "bpb": 1.8,
         "delta_ce": 0.0, "delta_low": 0.0, "delta_high": 0.0, "rel_delta": 0.0, "kbar": 2.0, "pairs_per_token": 2.0,
         "moe_flops_per_token": 8e5, "flops_vs_native": 1.0, "wall_s": 1.0, "tokens_per_s": 100.0, "tokens": 100,
         "documents": 3},
        {"label": label, "router": "usmoe", "corrupt": 0.0, "ce": 1.5, "ce_low": 1.4, "ce_high": 1.6, "bpb": 2.0,
         "delta_ce": 0.25, "delta_low": 0.125, "delta_high": 0.375, "rel_delta": 0.2, "kbar": 1.5,
         "pairs_per_token": 1.5, "moe_flops_per_token": 6e5, "flops_vs_native": 0.75, "wall_s": 1.0,
         "tokens_per_s": 100.0, "tokens": 100, "documents": 3}])
    layers = pd.DataFrame([{"label": lb, "router": r, "corrupt": 0.0, "layer": f"layer{i}", "kbar": kb, "pairs": 0,
                            "tokens": 50, "dropped": d, "rows_computed": 0, "flops_per_pair": 4e5}
                           for lb, r, kb, d in (("native", "native", 2.0, 0), (label, "usmoe", 1.5, 5))
                           for i in range(2)])
    return EvaluateResult(quality=q, layers=layers, generation=None,
                          model={"name": EVIL, "family": "olmoe", "layers": 2, "num_experts": 8, "k": 2,
                                 "parameters": 1000},
                          settings=(), definitions={}, documents=None,
                          config={"seq_len": 64, "bootstrap": 10, "seed": 0, "confidence": 0.95, "weights": "model"})


def test_evaluate_view_hand_built_result():
    label = "usmoe <b>bold</b>"
    text = evaluate_result_html(hand_result(label))
    page = check_page(text)
    assert "<b>bold</b>" not in text and "&lt;b&gt;bold&lt;/b&gt;" in text
    quality = page.frame(0).set_index("label")
    assert quality.loc[label, "ce (nats/token)"] == "1.500 [1.400, 1.600]"
    assert quality.loc[label, "Δce vs native"] == "+0.250 [+0.125, +0.375]"
    assert quality.loc[label, "FLOPs vs native"] == "75%"
    assert "tokens/s" not in quality.columns
    per_layer = page.frame(1).set_index("label")
    assert list(per_layer.columns) == ["layer0", "layer1", "dropped (share, all layers)"]
    assert per_layer.loc[label, "layer1"] == "1.500"
    assert per_layer.loc[label, "dropped (share, all layers)"] == "10.0%"  # 10 of 100 tokens


def test_evaluate_view_of_a_real_run():
    model, tok = load_tiny()
    res = evaluate(model, ["def f(x):\n    return x + 1\n" * 2, "import os\n" * 4], ["tc"], tokenizer=tok,
                   seq_len=16, batch_size=2, bootstrap=0, progress=False, generate=2, prompt_tokens=4)
    page = check_page(evaluate_result_html(res))
    assert res._repr_html_() == evaluate_result_html(res)   # what Jupyter shows
    headings = [t.strip() for t in page.text if t.strip()]
    assert "Greedy generation against native" in headings
    quality = page.frame(0)
    assert list(quality["label"]) == list(res.quality["label"])
    ce = [float(re.match(r"[\d.]+", c).group()) for c in quality["ce (nats/token)"]]
    np.testing.assert_allclose(ce, res.quality["ce"], atol=5e-4)
