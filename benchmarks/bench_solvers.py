"""Solver backends on the routing programs, each run in its own subprocess with a timeout.

Cases (standard Gaussian float64 scores, seed 0; c = 2T):

* HiGHS (``solve(..., "highs")``, highspy) on the budget LP ``sum x <= 2T`` at 16384x128
  (target < 30 s) and on the capped program ``RoutingProblem.capped(S, c=2T, token_max=4,
  expert_max=ceil(1.25 * 2T / N))`` at 4096x64 (target < 30 s);
* CBC (``solve(..., "cbc")``, PuLP) on the budget 0/1 program at 1024x64 (target < 60 s);
* ``scipy.optimize.milp`` (``solve(..., "milp")``) on the budget program at 256x16 and 1024x64
  with a time limit, with HiGHS and CBC at the same sizes for the ratio.

Each case runs in a fresh interpreter (``--worker``) in its own process group, killed as a
group at the timeout, so a slow solver (or CBC's child process) cannot hang the suite.
Recorded per case: build+solve wall time (``Solution.seconds``: model build and solver call),
certification time, total worker time, peak RSS, whether the solver's objective and the mask's
objective match the closed form (relative 1e-9; budget program only) and whether the
certificate says optimal.

Usage: ``python benchmarks/bench_solvers.py [--quick] [--only ID ...] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from common import fmt_s, markdown_table  # noqa: E402

RTOL = 1e-9


def _case(backend, program, T, N, *, target_s=None, time_limit=None, timeout_s=120.0, note=""):
    cid = f"{backend}-{program}-{T}x{N}"
    return {"id": cid, "backend": backend, "program": program, "T": T, "N": N,
            "target_s": target_s, "time_limit": time_limit, "timeout_s": timeout_s, "note": note}


FULL_CASES = [
    _case("highs", "budget", 16384, 128, target_s=30, timeout_s=150),
    _case("highs", "capped", 4096, 64, target_s=30, timeout_s=240),
    _case("cbc", "budget", 1024, 64, target_s=60, timeout_s=300),
    _case("milp", "budget", 256, 16, time_limit=60, timeout_s=150, note="ratio"),
    _case("milp", "budget", 1024, 64, time_limit=60, timeout_s=120, note="ratio"),
    _case("highs", "budget", 256, 16, note="ratio reference"),
    _case("cbc", "budget", 256, 16, note="ratio reference"),
    _case("highs", "budget", 1024, 64, note="ratio reference"),
]

QUICK_CASES = [
    _case("highs", "budget", 256, 16, timeout_s=60),
    _case("highs", "capped", 128, 16, timeout_s=60),
    _case("cbc", "budget", 32, 8, timeout_s=60),
    _case("milp", "budget", 32, 8, time_limit=20, timeout_s=60),
]


# ----------------------------------------------------------------------------- worker side
def build_problem(program: str, S):
    from usmoe_lp.lp import RoutingProblem

    T, N = S.shape
    if program == "budget":
        return RoutingProblem.budget(S, 2 * T, sense="<=")
    if program == "capped":
        return RoutingProblem.capped(S, c=2 * T, token_max=4,
                                     expert_max=math.ceil(1.25 * T * 2 / N))
    raise ValueError(f"unknown program {program!r}")


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(1.0, abs(b))


def worker(case: dict) -> dict:
    """Run one case in this process; returns the JSON-ready result."""
    import resource

    from common import make_scores

    from usmoe_lp.lp import solve

    t_all = time.perf_counter()
    S = make_scores("gaussian", case["T"], case["N"])
    t0 = time.perf_counter()
    problem = build_problem(case["program"], S)
    problem_s = time.perf_counter() - t0

    ref = None
    if problem.is_single_block:
        ref = solve(problem, "closed_form", certify_solution=False).objective

    t0 = time.perf_counter()
    sol = solve(problem, case["backend"], time_limit=case["time_limit"], certify_solution=True)
    call_s = time.perf_counter() - t0
    cert = sol.certificate
    mask_obj = problem.objective(sol.mask)
    out = {
        "status": sol.status,
        "message": sol.message,
        "variables": int(S.size),
        "problem_s": problem_s,
        "build_solve_s": sol.seconds,
        "certify_s": None if cert is None else cert.seconds,
        "solve_call_s": call_s,
        "worker_s": time.perf_counter() - t_all,
        "objective": sol.objective,
        "mask_objective": mask_obj,
        "closed_form_objective": ref,
        "objective_rel_err": None if ref is None else _rel(sol.objective, ref),
        "mask_rel_err": None if ref is None else _rel(mask_obj, ref),
        "matches_closed_form": None if ref is None else bool(
            _rel(sol.objective, ref) <= RTOL and _rel(mask_obj, ref) <= RTOL),
        "certificate_optimal": None if cert is None else bool(cert.optimal),
        "certificate_gap": None if cert is None else cert.gap,
        "certificate_message": None if cert is None else cert.message,
        "max_fractionality": sol.max_fractionality,
        "selected": int(sol.mask.sum()),
        "cpu_s": _cpu_seconds(resource),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_children_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
    return out


def _cpu_seconds(resource) -> float:
    """User + system CPU seconds of this worker and its finished children (CBC)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


# ----------------------------------------------------------------------------- parent side
def run_case(case: dict) -> dict:
    """Run ``case`` in a fresh interpreter in its own process group; kill the group on timeout."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(case)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=case["timeout_s"])
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker and any solver child (CBC) it started
        proc.communicate()
        return {**case, "status": "timeout", "wall_s": time.perf_counter() - t0,
                "message": f"killed after the {case['timeout_s']:.0f} s timeout"}
    wall = time.perf_counter() - t0
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            return {**case, **json.loads(line[len("RESULT "):]), "wall_s": wall}
    tail = (stderr or stdout).strip().splitlines()[-3:]
    return {**case, "status": "error", "wall_s": wall,
            "message": f"worker exited {proc.returncode}: " + " | ".join(tail)}


def run(quick: bool = False, only: list[str] | None = None, log=None,
        jobs: int | None = None) -> dict:
    """Run the cases; ``jobs`` at a time (default 1, so timings do not compete; quick: 2)."""
    cases = QUICK_CASES if quick else FULL_CASES
    if only:
        cases = [c for c in cases if c["id"] in only]
    jobs = jobs or (2 if quick else 1)

    def one(case: dict) -> dict:
        if log:
            log(f"solver case {case['id']} (timeout {case['timeout_s']:.0f} s) ...")
        res = run_case(case)
        if log:
            log(f"  {case['id']} -> {res['status']}: build+solve {fmt_s(res.get('build_solve_s'))}"
                f" (subprocess wall {fmt_s(res['wall_s'])})")
        return res

    if jobs == 1:
        results = [one(c) for c in cases]
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(one, cases))
    return {"quick": quick, "jobs": jobs, "results": results}


def case_ok(r: dict) -> bool:
    """Correctness (not speed): no crash; an optimal solve matches and is certified."""
    if r["status"] in ("error", "infeasible"):
        return False
    if r["status"] != "optimal":
        return True  # timeout / time_limit: a speed result, reported in the table
    return r.get("matches_closed_form") is not False and r.get("certificate_optimal") is True


def ok(report: dict) -> bool:
    return all(case_ok(r) for r in report["results"])


def _yes(v) -> str:
    return {None: "n/a", True: "yes", False: "**NO**"}[v]


def to_markdown(report: dict) -> str:
    rows = []
    for r in report["results"]:
        target = r.get("target_s")
        bs = r.get("build_solve_s")
        if target is None:
            verdict = "—"
        elif r["status"] == "optimal" and bs is not None:
            verdict = f"< {target} s: " + ("yes" if bs < target else "**no**")
        else:
            verdict = f"< {target} s: **no** ({r['status']})"
        err = r.get("objective_rel_err")
        match = _yes(r.get("matches_closed_form"))
        if r["status"] != "optimal" and r.get("matches_closed_form") is False:
            match = f"no ({r['status']})"
        if err is not None:
            match += f" ({max(err, r.get('mask_rel_err') or 0.0):.1e})"
        rss = max(r.get("peak_rss_mib") or 0, r.get("peak_rss_children_mib") or 0)
        rows.append([
            r["backend"], r["program"], f"{r['T']}x{r['N']}", f"{r['T'] * r['N']:,}",
            r["status"] + (f" (limit {r['time_limit']:.0f} s)" if r.get("time_limit") else ""),
            fmt_s(bs), fmt_s(r.get("certify_s")), fmt_s(r.get("wall_s")), fmt_s(r.get("cpu_s")),
            verdict, match,
            _yes(r.get("certificate_optimal")), f"{rss:.0f}" if rss else "—",
        ])
    jobs = report.get("jobs", 1)
    out = ["### Solver backends (one fresh subprocess per case"
           + (", run one at a time" if jobs == 1 else f", {jobs} at a time: timings compete")
           + "; standard Gaussian scores, c = 2T, budget sense `<=`)", ""]
    out.append(markdown_table(
        ["backend", "program", "T x N", "vars", "status", "build+solve", "certify",
         "subprocess wall", "worker CPU", "target", "obj == closed form (rel err)",
         "cert optimal", "peak RSS MiB"], rows,
        ["l", "l", "l", "r", "l", "r", "r", "r", "r", "l", "l", "l", "r"]))
    out += ["", "*build+solve* is `Solution.seconds` (constraint matrix, model build, solver "
            "call, solution read-back); *subprocess wall* adds interpreter start-up and "
            "imports (~2.5 s), problem construction, the closed-form reference and the "
            "certificate; *worker CPU* is the user+system CPU time of the worker and its solver "
            "child, less sensitive than wall time to other load on the machine. The capped "
            "program binds three families, so it has no closed form; it is certified through "
            "the HiGHS LP duals (Lagrangian bound)."]
    ratios = _milp_ratios(report["results"])
    if ratios:
        out += ["", "#### scipy `milp` against the other backends (build+solve time ratio)", ""]
        out.append(markdown_table(["T x N", "milp", "milp / highs", "milp / cbc"], ratios,
                                  ["l", "r", "r", "r"]))
    return "\n".join(out)


def _milp_ratios(results: list[dict]) -> list[list[str]]:
    by = {(r["backend"], r["program"], r["T"], r["N"]): r for r in results}
    rows = []
    for r in results:
        if r["backend"] != "milp":
            continue
        t = r.get("build_solve_s")
        censored = r["status"] != "optimal"
        if t is None:
            t = r.get("wall_s")
        cells = [f"{r['T']}x{r['N']}", fmt_s(t) + (f" ({r['status']})" if censored else "")]
        for other in ("highs", "cbc"):
            o = by.get((other, r["program"], r["T"], r["N"]))
            if o is None or o.get("build_solve_s") is None or t is None:
                cells.append("—")
            else:
                ratio = t / o["build_solve_s"]
                cells.append(("≥ " if censored else "") + (f"{ratio:.0f}x" if ratio >= 10
                                                           else f"{ratio:.2g}x"))
        rows.append(cells)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--only", nargs="*", help="case ids to run, e.g. highs-budget-256x16")
    ap.add_argument("--jobs", type=int, help="cases at a time (default 1; --quick: 2)")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    args = ap.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    report = run(args.quick, args.only, log=lambda s: print(s, file=sys.stderr, flush=True),
                 jobs=args.jobs)
    print(to_markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if ok(report) else 1


if __name__ == "__main__":
    sys.exit(main())
