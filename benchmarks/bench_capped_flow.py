"""The capped program by min-cost flow (``solve(..., "flow")``) against HiGHS (``"highs"``).

    python benchmarks/bench_capped_flow.py                    # 4096x64 and 16384x128 (HiGHS: minutes)
    python benchmarks/bench_capped_flow.py --quick --out DIR  # 256x16 and 512x32 (smoke run, seconds)

The program is ``RoutingProblem.capped(S, c, token_max, expert_max)`` with k = 2: c = T k pairs,
token_max = k + 1 (and k at 16384x128, gaussian), expert_max = ceil(1.25 T k / N), sense ``<=``.
Scores (float64, seed 0):

* ``gaussian``: standard normal, the scores of ``benchmarks/bench_solvers.py``; the expert caps
  barely bind (the budget and the token cap decide);
* ``skewed``: rows of softmax(z + b), z ~ N(0, 1) per entry and b ~ N(0, 1) per expert, a router
  with uneven expert popularity: at 16384x128 the most popular expert is wanted by ~15x its
  capacity, so the flow's price rounds and exact repair do real work.

Per case: the flow solver (``Solution.seconds``, the median of ``--repeats`` runs) and its
certificate (``Certificate.seconds``: the exact check of the flow's own multipliers), HiGHS once
(solve and its certificate), their objectives and certificate status, the ratio of total times
(solve + certificate), and capacity-TC (``usmoe_lp.routing.capacity_token_choice``, cf = 1.25,
the greedy heuristic for this program at token_max = k) for reference: its time and how far its
objective falls short of the optimum. HiGHS runs with ``--highs-time-limit`` (default 1800 s);
a case that reaches it reports the ratio as a lower bound. Timings are reported, never asserted.
Writes ``capped_flow_results.md`` into ``--out`` (default ``benchmarks/``; with ``--quick`` and no
``--out``, a new temporary directory).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import fmt_s, machine_info, machine_markdown, markdown_table, results_dir  # noqa: E402

from usmoe_lp.lp import RoutingProblem, solve  # noqa: E402
from usmoe_lp.routing import capacity_token_choice  # noqa: E402

K = 2
CAPACITY_FACTOR = 1.25
FULL_CASES = [(4096, 64, "gaussian", K + 1), (4096, 64, "skewed", K + 1),
              (16384, 128, "gaussian", K + 1), (16384, 128, "gaussian", K), (16384, 128, "skewed", K + 1)]
QUICK_CASES = [(256, 16, "gaussian", K + 1), (512, 32, "skewed", K + 1), (512, 32, "gaussian", K)]
RESULTS_NAME = "capped_flow_results.md"
TARGET_RATIO = 10.0


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def scores(kind: str, T: int, N: int, seed: int = 0) -> np.ndarray:
    """(T, N) float64 scores of the module docstring's distributions."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((T, N))
    if kind == "gaussian":
        return z
    if kind == "skewed":
        z += rng.standard_normal(N)[None, :]
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        return z
    raise ValueError(f"unknown score distribution {kind!r}")


def run_case(T: int, N: int, kind: str, token_max: int, repeats: int, highs_time_limit: float,
             log=_log) -> dict:
    S = scores(kind, T, N)
    c = T * K
    cap = math.ceil(CAPACITY_FACTOR * T * K / N)
    problem = RoutingProblem.capped(S, c, token_max, cap, sense="<=")
    log(f"capped {T}x{N} {kind} kmax={token_max}: flow x{repeats} ...")
    solve(RoutingProblem.capped(scores(kind, 64, 8), 128, token_max, 40), "flow")  # warm-up (first-call costs)
    flows = [solve(problem, "flow") for _ in range(repeats)]
    flow = flows[-1]
    flow_solve = statistics.median(f.seconds for f in flows)
    flow_cert = statistics.median(f.certificate.seconds for f in flows)
    rounds, augment = _flow_work(flow.message)
    log(f"capped {T}x{N} {kind} kmax={token_max}: HiGHS (time limit {highs_time_limit:g} s) ...")
    highs = solve(problem, "highs", time_limit=highs_time_limit)
    h_cert = highs.certificate
    log("capacity-TC ...")
    t0 = time.perf_counter()
    captc = capacity_token_choice(torch.from_numpy(S), K, capacity_factor=CAPACITY_FACTOR)
    captc_s = time.perf_counter() - t0
    captc_mask = captc.mask.numpy()
    opt = flow.objective
    return {
        "T": T, "N": N, "scores": kind, "k": K, "c": c, "token_max": token_max, "expert_max": cap,
        "flow_solve_s": flow_solve, "flow_cert_s": flow_cert, "flow_total_s": flow_solve + flow_cert,
        "flow_objective": opt, "flow_certificate": flow.certificate.status,
        "flow_certificate_backend": flow.certificate.backend, "price_rounds": rounds, "augmentations": augment,
        "flow_message": flow.message,
        "highs_status": highs.status, "highs_solve_s": highs.seconds,
        "highs_cert_s": None if h_cert is None else h_cert.seconds,
        "highs_total_s": highs.seconds + (0.0 if h_cert is None else h_cert.seconds),
        "highs_objective": highs.objective if highs.success else None,
        "highs_certificate": None if h_cert is None else h_cert.status,
        "same_mask": bool(highs.success and np.array_equal(highs.mask, flow.mask)),
        "captc_s": captc_s, "captc_objective": problem.objective(captc_mask),
        "captc_feasible": bool(np.all(captc_mask.sum(axis=0) <= cap)),
    }


def _flow_work(message: str) -> tuple[int | None, int | None]:
    """(price rounds, augmentations) from the flow solver's message."""
    try:
        inner = message.split("(", 1)[1].split(")", 1)[0]
        rounds = int(inner.split(" price rounds")[0])
        augment = int(inner.split(", ")[1].split(" augmentations")[0])
        return rounds, augment
    except (IndexError, ValueError):
        return None, None


def to_markdown(results: list[dict], repeats: int, highs_time_limit: float) -> str:
    rows, ref_rows = [], []
    for r in results:
        timed_out = r["highs_status"] == "time_limit"
        ratio = r["highs_total_s"] / r["flow_total_s"]
        ratio_text = (">" if timed_out else "") + (f"{ratio:.0f}×" if ratio >= 10 else f"{ratio:.1f}×")
        meets = "yes" if ratio >= TARGET_RATIO else ("no" if not timed_out else "—")
        if r["highs_objective"] is None:
            delta = "—"
        else:
            delta = f"{abs(r['flow_objective'] - r['highs_objective']) / max(1.0, abs(r['flow_objective'])):.1e}"
        rows.append([f"{r['T']}x{r['N']}", r["scores"], f"c={r['c']} kmax={r['token_max']} C={r['expert_max']}",
                     fmt_s(r["flow_solve_s"]), fmt_s(r["flow_cert_s"]), fmt_s(r["flow_total_s"]),
                     f"{r['price_rounds']} / {r['augmentations']}",
                     fmt_s(r["highs_solve_s"]) + (" (time limit)" if timed_out else ""),
                     fmt_s(r["highs_cert_s"]), fmt_s(r["highs_total_s"]), f"{ratio_text} ({meets})",
                     f"{r['flow_objective']:.6f}", delta, f"{r['flow_certificate']} / {r['highs_certificate']}"])
        gap = (r["flow_objective"] - r["captc_objective"]) / abs(r["flow_objective"]) if r["flow_objective"] else 0.0
        ref_rows.append([f"{r['T']}x{r['N']}", r["scores"], f"kmax={r['token_max']}", fmt_s(r["captc_s"]),
                         f"{r['captc_objective']:.6f}", f"{r['flow_objective']:.6f}", f"{100 * gap:.2f} %",
                         "yes" if r["same_mask"] else "no"])
    return "\n\n".join([
        "### Capped program: flow vs HiGHS",
        f"k = {K}, c = T k, C = ceil({CAPACITY_FACTOR} T k / N), sense `<=`. Flow: median of {repeats} runs after a "
        f"warm-up; "
        f"HiGHS: one run (time limit {highs_time_limit:g} s). *total* = solve + certificate; *ratio* = HiGHS "
        f"total / flow total (target ≥ {TARGET_RATIO:g}×). *rounds / aug.*: the flow's price rounds and unit "
        "augmentations of its exact repair. *|Δ obj|*: |flow − HiGHS| / max(1, |flow|). *certificate*: flow's "
        "own multipliers / HiGHS's duals, both checked exactly.",
        markdown_table(["size", "scores", "program", "flow solve", "flow cert.", "flow total", "rounds / aug.",
                        "HiGHS solve", "HiGHS cert.", "HiGHS total", "ratio (≥ 10×)", "objective", "|Δ obj|",
                        "certificate"], rows,
                       ["l", "l", "l", "r", "r", "r", "r", "r", "r", "r", "r", "r", "r", "l"]),
        "### Reference: capacity-TC (greedy) on the same scores",
        f"`capacity_token_choice(S, k={K}, capacity_factor={CAPACITY_FACTOR})` (torch, float64): feasible for the "
        "program at kmax ≥ k; *shortfall* = (optimum − its objective) / |optimum|. *same mask*: flow and HiGHS "
        "returned the same routing (optima can tie).",
        markdown_table(["size", "scores", "program", "capacity-TC time", "capacity-TC objective", "optimum",
                        "shortfall", "same mask"], ref_rows, ["l", "l", "l", "r", "r", "r", "r", "l"]),
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256x16 and 512x32 (smoke run, seconds)")
    ap.add_argument("--out", type=Path, help=f"directory for {RESULTS_NAME} (default: benchmarks/, or a new "
                                              "temporary directory with --quick)")
    ap.add_argument("--repeats", type=int, default=3, help="flow runs per case (median; default 3)")
    ap.add_argument("--highs-time-limit", type=float, default=1800.0, help="seconds per HiGHS solve")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    out_dir = results_dir(args.out, args.quick)

    t_start = time.perf_counter()
    info = machine_info()
    cases = QUICK_CASES if args.quick else FULL_CASES
    repeats = 1 if args.quick else args.repeats
    results = [run_case(T, N, kind, kmax, repeats, args.highs_time_limit) for T, N, kind, kmax in cases]
    elapsed = time.perf_counter() - t_start
    info["load_average_end"] = list(os.getloadavg())
    title = "# usmoe_lp capped-program benchmark" + (" (quick smoke run — small sizes, not for comparison)"
                                                     if args.quick else "")
    doc = "\n\n".join([
        title,
        "## Machine\n\n" + machine_markdown(info),
        "## Results\n\n" + to_markdown(results, repeats, args.highs_time_limit),
        f"*Generated by `benchmarks/bench_capped_flow.py{' --quick' if args.quick else ''}` in {elapsed:.0f} s.*",
    ]) + "\n"
    (out_dir / RESULTS_NAME).write_text(doc)
    print(doc)
    _log(f"wrote {out_dir / RESULTS_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
