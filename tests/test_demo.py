"""`usmoe-lp demo`: the whole pipeline on the embedded model (small token budget to stay quick)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from usmoe_lp.cli import app
from usmoe_lp.demo import DEMO_OWNED
from usmoe_lp.logs import RouterLog
from usmoe_lp.report.outputs import foreign_entries
from usmoe_lp.report.verify_report import FIGURES
from usmoe_lp.verify import CLAIMS


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--out", str(out), "--tokens", "1024"])
    assert res.exit_code == 0, res.output
    assert "report:" in res.output and "report.html" in res.output
    for n in range(1, 6):  # the five-line summary
        assert f"\n{n}. " in res.output
    for name in ("report.html", "summary.json", "verify/report.json", "verify/report.md", "analysis/metrics.json",
                 "analysis/report.html", "analysis/load_heatmap.png", "analysis/sweeps.png"):
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
    assert len(summary) == 5 and summary[-1].startswith("leakage")
    verify = json.loads((out / "verify" / "report.json").read_text())["claims"]
    holds = sum(c["verdict"] == "holds" for c in verify)
    failing = [c["claim"] for c in verify if c["verdict"] == "fails"]
    assert summary[0].startswith(f"verify: {holds} of {len(CLAIMS)} claims hold on every instance; fail: ")
    assert all(c in summary[0] for c in failing)
    assert {"topc_optimal_le", "usmoe_ge_ec"} <= set(failing)
    for name in FIGURES:
        assert (out / "verify" / name).is_file()
    page = (out / "report.html").read_text()
    assert "analysis/report.html" in page and "verify/report.md" in page
    assert page.count("data:image/png;base64,") >= 3
    # a second run may replace all of it (make demo twice in a row), and nothing else is there
    assert foreign_entries(out, DEMO_OWNED) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    assert str(tmp_path) not in (out / "analysis" / "metrics.json").read_text()  # no staging path leaked
