"""Smoke test of the benchmark suite: ``benchmarks/run_all.py --quick`` runs and writes tables.

Small sizes only; no timing is asserted (timings belong in ``benchmarks/results.md``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN_ALL = ROOT / "benchmarks" / "run_all.py"


def test_run_all_quick_writes_tables(tmp_path):
    committed = ROOT / "benchmarks" / "results.md"
    before = committed.stat().st_mtime_ns if committed.exists() else None

    proc = subprocess.run(
        [sys.executable, str(RUN_ALL), "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,  # a hang guard (~100 s on 2 idle cores, 250 s when busy)
    )
    assert proc.returncode == 0, f"run_all --quick exited {proc.returncode}:\n{proc.stderr[-3000:]}"

    md = (tmp_path / "results.md").read_text()
    assert "## Machine" in md and "CPU:" in md
    for heading in ("Closed-form certificate", "Torch routers", "Solver backends", "Live routing"):
        assert heading in md
    table_rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert any("certify" in line for line in table_rows)  # a header row
    assert any("highs" in line for line in table_rows) and any("cbc" in line for line in table_rows)
    assert "| --- |" in md or "| ---: |" in md
    assert "budget <= 2T" in md and "token choice k=2" in md

    raw = json.loads((tmp_path / "results.json").read_text())
    assert raw["quick"] is True and raw["ok"] is True
    assert {r["backend"] for r in raw["solvers"]["results"]} == {"highs", "cbc", "milp"}
    # live routing: every variant timed, its checks passed (native bitwise, realised k-bar and expert rows)
    (live,) = raw["live"]
    assert set(live["stats"]) == {"unpatched", "native", "tc k=2", "usmoe kbar=2", "tc k=1", "usmoe kbar=1"}
    assert all(v for c in live["checks"].values() for k, v in c.items() if k.endswith("_ok"))
    assert {k: round(v["kbar"], 9) for k, v in live["routed"].items()} == {
        "native": 2, "tc k=2": 2, "usmoe kbar=2": 2, "tc k=1": 1, "usmoe kbar=1": 1}
    assert any(line.startswith("| usmoe kbar=1 |") for line in table_rows)

    # The committed full-size results are never overwritten by the smoke run.
    after = committed.stat().st_mtime_ns if committed.exists() else None
    assert after == before


def test_bench_capped_flow_quick_writes_its_table(tmp_path):
    """``benchmarks/bench_capped_flow.py --quick``: flow and HiGHS on tiny capped programs, both certified."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_capped_flow.py"), "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"bench_capped_flow --quick exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    md = (tmp_path / "capped_flow_results.md").read_text()
    assert "## Machine" in md and "flow vs HiGHS" in md and "capacity-TC" in md
    rows = [line for line in md.splitlines() if line.startswith("| 256x16 |") or line.startswith("| 512x32 |")]
    assert len(rows) == 6  # three cases, in the main table and in the capacity-TC table
    assert all("optimal / optimal" in line for line in rows[:3])
