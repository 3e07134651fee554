"""Prefix-consistency (information leakage) speed: incremental algorithm vs re-routing every prefix.

    python benchmarks/bench_leakage.py           # 4096 x 64 (target < 1 s per router), brute force at 1024 x 64
    python benchmarks/bench_leakage.py --quick   # 512 x 64, brute force at 128 x 64 (smoke run)

One core (``torch.set_num_threads(1)``), float32 softmax scores of standard-normal logits, one
sequence. ``fast`` is :func:`usmoe_lp.diagnostics.leakage.prefix_consistency` (two heaps over a
single ranking, only the entries that cross the threshold move). ``brute`` routes every prefix 1..t
from scratch with the routers of :mod:`usmoe_lp.routing` and computes the same statistics (causal
row, displacement by comparing consecutive prefix routings); it is timed at a smaller T, and the
speed-up is taken at that T. ``agree`` checks that both give identical statistics. Each figure is
the median of a few runs after one warm-up; timings are reported, never asserted. Prints a table to
stdout and writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from usmoe_lp.diagnostics.leakage import prefix_consistency  # noqa: E402
from usmoe_lp.routing import expert_choice, global_topc  # noqa: E402

CONFIGS = [("ec", {"k": 8, "capacity_factor": 1.0}), ("ec", {"k": 2, "capacity_factor": 1.25}),
           ("usmoe", {"k": 1, "kbar": 8.0}), ("usmoe", {"k": 1, "kbar": 1.5})]


def _median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _brute(s: np.ndarray, router: str, params: dict) -> tuple[float, float, list[int]]:
    """(flip_rate, token_flip_rate, displacement histogram) by routing every prefix from scratch."""
    T, N = s.shape
    st = torch.from_numpy(s)
    rows, prev, disp = [], None, []
    for t in range(1, T + 1):
        if router == "ec":
            m = expert_choice(st[:t], capacity_factor=params["capacity_factor"], k=params["k"]).mask
        else:
            m = global_topc(st[:t], kbar=params["kbar"]).mask
        rows.append(m[t - 1])
        if prev is not None:
            disp.append(int((m[: t - 1] != prev).any(-1).sum()))
        prev = m
    diff = torch.stack(rows) != prev
    hist = np.bincount(np.asarray(disp, dtype=np.int64)).tolist() if disp else []
    return int(diff.sum()) / (T * N), int(diff.any(-1).sum()) / T, hist


def _scores(T: int, N: int, seed: int = 0) -> np.ndarray:
    z = torch.from_numpy(np.random.default_rng(seed).standard_normal((T, N)).astype(np.float32))
    return torch.softmax(z, -1).numpy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--tokens", type=int, default=None, help="T of the fast timing (default 4096; quick 512)")
    ap.add_argument("--brute-tokens", type=int, default=None, help="T of the brute-force timing (default 1024)")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    T = args.tokens or (512 if args.quick else 4096)
    Tb = args.brute_tokens or (128 if args.quick else 1024)
    N = args.experts
    repeats = args.repeats or (2 if args.quick else 5)
    big, small = _scores(T, N), _scores(Tb, N, seed=1)
    print(f"prefix consistency, one sequence, float32 scores, N = {N}, 1 thread; median of {repeats} runs")
    head = ["router", "params", f"fast T={T} (s)", f"fast T={Tb} (s)", f"brute T={Tb} (s)", "speed-up", "agree",
            "flip_rate", "displacement_mean"]
    rows = []
    for router, params in CONFIGS:
        if router == "ec" and params["k"] > N:
            continue
        fast_big = _median_s(lambda r=router, p=params: prefix_consistency(big, r, **p), repeats)
        fast_small = _median_s(lambda r=router, p=params: prefix_consistency(small, r, **p), repeats)
        t0 = time.perf_counter()
        brute = _brute(small, router, params)
        brute_s = time.perf_counter() - t0
        ref = prefix_consistency(small, router, **params)
        agree = brute == (ref.flip_rate, ref.token_flip_rate, ref.displacement_histogram)
        stats = prefix_consistency(big, router, **params)
        rows.append([router, ", ".join(f"{k}={v}" for k, v in params.items()), f"{fast_big:.3f}",
                     f"{fast_small:.4f}", f"{brute_s:.2f}", f"{brute_s / fast_small:.0f}x", "yes" if agree else "NO",
                     f"{stats.flip_rate:.5f}", f"{stats.displacement_mean:.3f}"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |")
    print("| " + " | ".join("-" * w for w in widths) + " |")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    return 0 if all(r[6] == "yes" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
