"""The main job on the embedded default: verify, capture, analyse, one report.

:func:`run_demo` runs, with no download and no GPU:

1. a short ``verify`` of the USMoE paper's LP claims on random score matrices (a few seconds);
2. a capture of the router logits of the embedded trained tiny MoE model (:mod:`usmoe_lp.tiny`) on
   held-out text, through the same :func:`usmoe_lp.capture` path as any transformers model;
3. ``analyze`` of that router log with the TC / EC / USMoE / capacity-TC comparison;
4. one report directory whose ``report.html`` ties the two halves together.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from usmoe_lp.report.analyze_report import ANALYZE_OWNED
from usmoe_lp.report.outputs import ROUTER_LOG_OWNED, check_report_location, foreign_check, prefixed
from usmoe_lp.report.verify_report import VERIFY_OWNED
from usmoe_lp.staging import staged_directory
from usmoe_lp.verify import VerifyConfig
from usmoe_lp.verify.runner import command_line

VERIFY_CONFIG = VerifyConfig(sizes=((8, 4), (12, 5), (32, 8)), ks=(1, 2), trials=2, seed=0,
                             backends=("closed_form", "highs", "cbc"), ilp_max_vars=64)
VERIFY_COMMAND = command_line(VERIFY_CONFIG)

DEMO_OWNED: tuple[str, ...] = (r"report\.html", r"summary\.json", r"timings\.json", *prefixed("verify", VERIFY_OWNED),
                               *prefixed("analysis", ANALYZE_OWNED), *prefixed("router-log", ROUTER_LOG_OWNED))
"""What a demo output directory holds (see :func:`usmoe_lp.report.outputs.foreign_entries`)."""


@dataclass(frozen=True)
class DemoResult:
    """Paths and results of a demo run."""

    out: Path
    report: Path
    verify: object
    analysis: object
    log: Path
    seconds: dict[str, float]
    summary: tuple[str, ...]


def capture_heldout(out: str | Path, *, max_tokens: int = 8192, seq_len: int = 256, batch_size: int = 8,
                    model=None, tokenizer=None, overwrite: bool = True, hidden: bool = True) -> Path:
    """Capture the embedded model's router logits on held-out text into a router log at ``out``.

    The held-out documents (never seen in training) are tokenised, cut into sequences of at most
    ``seq_len`` bytes, and fed in batches of ``batch_size`` until ``max_tokens`` tokens are logged.
    ``hidden``: also log the pre-router hidden states (d = 128 here), for the collapse metrics.
    Returns the log's path.
    """
    from usmoe_lp.logs.capture import capture
    from usmoe_lp.tiny import heldout_documents, load_tiny

    if model is None or tokenizer is None:
        model, tokenizer = load_tiny()
    texts = []
    total = 0
    for doc in heldout_documents():
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        for a in range(0, len(ids) - seq_len // 4, seq_len):
            piece = ids[a:a + seq_len]
            texts.append(piece)
            total += len(piece)
            if total >= max_tokens:
                break
        if total >= max_tokens:
            break
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with capture(model, out, overwrite=overwrite, model_name="usmoe-lp tiny (embedded)", fsync=False,
                 hidden=hidden), \
            torch.inference_mode():
        for a in range(0, len(texts), batch_size):
            batch = texts[a:a + batch_size]
            width = max(len(t) for t in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            att = torch.zeros(len(batch), width, dtype=torch.long)
            for i, t in enumerate(batch):  # left padding, as for generation
                ids[i, width - len(t):] = torch.tensor(t)
                att[i, width - len(t):] = 1
            model(input_ids=ids, attention_mask=att)
    return Path(out)


def run_demo(out: str | Path = "out/demo", *, progress: bool = True, max_tokens: int = 8192,
             overwrite: bool = True, overwrite_flag: str = "overwrite=True", out_flag: str = "out") -> DemoResult:
    """Run the whole demo into ``out`` (``verify/``, ``router-log/``, ``analysis/``, ``report.html``).

    The demo is built in a hidden sibling of ``out`` and swapped in only when complete
    (:mod:`usmoe_lp.staging`). ``overwrite`` (default True: ``out/demo`` is the demo's own default)
    replaces an earlier demo output, never a directory holding anything else; False refuses any
    non-empty ``out``. ``overwrite_flag`` / ``out_flag``: how the caller's interface names those
    options, for the messages. The files do not depend on ``out`` and, except ``timings.json``, on
    the time the run took.
    """
    final = Path(out)
    check_report_location(final, what="demo", out_flag=out_flag)
    with staged_directory(final, what="demo output", overwrite=overwrite, foreign=foreign_check(DEMO_OWNED),
                          overwrite_flag=overwrite_flag) as tmp:
        vres, ares, summary, seconds = _run_into(tmp, progress=progress, max_tokens=max_tokens)
    return DemoResult(out=final, report=final / "report.html", verify=vres, analysis=ares, log=final / "router-log",
                      seconds=seconds, summary=summary)


def _run_into(out: Path, *, progress: bool, max_tokens: int):
    from usmoe_lp.diagnostics.analyze import AnalyzeConfig, analyze
    from usmoe_lp.report import write_verify_report
    from usmoe_lp.report.analyze_report import summary_lines, write_analyze_report
    from usmoe_lp.verify import run_verify

    seconds = {}
    t0 = time.perf_counter()
    vres = run_verify(VERIFY_CONFIG, progress=progress)
    write_verify_report(vres, out / "verify", command=VERIFY_COMMAND)
    seconds["verify"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log = capture_heldout(out / "router-log", max_tokens=max_tokens, overwrite=False)
    seconds["capture"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cfg = AnalyzeConfig(alphas=(0.3, 0.5, 0.7), scopes=("sequence", "batch"), sequence_tokens=max_tokens)
    # the log's path inside the demo, not the staging directory the run is built in
    ares = dataclasses.replace(analyze(log, config=cfg), source="router-log")
    write_analyze_report(ares, out / "analysis", title="usmoe-lp analyze: embedded tiny MoE on held-out text")
    seconds["analyze"] = time.perf_counter() - t0

    summary = tuple(_summary(vres, ares, seconds))
    (out / "report.html").write_text(_report_html(out, vres, ares, summary, summary_lines(ares)))
    (out / "summary.json").write_text(json.dumps({"summary": list(summary)}, indent=1) + "\n")
    # the only file that varies between identical runs: how long each step took
    (out / "timings.json").write_text(json.dumps({"seconds": seconds}, indent=1) + "\n")
    return vres, ares, summary, seconds


def _summary(vres, ares, seconds) -> list[str]:
    claims = vres.claim_summary()
    holds = [c["claim"] for c in claims if c["verdict"] == "holds"]
    fails = [c for c in claims if c["verdict"] == "fails"]
    fail_text = "; ".join(f"{c['claim']} ({c['failures']}/{c['trials']})" for c in fails) or "none"
    la0 = ares.layers[0]
    lf = ares.load_frame()
    per = lf[lf["layer"] != "pooled"]
    lines = [f"verify: {len(holds)} of {len(claims)} claims hold on every instance; fail: {fail_text}",
             f"capture: {len(ares.layers)} MoE layers x {la0.num_tokens} held-out tokens, N = {la0.num_experts}, "
             f"k = {la0.top_k}",
             f"load: normalised entropy {per['load_entropy'].min():.3f}-{per['load_entropy'].max():.3f}, "
             f"MaxVio {per['maxvio'].min():.2f}-{per['maxvio'].max():.2f} across layers"]
    cf = ares.counterfactual_frame()
    pooled = cf[cf["layer"] == "pooled"] if not cf.empty else cf
    if not pooled.empty:
        tc = pooled[pooled["router"] == "tc"].iloc[0]
        usm = pooled[(pooled["router"] == "usmoe") & (pooled["kbar"] == la0.top_k) & (pooled["scope"] == "sequence")]
        ec = pooled[pooled["router"] == "ec"]
        if not usm.empty:
            u = usm.loc[usm["coverage"].idxmax()]
            lines.append(f"re-routing at k-bar = k: USMoE ({u['label']}) covers {u['coverage']:.3f} of the probability "
                         f"mass vs TC {tc['coverage']:.3f}, dropping {u['drop_rate']:.1%} of tokens")
            both = pd.concat([f for f in (ec, usm.loc[[u.name]]) if not f.empty])
            leak = [f"{r['label']} {r['flip_rate']:.2%}" for _, r in both.iterrows() if pd.notna(r.get("flip_rate"))]
            kv = u.get("kv_decode_token_flip_rate")
            kv_text = f"; KV-cache decoding of that USMoE changes the experts of {kv:.1%} of tokens" \
                if kv is not None and pd.notna(kv) else ""
            lines.append("leakage (prefix flip rate): TC 0% by construction; " + ", ".join(leak) + kv_text)
    return lines[:5]


def _img(path: Path, alt: str) -> str:
    if not path.exists():
        return ""
    b64 = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<figure><img alt='{html.escape(alt)}' src='data:image/png;base64,{b64}'>" \
           f"<figcaption>{html.escape(alt)}</figcaption></figure>"


def _report_html(out: Path, vres, ares, summary, analysis_lines) -> str:
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(c['claim'])}</td><td>{esc(c['verdict'])}</td><td>{c['failures']} / {c['trials']}</td>"
        f"<td>{esc('' if c['minimal_counterexample'] is None else str(c['minimal_counterexample']['scores']))}</td>"
        "</tr>" for c in vres.claim_summary())
    a = out / "analysis"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>usmoe-lp demo</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px}"
        "th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:13px}"
        "</style></head><body><h1>usmoe-lp demo</h1>",
        "<p>Routing as a linear program, checked on random matrices, then applied to the router logits of a small "
        "MoE language model (transformers OLMoE class) trained on the Python documentation and captured on held-out "
        "text. No download, no GPU.</p>",
        "<h2>Summary</h2><ol>", *[f"<li>{esc(s)}</li>" for s in summary], "</ol>",
        "<h2>1. Theory verification</h2>",
        f"<p>Command: <code>{esc(VERIFY_COMMAND)}</code>. Full report: <a href='verify/report.md'>verify/report.md"
        "</a>, numbers in <a href='verify/report.json'>verify/report.json</a>.</p>",
        "<table><tr><th>claim</th><th>verdict</th><th>failures / trials</th><th>minimal counterexample</th></tr>",
        rows, "</table>",
        _img(out / "verify" / "usmoe_minus_tc.png", "Objective of USMoE minus TC at matched budget (verify)"),
        "<h2>2. Router-log analysis of the embedded model</h2>",
        "<p>Full report: <a href='analysis/report.html'>analysis/report.html</a>; every number: "
        "<a href='analysis/metrics.json'>analysis/metrics.json</a>; the router log: <code>router-log/</code> "
        "(<code>usmoe-lp log info</code>).</p><ul>", *[f"<li>{esc(s)}</li>" for s in analysis_lines], "</ul>",
        _img(a / "load_heatmap.png", "Expert load per layer"),
        _img(a / "sweeps.png", "USMoE alpha x k-bar sweep vs TC and EC"),
        _img(a / "leakage_per_offset.png", "Leakage per offset"),
        _img(a / "experts_per_token.png", "Experts per token per router"),
        "<p>How long each step took: <a href='timings.json'>timings.json</a>.</p>",
        "</body></html>"]
    return "\n".join(parts) + "\n"
