"""Smoke test of ``benchmarks/bench_router_log.py --quick``: it runs and writes its tables.

Small sizes only; no timing is asserted.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench_router_log.py"


def test_bench_router_log_quick_writes_tables(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--out", str(out), "--tmp-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, f"bench_router_log --quick exited {proc.returncode}:\n{proc.stderr[-3000:]}"

    md = (out / "router_log_results.md").read_text()
    assert "## Machine" in md and "Scratch filesystem:" in md
    assert "| --- |" in md or "| ---: |" in md
    table_rows = [line for line in md.splitlines() if line.startswith("| ")]
    for needle in ("RouterLogWriter", "save_file + fsync", "save_file, no fsync", "iter_chunks", "load_file",
                   "max_buffered_bytes"):
        assert any(needle in line for line in table_rows), needle
    assert any(line.startswith("| bf16 |") for line in table_rows)
    assert any(line.startswith("| float32 |") for line in table_rows)
    assert md in proc.stdout  # the table is printed too
    # the scratch logs are cleaned up
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
