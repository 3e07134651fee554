"""Smoke test of ``benchmarks/bench_analyze.py --quick``: it runs, writes its tables and its JSON.

Small sizes only; no timing is asserted (no Dask cluster: ``--quick`` skips those runs).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench_analyze.py"


def test_bench_analyze_quick_writes_tables(tmp_path):
    out = tmp_path / "out" / "results.json"
    log_dir = tmp_path / "log"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--threads", "1", "--scaling", "2048", "--out", str(out),
         "--log-dir", str(log_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, f"bench_analyze --quick exited {proc.returncode}:\n{proc.stderr[-3000:]}"

    md = (out.parent / "analyze_results.md").read_text()
    assert "## Machine" in md and "Shared machine" in md
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    for needle in ("verify=none", "verify=lazy", "suite, one core", "GiB", "2,048"):
        assert any(needle in line for line in rows), needle
    assert "Counterfactual + leakage sample" in md and "Scaling with the log length" in md
    assert "Dask" not in md
    assert md in proc.stdout  # the table is printed too

    res = json.loads(out.read_text())
    layers, tokens, experts = res["size"]
    suite = res["suite"]["1"]
    assert suite["tokens"] == layers * tokens  # every token of every layer analysed
    assert suite["threads"] == 1 and suite["cpu"]["median_s"] > 0 and suite["time"]["median_s"] > 0
    assert res["read"]["lazy"]["cpu"]["runs"] == 1
    assert 0 < suite["peak_rss_bytes"] and res["sample"]["sample_tokens"] > 0
    assert [(r["layers"], r["tokens"], r["suite"]["tokens"]) for r in res["scaling"]] == [(2, 2048, 4096)]
    assert res["log_written"] is True and res["dask"] == {}

    # a second run reuses the log instead of writing it again
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--threads", "1", "--no-counterfactual", "--repeats", "1",
         "--scaling", "", "--out", str(out), "--log-dir", str(log_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["log_written"] is False and "sample" not in res and res["scaling"] == []
