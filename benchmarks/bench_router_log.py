"""Router-log writer throughput: ``RouterLogWriter`` vs plain ``safetensors`` shards, and read-back.

    python benchmarks/bench_router_log.py                    # 8 layers x 256k tokens x 64 experts
    python benchmarks/bench_router_log.py --quick --out DIR  # 4 layers x 16k tokens (smoke run)

Writes a synthetic router log (bf16 and float32 logits, plus the int64 token_ids / sequence_ids /
positions every log holds) with :class:`RouterLogWriter` in its real setting (``shard_tokens=65536``,
fsync on), appending chunks of 4096 tokens. Baseline: ``safetensors.torch.save_file`` of the very
same tensors in the same shard sizes, with and without fsync, so the ratio is the cost of the
writer's validation (finiteness check), buffering copies, sha256 and manifest rewrites. Read-back:
``RouterLog.open(path).iter_chunks(layer, chunk_tokens=65536)`` over every layer vs
``safetensors.torch.load_file`` of each shard. Also reports the writer's ``max_buffered_bytes``
against the shard size (bounded memory).

Throughput is MB/s of *logits* (1 MB = 10^6 bytes); the metadata tensors are written too but not
counted. Each figure is the median of ``--repeats`` runs (default 3) after one untimed warm-up run
of each variant, and each run's files are deleted before the next; ``os.sync()`` runs, untimed,
before each timed write so dirty pages of one run do not land in the next. Reads are of files just
written, i.e. from a warm page cache (page cache is not dropped), and every logits tensor read is
passed over once (a max over its bytes) on both paths, since ``load_file`` maps lazily. Timings are
reported, never asserted. Writes ``router_log_results.md`` into ``--out`` (default ``benchmarks/``; with
``--quick`` and no ``--out``, a new temporary directory).
"""

from __future__ import annotations

import argparse
import os
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
from common import fmt_s, machine_info, machine_markdown, markdown_table, results_dir  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from usmoe_lp.logs import LayerInfo, RouterLog, RouterLogWriter  # noqa: E402
from usmoe_lp.logs.format import LOGITS, fsync_dir  # noqa: E402

FULL_SIZE = (8, 262144, 64)    # layers, tokens, experts
QUICK_SIZE = (4, 16384, 64)
SHARD_TOKENS = 65536
APPEND_TOKENS = 4096
READ_CHUNK_TOKENS = 65536
DTYPES = {"bf16": torch.bfloat16, "float32": torch.float32}
RESULTS_NAME = "router_log_results.md"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_data(layers: int, tokens: int, experts: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """The tensors of one synthetic log: ``logits.l<i>`` (tokens, experts) and the int64 metadata."""
    g = torch.Generator().manual_seed(seed)
    data = {f"{LOGITS}l{i}": torch.randn(tokens, experts, generator=g).to(dtype) for i in range(layers)}
    seq_len = 4096
    ids = torch.arange(tokens, dtype=torch.int64)
    data["token_ids"] = torch.randint(0, 32000, (tokens,), generator=g, dtype=torch.int64)
    data["sequence_ids"] = ids // seq_len
    data["positions"] = ids % seq_len
    return data


def logits_bytes(data: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for name, t in data.items() if name.startswith(LOGITS))


# ----------------------------------------------------------------------------- the measured operations
def write_router_log(path: Path, data: dict[str, torch.Tensor], layer_names: list[str], experts: int) -> dict:
    tokens = data["token_ids"].shape[0]
    layers = [LayerInfo(name, num_experts=experts, top_k=2) for name in layer_names]
    with RouterLogWriter(path, layers, shard_tokens=SHARD_TOKENS, fsync=True) as w:
        for a in range(0, tokens, APPEND_TOKENS):
            b = min(a + APPEND_TOKENS, tokens)
            w.append({name: data[LOGITS + name][a:b] for name in layer_names},
                     token_ids=data["token_ids"][a:b], sequence_ids=data["sequence_ids"][a:b],
                     positions=data["positions"][a:b])
    return {"max_buffered_bytes": w.max_buffered_bytes, "shards": len(w.manifest.shards),
            "shard_bytes": [s.bytes for s in w.manifest.shards]}


def write_plain(path: Path, data: dict[str, torch.Tensor], fsync: bool) -> dict:
    """The baseline: one ``save_file`` per shard of the same tensors (fsync the file and the directory)."""
    path.mkdir(parents=True)
    tokens = data["token_ids"].shape[0]
    for index, a in enumerate(range(0, tokens, SHARD_TOKENS)):
        b = min(a + SHARD_TOKENS, tokens)
        file = path / f"{index:05d}.safetensors"
        save_file({name: t[a:b] for name, t in data.items()}, str(file), metadata={"format": "pt"})
        if fsync:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    if fsync:
        fsync_dir(path)
    return {}


def _touch(t: torch.Tensor) -> int:
    """Read every byte of ``t`` once (a max over its bytes viewed as int64) and return its size in bytes.

    ``load_file`` hands back tensors over a lazy mmap; without this the baseline would read nothing.
    Both read paths pay this same pass.
    """
    t.view(torch.uint8).view(torch.int64).max()
    return t.numel() * t.element_size()


def read_router_log(path: Path, verify: str) -> int:
    log = RouterLog.open(path, verify=verify)
    total = 0
    for layer in log.layers:
        for chunk in log.iter_chunks(layer, chunk_tokens=READ_CHUNK_TOKENS):
            total += _touch(chunk.logits)
    return total


def read_plain(path: Path) -> int:
    total = 0
    for file in sorted(path.glob("*.safetensors")):
        for name, t in load_file(str(file)).items():
            if name.startswith(LOGITS):
                total += _touch(t)
    return total


# ----------------------------------------------------------------------------- timing
def _stats(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": len(times)}


def time_writes(variants: dict[str, Callable[[Path], dict]], work: Path, repeats: int) -> tuple[dict, dict]:
    """Time each write variant ``repeats`` times after one untimed run, interleaved; each run into a
    fresh directory, deleted after it (the last run's is kept for the read-back).

    Returns per-variant timing stats and the extra info of each variant's last run.
    """
    for key, fn in variants.items():  # one untimed run each: first-touch memory faults (VMs), lazy imports
        fn(work / f"{key}-warmup")
        shutil.rmtree(work / f"{key}-warmup")
    times: dict[str, list[float]] = {k: [] for k in variants}
    extra: dict[str, dict] = {}
    for r in range(repeats):
        for key, fn in variants.items():
            target = work / f"{key}-{r}"
            os.sync()
            t0 = time.perf_counter()
            extra[key] = fn(target)
            times[key].append(time.perf_counter() - t0)
            if r < repeats - 1:   # keep the last run's files for the read-back
                shutil.rmtree(target)
    return {k: _stats(v) for k, v in times.items()}, extra


def time_reads(variants: dict[str, Callable[[], int]], expected_bytes: int, repeats: int) -> dict:
    for fn in variants.values():  # one untimed pass: warm page cache and lazy imports alike for all
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for key, fn in variants.items():
            t0 = time.perf_counter()
            got = fn()
            times[key].append(time.perf_counter() - t0)
            if got != expected_bytes:
                raise RuntimeError(f"read-back {key} returned {got} bytes of logits, expected {expected_bytes}")
    return {k: _stats(v) for k, v in times.items()}


def filesystem_of(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True, timeout=10).stdout
        fields = out.splitlines()[1].split()
        return f"{fields[1]} on {fields[0]} (mounted at {fields[-1]})"
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------- the benchmark
def run(quick: bool, repeats: int, tmp_parent: str | None = None, log: Callable[[str], None] = _log) -> dict:
    L, T, N = QUICK_SIZE if quick else FULL_SIZE
    work = Path(tempfile.mkdtemp(prefix="usmoe-bench-router-log-", dir=tmp_parent))
    result = {"size": (L, T, N), "repeats": repeats, "tmp": str(work), "filesystem": filesystem_of(work),
              "dtypes": {}}
    layer_names = [f"l{i}" for i in range(L)]
    try:
        for dname, dtype in DTYPES.items():
            data = make_data(L, T, N, dtype)
            nbytes = logits_bytes(data)
            log(f"router-log write {dname}: {L} layers x {T} tokens x {N} experts "
                f"({nbytes / 1e6:.0f} MB of logits), {repeats} runs ...")
            writes, extra = time_writes({
                "writer": lambda p, data=data: write_router_log(p, data, layer_names, N),
                "save_file+fsync": lambda p, data=data: write_plain(p, data, fsync=True),
                "save_file": lambda p, data=data: write_plain(p, data, fsync=False),
            }, work / dname, repeats)
            log(f"router-log read-back {dname} ...")
            log_path = work / dname / f"writer-{repeats - 1}"
            plain_path = work / dname / f"save_file+fsync-{repeats - 1}"
            reads = time_reads({
                "iter_chunks (verify=lazy)": lambda p=log_path: read_router_log(p, "lazy"),
                "iter_chunks (verify=none)": lambda p=log_path: read_router_log(p, "none"),
                "load_file": lambda p=plain_path: read_plain(p),
            }, nbytes, repeats)
            shard_tokens = min(SHARD_TOKENS, T)
            shard_tensor_bytes = sum(t[:shard_tokens].numel() * t.element_size() for t in data.values())
            result["dtypes"][dname] = {
                "logits_bytes": nbytes, "writes": writes, "reads": reads,
                "max_buffered_bytes": extra["writer"]["max_buffered_bytes"],
                "shards": extra["writer"]["shards"], "shard_file_bytes": max(extra["writer"]["shard_bytes"]),
                "shard_tensor_bytes": shard_tensor_bytes, "shard_tokens": shard_tokens,
            }
            del data
            shutil.rmtree(work / dname)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _mbps(nbytes: int, stats: dict) -> float:
    return nbytes / 1e6 / stats["median_s"]


def _time_cell(stats: dict) -> str:
    return f"{fmt_s(stats['median_s'])} ({fmt_s(stats['min_s'])}–{fmt_s(stats['max_s'])})"


def to_markdown(res: dict) -> str:
    L, T, N = res["size"]
    write_rows, read_rows, mem_rows = [], [], []
    for dname, d in res["dtypes"].items():
        nb = d["logits_bytes"]
        base = d["writes"]["save_file+fsync"]
        for key, label in (("writer", "RouterLogWriter (fsync, sha256, manifest)"),
                           ("save_file+fsync", "save_file + fsync (baseline)"),
                           ("save_file", "save_file, no fsync")):
            s = d["writes"][key]
            write_rows.append([dname, label, _time_cell(s), f"{_mbps(nb, s):.0f}",
                               f"{s['median_s'] / base['median_s']:.2f}×"])
        rbase = d["reads"]["load_file"]
        for key, label in (("iter_chunks (verify=lazy)", "RouterLog.iter_chunks, verify=lazy (default: sha256)"),
                           ("iter_chunks (verify=none)", "RouterLog.iter_chunks, verify=none"),
                           ("load_file", "load_file per shard (baseline)")):
            s = d["reads"][key]
            read_rows.append([dname, label, _time_cell(s), f"{_mbps(nb, s):.0f}",
                              f"{s['median_s'] / rbase['median_s']:.2f}×"])
        mem_rows.append([dname, d["shard_tokens"], d["shards"], f"{d['shard_tensor_bytes'] / 1e6:.1f} MB",
                         f"{d['shard_file_bytes'] / 1e6:.1f} MB", f"{d['max_buffered_bytes'] / 1e6:.1f} MB",
                         f"{d['max_buffered_bytes'] / d['shard_tensor_bytes']:.2f}"])
    return "\n\n".join([
        "### Router-log writer throughput",
        f"{L} layers × {T} tokens × {N} experts (bf16: {res['dtypes']['bf16']['logits_bytes'] / 1e6:.0f} MB, "
        f"float32: {res['dtypes']['float32']['logits_bytes'] / 1e6:.0f} MB of logits, plus 24 B/token of int64 "
        f"metadata), shards of {SHARD_TOKENS} tokens, appends of {APPEND_TOKENS} tokens. "
        f"Median of {res['repeats']} runs (min–max); MB/s counts logits only (1 MB = 10^6 B). "
        f"Temporary directory on {res['filesystem']}.",
        "**Write** (time relative to `save_file` + fsync of the same shards):",
        markdown_table(["dtype", "method", "time", "MB/s", "vs baseline"], write_rows,
                       ["l", "l", "r", "r", "r"]),
        f"**Read-back** of every layer, chunks of {READ_CHUNK_TOKENS} tokens (warm page cache; each logits "
        "tensor is passed over once on both paths, as `load_file` maps lazily; relative to `load_file`):",
        markdown_table(["dtype", "method", "time", "MB/s", "vs baseline"], read_rows,
                       ["l", "l", "r", "r", "r"]),
        "**Writer memory**: `max_buffered_bytes` against one shard's tensors (logits + metadata). "
        "The transient `torch.cat` of the buffered parts during a flush is not counted in "
        "`max_buffered_bytes`.",
        markdown_table(["dtype", "shard tokens", "shards", "shard tensors", "shard file", "max_buffered_bytes",
                        "ratio"], mem_rows, ["l", "r", "r", "r", "r", "r", "r"]),
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_SIZE[0]} layers x {QUICK_SIZE[1]} tokens "
                                                          "(smoke run, a few seconds)")
    ap.add_argument("--out", type=Path, help=f"directory for {RESULTS_NAME} (default: benchmarks/, or a new "
                                              "temporary directory with --quick)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (default 3)")
    ap.add_argument("--tmp-dir", help="parent of the scratch directory the logs are written to "
                                      "(default: the system temporary directory)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")

    out_dir = results_dir(args.out, args.quick)

    t_start = time.perf_counter()
    info = machine_info()
    res = run(args.quick, args.repeats, args.tmp_dir)
    elapsed = time.perf_counter() - t_start
    info["load_average_end"] = list(os.getloadavg())
    title = "# usmoe_lp router-log benchmark" + (" (quick smoke run — small sizes, not for comparison)"
                                                 if args.quick else "")
    doc = "\n\n".join([
        title,
        "## Machine\n\n" + machine_markdown(info) + f"\n* Scratch filesystem: {res['filesystem']}",
        "## Results\n\n" + to_markdown(res),
        f"*Generated by `benchmarks/bench_router_log.py{' --quick' if args.quick else ''}` in {elapsed:.0f} s.*",
    ]) + "\n"
    (out_dir / RESULTS_NAME).write_text(doc)
    print(doc)
    _log(f"wrote {out_dir / RESULTS_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
