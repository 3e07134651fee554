"""`usmoe-lp evaluate`: the live evaluation from the command line, its report directory and its errors.

Runs are kept small (a few short documents, tiny windows, few bootstrap replicates): the embedded model is real,
the numbers are checked against what the inputs fix independently (documents and scored tokens from the file's
bytes, Token Choice at the model's k equal to the model's own routing, k-bar of each setting).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from usmoe_lp.cli import app
from usmoe_lp.live.cli import read_documents
from usmoe_lp.live.evaluate import DEFINITIONS
from usmoe_lp.report.evaluate_report import EVALUATE_OWNED
from usmoe_lp.report.outputs import foreign_entries
from usmoe_lp.tiny import TINY_MODEL_DIR

DOCS = ["The assert statement checks a condition.", "A for loop iterates over the items of a sequence, in order.",
        "Names are bound by assignment;\nthey live in a namespace.", "Exceptions unwind the stack."]
JSON_KEYS = ["schema", "model", "settings", "quality", "layers", "generation", "documents", "definitions", "config",
             "library_versions"]
QUALITY_COLUMNS = ["label", "router", "corrupt", "ce", "ce_low", "ce_high", "bpb", "delta_ce", "delta_low",
                   "delta_high", "rel_delta", "kbar", "pairs_per_token", "moe_flops_per_token", "flops_vs_native",
                   "wall_s", "tokens_per_s", "tokens", "documents"]
FAST = ["--seq-len", "32", "--bootstrap", "40", "--no-progress"]


def invoke(*args: str):
    return CliRunner().invoke(app, ["evaluate", *args])


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "docs.txt"
    path.write_text("\n\n".join(DOCS[:2]) + "\n \t\n" + "\n\n\n".join(DOCS[2:]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, text_file):
    """One full run: the embedded model on a 4-document file, three routers, two corruption rates, generation (few
    forwards: each costs about 0.3 s of CPU here, the experts' grouped matmuls on CPU)."""
    out = tmp_path_factory.mktemp("evaluate") / "report"
    res = invoke("--routers", "tc,usmoe,ec", "--kbar", "1", "--alpha", "0.5", "--corrupt", "0,0.2",
                 "--generate", "2", "--prompt-tokens", "8", "--text", str(text_file), "--out", str(out), *FAST)
    assert res.exit_code == 0, res.output
    return out, res.output, json.loads((out / "evaluate.json").read_text())


def test_the_report_directory_holds_the_report_and_nothing_else(run):
    out, output, _ = run
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["evaluate.json", "report.md", "report.html", "quality_vs_cost.png", "corruption.png"])
    assert foreign_entries(out, EVALUATE_OWNED) == []
    assert sorted(p.name for p in out.parent.iterdir()) == ["report"]  # no staging directory left behind
    for name in names:
        assert (out / name).stat().st_size > 0
    assert "report:" in output and "report.html" in output and "settings (native included)" in output


def test_evaluate_json_keys_are_stable(run):
    _, _, data = run
    assert list(data) == JSON_KEYS
    assert data["schema"] == "usmoe-lp/evaluate/1"
    for row in data["quality"]:
        assert list(row) == QUALITY_COLUMNS
    assert set(data["definitions"]) >= set(QUALITY_COLUMNS)
    assert set(data["definitions"]) == set(DEFINITIONS)


def test_the_numbers_follow_from_the_inputs(run):
    _, _, data = run
    quality = data["quality"]
    labels = list(dict.fromkeys(r["label"] for r in quality))
    assert labels == ["native", "tc k=2", "usmoe a=0.5 kbar=1 seq", "ec cf=1"]
    assert sorted({r["corrupt"] for r in quality}) == [0.0, 0.2] and len(quality) == 2 * len(labels)
    # the file's blocks are the documents; each is [BOS] + bytes + [EOS], every target but BOS scored
    assert {r["documents"] for r in quality} == {len(DOCS)}
    assert {r["tokens"] for r in quality} == {sum(len(d.encode()) + 1 for d in DOCS)}
    by = {(r["label"], r["corrupt"]): r for r in quality}
    for rate in (0.0, 0.2):
        assert by[("native", rate)]["delta_ce"] == 0.0
        assert abs(by[("tc k=2", rate)]["delta_ce"]) < 1e-6        # Token Choice at the model's k is its routing
        assert by[("usmoe a=0.5 kbar=1 seq", rate)]["kbar"] == pytest.approx(1.0, abs=0.05)
        assert by[("usmoe a=0.5 kbar=1 seq", rate)]["flops_vs_native"] == pytest.approx(0.5, abs=0.03)
    docs = [r for r in data["documents"] if r["label"] == "tc k=2" and r["corrupt"] == 0.2]
    assert [r["tokens"] for r in docs] == [len(d.encode()) + 1 for d in DOCS]   # one record per block of the file
    for (label, rate), row in by.items():
        mine = [r for r in data["documents"] if r["label"] == label and r["corrupt"] == rate]
        assert sum(r["nll"] for r in mine) / sum(r["tokens"] for r in mine) == pytest.approx(row["ce"], rel=1e-9)
    gen = data["generation"]
    assert [g["label"] for g in gen] == labels and gen[0]["token_agreement"] == 1.0
    assert data["config"]["seq_len"] == 32 and data["config"]["bootstrap"] == 40


def test_report_html_is_self_contained(run):
    out, _, _ = run
    page = (out / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == 2
    sources = re.findall(r"""\bsrc\s*=\s*["']?([^"'\s>]+)""", page)
    assert sources and all(s.startswith("data:") for s in sources)
    assert not re.search(r"<(script|link|iframe)\b|@import|url\(|https?://", page)
    md = (out / "report.md").read_text()
    assert "(quality_vs_cost.png)" in md and "(corruption.png)" in md and "Pareto front" in md


def test_default_text_model_directory_and_max_tokens(tmp_path):
    out = tmp_path / "ev"
    res = invoke("--routers", "tc", "--model", str(TINY_MODEL_DIR), "--max-tokens", "100", "--out", str(out), *FAST)
    assert res.exit_code == 0, res.output
    data = json.loads((out / "evaluate.json").read_text())
    assert [r["label"] for r in data["quality"]] == ["native", "tc k=2"]
    # the first held-out document is longer than 100 tokens: one document, cut at 100 tokens, 99 targets
    assert {(r["documents"], r["tokens"]) for r in data["quality"]} == {(1, 99)}
    assert data["model"]["family"] == "olmoe" and data["model"]["k"] == 2
    assert not (out / "corruption.png").exists()  # one corruption rate: no corruption figure


def test_an_earlier_report_is_replaced_only_with_overwrite(tmp_path, run):
    out = tmp_path / "ev"
    shutil.copytree(run[0], out)
    before = (out / "evaluate.json").read_bytes()
    args = ("--routers", "tc", "--max-tokens", "40", "--out", str(out), "--seq-len", "16", "--bootstrap", "0",
            "--no-progress")
    res = invoke(*args)
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert (out / "evaluate.json").read_bytes() == before
    res = invoke(*args, "--overwrite")
    assert res.exit_code == 0, res.output
    data = json.loads((out / "evaluate.json").read_text())
    assert [r["label"] for r in data["quality"]] == ["native", "tc k=2"]
    assert data["quality"][1]["ce_low"] is None          # no bootstrap: no interval, and the report still renders
    assert not (out / "corruption.png").exists()        # the earlier run's figure went with it
    (out / "notes.txt").write_text("mine")
    res = invoke(*args, "--overwrite")
    assert res.exit_code == 2 and "refusing to delete" in " ".join(res.output.split())
    assert (out / "notes.txt").read_text() == "mine"


def test_out_may_not_contain_the_text(tmp_path):
    (tmp_path / "docs.txt").write_text("one\n\ntwo\n")
    res = invoke("--routers", "tc", "--text", str(tmp_path / "docs.txt"), "--out", str(tmp_path), "--overwrite")
    assert res.exit_code == 2 and "contains the input" in " ".join(res.output.split())
    assert (tmp_path / "docs.txt").read_text() == "one\n\ntwo\n"


@pytest.mark.parametrize(("args", "message"), [
    (["--routers", "nope"], "--routers nope: unknown router"),
    (["--routers", "tc", "--kbar", "1"], "--kbar: no router of --routers (tc) takes it"),
    (["--routers", "usmoe", "--kbar", "-1"], "--kbar must be a finite number > 0"),
    (["--routers", "usmoe", "--kbar", "x"], "--kbar: 'x' is not a number"),
    (["--routers", "usmoe", "--alpha", "2"], "--alpha must lie in [0, 1]"),
    (["--routers", "usmoe", "--scope", "row"], "--scope must be one of sequence, batch, position"),
    (["--routers", "usmoe", "--kbar", "1", "--param", "kbar=2"], "--kbar and --param kbar both give kbar"),
    (["--routers", "usmoe", "--param", "kbar"], "--param 'kbar': expected NAME=V1,V2"),
    (["--routers", "usmoe", "--param", "capacity_factor=2"], "--param capacity_factor: no router of --routers"),
    (["--routers", "ec", "--param", "capacity_factor=-1"], "--param capacity_factor must"),
    (["--routers", "tc", "--k", "0"], "--k must be >= 1"),
    (["--routers", "tc", "--k", "one"], "--k must be comma-separated integers"),
    (["--routers", "tc", "--corrupt", "a"], "--corrupt must be comma-separated numbers"),
    (["--routers", "tc", "--corrupt", "2"], "--corrupt must lie in [0, 1]"),
    (["--routers", "tc", "--seq-len", "1"], "--seq-len must be >= 2"),
    (["--routers", "tc", "--bootstrap", "-1"], "--bootstrap must be >= 0"),
    (["--routers", "tc", "--weights", "mine"], "--weights must be one of model, reference, score"),
    (["--routers", "tc", "--text", "no-such-file.txt"], "--text no-such-file.txt: No such file"),
    (["--routers", "tc", "--model", "no-such-dir"], "--model no-such-dir does not exist"),
])
def test_bad_flags_are_named_in_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    res = invoke(*args, "--out", "out", "--no-progress")
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert text.startswith("error: ") and message in text, text
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()


def test_routers_are_required(tmp_path):
    res = invoke("--out", str(tmp_path / "out"))
    assert res.exit_code == 2 and "--routers" in res.output


def test_read_documents_splits_on_blank_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a\n\n \t\nb\nc\n\n\n\nd\n")
    assert read_documents(path) == ["a", "b\nc", "d"]
    path.write_text("\n \n")
    with pytest.raises(Exception, match="no document"):
        read_documents(path)
    path.write_bytes(b"\xff\xfe bad")
    with pytest.raises(Exception, match="not UTF-8"):
        read_documents(path)
