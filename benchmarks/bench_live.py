"""Cost of live routing (``usmoe_lp.live.route``) on a MoE model's forward pass, on CPU.

    python benchmarks/bench_live.py                    # Mixtral hidden 512, FFN 2048, 8 experts top-2, 2 layers; 4x256
    python benchmarks/bench_live.py --quick --out DIR  # hidden 64, FFN 128; 2x32 (smoke run)

A random-weight transformers Mixtral (float32, eval, ``torch.no_grad()``, a full attention mask) runs batches of
B sequences x T tokens six ways, each inside its own ``with route(model, ...)`` context (made and entered anew for
every timed block, so the context's set-up is in the time):

* ``unpatched``: ``model(**batch)``, no context;
* ``native``: ``route(model, "native")``: the model's own selection and weights run unchanged, the registry's
  replay of the router is computed beside them and checked token by token (the overhead of the hooks and the check);
* ``tc k=2``: ``route(model, "tc", k=2)``: the registry's Token Choice on the model's softmax, our selection path
  (selection, the model's combine-weight rule, packing), the same pairs as the model;
* ``usmoe kbar=2``: ``route(model, "usmoe", kbar=2)`` (alpha 0.5, sequence scope): the global top-c, tokens with
  0..N experts, so the experts run on the gathered pairs (:func:`usmoe_lp.live.dispatch.run_experts`);
* ``tc k=1`` and ``usmoe kbar=1``: half the pairs of the same routers.

Each timed block is ``--forwards`` forwards; the variants are interleaved block by block, after one untimed block
each, and a variant's figure is the median over ``--repeats`` blocks of the block time divided by the forwards in it.
Ratios are *paired*: the median over blocks of (variant block / the reference's block of the same round), robust to
load drift on a shared machine. Targets (the live-routing issue): ``native`` under 5 % over ``unpatched``; the wall
time at k-bar = 1 at most 0.65x that at k-bar = 2 with the same router (the compute saving is real, not masked by the
routing's own cost). Where the time goes: one extra block per variant under cProfile (cumulative time of the experts,
the selection, the weight rule, the packing and the pair dispatch). The expected ratios from the FLOPs of the model
(parameter shapes) are shown beside the measured ones.

Correctness is checked, not timed: ``native`` returns the unpatched logits bitwise with no mismatch; ``tc k=2``
computes the same pairs and the same logits up to float rounding; every variant's realised k-bar and expert rows
computed are the expected ones. Timings are reported, never asserted. Writes ``live_results.md`` into ``--out``
(default ``benchmarks/``; with ``--quick`` and no ``--out``, a new temporary directory).
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import torch  # noqa: E402
from common import (  # noqa: E402
    fmt_ms,
    machine_info,
    machine_markdown,
    markdown_table,
    random_token_batches,
    results_dir,
)

from usmoe_lp.live import WEIGHT_RULES, dispatch, route  # noqa: E402
from usmoe_lp.live.route import Route  # noqa: E402
from usmoe_lp.live.selectors import RegistrySelector  # noqa: E402

RESULTS_NAME = "live_results.md"
FULL = dict(hidden=512, intermediate=2048, layers=2, experts=8, top_k=2, heads=8, vocab=1024, batch=4, seq=256)
QUICK = dict(hidden=64, intermediate=128, layers=2, experts=8, top_k=2, heads=2, vocab=256, batch=2, seq=32)
NATIVE_TARGET = 0.05
HALF_TARGET = 0.65
# (label, router, parameters): the variants, in the order they run in each round
VARIANTS = (
    ("unpatched", None, {}),
    ("native", "native", {}),
    ("tc k=2", "tc", {"k": 2}),
    ("usmoe kbar=2", "usmoe", {"kbar": 2.0}),
    ("tc k=1", "tc", {"k": 1}),
    ("usmoe kbar=1", "usmoe", {"kbar": 1.0}),
)
# (variant, reference, what it measures, target or None, "overhead": variant / reference - 1 < target, or "ratio":
# variant / reference <= target)
RATIOS = (
    ("native", "unpatched", "hooks + the native check", NATIVE_TARGET, "overhead"),
    ("tc k=2", "unpatched", "our selection path, same pairs", None, "overhead"),
    ("usmoe kbar=2", "unpatched", "global top-c, gathered pairs", None, "overhead"),
    ("tc k=1", "tc k=2", "half the pairs, TC", HALF_TARGET, "ratio"),
    ("usmoe kbar=1", "usmoe kbar=2", "half the pairs, USMoE", HALF_TARGET, "ratio"),
)
STAGES = ("experts (transformers)", "run_experts (pairs)", "pack", "selector.select", "Route._apply",
          "weight rule", "attention")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_model(size: dict, experts_implementation: str | None):
    """A random-weight Mixtral of ``size`` (seeded), float32, eval."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {} if experts_implementation is None else {"experts_implementation": experts_implementation}
    config = AutoConfig.for_model(
        "mixtral", hidden_size=size["hidden"], intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"], num_attention_heads=size["heads"], num_key_value_heads=size["heads"],
        num_local_experts=size["experts"], num_experts_per_tok=size["top_k"], vocab_size=size["vocab"],
        max_position_embeddings=max(512, size["seq"]), pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float().eval()


def flops_per_token(size: dict, k: float) -> dict:
    """Multiply-adds x 2 per token of one forward, from the parameter shapes: attention projections (q, k, v, o),
    attention scores and values over the causal mean context (T + 1) / 2, router, k experts (gate, up, down),
    lm_head. Norms, rotary, softmax and the embedding lookup are left out."""
    d, i, n, v, T = size["hidden"], size["intermediate"], size["experts"], size["vocab"], size["seq"]
    per_layer = {"attention": 4 * d * d + 2 * d * (T + 1) / 2, "router": d * n, "experts": k * 3 * d * i}
    out = {key: 2 * size["layers"] * val for key, val in per_layer.items()}
    out["lm_head"] = 2 * d * v
    out["total"] = sum(out.values())
    return out


def _stage_codes(model) -> dict[str, list]:
    """The code objects whose cumulative cProfile time each stage of STAGES reports."""
    from transformers.integrations import moe

    impl = getattr(model.config, "_experts_implementation", None) or "eager"
    experts = next(m for name, m in model.named_modules() if name.endswith("mlp.experts"))
    original = inspect.unwrap(type(experts).forward)
    experts_fn = original if impl == "eager" else moe.ALL_EXPERTS_FUNCTIONS.get(impl, original)
    codes = {
        "experts (transformers)": [experts_fn],
        "run_experts (pairs)": [dispatch.run_experts],
        "pack": [dispatch.pack],
        "selector.select": [RegistrySelector.select],
        "Route._apply": [getattr(Route, "_apply", None)],  # private: reported as 0 if it is renamed
        "weight rule": [r.weights for r in WEIGHT_RULES.values()],
    }
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        codes["attention"] = [sdpa_attention_forward]
    except ImportError:  # pragma: no cover - other transformers layouts
        codes["attention"] = []
    return {k: [(f.__code__.co_filename, f.__code__.co_firstlineno, f.__code__.co_name) for f in fns
                if hasattr(f, "__code__")] for k, fns in codes.items()}


def _profile(fn: Callable[[], None], codes: dict[str, list], forwards: int) -> dict:
    """ms per forward of each stage (cumulative cProfile time), and of the whole block under the profiler."""
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    fn()
    prof.disable()
    total = (time.perf_counter() - t0) / forwards * 1e3
    stats = pstats.Stats(prof).stats
    out = {"total_ms": total}
    for stage, keys in codes.items():
        out[stage] = sum(stats[key][3] for key in keys if key in stats) / forwards * 1e3
    return out


def run(quick: bool, repeats: int, forwards: int, experts_implementation: str | None, profile: bool = True,
        log: Callable[[str], None] = _log) -> dict:
    size = QUICK if quick else FULL
    model = make_model(size, experts_implementation)
    impl = getattr(model.config, "_experts_implementation", None) or "eager"
    batches = random_token_batches(size, forwards)
    tokens = size["batch"] * size["seq"]
    last_stats: dict[str, object] = {}

    def variant(label: str, router: str | None, params: dict) -> Callable[[], None]:
        if router is None:
            def plain() -> None:
                for b in batches:
                    model(**b)
            return plain

        def routed() -> None:
            with route(model, router, **params) as r:
                for b in batches:
                    model(**b)
            last_stats[label] = r.stats
        return routed

    fns = {label: variant(label, router, params) for label, router, params in VARIANTS}
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    log(f"live routing: Mixtral hidden {size['hidden']}, FFN {size['intermediate']}, {size['layers']} layers, "
        f"{size['experts']} experts top-{size['top_k']}, experts implementation {impl}, batches "
        f"{size['batch']}x{size['seq']}, {forwards} forwards x {repeats} blocks, {torch.get_num_threads()} threads ...")
    with torch.no_grad():
        for fn in fns.values():  # untimed warm-up block each
            fn()
        for r in range(repeats):
            for key, fn in fns.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                times[key].append((time.perf_counter() - t0) / forwards * 1e3)
                cpu[key].append((time.process_time() - c0) / forwards * 1e3)
            log(f"  block {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.0f} ms" for k, v in times.items()))
        checks = _check(model, batches[0], size)
        prof = {}
        if profile:
            codes = _stage_codes(model)
            prof = {key: _profile(fn, codes, forwards) for key, fn in fns.items()}
    stats = {k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)} for k, v in times.items()}
    for key, v in cpu.items():
        stats[key]["cpu_median_ms"] = statistics.median(v)
    ratios = {f"{a} / {b}": statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))
              for a, b, *_ in RATIOS}
    cpu_ratios = {f"{a} / {b}": statistics.median(x / y for x, y in zip(cpu[a], cpu[b], strict=True))
                  for a, b, *_ in RATIOS}
    routed = {label: {"kbar": s.kbar, "rows_per_token": s.rows_computed / (s.tokens * len(s.layers))}
              for label, s in last_stats.items()}
    return {"quick": quick, "size": size, "experts_implementation": impl, "repeats": repeats, "forwards": forwards,
            "stats": stats,
            "ratios": ratios, "cpu_ratios": cpu_ratios, "tokens_per_forward": tokens,
            "threads": torch.get_num_threads(), "checks": checks, "routed": routed, "profile": prof,
            "parameters": sum(p.numel() for p in model.parameters()),
            "expert_parameters": sum(p.numel() for n, p in model.named_parameters() if ".experts." in n),
            "flops": {kb: flops_per_token(size, kb) for kb in (1, 2)}}


def run_implementations(quick: bool, repeats: int, forwards: int, implementations: list[str | None], threads: int = 1,
                        profile: bool = True, log: Callable[[str], None] = _log) -> list[dict]:
    """:func:`run` for each experts implementation (None: the model's default) with ``threads`` torch threads (the
    caller's setting is restored afterwards)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return [run(quick, repeats, forwards, impl, profile=profile, log=log) for impl in implementations]
    finally:
        torch.set_num_threads(previous)


def _check(model, batch: dict, size: dict) -> dict:
    """The correctness checks of the module docstring, on one batch."""
    tokens = size["batch"] * size["seq"]
    layers = size["layers"]
    ref = model(**batch).logits
    out: dict[str, dict] = {}
    for label, router, params in VARIANTS[1:]:
        with route(model, router, **params) as r:
            logits = model(**batch).logits
        s = r.stats
        expected_kbar = float(params.get("k", params.get("kbar", size["top_k"])))
        c = {"kbar": s.kbar, "kbar_ok": abs(s.kbar - expected_kbar) < 1e-9,
             "rows_ok": s.rows_computed == round(expected_kbar * tokens) * layers,
             "max_abs_diff": float((logits - ref).abs().max())}
        if label == "native":
            c["same_ok"] = bool(torch.equal(logits, ref)) and all(x.native_mismatches == 0 for x in s.layers)
        elif label == "tc k=2":
            c["same_ok"] = c["max_abs_diff"] < 1e-4 * max(1.0, float(ref.abs().max()))
        out[label] = c
    return out


def ok(res: dict) -> bool:
    return all(all(v for k, v in c.items() if k.endswith("_ok")) for c in res["checks"].values())


def _pct(x: float) -> str:
    return f"{x:+.1%}"


def to_markdown(results: list[dict]) -> str:
    """The ``### Live routing`` section: one timing table and one profile table per experts implementation."""
    first = results[0]
    size = first["size"]
    f1, f2 = first["flops"][1], first["flops"][2]
    share = f2["experts"] / f2["total"]
    out = [
        "### Live routing: `route(model, router)` on a Mixtral forward (CPU)", "",
        f"Random-weight Mixtral (transformers), float32: hidden {size['hidden']}, expert FFN {size['intermediate']}, "
        f"{size['layers']} layers, {size['experts']} experts top-{size['top_k']}, {size['heads']} heads, vocab "
        f"{size['vocab']}; {first['parameters'] / 1e6:.1f} M parameters ({first['expert_parameters'] / 1e6:.1f} M in "
        f"experts); batches of {size['batch']} x {size['seq']} tokens (full attention mask), `torch.no_grad()`, "
        f"{first['threads']} torch thread(s). The routed experts are {share:.0%} of the forward's FLOPs at k = 2 "
        f"({f2['total'] / 1e6:.1f} MFLOP per token; {f1['total'] / 1e6:.1f} at k = 1, so an ideal FLOP-bound "
        f"k = 1 / k = 2 ratio is {f1['total'] / f2['total']:.2f}). Median per forward over "
        f"{first['repeats']} blocks of {first['forwards']} forwards, variants interleaved, one untimed block each "
        "first; every routed block makes and enters its own `route(...)` context. Ratios are paired (median over "
        "blocks of the per-block ratio). Wall time is the figure of merit; the process CPU time "
        "(`time.process_time`) is shown beside it because it is steadier when other jobs share the cores.",
    ]
    for res in results:
        stats, base = res["stats"], res["stats"]["unpatched"]["median_ms"]
        rows = []
        for label, *_ in VARIANTS:
            s = stats[label]
            routed = res["routed"].get(label)
            rows.append([label, fmt_ms(s["median_ms"]), f"{fmt_ms(s['min_ms'])}–{fmt_ms(s['max_ms'])}",
                         fmt_ms(s["cpu_median_ms"]), f"{res['tokens_per_forward'] / s['median_ms'] * 1e3:,.0f}",
                         "—" if routed is None else f"{routed['kbar']:.2f}",
                         "—" if routed is None else f"{routed['rows_per_token']:.2f}",
                         "—" if label == "unpatched" else f"{s['median_ms'] / base:.3f}"])
        out += ["", f"#### experts implementation `{res['experts_implementation']}`", "",
                markdown_table(["variant", "median / forward", "min–max", "CPU time / forward", "tokens/s", "k-bar",
                                "expert rows / token / layer", "vs unpatched (medians)"], rows,
                               ["l", "r", "r", "r", "r", "r", "r", "r"]), ""]
        rrows = []
        for a, b, what, target, kind in RATIOS:
            value, cpu = res["ratios"][f"{a} / {b}"], res["cpu_ratios"][f"{a} / {b}"]
            shown = _pct(value - 1) if kind == "overhead" else f"{value:.3f}x"
            shown_cpu = _pct(cpu - 1) if kind == "overhead" else f"{cpu:.3f}x"
            if target is None:
                goal = "—"
            elif res["quick"]:
                goal = "not judged (quick run)"
            elif kind == "overhead":
                goal = f"< {target:.0%}: {'met' if value - 1 < target else 'missed'}"
            else:
                goal = f"<= {target:.2f}x: {'met' if value <= target else 'missed'}"
            rrows.append([f"{a} vs {b}", what, shown, shown_cpu, goal])
        out += [markdown_table(["paired comparison", "what it measures", "wall time: overhead / ratio",
                                "CPU time: overhead / ratio", "target (wall time)"], rrows,
                               ["l", "l", "r", "r", "l"]), ""]
        if res["profile"]:
            prow = []
            for label, *_ in VARIANTS:
                p = res["profile"][label]
                prow.append([label, fmt_ms(p["total_ms"])]
                            + [("—" if p[s] == 0 else f"{fmt_ms(p[s])} ({p[s] / p['total_ms']:.0%})") for s in STAGES])
            out += ["Where the time goes (one block per variant under cProfile, which slows Python-heavy code: "
                    "cumulative ms per forward and share of the profiled forward; the stages nest — "
                    "`Route._apply` holds the weight rule and `pack`, `run_experts` holds the experts call of "
                    "the gathered pairs):", "",
                    markdown_table(["variant", "forward (profiled)", *STAGES], prow, ["l"] + ["r"] * (1 + len(STAGES))),
                    ""]
            own = {label: _own_share(res["profile"][label]) for label, router, _ in VARIANTS if router is not None}
            worst = max(own, key=own.get)
            k1, k2 = res["profile"]["tc k=1"], res["profile"]["tc k=2"]
            out += [f"The routing's own work (selection + `Route._apply` + the gathering in `run_experts` around the "
                    f"experts call) is at most {own[worst]:.1%} of a profiled forward ({worst}). The gap between the "
                    f"measured k = 1 / k = 2 ratios and the FLOP ideal is the work that does not shrink with the "
                    f"pairs: the experts are {k2['experts (transformers)'] / k2['total_ms']:.0%} of the tc k=2 "
                    f"forward and {k1['experts (transformers)'] / k1['total_ms']:.0%} of the tc k=1 forward; "
                    "attention, norms, rotary embeddings, the embedding and lm_head stay.", ""]
        checks = res["checks"]
        out.append("Checks: " + "; ".join(
            f"{label}: k-bar {c['kbar']:.2f} {'ok' if c['kbar_ok'] else 'WRONG'}, "
            f"rows {'ok' if c['rows_ok'] else 'WRONG'}"
            + ("" if "same_ok" not in c else f", logits vs unpatched max |diff| {c['max_abs_diff']:.1e} "
               f"{'ok' if c['same_ok'] else 'WRONG'}")
            for label, c in checks.items()) + ".")
    return "\n".join(out)


def _own_share(p: dict) -> float:
    """Share of a profiled forward spent in the routing itself: the selector, ``Route._apply`` (weight rule and
    packing included) and ``run_experts`` less the experts call it makes."""
    gather = p["run_experts (pairs)"] - p["experts (transformers)"] if p["run_experts (pairs)"] else 0.0
    return (p["selector.select"] + p["Route._apply"] + max(gather, 0.0)) / p["total_ms"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and batches (smoke run)")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for live_results.md (default benchmarks/; a temporary one with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed blocks per variant (default 9; quick 2)")
    parser.add_argument("--forwards", type=int, default=None, help="forwards per block (default 2; quick 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: steadier on a shared machine)")
    parser.add_argument("--experts-implementation", default=None,
                        help="comma-separated transformers experts implementations to run (default: grouped_mm and "
                             "eager; quick: the model's default only)")
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile breakdown")
    args = parser.parse_args(argv)
    out_dir = results_dir(args.out, args.quick)
    impls: list[str | None]
    if args.experts_implementation:
        impls = [s.strip() for s in args.experts_implementation.split(",") if s.strip()]
    else:
        impls = [None] if args.quick else ["grouped_mm", "eager"]
    t_start = time.perf_counter()
    info = machine_info()
    results = run_implementations(args.quick, args.repeats or (2 if args.quick else 9),
                                  args.forwards or (1 if args.quick else 2), impls, threads=args.threads,
                                  profile=not args.no_profile)
    elapsed = time.perf_counter() - t_start
    info["load_average_end"] = list(os.getloadavg())
    info["torch_threads"] = args.threads  # what the timed forwards ran with (the caller's setting is restored)
    passed = all(ok(r) for r in results)
    title = "# Live routing overhead and savings" + (" (quick smoke run — small sizes, not for comparison)"
                                                     if args.quick else "")
    doc = "\n\n".join([
        title,
        "## Machine\n\n" + machine_markdown(info) + "\n* Shared machine: 2 cores, other jobs may run concurrently",
        "## Results\n\n" + to_markdown(results),
        f"*Generated by `benchmarks/bench_live.py{' --quick' if args.quick else ''}` in {elapsed:.0f} s. "
        f"Correctness checks: {'all passed' if passed else 'FAILED'}.*",
    ]) + "\n"
    (out_dir / RESULTS_NAME).write_text(doc)
    print(doc)
    _log(f"wrote {out_dir / RESULTS_NAME}")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
