"""`usmoe-lp demo`: the whole pipeline on the embedded model (small token budget to stay quick)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from usmoe_lp.cli import app
from usmoe_lp.demo import DEMO_OWNED
from usmoe_lp.logs import RouterLog
from usmoe_lp.report.outputs import foreign_entries
from usmoe_lp.report.verify_report import FIGURES
from usmoe_lp.tiny import heldout_documents
from usmoe_lp.verify import CLAIMS


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--out", str(out), "--tokens", "1024"])
    assert res.exit_code == 0, res.output
    assert "report:" in res.output and "report.html" in res.output
    for n in range(1, 7):  # the six-line summary
        assert f"\n{n}. " in res.output
    for name in ("report.html", "report.md", "summary.json", "verify/report.json", "verify/report.md",
                 "analysis/metrics.json", "analysis/report.html", "analysis/load_heatmap.png", "analysis/sweeps.png",
                 "evaluate/evaluate.json", "evaluate/report.html", "evaluate/report.md",
                 "evaluate/quality_vs_cost.png"):
        assert (out / name).stat().st_size > 0, name
    log = RouterLog.open(out / "router-log")
    assert log.complete and len(log.layers) == 4 and set(log.num_experts.values()) == {8}
    assert log.manifest.model.family == "olmoe"
    assert log.num_tokens >= 1024
    assert log.validate().ok
    metrics = json.loads((out / "analysis" / "metrics.json").read_text())
    assert list(metrics["layers"]) == list(log.layers)
    # the trained routers are not trivial: confident routing, uneven load, layers differ
    ent = [m["load"]["token_entropy_normalised"] for m in metrics["layers"].values()]
    assert max(ent) < 0.97 and max(ent) - min(ent) > 0.05
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert len(summary) == 6 and summary[4].startswith("leakage") and summary[5].startswith("live evaluation")
    verify = json.loads((out / "verify" / "report.json").read_text())["claims"]
    holds = sum(c["verdict"] == "holds" for c in verify)
    failing = [c["claim"] for c in verify if c["verdict"] == "fails"]
    assert summary[0].startswith(f"verify: {holds} of {len(CLAIMS)} claims hold on every instance; fail: ")
    assert all(c in summary[0] for c in failing)
    assert {"topc_optimal_le", "usmoe_ge_ec"} <= set(failing)
    for name in FIGURES:
        assert (out / "verify" / name).is_file()
    page = (out / "report.html").read_text()
    assert "analysis/report.html" in page and "verify/report.md" in page and "evaluate/report.html" in page
    assert page.count("data:image/png;base64,") >= 4 and "Pareto front" in page
    md = (out / "report.md").read_text()
    assert "(evaluate/quality_vs_cost.png)" in md and "Pareto front" in md
    check_evaluation(out / "evaluate", summary[5])
    # a second run may replace all of it (make demo twice in a row), and nothing else is there
    assert foreign_entries(out, DEMO_OWNED) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    assert str(tmp_path) not in (out / "analysis" / "metrics.json").read_text()  # no staging path leaked


def check_evaluation(path, line):
    """The demo's live evaluation: its settings, the held-out text it scored (the first 64 bytes of every
    document at --tokens 1024), and what the settings must do on the model."""
    data = json.loads((path / "evaluate.json").read_text())
    quality = {r["label"]: r for r in data["quality"]}
    assert list(quality) == ["native", "tc k=1", "tc k=2", "usmoe a=0.5 kbar=1 seq", "usmoe a=0.5 kbar=1.5 seq",
                             "usmoe a=0.5 kbar=2 seq", "ec cf=1"]
    docs = heldout_documents()
    assert {r["documents"] for r in quality.values()} == {len(docs)}
    assert {r["tokens"] for r in quality.values()} == {sum(len(d[:64].encode()) + 1 for d in docs)}
    assert abs(quality["tc k=2"]["delta_ce"]) < 1e-6               # Token Choice at the model's k: its routing
    assert quality["tc k=1"]["kbar"] == 1.0 and quality["tc k=1"]["flops_vs_native"] == 0.5
    assert abs(quality["usmoe a=0.5 kbar=1.5 seq"]["kbar"] - 1.5) < 0.05
    assert quality["tc k=1"]["delta_ce"] > 0                        # half the experts costs quality
    assert data["model"]["name"] == "usmoe-lp tiny (embedded)"
    assert line.startswith(f"live evaluation ({len(docs)} held-out documents")
