"""Shared helpers for the benchmarks: timing, score matrices, machine description, markdown."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def time_call(fn: Callable[[], object], repeats: int = 9, warmup: int = 2) -> dict:
    """Wall-clock statistics of ``fn()`` in milliseconds: median/min/max over ``repeats`` runs.

    ``warmup`` untimed calls come first (page faults, caches, lazy imports).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "repeats": repeats}


def make_scores(kind: str, T: int, N: int, seed: int = 0) -> np.ndarray:
    """(T, N) float64 scores: ``gaussian`` (standard normal) or ``softmax`` (rows of softmax(z))."""
    z = np.random.default_rng(seed).standard_normal((T, N))
    if kind == "gaussian":
        return z
    if kind == "softmax":
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        return z
    raise ValueError(f"unknown score distribution {kind!r}")


def random_token_batches(size: dict, count: int) -> list[dict]:
    """``count`` batches of ``size["batch"]`` x ``size["seq"]`` random token ids in [3, ``size["vocab"]``) (ids 0-2
    are pad/bos/eos), with a full attention mask; seeded, the same in every benchmark."""
    import torch

    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(3, size["vocab"], (size["batch"], size["seq"]), generator=g),
             "attention_mask": torch.ones(size["batch"], size["seq"], dtype=torch.long)} for _ in range(count)]


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _cbc_version() -> str:
    try:
        import pulp

        path = pulp.PULP_CBC_CMD().path
        out = subprocess.run([path, "-quit"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.strip().lower().startswith("version"):
                return line.split(":", 1)[1].strip() + " (bundled with PuLP)"
    except Exception:  # informational only
        pass
    return "unknown"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "usmoe_lp"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if out.returncode != 0:
            return "unknown"
        return out.stdout.strip() + (" (usmoe_lp/ modified)" if dirty else "")
    except OSError:
        return "unknown"


def machine_info() -> dict:
    """What the numbers were measured on: cores, CPU model, memory and library versions."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        usable = os.cpu_count()
    try:
        import torch

        torch_threads = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        torch_threads = None
    mem = _mem_total_gib()
    return {
        "load_average": list(os.getloadavg()),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": None if mem is None else round(mem, 1),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "scipy": _version("scipy"),
        "highspy": _version("highspy"),
        "pulp": _version("pulp"),
        "cbc": _cbc_version(),
        "torch": _version("torch"),
        "torch_threads": torch_threads,
        "usmoe_lp": _version("usmoe-lp"),
        "git_commit": _git_commit(),
    }


def machine_markdown(info: dict) -> str:
    mem = f"{info['memory_gib']} GiB RAM" if info.get("memory_gib") else "RAM unknown"
    return "\n".join([
        f"* Date: {info['date']}",
        f"* CPU: {info['cpu_model']}, {info['logical_cores']} logical cores "
        f"({info['usable_cores']} usable), {mem}",
        f"* Platform: {info['platform']}, Python {info['python']}",
        f"* numpy {info['numpy']}, scipy {info['scipy']}, highspy {info['highspy']}, "
        f"PuLP {info['pulp']} (CBC {info['cbc']}), torch {info['torch']} "
        f"({info['torch_threads']} threads)",
        f"* usmoe_lp {info['usmoe_lp']}, git {info['git_commit']}",
        "* Load average (1/5/15 min) at start: "
        + "/".join(f"{x:.2f}" for x in info["load_average"])
        + (f", at end: {'/'.join(f'{x:.2f}' for x in info['load_average_end'])}"
           if info.get("load_average_end") else "")
        + (" — **other work was running on the machine at the start; timings may be inflated**"
           if info["load_average"][0] > 0.5 * (info["usable_cores"] or 1) else ""),
    ])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]],
                   align: Sequence[str] | None = None) -> str:
    """A GitHub markdown table; ``align`` holds ``l`` or ``r`` per column."""
    align = align or ["l"] * len(headers)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "—"
    if ms < 1:
        return f"{ms * 1e3:.0f} µs"
    if ms < 1000:
        return f"{ms:.2f} ms"
    return f"{ms / 1e3:.2f} s"


def fmt_s(s: float | None) -> str:
    return "—" if s is None else fmt_ms(s * 1e3)


def results_dir(out, quick: bool) -> Path:
    """Where a benchmark writes its results: ``out`` when given; else a new temporary directory for a
    ``--quick`` smoke run (so it never overwrites the committed tables); else ``benchmarks/`` itself.
    The directory is created."""
    if out is not None:
        path = Path(out)
    elif quick:
        path = Path(tempfile.mkdtemp(prefix="usmoe-bench-"))
    else:
        path = Path(__file__).resolve().parent
    path.mkdir(parents=True, exist_ok=True)
    return path

