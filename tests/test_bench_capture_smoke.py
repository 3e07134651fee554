"""Smoke test of ``benchmarks/bench_capture.py --quick``: it runs and writes its table.

Tiny model and batches only; no timing is asserted.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench_capture.py"


def test_bench_capture_quick_writes_table(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(out), "--tmp-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"bench_capture --quick exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    md = (out / "capture_results.md").read_text()
    assert "## Machine" in md and "| ---: |" in md
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    for needle in ("no capture", "capture (hooks -> log, fsync)", "output_router_logits=True"):
        assert any(line.startswith(f"| {needle} |") for line in rows), needle
    assert "Capture overhead" in md
    assert md in proc.stdout  # the table is printed too
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the scratch logs are cleaned up
