"""Reports people can read: tools/report_check.py finds what a browser would show wrong, and the reports pass it.

The checks against a rendered page need Chromium (/usr/bin/chromium; CI has none: those tests skip). The rest
runs everywhere: the text checks on hand-written strings, the one-text rule (every paragraph of report.md is in
report.html), the one definition of "best", and the verify figure's tolerance on floating-point noise.
"""

from __future__ import annotations

import html
import importlib.util
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from usmoe_lp.diagnostics import AnalyzeConfig, analyze_logits
from usmoe_lp.report import analyze_report
from usmoe_lp.report.analyze_report import best_at_matched_budget, write_analyze_report
from usmoe_lp.report.figures import usmoe_gain_per_token
from usmoe_lp.report.markup import Heading, Table, inline_html, render_html, render_markdown

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("report_check", ROOT / "tools" / "report_check.py")
report_check = importlib.util.module_from_spec(SPEC)
sys.modules[SPEC.name] = report_check   # dataclasses look their module up there
SPEC.loader.exec_module(report_check)

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium)")


def _text(page: str) -> str:
    """The visible text of an HTML page, written plainly: tags dropped, entities decoded, blanks collapsed."""
    body = re.sub(r"<(style|script)[^>]*>.*?</\1>", " ", page, flags=re.DOTALL)
    body = re.sub(r"</?(code|a|strong|wbr)\b[^>]*>", "", body)   # inline: no break in the text
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


# ------------------------------------------------------------------------------------------------ text checks
@pytest.mark.parametrize("text, what", [
    ("Source: `out/demo/router-log`", "backtick"),
    ("a **fails** b", "**"),
    ("see [verify/report.md](verify/report.md)", "[text](link)"),
    ("![load](load.png)", "!["),
    ("scopes ['sequence', 'batch']", "Python list/tuple repr"),
    ("scopes ('sequence',)", "Python list/tuple repr"),
    ("config {'alpha': 0.5}", "Python dict repr"),
])
def test_leaks_are_named(text, what):
    leaks = report_check.markdown_leaks(text)
    assert leaks and any(line.startswith(what) for line in leaks), leaks


@pytest.mark.parametrize("text", ["scopes sequence, batch", "k-bar 1, 1.5, 2 [experts per token]",
                                  "coverage 0.696 (seqtopk, 0.0% tokens dropped)", "max(1, |a|, |b|) * 1e-9",
                                  "S = [1 0.5; 0 2]", "a_b and c*d"])
def test_plain_text_passes(text):
    assert report_check.markdown_leaks(text) == []


def test_inline_markdown_renders_and_escapes():
    assert inline_html("`a<b>` and [x](y.md) **z**") == "<code>a&lt;b&gt;</code> and <a href='y.md'>x</a> " \
                                                        "<strong>z</strong>"
    assert inline_html("`[not](a link)`") == "<code>[not](a link)</code>"


def test_wide_tables_are_cut_into_groups_with_the_key_repeated():
    frame = pd.DataFrame({"label": ["a", "b"], "x": [1, 2], "y": [3.0, 4.0], "z": [5, 6]})
    blocks = [Heading("t", 1), Table(frame, groups=(("first", ("x",)), ("second", ("z", "missing"))))]
    md = render_markdown(blocks)
    assert md.count("| label |") == 3   # x; z; and y, of no group, last
    assert "| label | x |" in md and "| label | z |" in md and "| label | y |" in md
    page = render_html(blocks, title="t")
    assert page.count("<table>") == 3 and "_first_" not in page


# ------------------------------------------------------------------------------------------------ one definition
def test_best_is_the_highest_coverage_at_the_matched_budget():
    pooled = pd.DataFrame({"label": ["tc", "u1", "u2", "u3", "ec"], "router": ["tc", "usmoe", "usmoe", "usmoe", "ec"],
                           "realised_kbar": [2.0, 2.03, 1.99, 2.5, 2.0], "coverage": [0.6, 0.9, 0.7, 0.95, 0.65]})
    # brute force: |kbar - 2| <= 0.02 * 2 = 0.04 keeps tc, u1, u2, ec; u3 is cheaper in coverage terms but not matched
    assert best_at_matched_budget(pooled, 2)["label"] == "u1"
    assert best_at_matched_budget(pooled, 2, router="usmoe")["label"] == "u1"
    assert best_at_matched_budget(pooled, 2, router="ec")["label"] == "ec"
    assert best_at_matched_budget(pooled, 2, router="topp") is None
    assert best_at_matched_budget(pooled, 3) is None


def test_verify_gain_noise_is_zero_and_real_gains_stay():
    frame = pd.DataFrame({"T": [8, 8, 8], "value_usmoe": [4.0, 4.0, 0.0],
                          "value_usmoe_minus_tc": [-3e-16, 0.8, -1e-7]})
    gain = usmoe_gain_per_token(frame).to_numpy()
    # 1e-9 * max(1, 4, 4) = 4e-9 > 3e-16: equal; 0.8 / 8 = 0.1 kept; 1e-7 > 1e-9: a real (negative) difference
    np.testing.assert_array_equal(gain, [0.0, 0.1, -1e-7 / 8])


# ------------------------------------------------------------------------------------------------ the reports
@pytest.fixture(scope="module")
def small_report(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(4 * 8, 6, generator=g) for _ in range(2))
    cfg = AnalyzeConfig(routers=("tc", "ec", "usmoe"), scopes=("sequence", "batch"), batch_size=2,
                        kbars=(1.0, 2.0), alphas=(0.3, 0.7), threads=False)
    result = analyze_logits(logits, top_k=2, padding_mask=torch.zeros(4, 8, dtype=torch.bool), config=cfg)
    out = tmp_path_factory.mktemp("report-check") / "analysis"
    write_analyze_report(result, out, title="small analysis")
    return result, out


def test_every_paragraph_of_report_md_is_in_report_html(small_report):
    """One text, two renderings: each Markdown paragraph, its inline syntax removed, is in the HTML's text."""
    _, out = small_report
    md, page = (out / "report.md").read_text(), _text((out / "report.html").read_text())
    paragraphs = [p for p in md.split("\n\n") if p.strip() and not p.lstrip().startswith(("|", "#", "!["))]
    assert len(paragraphs) >= 8
    for p in paragraphs:
        for line in p.splitlines():
            plain = re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", line.lstrip("-0123456789. "))
            plain = re.sub(r"^_(.*)_$", r"\1", plain.strip())   # an italic line: a table's title
            plain = " ".join(plain.replace("`", "").split())
            assert plain in page, plain
    for note in (analyze_report.LOAD_NOTE, analyze_report.COUNTERFACTUAL_NOTE):
        assert note.replace("`", "") in page


@needs_chromium
def test_small_report_passes_the_browser_checks(small_report, tmp_path):
    _, out = small_report
    res = report_check.check_page(CHROMIUM, out / "report.html", tmp_path / "shots")
    assert res.problems == (), res.problems
    assert res.width <= report_check.WIDTH and res.shots
    from PIL import Image

    for shot in res.shots:
        with Image.open(shot) as img:
            assert img.width == report_check.WIDTH
    assert not (out / "probe.html").exists() and not (tmp_path / "shots" / "probe.html").exists()


@needs_chromium
def test_a_broken_page_is_named(tmp_path):
    """A page with each fault the checker exists for: every one is reported."""
    cells = "".join(f"<td>column_{i}_with_a_long_name</td>" for i in range(40))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>bad</title></head><body>"
            f"<p>Source: `out/demo` with scopes ['sequence', 'batch']</p><table><tr>{cells}</tr></table>"
            "<img alt='missing figure' src='nowhere.png'><a href='gone.md'>gone</a></body></html>")
    (tmp_path / "report.html").write_text(page)
    res = report_check.check_page(CHROMIUM, tmp_path / "report.html", tmp_path / "shots")
    text = "\n".join(res.problems)
    assert "horizontal overflow" in text and "past the right edge: table" in text
    assert "backtick" in text and "Python list/tuple repr" in text
    assert "image not loaded: missing figure" in text and "link to a missing file: gone.md" in text
    assert report_check.main([str(tmp_path), "--shots", str(tmp_path / "s2")]) == 1


def test_missing_chromium_says_how_to_install(tmp_path, capsys):
    missing = str(tmp_path / "no-chromium")
    with pytest.raises(report_check.ChromiumMissing, match="apt-get install chromium"):
        report_check.find_chromium(missing)
    assert report_check.main([str(tmp_path), "--chromium", missing]) == 2
    assert "apt-get install chromium" in capsys.readouterr().err


@needs_chromium
def test_compare_report_passes_the_browser_checks(tmp_path):
    """A compare report of two small logits logs on the same tokens (agreement and side-by-side sections, column
    groups) passes the checks."""
    from test_compare import CHEAP, _logits, write

    from usmoe_lp.compare import compare, write_compare

    za = _logits(0)
    logs = [write(tmp_path / "base", za), write(tmp_path / "tuned", {"l0": za["l0"], "l1": _logits(1)["l1"]})]
    out = tmp_path / "comparison"
    write_compare(compare(logs, labels=["base", "tuned"], config=CHEAP), out)
    res = report_check.check_page(CHROMIUM, out / "report.html", tmp_path / "shots")
    assert res.problems == (), res.problems
    assert res.width <= report_check.WIDTH
