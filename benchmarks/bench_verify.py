"""``usmoe-lp verify`` at scale: batch throughput at 8x4, one 1024x64 instance, 1 -> 2 Dask workers.

    python benchmarks/bench_verify.py                    # the full run, writes benchmarks/verify_results.md
    python benchmarks/bench_verify.py --quick --out DIR  # tiny sizes, no cluster (smoke run, seconds)

Three measurements, each repeated ``--repeats`` times (median reported, with the spread):

1. **Throughput at 8x4**: every claim with the default backends (``usmoe_lp.verify.DEFAULT_BACKENDS``: two
   independent oracles for every claim, all in-process), every matrix family, k = 1 and 2, checked by
   ``run_verify`` in this process without shrinking. CPU time is user + system time of this process
   (every thread it runs) and of its child processes (CBC's), so instances per CPU second is instances per
   second per core. The same instances
   checked one at a time (batches of one, ``runner.run_batch`` per trial) give the per-instance path: with
   the default backends, and with the former default ``closed_form,highs,cbc`` (a CBC subprocess per
   program and instance), on ``--per-instance`` instances; and the code before batching itself (its
   claims module read from git at commit 2e8fe86, run on today's ``usmoe_lp.lp``, former default backends).
2. **One 1024x64 instance**: every claim but ``ilp_eq_lp`` (beyond ``--ilp-max-vars``: no 0/1 backend),
   default backends, CPU and wall time per instance; then each claim alone on a fresh batch (cold caches),
   which shows where the time goes.
3. **Scaling**: the same run of a few thousand 8x4 instances on a local Dask cluster of 1 and of 2 worker
   processes (``usmoe_lp.cluster.dask_client``; cluster start-up not timed), wall time and the workers' CPU
   time; the speed-up is wall(1) / wall(2). Skipped with ``--quick`` (no cluster in the smoke run).

Timings are reported, never asserted. The machine is shared: the file states the load average at the start
and the end of the run. Writes ``verify_results.md`` into ``--out`` (default ``benchmarks/``; with ``--quick``
and no ``--out``, a new temporary directory).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import numpy as np  # noqa: E402
from common import machine_info, machine_markdown, markdown_table, results_dir  # noqa: E402

from usmoe_lp._threads import one_torch_thread  # noqa: E402
from usmoe_lp.cluster import dask_client  # noqa: E402
from usmoe_lp.verify import CLAIMS, DEFAULT_BACKENDS, FAMILIES, VerifyConfig, run_verify  # noqa: E402
from usmoe_lp.verify.claims import Batch, Context  # noqa: E402
from usmoe_lp.verify.runner import BatchTask, batch_size, run_batch, trial_seed  # noqa: E402

RESULTS_NAME = "verify_results.md"
TARGET_RATE = 500.0  # instances per second per core at 8x4
TARGET_LARGE_S = 1.0  # one 1024x64 instance
TARGET_SCALING = 1.8  # "near-linear" 1 -> 2 workers
FORMER_BACKENDS = ("closed_form", "highs", "cbc")
BEFORE_BATCHING = "2e8fe86"
"""The last commit whose claims checked one instance at a time (``usmoe_lp/verify/claims.py`` there)."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cpu() -> float:
    """CPU seconds of this process (every thread) and of its finished child processes (CBC's)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _timed(fn):
    """(result, CPU seconds of this process and its children, wall seconds)."""
    c0, w0 = _cpu(), time.perf_counter()
    out = fn()
    return out, _cpu() - c0, time.perf_counter() - w0


def _spread(values: list[float]) -> str:
    return f"{min(values):.3g}–{max(values):.3g}"


def throughput(size: tuple[int, int], families: tuple[str, ...], trials: int, repeats: int) -> dict:
    """Batch path: run_verify in this process, no shrinking."""
    T, N = size
    cfg = VerifyConfig(families=families, sizes=(size,), ks=(1, 2), trials=trials, seed=0, shrink=False)
    n = len(families) * 2 * trials
    runs = []
    for r in range(repeats):
        res, cpu, wall = _timed(lambda: run_verify(cfg, progress=False))
        assert len(res.records) == n * len(CLAIMS)  # every claim ran on every instance
        runs.append((cpu, wall))
        _log(f"  batch {T}x{N}: {n} instances, cpu {cpu:.2f} s, wall {wall:.2f} s (run {r + 1}/{repeats})")
    cpu = statistics.median(c for c, _ in runs)
    wall = statistics.median(w for _, w in runs)
    return {"path": "batches", "size": f"{T}x{N}", "backends": list(DEFAULT_BACKENDS), "instances": n,
            "batch_size": batch_size(T, N), "cpu_s": cpu, "wall_s": wall, "rate_per_core": n / cpu,
            "cpu_runs": [c for c, _ in runs], "wall_runs": [w for _, w in runs]}


def per_instance(size: tuple[int, int], count: int, backends: tuple[str, ...], repeats: int) -> dict:
    """The same kind of instances checked one at a time (batches of one)."""
    T, N = size
    fams = list(FAMILIES)
    tasks = [BatchTask(fams[i % len(fams)], T, N, 1 + i % 2, i, i + 1, 0, tuple(CLAIMS), backends, 4096)
             for i in range(count)]
    runs = []
    for r in range(repeats):
        _, cpu, wall = _timed(lambda: [run_batch(t) for t in tasks])
        runs.append((cpu, wall))
        _log(f"  one at a time {T}x{N} ({','.join(backends)}): {count} instances, cpu {cpu:.2f} s, "
             f"wall {wall:.2f} s (run {r + 1}/{repeats})")
    cpu = statistics.median(c for c, _ in runs)
    wall = statistics.median(w for _, w in runs)
    return {"path": "one at a time", "size": f"{T}x{N}", "backends": list(backends), "instances": count,
            "batch_size": 1, "cpu_s": cpu, "wall_s": wall, "rate_per_core": count / cpu,
            "cpu_runs": [c for c, _ in runs], "wall_runs": [w for _, w in runs]}


def _claims_before_batching():
    """The claims module of :data:`BEFORE_BATCHING`, read from git and run on today's ``usmoe_lp.lp``
    (None without git history)."""
    proc = subprocess.run(["git", "show", f"{BEFORE_BATCHING}:usmoe_lp/verify/claims.py"], cwd=HERE.parent,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    module = types.ModuleType("claims_before_batching")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(proc.stdout, f"{BEFORE_BATCHING}:usmoe_lp/verify/claims.py", "exec"), module.__dict__)
    return module


def per_instance_before(size: tuple[int, int], count: int) -> dict | None:
    """Today's per-instance path: the pre-batching claims (their ``Instance``, one check per claim and
    instance) with their default backends closed_form,highs,cbc, on the same kind of instances."""
    old = _claims_before_batching()
    if old is None:
        _log("  (no git history: the pre-batching path is not measured)")
        return None
    T, N = size
    fams = list(FAMILIES)
    ctx = old.Context(backends=FORMER_BACKENDS, ilp_max_vars=4096)

    def run():
        for i in range(count):
            fam, k = fams[i % len(fams)], 1 + i % 2
            S = FAMILIES[fam].generate(np.random.default_rng(trial_seed(0, fam, T, N, k, i)), T, N)
            inst = old.Instance(S, k, ctx)
            for claim in old.CLAIMS.values():
                claim.check(inst)

    _, cpu, wall = _timed(run)
    _log(f"  before batching ({BEFORE_BATCHING}) {T}x{N}: {count} instances, cpu {cpu:.2f} s, wall {wall:.2f} s")
    return {"path": f"one at a time, code of {BEFORE_BATCHING}", "size": f"{T}x{N}",
            "backends": list(FORMER_BACKENDS), "instances": count, "batch_size": 1, "cpu_s": cpu, "wall_s": wall,
            "rate_per_core": count / cpu, "cpu_runs": [cpu], "wall_runs": [wall]}


def large_instance(size: tuple[int, int], repeats: int, breakdown: bool) -> dict:
    """One instance at a time (trials 0..repeats-1, gaussian, k = 2), every claim but ilp_eq_lp."""
    T, N = size
    claims = tuple(c for c in CLAIMS if c != "ilp_eq_lp")
    runs = []
    for t in range(repeats):
        task = BatchTask("gaussian", T, N, 2, t, t + 1, 0, claims, DEFAULT_BACKENDS, 4096)
        records, cpu, wall = _timed(lambda task=task: run_batch(task))
        assert len(records) == len(claims)
        runs.append((cpu, wall))
        _log(f"  {T}x{N}: cpu {cpu:.2f} s, wall {wall:.2f} s (trial {t})")
    out = {"size": f"{T}x{N}", "claims": len(claims), "cpu_s": statistics.median(c for c, _ in runs),
           "wall_s": statistics.median(w for _, w in runs), "cpu_runs": [c for c, _ in runs],
           "wall_runs": [w for _, w in runs], "breakdown": {}}
    if breakdown:
        seed = trial_seed(0, "gaussian", T, N, 2, 0)
        S = FAMILIES["gaussian"].generate(np.random.default_rng(seed), T, N)
        ctx = Context(backends=DEFAULT_BACKENDS)
        for cid in claims:
            with one_torch_thread():
                _, cpu, wall = _timed(lambda cid=cid: CLAIMS[cid].check(Batch.one(S, 2, ctx)))
            out["breakdown"][cid] = {"cpu_s": cpu, "wall_s": wall}
            _log(f"    {cid} alone: cpu {cpu:.2f} s")
    return out


def _worker_cpu(client) -> float:
    return sum(client.run(time.process_time).values())


def scaling(trials: int, repeats: int) -> dict:
    """The same 8x4 run on a local cluster of 1 and of 2 workers (wall time; start-up excluded)."""
    cfg = VerifyConfig(sizes=((8, 4),), ks=(1, 2), trials=trials, seed=0, shrink=False)
    n = len(cfg.families) * 2 * trials
    out = {"instances": n, "tasks": len(cfg.families) * 2 * -(-trials // batch_size(8, 4)), "workers": {}}
    for workers in (1, 2):
        with dask_client(workers=workers) as client:
            client.wait_for_workers(workers, timeout=120)
            # every worker imports usmoe_lp and runs its first solves before the clock starts
            client.run(run_batch, BatchTask("gaussian", 8, 4, 2, 0, 4, 0, tuple(CLAIMS), DEFAULT_BACKENDS, 4096))
            runs, loads = [], []
            for r in range(repeats):
                c0 = _worker_cpu(client)
                _, main_cpu, wall = _timed(lambda client=client: run_verify(cfg, progress=False, client=client))
                cpu = _worker_cpu(client) - c0
                runs.append((cpu, wall, main_cpu))
                loads.append(os.getloadavg()[0])
                _log(f"  {workers} worker(s): {n} instances, wall {wall:.2f} s, workers' cpu {cpu:.2f} s, "
                     f"scheduler and client cpu {main_cpu:.2f} s (run {r + 1}/{repeats}, load "
                     f"{os.getloadavg()[0]:.2f})")
        out["workers"][workers] = {"wall_s": statistics.median(w for _, w, _ in runs),
                                   "cpu_s": statistics.median(c for c, _, _ in runs),
                                   "main_cpu_s": statistics.median(m for _, _, m in runs),
                                   "load_after_runs": loads,
                                   "wall_runs": [w for _, w, _ in runs], "cpu_runs": [c for c, _, _ in runs]}
    out["speedup"] = out["workers"][1]["wall_s"] / out["workers"][2]["wall_s"]
    out["cpu_ratio"] = out["workers"][2]["cpu_s"] / out["workers"][1]["cpu_s"]
    return out


def to_markdown(res: dict) -> str:
    info = res["machine"]
    lines = ["# `usmoe-lp verify` at scale", "",
             "Measured by `benchmarks/bench_verify.py`" + (" --quick" if res["quick"] else "")
             + f" ({res['repeats']} runs each, median; the range in brackets). CPU time is the user + system time "
             "of the process doing the work (all its threads) and of its child processes (CBC); instances per CPU "
             "second = instances per second per core. Timings on a shared machine: compare CPU times, and read "
             "the load average.", "",
             "## Machine", "", machine_markdown(info), ""]
    lines += ["## Throughput (every claim, two independent oracles per claim)", "",
              f"Target: at least {TARGET_RATE:.0f} instances per second per core at 8x4 with the default backends "
              f"({', '.join(DEFAULT_BACKENDS)}).", ""]
    rows = []
    for r in res["throughput"]:
        rows.append([r["path"], r["size"], ", ".join(r["backends"]), r["batch_size"], r["instances"],
                     f"{r['cpu_s']:.2f} ({_spread(r['cpu_runs'])})", f"{r['wall_s']:.2f}",
                     f"{1e3 * r['cpu_s'] / r['instances']:.2f}", f"{r['rate_per_core']:.0f}"])
    lines.append(markdown_table(["path", "size", "backends", "batch", "instances", "CPU s", "wall s",
                                 "CPU ms / instance", "instances / s / core"], rows,
                                ["l", "l", "l", "r", "r", "r", "r", "r", "r"]))
    base = res["throughput"][0]
    for r in res["throughput"][1:]:
        lines.append(f"\nBatches vs {r['path']} ({', '.join(r['backends'])}): "
                     f"{base['rate_per_core'] / r['rate_per_core']:.1f}x the instances per CPU second.")
    verdict = "met" if base["rate_per_core"] >= TARGET_RATE else "**not met**"
    lines += ["", f"Target {TARGET_RATE:.0f} / s / core: {verdict} ({base['rate_per_core']:.0f} at {base['size']}).",
              ""]
    big = res["large"]
    lines += [f"## One {big['size']} instance ({big['claims']} claims: all but `ilp_eq_lp`)", "",
              f"Target: under {TARGET_LARGE_S:.0f} s. Per instance: CPU {big['cpu_s']:.2f} s "
              f"({_spread(big['cpu_runs'])}), wall {big['wall_s']:.2f} s ({_spread(big['wall_runs'])}): "
              + ("met." if big["wall_s"] < TARGET_LARGE_S and big["cpu_s"] < TARGET_LARGE_S else "**not met**."), ""]
    if big["breakdown"]:
        lines += ["Each claim alone on a fresh batch of one (cold: it builds and solves what it needs; in a run the "
                  "claims share programs, solves and masks):", ""]
        lines.append(markdown_table(["claim", "CPU s", "wall s"],
                                    [[f"`{c}`", f"{v['cpu_s']:.3f}", f"{v['wall_s']:.3f}"]
                                     for c, v in big["breakdown"].items()], ["l", "r", "r"]))
        lines.append("")
    sc = res.get("scaling")
    lines += ["## Scaling on a local Dask cluster, 1 -> 2 workers", ""]
    if sc is None:
        lines += ["Skipped (`--quick`: no cluster in the smoke run).", ""]
    else:
        lines += [f"{sc['instances']} instances of 8x4 (every family, k = 1 and 2, every claim, default backends) "
                  f"in {sc['tasks']} batches; wall time of `run_verify` (cluster start-up and each worker's first "
                  "imports excluded), the workers' CPU time, and the CPU time of this process (scheduler and "
                  "client threads).", ""]
        rows = [[w, f"{v['wall_s']:.2f} ({_spread(v['wall_runs'])})", f"{v['cpu_s']:.2f}", f"{v['main_cpu_s']:.2f}",
                 f"{sc['instances'] / v['wall_s']:.0f}", "/".join(f"{x:.1f}" for x in v["load_after_runs"])]
                for w, v in sc["workers"].items()]
        lines.append(markdown_table(["workers", "wall s", "workers' CPU s", "scheduler + client CPU s",
                                     "instances / s", "1-min load after each run"], rows,
                                    ["r", "r", "r", "r", "r", "r"]))
        verdict = "met" if sc["speedup"] >= TARGET_SCALING else "**not met**"
        lines += ["", f"Speed-up 1 -> 2 workers: {sc['speedup']:.2f}x in wall time (near-linear: >= {TARGET_SCALING}x; "
                  f"{verdict}); the workers' CPU time for the same work is {sc['cpu_ratio']:.2f}x that of one "
                  "worker (1.00: splitting the work costs nothing extra). The machine has "
                  f"{info['usable_cores']} usable cores shared with other work: the wall-time speed-up can only "
                  "reach 2x when both are free.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes and no cluster (smoke run, seconds)")
    ap.add_argument("--out", type=Path, help=f"directory for {RESULTS_NAME} (default: benchmarks/, or a new "
                    "temporary directory with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per measurement (default 3; 1 with --quick)")
    ap.add_argument("--trials", type=int, default=256, help="trials per family and k at 8x4 (default 256)")
    ap.add_argument("--per-instance", type=int, default=40, help="instances for the one-at-a-time path (40)")
    ap.add_argument("--scaling-trials", type=int, default=256,
                    help="trials per family and k of the scaling run (default 256: 4608 instances)")
    args = ap.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    out_dir = results_dir(args.out, args.quick)
    info = machine_info()
    res: dict = {"quick": args.quick, "repeats": repeats, "machine": info}
    if args.quick:
        fams, size, trials, count, large = ("gaussian",), (8, 4), 4, 2, (16, 8)
    else:
        fams, size, trials, count, large = tuple(FAMILIES), (8, 4), args.trials, args.per_instance, (1024, 64)
    _log("warm-up (imports, first solves)")
    run_verify(VerifyConfig(families=("gaussian",), sizes=((4, 3),), ks=(1,), trials=2, shrink=False), progress=False)
    _log("throughput")
    with one_torch_thread():
        res["throughput"] = [throughput(size, fams, trials, repeats),
                             per_instance(size, count, DEFAULT_BACKENDS, repeats)]
        if not args.quick:
            res["throughput"].append(per_instance(size, count, FORMER_BACKENDS, 1))
            before = per_instance_before(size, count)
            if before is not None:
                res["throughput"].append(before)
    _log("large instance")
    res["large"] = large_instance(large, repeats, breakdown=True)
    if not args.quick:
        _log("scaling")
        res["scaling"] = scaling(args.scaling_trials, repeats)
    info["load_average_end"] = list(os.getloadavg())
    md = to_markdown(res)
    (out_dir / RESULTS_NAME).write_text(md)
    print(md)
    _log(f"wrote {out_dir / RESULTS_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
