"""The main job on the embedded default: verify, capture, analyse, one report.

:func:`run_demo` runs, with no download and no GPU:

1. a short ``verify`` of the USMoE paper's LP claims on random score matrices (a few seconds);
2. a capture of the router logits of the embedded trained tiny MoE model (:mod:`usmoe_lp.tiny`) on
   held-out text, through the same :func:`usmoe_lp.capture` path as any transformers model;
3. ``analyze`` of that router log with the TC / EC / USMoE / capacity-TC comparison;
4. a short live ``evaluate`` of router settings in the same model (:func:`usmoe_lp.live.evaluate.evaluate`):
   native, TC at k = 1 and 2, USMoE at k-bar 1, 1.5 and 2 (alpha 0.5) and Expert Choice, each routing the model
   itself, scored on the beginning of every held-out document (at most two windows each: the first
   ``min(509, max(64, max_tokens // 16))`` bytes; 9 documents, the bootstrap's resampling unit; about 4500 tokens
   at the default budget, one forward per setting);
5. one report directory whose ``report.html`` and ``report.md`` tie the parts together.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from usmoe_lp.report.analyze_report import ANALYZE_OWNED, BEST_MEANS, best_at_matched_budget
from usmoe_lp.report.evaluate_report import EVALUATE_OWNED
from usmoe_lp.report.markup import Bullets, Code, Figure, Heading, Paragraph, Table, render_html, render_markdown
from usmoe_lp.report.outputs import ROUTER_LOG_OWNED, check_report_location, foreign_check, prefixed
from usmoe_lp.report.verify_report import VERIFY_OWNED
from usmoe_lp.staging import staged_directory
from usmoe_lp.verify import VerifyConfig
from usmoe_lp.verify.runner import command_line

VERIFY_CONFIG = VerifyConfig(sizes=((8, 4), (12, 5), (32, 8)), ks=(1, 2), trials=2, seed=0,
                             backends=("closed_form", "highs", "cbc"), ilp_max_vars=64)
VERIFY_COMMAND = command_line(VERIFY_CONFIG)

DEMO_OWNED: tuple[str, ...] = (r"report\.html", r"report\.md", r"summary\.json", r"timings\.json",
                               *prefixed("verify", VERIFY_OWNED), *prefixed("analysis", ANALYZE_OWNED),
                               *prefixed("router-log", ROUTER_LOG_OWNED), *prefixed("evaluate", EVALUATE_OWNED))
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
    evaluation: object = None


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
    """Run the whole demo into ``out`` (``verify/``, ``router-log/``, ``analysis/``, ``evaluate/``, ``report.html``,
    ``report.md``).

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
        vres, ares, eres, summary, seconds = _run_into(tmp, progress=progress, max_tokens=max_tokens)
    return DemoResult(out=final, report=final / "report.html", verify=vres, analysis=ares, log=final / "router-log",
                      seconds=seconds, summary=summary, evaluation=eres)


EVALUATE_TITLE = "usmoe-lp evaluate: embedded tiny MoE on held-out text"


def evaluate_settings(k: int) -> tuple:
    """The demo's live settings for a model with top-``k`` routing (native is added by evaluate): TC at k = 1 and
    k, USMoE at k-bar 1, 1.5 and k with alpha 0.5 (sequence scope), Expert Choice at its default capacity."""
    from usmoe_lp.live.evaluate import settings_grid

    return (*settings_grid(1, ("tc",)), *settings_grid(k, ("tc",)),
            *settings_grid(k, ("usmoe",), kbar=tuple(dict.fromkeys((1.0, 1.5, float(k)))), alpha=0.5),
            *settings_grid(k, ("ec",)))


EVALUATE_SEQ_LEN = 256
"""Window of the demo's live evaluation (stride 255): a document's beginning of up to 509 bytes, 511 tokens with
[BOS] and [EOS], fits two windows."""


def evaluate_documents(max_tokens: int) -> list[str]:
    """The demo's evaluation text: the first ``min(2 * (EVALUATE_SEQ_LEN - 1) - 1, max(64, max_tokens // 16))``
    characters of every held-out document (at most two windows each), so the bootstrap resamples all of them."""
    from usmoe_lp.tiny import heldout_documents

    n = min(2 * (EVALUATE_SEQ_LEN - 1) - 1, max(64, max_tokens // 16))
    return [d[:n] for d in heldout_documents()]


def _run_into(out: Path, *, progress: bool, max_tokens: int):
    from usmoe_lp._threads import one_torch_thread
    from usmoe_lp.diagnostics.analyze import AnalyzeConfig, analyze
    from usmoe_lp.live.evaluate import evaluate
    from usmoe_lp.report import write_verify_report
    from usmoe_lp.report.analyze_report import summary_lines, write_analyze_report
    from usmoe_lp.report.evaluate_report import write_files
    from usmoe_lp.tiny import load_tiny
    from usmoe_lp.verify import run_verify

    seconds = {}
    t0 = time.perf_counter()
    vres = run_verify(VERIFY_CONFIG, progress=progress)
    write_verify_report(vres, out / "verify", command=VERIFY_COMMAND)
    seconds["verify"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model, tokenizer = load_tiny()
    log = capture_heldout(out / "router-log", max_tokens=max_tokens, overwrite=False, model=model,
                          tokenizer=tokenizer)
    seconds["capture"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cfg = AnalyzeConfig(alphas=(0.3, 0.5, 0.7), scopes=("sequence", "batch"), sequence_tokens=max_tokens)
    # the log's path inside the demo, not the staging directory the run is built in
    ares = dataclasses.replace(analyze(log, config=cfg), source="router-log")
    write_analyze_report(ares, out / "analysis", title="usmoe-lp analyze: embedded tiny MoE on held-out text")
    seconds["analyze"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    documents = evaluate_documents(max_tokens)
    # one torch thread, as analyze's per-sequence analyses: the tiny model's forwards are small operations, for
    # which a second thread saves little when the cores are free and costs 2-10x when they are shared (measured:
    # 3.7 s with two threads on two idle cores, 5.5 s with one; 11-50 s with two, 5.5 s with one, under load)
    with one_torch_thread():
        eres = evaluate(model, documents, evaluate_settings(int(model.config.num_experts_per_tok)),
                        tokenizer=tokenizer, seq_len=EVALUATE_SEQ_LEN, batch_size=2 * len(documents),
                        bootstrap=1000, seed=0, progress=progress)
    # the model's name as the demo calls it, not the path of the installed package's weights
    eres = dataclasses.replace(eres, model={**eres.model, "name": "usmoe-lp tiny (embedded)"})
    write_files(eres, out / "evaluate", title=EVALUATE_TITLE)
    seconds["evaluate"] = time.perf_counter() - t0

    summary = tuple(_summary(vres, ares, seconds, eres))
    lines = summary_lines(ares)
    (out / "report.html").write_text(_report_html(out, vres, ares, summary, lines, eres))
    (out / "report.md").write_text(_report_md(out, vres, summary, lines, eres))
    (out / "summary.json").write_text(json.dumps({"summary": list(summary)}, indent=1) + "\n")
    # the only file that varies between identical runs: how long each step took
    (out / "timings.json").write_text(json.dumps({"seconds": seconds}, indent=1) + "\n")
    return vres, ares, eres, summary, seconds


def _summary(vres, ares, seconds, eres=None) -> list[str]:
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
        u = best_at_matched_budget(pooled, la0.top_k, router="usmoe")
        ec = pooled[pooled["router"] == "ec"]
        if u is not None:
            lines.append(f"re-routing at the matched budget: the best USMoE setting ({u['label']}; best = "
                         f"{BEST_MEANS}) covers {u['coverage']:.3f} of the probability mass vs TC "
                         f"{tc['coverage']:.3f}, dropping {u['drop_rate']:.1%} of tokens")
            both = pd.concat([f for f in (ec, pooled.loc[[u.name]]) if not f.empty])
            leak = [f"{r['label']} {r['flip_rate']:.2%}" for _, r in both.iterrows() if pd.notna(r.get("flip_rate"))]
            kv = u.get("kv_decode_token_flip_rate")
            kv_text = f"; KV-cache decoding of that USMoE changes the experts of {kv:.1%} of tokens" \
                if kv is not None and pd.notna(kv) else ""
            lines.append("leakage (prefix flip rate): TC 0% by construction; " + ", ".join(leak) + kv_text)
    lines = lines[:5]
    if eres is not None:
        lines.append(_evaluate_line(eres))
    return lines


def _evaluate_line(eres) -> str:
    """The summary line of the live evaluation: native's cross-entropy and the best setting below its cost."""
    from usmoe_lp.report.evaluate_report import best_cheaper, ci_text, native_row, quality_at

    clean = quality_at(eres.quality)
    nat = native_row(clean)
    text = (f"live evaluation ({int(clean['documents'].max())} held-out documents, {int(clean['tokens'].max()):,} "
            f"tokens): native {ci_text(nat['ce'], nat['ce_low'], nat['ce_high'])} nats/token")
    best = best_cheaper(clean)
    if best is not None:
        text += (f"; at {float(best['flops_vs_native']):.0%} of its routed-expert FLOPs {best['label']} loses "
                 f"{ci_text(best['delta_ce'], best['delta_low'], best['delta_high'], sign=True)} nats/token")
    return text


def _figure(path: Path, caption: str) -> list[Figure]:
    """The figure at ``path`` (relative to the demo directory in both reports), or nothing when it was not drawn."""
    return [Figure(f"{path.parent.name}/{path.name}", path.read_bytes(), caption)] if path.exists() else []


def _matrix_text(rows) -> str:
    """A small score matrix on one line, rows separated by semicolons: ``[1 0.5; 0 2]``."""
    return "[" + "; ".join(" ".join(f"{float(v):g}" for v in row) for row in rows) + "]"


def report_blocks(out: Path, vres, summary, analysis_lines, eres) -> list:
    """The demo page as blocks (:mod:`usmoe_lp.report.markup`): the one text of report.md and report.html."""
    from usmoe_lp.report.evaluate_report import front_sentence

    claims = pd.DataFrame([{"claim": c["claim"], "verdict": c["verdict"],
                            "failures / trials": f"{c['failures']} / {c['trials']}",
                            "minimal counterexample (scores)": "–" if c["minimal_counterexample"] is None
                            else f"k = {c['minimal_counterexample']['k']}: "
                                 f"{_matrix_text(c['minimal_counterexample']['scores'])}"}
                           for c in vres.claim_summary()])
    a = out / "analysis"
    return [
        Heading("usmoe-lp demo", 1), Paragraph(INTRO),
        Heading("Summary"), Bullets(tuple(summary), ordered=True),
        Heading("1. Theory verification"), Paragraph("Command:"), Code(VERIFY_COMMAND),
        Paragraph("Full report: [verify/report.md](verify/report.md); numbers in "
                  "[verify/report.json](verify/report.json)."),
        Table(claims),
        *_figure(out / "verify" / "usmoe_minus_tc.png", "Objective of USMoE minus TC at matched budget (verify)"),
        Heading("2. Router-log analysis of the embedded model"),
        Paragraph("Full report: [analysis/report.html](analysis/report.html) (also "
                  "[analysis/report.md](analysis/report.md)); every number: "
                  "[analysis/metrics.json](analysis/metrics.json); "
                  "the router log: `router-log/` (`usmoe-lp log info router-log`)."),
        Bullets(tuple(analysis_lines)),
        *_figure(a / "load_heatmap.png", "Expert load per layer"),
        *_figure(a / "sweeps.png", "Every counterfactual router setting against realised k-bar (USMoE alpha x k-bar "
                                   "x scope sweep vs TC, EC and the other routers)"),
        *_figure(a / "leakage_per_offset.png", "Leakage per offset"),
        *_figure(a / "experts_per_token.png", "Experts per token per router setting"),
        Heading("3. Live evaluation: each router routes the model"),
        Paragraph(f"{EVALUATE_INTRO} Full report: [evaluate/report.html](evaluate/report.html) (also "
                  "[evaluate/report.md](evaluate/report.md)); every number: "
                  "[evaluate/evaluate.json](evaluate/evaluate.json)."),
        Paragraph(front_sentence(eres)),
        *_figure(out / "evaluate" / "quality_vs_cost.png", "Quality vs cost of each router setting (live evaluation)"),
        Paragraph("How long each step took: [timings.json](timings.json)."),
    ]


def _report_html(out: Path, vres, ares, summary, analysis_lines, eres) -> str:
    return render_html(report_blocks(out, vres, summary, analysis_lines, eres), title="usmoe-lp demo")


INTRO = ("Routing as a linear program, checked on random matrices, then applied to the router logits of a small MoE "
         "language model (transformers OLMoE class) trained on the Python documentation and captured on held-out "
         "text, and finally to the model itself: each router setting routes its forward passes. No download, no GPU.")

EVALUATE_INTRO = ("Each setting replaces the model's router in every MoE layer (only the selected experts are "
                  "computed) and the model scores held-out text; native is the model's own routing.")


def _report_md(out: Path, vres, summary, analysis_lines, eres) -> str:
    return render_markdown(report_blocks(out, vres, summary, analysis_lines, eres))
