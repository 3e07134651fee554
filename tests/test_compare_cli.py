"""``usmoe-lp compare`` (through a typer app built here) and the compare report.

Oracles: the API's result (the report's numbers), the definitions table (every key of compare.json defined),
a second write of the same result (the same bytes), and the errors a user must get in flag words.
"""

from __future__ import annotations

import json
import re

import pytest
import typer
from test_compare import CHEAP, _logits, _meta, write
from test_definitions import ROOT, _check_target
from typer.testing import CliRunner

from usmoe_lp.compare import compare, write_compare
from usmoe_lp.compare_cli import compare_command
from usmoe_lp.errors import OutputExists
from usmoe_lp.report.compare_report import definition

app = typer.Typer(add_completion=False, rich_markup_mode=None)
app.command("compare")(compare_command)


@app.callback()
def _root() -> None:
    """Test app: the compare command mounted as usmoe-lp's cli.py mounts it."""


FAST = ["--no-counterfactual", "--no-leakage", "--chunk-tokens", "16"]


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmpcli")
    za = _logits(0)
    return write(root / "base", za), write(root / "tuned", {"l0": za["l0"], "l1": _logits(1)["l1"]})


def _keys(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield path, k
            if k not in ("library_versions", "definitions", "sweep"):  # data keys (library, parameter names)
                yield from _keys(v, (*path, k))
    elif isinstance(obj, list):
        for v in obj:
            yield from _keys(v, path)


def test_cli_writes_the_report_of_the_api(logs, tmp_path):
    out = tmp_path / "rep"
    res = CliRunner().invoke(app, ["compare", str(logs[0]), str(logs[1]), "--out", str(out), "--label", "base",
                                   "--label", "tuned", *FAST])
    assert res.exit_code == 0, res.output
    assert "base vs tuned over 90 tokens x 2 layers" in res.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["agreement.png", "compare.json", "report.html", "report.md", "side_by_side.png"]
    data = json.loads((out / "compare.json").read_text())
    result = compare(list(logs), labels=["base", "tuned"], config=CHEAP)
    frame = result.agreement_frame()
    assert [r["exact_agreement"] for r in data["agreement"]] == pytest.approx(frame["exact_agreement"].tolist())
    assert [r["layer"] for r in data["agreement"]] == ["l0", "l1", "pooled"]
    assert data["agreement"][0]["exact_tokens"] == 90 and data["agreement"][0]["top1_tokens"] == 90
    assert data["alignment"] == {"shared": True, "tokens": 90, "token_ids_checked": 77, "reason": None}
    assert data["layers"] == [["l0", "l0"], ["l1", "l1"]] and data["matched_by"] == "name"
    side = result.side_by_side_frame()
    assert [r["load_entropy"] for r in data["side_by_side"]] == pytest.approx(side["load_entropy"].tolist())
    undefined = {k for _, k in _keys(data) if definition(k) is None}
    assert not undefined, undefined
    assert set(data["definitions"]) >= {k for _, k in _keys(data)}
    problems = [p for d in data["definitions"].values() if (p := _check_target(d["see"], ROOT)) is not None]
    assert not problems, problems
    cited = re.findall(r"(docs/[\w./-]+#[\w-]+)", (out / "report.md").read_text())
    assert cited and all(_check_target(c, ROOT) is None for c in cited)
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "src='agreement.png'" not in html  # self-contained
    md = (out / "report.md").read_text()
    assert "Routing agreement per layer" in md and "matched by name" in md

    # an earlier report: refused without --overwrite, replaced with it
    again = CliRunner().invoke(app, ["compare", str(logs[0]), str(logs[1]), "--out", str(out), *FAST])
    assert again.exit_code == 2 and "--overwrite" in again.output and "Traceback" not in again.output
    again = CliRunner().invoke(app, ["compare", str(logs[0]), str(logs[1]), "--out", str(out), "--overwrite", *FAST])
    assert again.exit_code == 0, again.output
    (out / "notes.txt").write_text("mine")
    again = CliRunner().invoke(app, ["compare", str(logs[0]), str(logs[1]), "--out", str(out), "--overwrite", *FAST])
    assert again.exit_code == 2 and "notes.txt" in again.output
    assert (out / "notes.txt").read_text() == "mine"


def test_the_same_result_gives_the_same_bytes(logs, tmp_path):
    result = compare(list(logs), config=CHEAP)
    one, two = write_compare(result, tmp_path / "one"), write_compare(result, tmp_path / "two")
    for name in one:
        assert one[name].read_bytes() == two[name].read_bytes(), name
    with pytest.raises(OutputExists, match="overwrite=True"):
        write_compare(result, tmp_path / "one")
    with pytest.raises(OutputExists, match="router log"):
        write_compare(result, logs[0] / "report")


def test_report_without_shared_tokens_says_why(logs, tmp_path):
    tok, seq, pos = _meta()
    other = write(tmp_path / "other", _logits(3), meta=(tok, seq, pos + 1))
    res = CliRunner().invoke(app, ["compare", str(logs[0]), str(other), "--out", str(tmp_path / "rep"), *FAST])
    assert res.exit_code == 0, res.output
    assert "no routing agreement: token 0 differs" in res.output
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "No routing agreement: the logs do not share their tokens (token 0 differs: base has sequence 0, " \
           "position 0" in md
    assert not (tmp_path / "rep" / "agreement.png").exists() and (tmp_path / "rep" / "side_by_side.png").exists()
    data = json.loads((tmp_path / "rep" / "compare.json").read_text())
    assert data["agreement"] == [] and data["alignment"]["shared"] is False


@pytest.mark.parametrize("args, message", [
    (["{a}", "{missing}"], "missing"),
    (["{a}"], "at least two router logs (LOG arguments), got 1"),
    (["{a}", "{b}", "--label", "x", "--label", "y", "--label", "z"], "--label is given 3 times for 2 logs"),
    (["{a}", "{b}", "--label", "x", "--label", "x"], "--label values must be unique"),
    (["{a}", "{b}", "--layers", "nope"], "--layers nope: not a layer"),
    (["{a}", "{b}", "--workers", "2", "--scheduler", "tcp://x:1"], "--workers"),
    (["{a}", "{b}", "--top-k", "-1"], "--top-k must be >= 0"),
])
def test_cli_errors_in_flag_words(logs, tmp_path, args, message):
    fill = {"a": str(logs[0]), "b": str(logs[1]), "missing": str(tmp_path / "missing")}
    res = CliRunner().invoke(app, ["compare", *(a.format(**fill) for a in args), "--out", str(tmp_path / "o"), *FAST])
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and message in res.output
    assert "Traceback" not in res.output and not (tmp_path / "o").exists()


def test_cli_refuses_an_out_that_holds_other_files(logs, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "data.csv").write_text("x")
    res = CliRunner().invoke(app, ["compare", str(logs[0]), str(logs[1]), "--out", str(out), *FAST])
    assert res.exit_code == 2 and "not empty" in res.output and "--overwrite" in res.output
    assert (out / "data.csv").read_text() == "x"


def _page_text(page: str) -> str:
    """The visible text of an HTML page, written plainly (tags dropped, entities decoded, blanks collapsed)."""
    import html as html_module

    body = re.sub(r"<(style|script)[^>]*>.*?</\1>", " ", page, flags=re.DOTALL)
    body = re.sub(r"</?(code|a|strong|wbr)\b[^>]*>", "", body)
    return " ".join(html_module.unescape(re.sub(r"<[^>]+>", " ", body)).split())


def test_report_md_and_html_say_the_same(logs, tmp_path):
    """One text, two renderings: every Markdown line (inline syntax removed) is in the HTML's text, no Markdown
    syntax shows in the HTML, and the side-by-side table is cut into column groups with its key repeated."""
    result = compare(list(logs), labels=["base", "tuned"], config=CHEAP)
    out = write_compare(result, tmp_path / "rep")
    md, page = out["report.md"].read_text(), out["report.html"].read_text()
    text = _page_text(page)
    lines = [ln for p in md.split("\n\n") if p.strip() and not p.lstrip().startswith(("|", "#", "!["))
             for ln in p.splitlines()]
    assert len(lines) >= 10
    for line in lines:
        plain = re.sub(r"^_(.*)_$", r"\1", line.lstrip("-0123456789. ").strip())
        plain = " ".join(plain.replace("`", "").split())
        assert plain in text, plain
    assert "`" not in text and "**" not in text
    assert "<code>base</code>" in page
    # the side-by-side table: one table per column group, each led by the layer / log key (2 layers x 2 logs)
    assert md.count("| layer / log |") == 2 and page.count("<th>layer / log</th>") == 2
    assert "| l1 / tuned |" in md
