"""Diagnostic: why HiGHS is slow on the budget LP ``max <S, x>, sum x <= c, 0 <= x <= 1``.

Builds the LP directly with highspy (no usmoe_lp code) in a fresh subprocess per variant, with
a timeout, and varies the two things that matter:

* the row's lower bound: ``0`` (a ranged row ``0 <= sum x <= c``, what
  ``usmoe_lp.lp.backends.solve_highs`` passes for ``"<="``, since ``budget_lo`` is 0) or
  ``-inf`` (a plain ``<=`` row; the 0 is implied by ``x >= 0``);
* HiGHS options: defaults, or ``presolve=off`` with ``solver=ipm`` (crossover on).

Prints one markdown table. Not part of ``run_all.py``; run it by hand, e.g.
``python benchmarks/diag_highs_budget.py --sizes 1024x64 4096x64 --timeout 120``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = [
    ("0", {}),
    ("-inf", {}),
    ("0", {"presolve": "off", "solver": "ipm", "run_crossover": "on"}),
    ("-inf", {"presolve": "off", "solver": "ipm", "run_crossover": "on"}),
]


def worker(T: int, N: int, row_lo: str, options: dict) -> dict:
    import highspy
    import numpy as np

    S = np.random.default_rng(0).standard_normal((T, N))
    n = T * N
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    for k, v in options.items():
        h.setOptionValue(k, v)
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = n, 1
    lp.col_cost_ = S.ravel()
    lp.col_lower_, lp.col_upper_ = np.zeros(n), np.ones(n)
    lp.row_lower_, lp.row_upper_ = np.array([float(row_lo)]), np.array([2.0 * T])
    lp.sense_ = highspy.ObjSense.kMaximize
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = np.arange(n + 1, dtype=np.int32)
    lp.a_matrix_.index_ = np.zeros(n, dtype=np.int32)
    lp.a_matrix_.value_ = np.ones(n)
    h.passModel(lp)
    t0 = time.perf_counter()
    h.run()
    run_s = time.perf_counter() - t0
    x = np.asarray(h.getSolution().col_value)
    ref = float(np.sort(S.ravel())[::-1][: 2 * T].clip(min=0).sum())
    obj = float(h.getInfo().objective_function_value)
    return {"status": h.modelStatusToString(h.getModelStatus()), "run_s": run_s,
            "rel_err": abs(obj - ref) / max(1.0, abs(ref)),
            "max_frac": float(np.abs(x - np.round(x)).max()), "highs": h.version()}


def run_variant(T, N, row_lo, options, timeout):
    payload = json.dumps({"T": T, "N": N, "row_lo": row_lo, "options": options})
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", payload],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"status": f"timeout (> {timeout:.0f} s)"}
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"status": "error: " + " | ".join(err.strip().splitlines()[-2:])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", nargs="*", default=["1024x64", "4096x64"])
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args(argv)
    if args.worker:
        w = json.loads(args.worker)
        print("RESULT " + json.dumps(worker(w["T"], w["N"], w["row_lo"], w["options"])), flush=True)
        return 0
    print("| T x N | row lower | options | HiGHS | status | h.run() | rel err vs top-c | max frac |")
    print("| --- | --- | --- | --- | --- | ---: | ---: | ---: |")
    for size in args.sizes:
        T, N = (int(v) for v in size.lower().split("x"))
        for row_lo, opts in VARIANTS:
            r = run_variant(T, N, row_lo, opts, args.timeout)
            opt = ", ".join(f"{k}={v}" for k, v in opts.items()) or "defaults"
            run_s = f"{r['run_s']:.2f} s" if "run_s" in r else "—"
            err = f"{r['rel_err']:.1e}" if "rel_err" in r else "—"
            frac = f"{r['max_frac']:.1e}" if "max_frac" in r else "—"
            print(f"| {T}x{N} | {row_lo} | {opt} | {r.get('highs', '—')} | {r['status']} | {run_s} "
                  f"| {err} | {frac} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
