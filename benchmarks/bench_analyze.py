"""Streaming analysis throughput: ``analyze`` (load / entropy / collapse / margins) against a plain read.

    python benchmarks/bench_analyze.py                       # 8 layers x 1M tokens x 64 experts, bf16
    python benchmarks/bench_analyze.py --quick --out DIR     # 2 layers x 16k tokens (smoke run)

Writes a synthetic bf16 router log once with :class:`RouterLogWriter` (top_k 8; logits = a per-layer
expert bias + a per-sequence offset + gaussian noise; sequences of 4096 tokens; shards of 65536
tokens) into ``--log-dir`` (default: ``<tmp>/usmoe-bench-analyze/L<layers>-T<tokens>-N<experts>``)
and reuses it when a log of the same size is already there. Then measures, on that log:

(a) a plain read: ``RouterLog.open(path, verify=...)`` and ``iter_chunks(layer, 65536)`` over every
    layer, each logits tensor passed over once (a max over its bytes), with ``verify="none"`` and
    the default ``verify="lazy"`` (sha256 of every shard on first use), torch on one thread;
(b) the streaming suite: ``analyze(log, config=AnalyzeConfig(counterfactual=False, leakage=False,
    threads=...))`` (load, entropies, aux/z losses, collapse Grams, margins) in a fresh child process:
    ``--threads 1`` on one core (``threads=False``), ``--threads 2`` with the collapse Grams on a second
    thread (``threads=True``); wall time AND CPU time (``getrusage`` of the child, every thread), tokens/s,
    and both relative to the lazy read (target: within 5x on one core);
(c) the peak memory of (b): the RSS high-water mark (``VmHWM``, see :func:`peak_rss_bytes`) of that
    child, which imports everything, opens the log and runs (b) (target: under 2 GiB); the RSS after
    the imports alone is reported beside it;
(d) scaling with the log length (``--scaling``, default 1M, 2M and 4M tokens on logs of
    ``--scaling-layers`` layers, default 2, to save disk): the one-core suite's wall and CPU time per
    token (expected flat) and its peak RSS (expected constant), each against the lazy read of that log;
(e) Dask (``--dask``, default 1 and 2 workers): a local cluster of that many worker processes
    (``usmoe_lp.cluster.dask_client``; start-up and one warm-up run on the first layer not timed), then
    ``analyze(log, config=..., client=c)`` with the one-core suite; wall time, the workers' CPU time
    (their ``getrusage``) and peak RSS, and the speed-up wall(1 worker) / wall(2 workers) (target >= 1.8);
(f) the cost of the default counterfactual + leakage sample: ``analyze`` with the default
    ``AnalyzeConfig()`` on the first layer, minus the suite on that layer, in a child process too.

Each time is the median of ``--repeats`` runs (default 3; the suite runs in the child, read runs in
this process after one untimed warm-up read so the page cache is warm for every variant). Timings
are reported, never asserted; the machine is shared, so the file states the load average at the start
and the end. Writes ``analyze_results.md`` (and ``--out``'s ``results.json`` when ``--out`` ends in
``.json``) into ``--out`` (default ``benchmarks/``; with ``--quick`` and no ``--out``, a new temporary
directory; ``--quick`` skips (e) unless ``--dask`` is given).
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
SCALING_TOKENS = (1_000_000, 2_000_000, 4_000_000)
QUICK_SCALING_TOKENS = (4096, 8192, 16384)
SCALING_LAYERS = 2
DASK_WORKERS = (1, 2)
DASK_TARGET = 1.8      # wall(1 worker) / wall(2 workers)


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


def cpu_seconds() -> float:
    """User + system CPU time of this process, every thread (``getrusage``)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed_reads(log_dir: Path, repeats: int, expected: int) -> dict:
    """(a): wall and CPU time of the plain read, verify none and lazy, torch on one thread, warm cache."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        read_log(log_dir, "none")  # warm page cache
        walls: dict[str, list[float]] = {"none": [], "lazy": []}
        cpus: dict[str, list[float]] = {"none": [], "lazy": []}
        for _ in range(repeats):
            for verify in walls:
                t, c = time.perf_counter(), cpu_seconds()
                got = read_log(log_dir, verify)
                walls[verify].append(time.perf_counter() - t)
                cpus[verify].append(cpu_seconds() - c)
                if got != expected:
                    raise RuntimeError(f"read {got} bytes of logits, expected {expected}")
    finally:
        torch.set_num_threads(before)
    return {v: {**_stats(walls[v]), "cpu": _stats(cpus[v])} for v in walls}


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


def _worker_usage() -> dict:
    """On a Dask worker: its CPU seconds and RSS high-water mark."""
    return {"cpu_s": cpu_seconds(), "peak_rss_bytes": peak_rss_bytes()}


def _child(args: argparse.Namespace) -> int:
    """Child process: import, open the log, run ``analyze``, print JSON with the RSS high-water mark.

    ``--child suite``: the suite on every layer, ``repeats`` times, in this process (``--threads`` 1: one
    core; 2: the collapse thread). ``--child dask``: the one-core suite on a local cluster of ``--workers``
    processes. ``--child sample``: on the first layer only, the suite once and then the default analysis
    (counterfactual + leakage) once.
    """
    from usmoe_lp.diagnostics.analyze import AnalyzeConfig, analyze
    from usmoe_lp.logs import RouterLog

    torch.set_num_threads(1)
    rss_imports = peak_rss_bytes()
    suite = AnalyzeConfig(counterfactual=False, leakage=False, threads=args.threads > 1)

    def timed(cfg, layers=None, client=None):
        rl = RouterLog.open(args.log_dir)  # default verify="lazy", as the CLI does
        t, c = time.perf_counter(), cpu_seconds()
        res = analyze(rl, config=cfg, layers=layers, client=client)
        return time.perf_counter() - t, cpu_seconds() - c, res

    out = {"rss_after_imports_bytes": rss_imports, "threads": args.threads}
    if args.child == "suite":
        walls, cpus, read_s = [], [], []
        for _ in range(args.repeats):
            wall, cpu, res = timed(suite)
            walls.append(wall)
            cpus.append(cpu)
            read_s.append(res.read_seconds)
        out.update(times_s=walls, cpu_s=cpus, read_seconds=read_s, tokens=sum(la.num_tokens for la in res.layers),
                   aux_loss_pooled=res.aux_loss_pooled)
    elif args.child == "dask":
        from usmoe_lp.cluster import dask_client

        with dask_client(workers=args.workers) as c:
            first = RouterLog.open(args.log_dir, verify="none").layers[:1]
            timed(suite, first, c)  # warm-up: imports on the workers
            walls, cpus = [], []
            for _ in range(args.repeats):
                before = c.run(_worker_usage)
                wall, _, res = timed(suite, None, c)
                after = c.run(_worker_usage)
                walls.append(wall)
                cpus.append(sum(after[w]["cpu_s"] - before[w]["cpu_s"] for w in after))
            out.update(times_s=walls, worker_cpu_s=cpus, workers=len(after),
                       worker_peak_rss_bytes=max(u["peak_rss_bytes"] for u in after.values()),
                       tokens=sum(la.num_tokens for la in res.layers), aux_loss_pooled=res.aux_loss_pooled)
    else:
        layer = RouterLog.open(args.log_dir, verify="none").layers[0]
        t_suite, _, _ = timed(suite, (layer,))
        full = AnalyzeConfig() if args.sample_tokens is None else AnalyzeConfig(sequence_tokens=args.sample_tokens)
        t_full, _, res = timed(full, (layer,))
        out.update(suite_s=t_suite, full_s=t_full, sample_tokens=res.layers[0].sample_tokens,
                   sequence_tokens=full.sequence_tokens)
    out["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(out))
    return 0


def run_child(log_dir: Path, mode: str, threads: int, repeats: int, sample_tokens: int | None = None,
              workers: int | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--log-dir", str(log_dir),
           "--threads", str(threads), "--repeats", str(repeats)]
    if sample_tokens is not None:
        cmd += ["--sample-tokens", str(sample_tokens)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"child {mode} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _suite_child(log_dir: Path, threads: int, repeats: int) -> dict:
    c = run_child(log_dir, "suite", threads, repeats)
    c["time"] = _stats(c.pop("times_s"))
    c["cpu"] = _stats(c.pop("cpu_s"))
    c["read_inside"] = _stats(c.pop("read_seconds"))
    return c


# ----------------------------------------------------------------------------- the benchmark
def run(layers: int, tokens: int, experts: int, *, repeats: int = 3, threads: tuple[int, ...] = (1, 2),
        log_dir: Path | None = None, counterfactual: bool = True, log: Callable[[str], None] = _log,
        seq_len: int = SEQ_LEN, sample_tokens: int | None = None, scaling: tuple[int, ...] = (),
        scaling_layers: int = SCALING_LAYERS, dask: tuple[int, ...] = ()) -> dict:
    """Measure (a)-(f) on the synthetic log (written to / reused from ``log_dir``); returns plain data.

    threads: the suite's variants, 1 = one core, 2 = with the collapse thread. scaling: token counts of
    (d), on logs of ``scaling_layers`` layers beside ``log_dir`` (default directory when it is None).
    dask: worker counts of (e)."""
    log_dir = log_dir or default_log_dir(layers, tokens, experts, seq_len)
    t0 = time.perf_counter()
    written = ensure_log(log_dir, layers, tokens, experts, log, seq_len)
    res = {"size": [layers, tokens, experts], "top_k": TOP_K, "seq_len": seq_len, "chunk_tokens": CHUNK_TOKENS,
           "repeats": repeats, "log_dir": str(log_dir), "log_written": written,
           "log_seconds": time.perf_counter() - t0,
           "log_bytes": sum(f.stat().st_size for f in log_dir.rglob("*") if f.is_file())}
    total = layers * tokens
    log(f"plain read of {total} tokens, {repeats} runs ...")
    res["read"] = timed_reads(log_dir, repeats, total * experts * 2)
    res["suite"] = {}
    for th in threads:
        what = "one core" if th == 1 else "collapse Grams on a second thread"
        log(f"suite (load/entropy/collapse/margins), {what}, {repeats} runs in a child process ...")
        res["suite"][str(th)] = _suite_child(log_dir, th, repeats)
    res["scaling"] = []
    for n_tok in scaling:
        sdir = log_dir.parent / default_log_dir(scaling_layers, n_tok, experts, seq_len).name  # beside the log
        ensure_log(sdir, scaling_layers, n_tok, experts, log, seq_len)
        log(f"scaling: {scaling_layers} layers x {n_tok} tokens, {repeats} runs ...")
        row = {"layers": scaling_layers, "tokens": n_tok,
               "read": timed_reads(sdir, repeats, scaling_layers * n_tok * experts * 2),
               "suite": _suite_child(sdir, 1, repeats)}
        res["scaling"].append(row)
    res["dask"] = {}
    for w in dask:
        log(f"dask: local cluster of {w} worker(s), {repeats} runs (start-up and warm-up not timed) ...")
        c = run_child(log_dir, "dask", 1, repeats, workers=w)
        c["time"] = _stats(c.pop("times_s"))
        c["worker_cpu"] = _stats(c.pop("worker_cpu_s"))
        res["dask"][str(w)] = c
    if counterfactual:
        th = threads[0]
        log("counterfactual + leakage sample on the first layer ...")
        c = run_child(log_dir, "sample", th, 1, sample_tokens)
        c["sample_cost_s"] = c["full_s"] - c["suite_s"]
        res["sample"] = c
    return res


def ok(res: dict) -> bool:
    """Correctness only (a crash raises before this): every layer's tokens were analysed, on every cluster
    with the same pooled aux loss."""
    L, T, _ = res["size"]
    runs = [*res["suite"].values(), *res.get("dask", {}).values()]
    same = len({c["aux_loss_pooled"] for c in runs}) <= 1 if res.get("dask") else True
    return all(c["tokens"] == L * T for c in runs) and same and all(
        r["suite"]["tokens"] == r["layers"] * r["tokens"] for r in res.get("scaling", []))


def _tps(tokens: int, s: float) -> str:
    return f"{tokens / s / 1e6:.2f} M"


def _span(s: dict) -> str:
    return f"{s['median_s']:.2f} s ({s['min_s']:.2f}–{s['max_s']:.2f})"


def to_markdown(res: dict) -> str:
    L, T, N = res["size"]
    total = L * T
    lazy, lazy_cpu = res["read"]["lazy"]["median_s"], res["read"]["lazy"]["cpu"]["median_s"]
    rows = []
    for verify, label in (("none", "plain read, verify=none"), ("lazy", "plain read, verify=lazy (default)")):
        s = res["read"][verify]
        rows.append([label, _span(s), f"{s['cpu']['median_s']:.2f} s", _tps(total, s["median_s"]),
                     f"{s['median_s'] / lazy:.2f}×", f"{s['cpu']['median_s'] / lazy_cpu:.2f}×", "—"])
    for th, c in res["suite"].items():
        s = c["time"]
        label = "suite, one core" if th == "1" else "suite, collapse Grams on a 2nd thread"
        rows.append([label, _span(s), f"{c['cpu']['median_s']:.2f} s", _tps(total, s["median_s"]),
                     f"**{s['median_s'] / lazy:.2f}×**", f"{c['cpu']['median_s'] / lazy_cpu:.2f}×",
                     f"{c['peak_rss_bytes'] / 2**30:.2f} GiB (imports {c['rss_after_imports_bytes'] / 2**30:.2f})"])
    one = res["suite"].get("1", next(iter(res["suite"].values())))
    ratio = one["time"]["median_s"] / lazy
    worst_rss = max(c["peak_rss_bytes"] for c in res["suite"].values()) / 2**30
    read_inside = one["read_inside"]["median_s"]
    parts = [
        "### Streaming analysis vs a plain read of the log",
        f"{L} layers × {T} tokens × {N} experts, bf16 ({res['log_bytes'] / 1e6:.0f} MB on disk), top_k {res['top_k']}, "
        f"chunks of {res['chunk_tokens']} tokens; median of {res['repeats']} runs (min–max), warm page cache, torch "
        "on one thread. Suite = `analyze(log, config=AnalyzeConfig(counterfactual=False, leakage=False, "
        "threads=...))` in a fresh child process (CPU = its `getrusage`, every thread; peak RSS = its `VmHWM`). "
        "Relative times are against the default (lazy, sha256) read. "
        f"Targets: suite on one core within {READ_TARGET:.0f}× the read "
        f"({'met' if ratio <= READ_TARGET else 'NOT met'}: {ratio:.2f}× wall, "
        f"{one['cpu']['median_s'] / lazy_cpu:.2f}× CPU), peak RSS under "
        f"{RSS_TARGET_GIB:.0f} GiB ({'met' if worst_rss < RSS_TARGET_GIB else 'NOT met'}: {worst_rss:.2f} GiB). "
        f"Of the one-core suite's time, {read_inside:.2f} s is its own reading (sha256, decode, finite check).",
        _table(["what", "wall", "CPU", "tokens/s", "vs read (wall)", "vs read (CPU)", "peak RSS"], rows,
               ["l", "r", "r", "r", "r", "r", "r"]),
    ]
    if res.get("scaling"):
        srows = []
        for r in res["scaling"]:
            n = r["layers"] * r["tokens"]
            s, c, rd = r["suite"]["time"], r["suite"]["cpu"], r["read"]["lazy"]
            srows.append([f"{r['tokens']:,}", r["layers"], _span(s), f"{c['median_s']:.2f} s",
                          f"{s['median_s'] / n * 1e9:.0f} ns", f"{c['median_s'] / n * 1e9:.0f} ns",
                          f"{s['median_s'] / rd['median_s']:.2f}×", f"{r['suite']['peak_rss_bytes'] / 2**30:.2f} GiB"])
        parts += [
            "**Scaling with the log length** (the one-core suite on logs of the same generator, "
            f"{res['scaling'][0]['layers']} layers to save disk; per token = per token of one layer; expected: time "
            "per token flat, peak RSS constant):",
            _table(["tokens per layer", "layers", "wall", "CPU", "wall / token", "CPU / token", "vs read (wall)",
                    "peak RSS"], srows, ["r", "r", "r", "r", "r", "r", "r", "r"]),
        ]
    if res.get("dask"):
        drows, walls = [], {}
        for w, c in res["dask"].items():
            s = c["time"]
            walls[w] = s["median_s"]
            drows.append([w, _span(s), f"{c['worker_cpu']['median_s']:.2f} s", _tps(total, s["median_s"]),
                          f"{s['median_s'] / lazy:.2f}×", f"{c['worker_peak_rss_bytes'] / 2**30:.2f} GiB"])
        text = ("**Dask** (`usmoe_lp.cluster.dask_client(workers=W)`, processes with one thread each, then "
                "`analyze(log, config=..., client=c)`, the one-core suite; cluster start-up and a warm-up run on "
                "the first layer not timed; CPU = the workers' `getrusage`)")
        if "1" in walls and "2" in walls:
            sp = walls["1"] / walls["2"]
            text += (f": 2 workers are **{sp:.2f}×** faster than 1 (target ≥ {DASK_TARGET}: "
                     f"{'met' if sp >= DASK_TARGET else 'NOT met'})")
        parts += [text + ":", _table(["workers", "wall", "workers' CPU", "tokens/s", "vs read (wall)",
                                      "peak RSS per worker"], drows, ["r", "r", "r", "r", "r", "r"])]
    if "sample" in res:
        s = res["sample"]
        parts.append(
            f"**Counterfactual + leakage sample** (`AnalyzeConfig(sequence_tokens={s['sequence_tokens']})`, the rest "
            f"default: TC, EC, USMoE α ∈ {{0.3, 0.5, 0.7}} × k̄ grid, capacity-TC, and the leakage of each; "
            f"{s['sample_tokens']} tokens sampled per layer, whole sequences of {res['seq_len']}), first layer only, "
            f"child process: full analysis {s['full_s']:.2f} s, suite alone "
            f"{s['suite_s']:.2f} s, so the sample costs **{s['sample_cost_s']:.1f} s per layer** (independent of "
            f"the log length: {s['sample_cost_s'] * L:.0f} s for {L} layers); "
            f"peak RSS {s['peak_rss_bytes'] / 2**30:.2f} GiB.")
    return "\n\n".join(parts)


def _table(headers, rows, align) -> str:
    from common import markdown_table

    return markdown_table(headers, rows, align)


def _sizes(text: str) -> tuple[int, ...]:
    return tuple(int(float(x)) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_SIZE[0]} layers x {QUICK_SIZE[1]} tokens, 1 run "
                                                          "(smoke run, a few seconds)")
    ap.add_argument("--layers", type=int, help=f"MoE layers (default {FULL_SIZE[0]})")
    ap.add_argument("--tokens", type=int, help=f"tokens per layer (default {FULL_SIZE[1]})")
    ap.add_argument("--experts", type=int, help=f"experts per layer (default {FULL_SIZE[2]})")
    ap.add_argument("--repeats", type=int, help="timed runs per measurement (default 3; quick 1)")
    ap.add_argument("--threads", default="1,2", help="suite variants: 1 = one core, 2 = the collapse Grams on a "
                                                     "second thread (default 1,2)")
    ap.add_argument("--scaling", help="token counts of the scaling runs, comma-separated (default "
                                      f"{','.join(map(str, SCALING_TOKENS))}; quick "
                                      f"{','.join(map(str, QUICK_SCALING_TOKENS))}; empty: none)")
    ap.add_argument("--scaling-layers", type=int, default=SCALING_LAYERS,
                    help=f"layers of the scaling logs (default {SCALING_LAYERS})")
    ap.add_argument("--dask", help="worker counts of the Dask runs, comma-separated (default "
                                   f"{','.join(map(str, DASK_WORKERS))}; quick: none; empty: none)")
    ap.add_argument("--log-dir", type=Path, help="where the synthetic log is written / reused")
    ap.add_argument("--no-counterfactual", action="store_true", help="skip (f), the counterfactual sample")
    ap.add_argument("--out", help=f"directory for {RESULTS_NAME}, or a file name ending in .json for the raw results "
                                  "(then the markdown goes beside it); default benchmarks/ (quick: a temp dir)")
    ap.add_argument("--sample-tokens", type=int, help="sequence_tokens of the counterfactual sample in (f) "
                                                      f"(default: AnalyzeConfig's; quick {QUICK_SAMPLE_TOKENS})")
    ap.add_argument("--child", choices=("suite", "sample", "dask"), help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, help=argparse.SUPPRESS)
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
    scaling = _sizes(args.scaling) if args.scaling is not None else (QUICK_SCALING_TOKENS if args.quick
                                                                       else SCALING_TOKENS)
    dask = _sizes(args.dask) if args.dask is not None else (() if args.quick else DASK_WORKERS)
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
                  counterfactual=not args.no_counterfactual, seq_len=seq_len, sample_tokens=sample_tokens,
                  scaling=scaling, scaling_layers=args.scaling_layers, dask=dask)
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
