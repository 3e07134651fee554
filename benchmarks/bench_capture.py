"""Overhead of ``usmoe_lp.logs.capture`` on a MoE model's forward pass, on CPU.

    python benchmarks/bench_capture.py                    # OLMoE: hidden 256, 4 layers, 16 experts, top-2; 8x256
    python benchmarks/bench_capture.py --quick --out DIR  # hidden 64, 2 layers, 8 experts; 2x64 (smoke run)

A random-weight transformers OLMoE model (float32, eval, ``torch.no_grad()``) runs batches of
B sequences x T tokens (a full attention mask) three ways:

* ``no capture``: ``model(**batch)``;
* ``capture (hooks -> log, fsync)``: the same forwards inside ``with capture(model, dir, fsync=True)``,
  every router's raw logits (and token ids / sequence ids / positions) streamed to a router log.
  ``shard_tokens`` is set to ``--forwards`` batches, so each timed block opens a fresh log, runs its
  forwards, then closes it: one shard written with sha256 and fsync, plus the manifest — the
  whole cost of logging those tokens, not only the hooks;
* ``output_router_logits=True``: ``model(**batch, output_router_logits=True)``, the model returning
  the logits itself (kept in memory, nothing written).

Each timed block is ``--forwards`` forwards; the three variants are interleaved block by block, after
one untimed block each, and the figure is the median over ``--repeats`` blocks of the block time
divided by the forwards in it (also min-max). Overhead = median / median of ``no capture`` - 1; paired
overhead = median over blocks of (variant block / the no-capture block of the same round) - 1, robust to load drift.
Target (the capture issue): under 10 % over no capture on CPU. Timings are reported, never asserted.
Writes ``capture_results.md`` into ``--out`` (default ``benchmarks/``).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import torch  # noqa: E402
from common import fmt_ms, machine_info, machine_markdown, markdown_table, random_token_batches  # noqa: E402

from usmoe_lp.logs import RouterLog  # noqa: E402
from usmoe_lp.logs.capture import capture  # noqa: E402

RESULTS_NAME = "capture_results.md"
FULL = dict(hidden=256, layers=4, experts=16, top_k=2, intermediate=512, batch=8, seq=256, vocab=8192)
QUICK = dict(hidden=64, layers=2, experts=8, top_k=2, intermediate=128, batch=2, seq=64, vocab=1024)
TARGET = 0.10


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_model(size: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "olmoe", hidden_size=size["hidden"], intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"], num_attention_heads=max(1, size["hidden"] // 64),
        num_key_value_heads=max(1, size["hidden"] // 64), num_experts=size["experts"],
        num_experts_per_tok=size["top_k"], vocab_size=size["vocab"], max_position_embeddings=max(512, size["seq"]),
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float().eval()


def run(quick: bool, repeats: int, forwards: int, tmp_parent: str | None = None,
        log: Callable[[str], None] = _log) -> dict:
    size = QUICK if quick else FULL
    model = make_model(size)
    batches = random_token_batches(size, forwards)
    tokens_per_block = forwards * size["batch"] * size["seq"]
    work = Path(tempfile.mkdtemp(prefix="usmoe-bench-capture-", dir=tmp_parent))
    counter = iter(range(10**9))
    log_bytes: list[int] = []

    def plain() -> None:
        for b in batches:
            model(**b)

    def router_logits() -> None:
        for b in batches:
            model(**b, output_router_logits=True)

    def captured() -> None:
        path = work / f"log-{next(counter)}"
        with capture(model, path, shard_tokens=tokens_per_block, fsync=True, router_weights=False) as cap:
            for b in batches:
                model(**b)
        if cap.tokens != tokens_per_block:
            raise RuntimeError(f"capture logged {cap.tokens} tokens, expected {tokens_per_block}")
        log_bytes.append(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()))
        shutil.rmtree(path)

    variants = {"no capture": plain, "capture (hooks -> log, fsync)": captured,
                "output_router_logits=True": router_logits}
    times: dict[str, list[float]] = {k: [] for k in variants}
    log(f"capture overhead: OLMoE hidden {size['hidden']}, {size['layers']} layers, {size['experts']} experts "
        f"top-{size['top_k']}, batches {size['batch']}x{size['seq']}, {forwards} forwards x {repeats} blocks, "
        f"{torch.get_num_threads()} threads ...")
    try:
        with torch.no_grad():
            for fn in variants.values():  # untimed warm-up block each
                fn()
            for r in range(repeats):
                for key, fn in variants.items():
                    t0 = time.perf_counter()
                    fn()
                    times[key].append((time.perf_counter() - t0) / forwards * 1e3)
                log(f"  block {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.1f} ms" for k, v in times.items()))
        # a final correctness check: the log holds exactly what the model returns
        path = work / "check"
        with torch.no_grad():
            with capture(model, path, fsync=True) as cap:
                cap.run(batches[:1])
            ref = model(**batches[0], output_router_logits=True).router_logits
        opened = RouterLog.open(path)
        for layer, x in zip(opened.layers, ref, strict=True):
            if not torch.equal(opened.read(layer, 0, opened.num_tokens).logits, x.reshape(-1, x.shape[-1])):
                raise RuntimeError(f"logged logits of {layer} differ from output_router_logits")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stats = {k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)} for k, v in times.items()}
    paired = {k: statistics.median(a / b - 1 for a, b in zip(v, times["no capture"], strict=True))
              for k, v in times.items()}
    return {"paired_overhead": paired, "size": size, "repeats": repeats, "forwards": forwards, "stats": stats,
            "tokens_per_forward": size["batch"] * size["seq"], "log_bytes_per_forward": statistics.median(log_bytes)
            / forwards, "threads": torch.get_num_threads()}


def to_markdown(res: dict) -> str:
    size, stats = res["size"], res["stats"]
    base = stats["no capture"]["median_ms"]
    rows = []
    for key, s in stats.items():
        over = s["median_ms"] / base - 1
        rows.append([key, fmt_ms(s["median_ms"]), f"{fmt_ms(s['min_ms'])}–{fmt_ms(s['max_ms'])}",
                     f"{res['tokens_per_forward'] / s['median_ms'] * 1e3:,.0f}",
                     "—" if key == "no capture" else f"{over:+.1%}",
                     "—" if key == "no capture" else f"{res['paired_overhead'][key]:+.1%}"])
    over = res["paired_overhead"]["capture (hooks -> log, fsync)"]
    verdict = "meets" if over < TARGET else "misses"
    return "\n".join([
        "# Capture overhead on CPU", "",
        f"Random-weight OLMoE (transformers), float32: hidden {size['hidden']}, {size['layers']} layers, "
        f"{size['experts']} experts, top-{size['top_k']}, expert FFN {size['intermediate']}, vocab {size['vocab']}; "
        f"batches of {size['batch']} x {size['seq']} tokens, `torch.no_grad()`, {res['threads']} torch threads. "
        f"Median per forward over {res['repeats']} blocks of {res['forwards']} forwards (variants interleaved, "
        "one untimed block each first). The capture block includes opening the log and closing it "
        f"(one shard of {res['forwards']} forwards' tokens: sha256, fsync, manifest); "
        f"{res['log_bytes_per_forward'] / 1e3:.0f} kB written per forward.", "",
        markdown_table(["variant", "median / forward", "min–max", "tokens/s", "overhead vs no capture",
                        "paired overhead (median of per-block ratios)"], rows, ["l", "r", "r", "r", "r", "r"]), "",
        f"Capture overhead (paired) {over:+.1%}: {verdict} the target of < {TARGET:.0%} over no capture on CPU. "
        "The logged logits were checked equal to `output_router_logits=True` on one batch.", "",
        "## Machine", "", machine_markdown(res["machine"]), "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and batches (smoke run)")
    parser.add_argument("--out", type=Path, default=HERE, help="directory for capture_results.md")
    parser.add_argument("--repeats", type=int, default=None, help="timed blocks per variant (default 7; quick 2)")
    parser.add_argument("--forwards", type=int, default=None, help="forwards per block (default 4; quick 2)")
    parser.add_argument("--tmp-dir", default=None, help="parent directory of the scratch logs")
    args = parser.parse_args(argv)
    info = machine_info()
    res = run(args.quick, args.repeats or (2 if args.quick else 7), args.forwards or (2 if args.quick else 4),
              args.tmp_dir)
    import os

    res["machine"] = {**info, "load_average_end": list(os.getloadavg())}
    md = to_markdown(res)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / RESULTS_NAME).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
