"""Smoke test of ``benchmarks/bench_verify.py --quick``: it runs and writes its table (no timing asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench_verify.py"


def test_bench_verify_quick_writes_its_table(tmp_path):
    committed = ROOT / "benchmarks" / "verify_results.md"
    before = committed.stat().st_mtime_ns if committed.exists() else None
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # a hang guard
    assert proc.returncode == 0, f"bench_verify --quick exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    md = (tmp_path / "verify_results.md").read_text()
    assert md in proc.stdout
    assert "## Machine" in md and "Load average" in md and "Date:" in md
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    batches = next(r for r in rows if r.startswith("| batches | 8x4 |"))
    one = next(r for r in rows if r.startswith("| one at a time | 8x4 |"))
    # 1 family x 2 ks x 4 trials in batches; 2 instances one at a time
    assert batches.split(" | ")[4] == "8" and one.split(" | ")[4] == "2"
    for row in (batches, one):
        assert float(row.rstrip(" |").split(" | ")[-1]) > 0  # instances per second per core
    claims = [r for r in rows if r.startswith("| `")]
    assert len(claims) == 13 and not any("ilp_eq_lp" in r for r in claims)
    assert re.search(r"## One 16x8 instance \(13 claims", md)
    assert "Skipped (`--quick`" in md
    after = committed.stat().st_mtime_ns if committed.exists() else None
    assert after == before  # the committed results are never overwritten by the smoke run
