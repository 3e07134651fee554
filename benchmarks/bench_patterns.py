"""The extra CPU of the routing patterns in ``analyze``'s streaming pass, per 1M tokens x 64 experts x k = 8.

    python benchmarks/bench_patterns.py                  # 2 layers x 1M tokens x 64 experts, k = 8, bf16
    python benchmarks/bench_patterns.py --quick          # 2 layers x 65536 tokens (smoke run)

The synthetic log is bench_analyze.py's (:func:`bench_analyze.ensure_log`: bf16 logits = a per-layer expert bias
+ a per-sequence offset + noise, sequences of 4096 tokens, random token ids below 32000), reused when present.
Measures, in this process on one thread (torch on one thread, ``threads=False``, numpy's BLAS on one thread:
``OPENBLAS_NUM_THREADS=1`` unless set), the CPU time
(``time.process_time``) of ``analyze(log, config=AnalyzeConfig(counterfactual=False, leakage=False,
threads=False, patterns=...))`` with the patterns off and on (median of ``--repeats`` runs each), and their
difference per layer and 1M tokens; then where the pattern time goes on one 65536-token chunk of one layer: the
ranking of the selection (:func:`usmoe_lp.diagnostics.stream.ranked_selection`), building the validated
:class:`~usmoe_lp.diagnostics.routed.Routed`, each partial of :class:`~usmoe_lp.diagnostics.patterns.PatternStream`
and a layer transition (:class:`~usmoe_lp.diagnostics.transitions.TransitionPartial`). Timings are printed (and
written to ``--out`` as JSON when given), never asserted; the load average is printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # numpy's BLAS on one thread too
    os.environ.setdefault(_var, "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import torch  # noqa: E402
from bench_analyze import TOP_K, default_log_dir, ensure_log  # noqa: E402

FULL = (2, 1_000_000, 64)
QUICK = (2, 65536, 64)
CHUNK = 65536


def _cpu(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return statistics.median(times)


def suite_seconds(log_dir: Path, patterns: bool, repeats: int) -> float:
    """CPU seconds of the streaming suite over the whole log (one thread)."""
    from usmoe_lp.diagnostics import AnalyzeConfig, analyze

    cfg = AnalyzeConfig(counterfactual=False, leakage=False, threads=False, patterns=patterns)
    return _cpu(lambda: analyze(log_dir, config=cfg, verify="none"), repeats)


def breakdown(log_dir: Path, repeats: int) -> dict[str, float]:
    """CPU seconds of each step of the patterns on the first chunk of the first two layers."""
    from usmoe_lp.diagnostics.coactivation import CoactivationPartial
    from usmoe_lp.diagnostics.locality import LocalityPartial
    from usmoe_lp.diagnostics.routed import Routed, ids_mask
    from usmoe_lp.diagnostics.stream import ranked_selection, recompute_model_selection
    from usmoe_lp.diagnostics.transitions import TransitionPartial
    from usmoe_lp.diagnostics.vocab import VocabPartial
    from usmoe_lp.logs import RouterLog
    from usmoe_lp.routing import probabilities

    log = RouterLog.open(log_dir, verify="none")
    chunks = [log.read(name, 0, min(CHUNK, log.num_tokens)) for name in log.layers[:2]]
    n, N = chunks[0].logits.shape
    meta = dict(token_ids=chunks[0].token_ids.numpy(), sequence_ids=chunks[0].sequence_ids.numpy(),
                positions=chunks[0].positions.numpy())
    scores = [probabilities(c.logits.float(), "softmax") for c in chunks]
    masks = [recompute_model_selection(s, TOP_K).numpy() for s in scores]
    ranked = [ranked_selection(m, s.numpy()) for m, s in zip(masks, scores, strict=True)]
    routed = [Routed(r, N, **meta) for r in ranked]
    mask = routed[0].mask()
    steps = {
        "ranked_selection": lambda: ranked_selection(masks[0], scores[0].numpy()),
        "Routed (validation)": lambda: Routed(ranked[0], N, **meta),
        "Routed.mask (built once per chunk)": lambda: ids_mask(ranked[0], N),
        "coactivation": lambda: CoactivationPartial.empty(N).update(routed[0], mask),
        "vocab": lambda: VocabPartial.empty(N).update(routed[0]),
        "locality": lambda: LocalityPartial.empty(N).update(routed[0], mask),
        "transition (one layer pair)": lambda: TransitionPartial.empty(N, N).update(routed[0], routed[1]),
    }
    out = {name: _cpu(fn, repeats) * 1_000_000 / n for name, fn in steps.items()}
    out["tokens"] = n
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 layers x 65536 tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--log-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = p.parse_args(argv)
    layers, tokens, experts = QUICK if args.quick else FULL
    log_dir = args.log_dir or default_log_dir(layers, tokens, experts)
    torch.set_num_threads(1)
    ensure_log(log_dir, layers, tokens, experts)
    load0 = os.getloadavg()[0]
    off = suite_seconds(log_dir, False, args.repeats)
    on = suite_seconds(log_dir, True, args.repeats)
    per = 1_000_000 / (layers * tokens)
    parts = breakdown(log_dir, args.repeats)
    res = {"layers": layers, "tokens": tokens, "experts": experts, "top_k": TOP_K, "repeats": args.repeats,
           "suite_cpu_s": off, "suite_with_patterns_cpu_s": on,
           "suite_cpu_s_per_1M_token_layers": off * per, "patterns_cpu_s_per_1M_token_layers": (on - off) * per,
           "patterns_breakdown_cpu_s_per_1M_tokens": {k: v for k, v in parts.items() if k != "tokens"},
           "load_average": [load0, os.getloadavg()[0]]}
    print(f"{layers} layers x {tokens:,} tokens x {experts} experts, k = {TOP_K}, one thread "
          f"(load average {load0:.2f} -> {os.getloadavg()[0]:.2f})")
    print(f"  streaming suite:               {off * per:6.2f} s CPU per 1M token-layers")
    print(f"  + routing patterns:            {(on - off) * per:6.2f} s CPU per 1M token-layers "
          f"(suite {on * per:.2f} s with them)")
    print(f"  breakdown on one {parts['tokens']:,}-token chunk, s CPU per 1M tokens:")
    for name, v in res["patterns_breakdown_cpu_s_per_1M_tokens"].items():
        print(f"    {name:36s} {v:6.3f}")
    if args.out is not None:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
