"""Streaming analysis throughput: ``analyze`` (load / entropy / collapse / margins) against a plain read.

    python benchmarks/bench_analyze.py                       # 8 layers x 1M tokens x 64 experts, bf16
    python benchmarks/bench_analyze.py --quick --out DIR     # 2 layers x 16k tokens (smoke run)

Writes a synthetic bf16 router log once with :class:`RouterLogWriter` (top_k 8; logits = a per-layer
expert bias + a per-sequence offset + gaussian noise; sequences of 4096 tokens; shards of 65536
tokens) into ``--log-dir`` (default: ``<tmp>/usmoe-bench-analyze/L<layers>-T<tokens>-N<experts>``)
and reuses it when a log of the same size is already there. Then measures, on that log:

(a) a plain read: ``RouterLog.open(path, verify=...)`` and ``iter_chunks(layer, 65536)`` over every
    layer, each logits tensor passed over once (a max over its bytes), with ``verify="none"`` and
    the default ``verify="lazy"`` (sha256 of every shard on first use);
(b) the streaming suite: ``analyze(log, config=AnalyzeConfig(counterfactual=False, leakage=False))``
    (load, entropies, aux/z losses, collapse Grams, margins), tokens/s and its time relative to the
    lazy-verify read (target: within 5x), with ``torch.set_num_threads`` 1 and 2;
(c) the peak memory of (b): the RSS high-water mark (``VmHWM``, see :func:`peak_rss_bytes`) of a fresh
    child process that imports everything, opens the log and runs (b) (target: under 2 GiB); the
    RSS after the imports alone is reported beside it;
(d) the cost of the default counterfactual + leakage sample: ``analyze`` with the default
    ``AnalyzeConfig()`` on the first layer, minus the suite on that layer, in a child process too
    (with the first of the ``--threads``).

Each time is the median of ``--repeats`` runs (default 3; the suite runs in the child, read runs in
this process after one untimed warm-up read so the page cache is warm for every variant). Timings
are reported, never asserted. Writes ``analyze_results.md`` (and ``--out``'s ``results.json`` when
``--json`` is given) into ``--out`` (default ``benchmarks/``; with ``--quick`` and no ``--out``, a new
temporary directory).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import torch  # noqa: E402

FULL_SIZE = (8, 1_000_000, 64)   # layers, tokens, experts
QUICK_SIZE = (2, 16384, 64)
TOP_K = 8
SEQ_LEN = 4096
QUICK_SEQ_LEN = 256       # --quick: short sequences so that the counterfactual sample stays small
QUICK_SAMPLE_TOKENS = 512
SHARD_TOKENS = 65536
CHUNK_TOKENS = 65536
RESULTS_NAME = "analyze_results.md"
READ_TARGET = 5.0      # suite within this many times the read
RSS_TARGET_GIB = 2.0


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_log_dir(layers: int, tokens: int, experts: int, seq_len: int = SEQ_LEN) -> Path:
    return Path(tempfile.gettempdir()) / "usmoe-bench-analyze" / f"L{layers}-T{tokens}-N{experts}-S{seq_len}"


# ----------------------------------------------------------------------------- the synthetic log
def write_log(path: Path, layers: int, tokens: int, experts: int, seq_len: int = SEQ_LEN, seed: int = 0) -> None:
    """Write the synthetic bf16 log: per layer, logits = bias_l[e] + offset_l[seq] + 1.5 * noise."""
    from usmoe_lp.logs import LayerInfo, RouterLogWriter

    g = torch.Generator().manual_seed(seed)
    names = [f"layer{i}" for i in range(layers)]
    bias = {n: 0.8 * torch.randn(experts, generator=g) for n in names}  # some experts favoured per layer
    n_seq = -(-tokens // seq_len)
    offset = {n: torch.randn(n_seq, generator=g) for n in names}  # common shift per sequence (softmax-invariant)
    infos = [LayerInfo(n, num_experts=experts, top_k=TOP_K, score_function="softmax") for n in names]
    with RouterLogWriter(path, infos, model={"name": "synthetic", "family": "bench"},
                         shard_tokens=SHARD_TOKENS, fsync=False, overwrite=True) as w:
        for a in range(0, tokens, SHARD_TOKENS):
            b = min(a + SHARD_TOKENS, tokens)
            idx = torch.arange(a, b)
            seq = idx // seq_len
            logits = {n: (bias[n] + offset[n][seq, None] + 1.5 * torch.randn(b - a, experts, generator=g))
                      .to(torch.bfloat16) for n in names}
            w.append(logits, token_ids=torch.randint(0, 32000, (b - a,), generator=g), sequence_ids=seq,
                     positions=idx % seq_len)


def ensure_log(path: Path, layers: int, tokens: int, experts: int, log: Callable[[str], None] = _log,
               seq_len: int = SEQ_LEN) -> bool:
    """Reuse the log at ``path`` if it holds this many layers, tokens and experts (the sequence length
    is not checked: the default directory name holds it), else (re)write it. True if written."""
    from usmoe_lp.logs import RouterLog

    try:
        rl = RouterLog.open(path, verify="none")
        if (len(rl.layers) == layers and rl.num_tokens == tokens and rl.complete
                and set(rl.num_experts.values()) == {experts}):
            return False
    except Exception:  # missing or not a log: write it
        pass
    log(f"writing synthetic log {layers} layers x {tokens} tokens x {experts} experts (bf16) to {path} ...")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_log(path, layers, tokens, experts, seq_len)
    return True


# ----------------------------------------------------------------------------- the measured operations
def read_log(path: Path, verify: str) -> int:
    """Read every layer's chunks, passing once over each logits tensor; returns the bytes of logits read."""
    from usmoe_lp.logs import RouterLog

    rl = RouterLog.open(path, verify=verify)
    total = 0
    for layer in rl.layers:
        for chunk in rl.iter_chunks(layer, chunk_tokens=CHUNK_TOKENS):
            t = chunk.logits
            t.view(torch.uint8).view(torch.int64).max()
            total += t.numel() * t.element_size()
    return total


def _stats(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": len(times)}


def peak_rss_bytes() -> int:
    """This process's RSS high-water mark: ``VmHWM`` of /proc/self/status (Linux), else ``ru_maxrss``.

    ``ru_maxrss`` of a child started by fork + exec also counts the RSS of the forked copy of the parent
    before the exec (Linux keeps the maximum over the old memory map), so it would report the parent's
    footprint (here the mapped log pages of the read benchmark) rather than the child's own.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(args: argparse.Namespace) -> int:
    """Child process: import, open the log, run ``analyze``, print JSON with the RSS high-water mark.

    ``--child suite``: the suite on every layer, ``repeats`` times. ``--child sample``: on the first
    layer only, the suite once and then the default analysis (counterfactual + leakage) once.
    """
    from usmoe_lp.diagnostics.analyze import AnalyzeConfig, analyze
    from usmoe_lp.logs import RouterLog

    torch.set_num_threads(args.threads)
    rss_imports = peak_rss_bytes()
    suite = AnalyzeConfig(counterfactual=False, leakage=False)

    def timed(cfg, layers=None):
        rl = RouterLog.open(args.log_dir)  # default verify="lazy", as the CLI does
        t0 = time.perf_counter()
        res = analyze(rl, config=cfg, layers=layers)
        return time.perf_counter() - t0, res

    out = {"rss_after_imports_bytes": rss_imports, "threads": torch.get_num_threads()}
    if args.child == "suite":
        times, read_s = [], []
        for _ in range(args.repeats):
            t, res = timed(suite)
            times.append(t)
            read_s.append(res.read_seconds)
        out.update(times_s=times, read_seconds=read_s, tokens=sum(la.num_tokens for la in res.layers),
                   aux_loss_pooled=res.aux_loss_pooled)
    else:
        layer = RouterLog.open(args.log_dir, verify="none").layers[0]
        t_suite, _ = timed(suite, (layer,))
        full = AnalyzeConfig() if args.sample_tokens is None else AnalyzeConfig(sequence_tokens=args.sample_tokens)
        t_full, res = timed(full, (layer,))
        out.update(suite_s=t_suite, full_s=t_full, sample_tokens=res.layers[0].sample_tokens,
                   sequence_tokens=full.sequence_tokens)
    out["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(out))
    return 0


def run_child(log_dir: Path, mode: str, threads: int, repeats: int, sample_tokens: int | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--log-dir", str(log_dir),
           "--threads", str(threads), "--repeats", str(repeats)]
    if sample_tokens is not None:
        cmd += ["--sample-tokens", str(sample_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"child {mode} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the benchmark
def run(layers: int, tokens: int, experts: int, *, repeats: int = 3, threads: tuple[int, ...] = (1, 2),
        log_dir: Path | None = None, counterfactual: bool = True, log: Callable[[str], None] = _log,
        seq_len: int = SEQ_LEN, sample_tokens: int | None = None) -> dict:
    """Measure (a)-(d) on the synthetic log (written to / reused from ``log_dir``); returns plain data."""
    log_dir = log_dir or default_log_dir(layers, tokens, experts, seq_len)
    t0 = time.perf_counter()
    written = ensure_log(log_dir, layers, tokens, experts, log, seq_len)
    res = {"size": [layers, tokens, experts], "top_k": TOP_K, "seq_len": seq_len, "chunk_tokens": CHUNK_TOKENS,
           "repeats": repeats, "log_dir": str(log_dir), "log_written": written,
           "log_seconds": time.perf_counter() - t0,
           "log_bytes": sum(f.stat().st_size for f in log_dir.rglob("*") if f.is_file())}
    total = layers * tokens
    expected = total * experts * 2
    log(f"plain read of {total} tokens, {repeats} runs ...")
    read_log(log_dir, "none")  # warm page cache
    reads: dict[str, list[float]] = {"none": [], "lazy": []}
    for _ in range(repeats):
        for verify in reads:
            t = time.perf_counter()
            got = read_log(log_dir, verify)
            reads[verify].append(time.perf_counter() - t)
            if got != expected:
                raise RuntimeError(f"read {got} bytes of logits, expected {expected}")
    res["read"] = {v: _stats(ts) for v, ts in reads.items()}
    res["suite"] = {}
    for th in threads:
        log(f"suite (load/entropy/collapse/margins), torch threads {th}, {repeats} runs in a child process ...")
        c = run_child(log_dir, "suite", th, repeats)
        c["time"] = _stats(c.pop("times_s"))
        c["read_inside"] = _stats(c.pop("read_seconds"))
        res["suite"][str(th)] = c
    if counterfactual:
        th = threads[0]
        log(f"counterfactual + leakage sample on the first layer, torch threads {th} ...")
        c = run_child(log_dir, "sample", th, 1, sample_tokens)
        c["sample_cost_s"] = c["full_s"] - c["suite_s"]
        res["sample"] = c
    return res


def ok(res: dict) -> bool:
    """Correctness only (a crash raises before this): every layer's tokens were analysed."""
    L, T, _ = res["size"]
    return all(c["tokens"] == L * T for c in res["suite"].values())


def _tps(tokens: int, s: float) -> str:
    return f"{tokens / s / 1e6:.2f} M"


def to_markdown(res: dict) -> str:
    L, T, N = res["size"]
    total = L * T
    lazy = res["read"]["lazy"]["median_s"]
    none = res["read"]["none"]["median_s"]
    rows = []
    for verify, label in (("none", "plain read, verify=none"), ("lazy", "plain read, verify=lazy (default)")):
        s = res["read"][verify]
        rows.append([label, "—", f"{s['median_s']:.2f} s ({s['min_s']:.2f}–{s['max_s']:.2f})",
                     _tps(total, s["median_s"]), f"{s['median_s'] / lazy:.2f}×", "—"])
    for th, c in res["suite"].items():
        s = c["time"]
        rows.append(["`analyze` load/entropy/collapse/margins", th,
                     f"{s['median_s']:.2f} s ({s['min_s']:.2f}–{s['max_s']:.2f})", _tps(total, s["median_s"]),
                     f"{s['median_s'] / lazy:.2f}× ({s['median_s'] / none:.2f}× verify=none)",
                     f"{c['peak_rss_bytes'] / 2**30:.2f} GiB (imports {c['rss_after_imports_bytes'] / 2**30:.2f})"])
    worst = max(c["time"]["median_s"] for c in res["suite"].values()) / lazy
    worst_rss = max(c["peak_rss_bytes"] for c in res["suite"].values()) / 2**30
    parts = [
        "### Streaming analysis vs a plain read of the log",
        f"{L} layers × {T} tokens × {N} experts, bf16 ({res['log_bytes'] / 1e6:.0f} MB on disk), top_k {res['top_k']}, "
        f"chunks of {res['chunk_tokens']} tokens; median of {res['repeats']} runs (min–max), warm page cache. "
        "Suite = `analyze(log, config=AnalyzeConfig(counterfactual=False, leakage=False))` in a fresh child process "
        "(peak RSS = its `VmHWM`). Relative times are against the default (lazy, sha256) read. "
        f"Targets: suite within {READ_TARGET:.0f}× the read "
        f"({'met' if worst <= READ_TARGET else 'NOT met'}: worst {worst:.2f}×), peak RSS under "
        f"{RSS_TARGET_GIB:.0f} GiB ({'met' if worst_rss < RSS_TARGET_GIB else 'NOT met'}: {worst_rss:.2f} GiB).",
        _table(["what", "torch threads", "time", "tokens/s", "vs read", "peak RSS"], rows,
               ["l", "r", "r", "r", "r", "r"]),
    ]
    if "sample" in res:
        s = res["sample"]
        parts.append(
            f"**Counterfactual + leakage sample** (`AnalyzeConfig(sequence_tokens={s['sequence_tokens']})`, the rest "
            f"default: TC, EC, USMoE α ∈ {{0.3, 0.5, 0.7}} × k̄ grid, capacity-TC, and the leakage of each; "
            f"{s['sample_tokens']} tokens sampled per layer, whole sequences of {res['seq_len']}), first layer only, "
            f"torch threads {s['threads']}, child process: full analysis {s['full_s']:.2f} s, suite alone "
            f"{s['suite_s']:.2f} s, so the sample costs **{s['sample_cost_s']:.1f} s per layer** (independent of "
            f"the log length: {s['sample_cost_s'] * L:.0f} s for {L} layers); "
            f"peak RSS {s['peak_rss_bytes'] / 2**30:.2f} GiB.")
    return "\n\n".join(parts)


def _table(headers, rows, align) -> str:
    from common import markdown_table

    return markdown_table(headers, rows, align)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_SIZE[0]} layers x {QUICK_SIZE[1]} tokens, 1 run "
                                                          "(smoke run, a few seconds)")
    ap.add_argument("--layers", type=int, help=f"MoE layers (default {FULL_SIZE[0]})")
    ap.add_argument("--tokens", type=int, help=f"tokens per layer (default {FULL_SIZE[1]})")
    ap.add_argument("--experts", type=int, help=f"experts per layer (default {FULL_SIZE[2]})")
    ap.add_argument("--repeats", type=int, help="timed runs per measurement (default 3; quick 1)")
    ap.add_argument("--threads", default="1,2", help="torch thread counts for the suite (default 1,2)")
    ap.add_argument("--log-dir", type=Path, help="where the synthetic log is written / reused")
    ap.add_argument("--no-counterfactual", action="store_true", help="skip (d), the counterfactual sample")
    ap.add_argument("--out", help=f"directory for {RESULTS_NAME}, or a file name ending in .json for the raw results "
                                  "(then the markdown goes beside it); default benchmarks/ (quick: a temp dir)")
    ap.add_argument("--sample-tokens", type=int, help="sequence_tokens of the counterfactual sample in (d) "
                                                      f"(default: AnalyzeConfig's; quick {QUICK_SAMPLE_TOKENS})")
    ap.add_argument("--child", choices=("suite", "sample"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.threads = int(args.threads)
        args.repeats = args.repeats or 1
        return _child(args)

    L, T, N = QUICK_SIZE if args.quick else FULL_SIZE
    L, T, N = args.layers or L, args.tokens or T, args.experts or N
    if min(L, T, N) < 1 or N < TOP_K + 1:
        ap.error(f"need layers, tokens >= 1 and experts > {TOP_K}")
    repeats = args.repeats or (1 if args.quick else 3)
    threads = tuple(int(t) for t in args.threads.split(","))
    seq_len = QUICK_SEQ_LEN if args.quick else SEQ_LEN
    sample_tokens = args.sample_tokens or (QUICK_SAMPLE_TOKENS if args.quick else None)

    from common import results_dir

    out = Path(args.out) if args.out else None
    json_path = None
    if out is not None and out.suffix == ".json":
        json_path, out_dir = out, out.parent
    else:
        out_dir = results_dir(out, args.quick)
    out_dir.mkdir(parents=True, exist_ok=True)

    from common import machine_info, machine_markdown

    t_start = time.perf_counter()
    info = machine_info()
    cleanup = None
    log_dir = args.log_dir
    if log_dir is None and args.quick:
        cleanup = Path(tempfile.mkdtemp(prefix="usmoe-bench-analyze-"))
        log_dir = cleanup / "log"
    try:
        res = run(L, T, N, repeats=repeats, threads=threads, log_dir=log_dir,
                  counterfactual=not args.no_counterfactual, seq_len=seq_len, sample_tokens=sample_tokens)
    finally:
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
    elapsed = time.perf_counter() - t_start
    info["load_average_end"] = list(os.getloadavg())
    res["machine"] = info
    title = "# usmoe_lp streaming-analysis benchmark" + (" (quick smoke run — small sizes, not for comparison)"
                                                         if args.quick else "")
    doc = "\n\n".join([
        title,
        "## Machine\n\n" + machine_markdown(info) + "\n* Shared machine: 2 cores, other jobs may run concurrently",
        "## Results\n\n" + to_markdown(res),
        f"*Generated by `benchmarks/bench_analyze.py{' --quick' if args.quick else ''}` in {elapsed:.0f} s.*",
    ]) + "\n"
    (out_dir / RESULTS_NAME).write_text(doc)
    if json_path is not None:
        json_path.write_text(json.dumps(res, indent=2, default=str))
    print(doc)
    _log(f"wrote {out_dir / RESULTS_NAME}")
    return 0 if ok(res) else 1


if __name__ == "__main__":
    sys.exit(main())
