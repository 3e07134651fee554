"""Tables and figures of the live-routing section of papers/routing-as-lp.md (Section 6).

Usage:
    .venv/bin/python papers/make_live_tables.py --run papers/live        # the two evaluations (~20 min, 2 cores)
    .venv/bin/python papers/make_live_tables.py papers/live [--figures papers/figures]

``--run DIR`` evaluates the embedded tiny model (:func:`usmoe_lp.tiny.load_tiny`) with
:func:`usmoe_lp.live.evaluate.evaluate` twice and writes ``DIR/clean.json`` (every setting of
:data:`CLEAN_SETTINGS`, clean inputs, greedy generation) and ``DIR/corrupt.json`` (the settings of
:data:`CORRUPT_SETTINGS` at the rates :data:`RATES`). Each file is the result's ``to_json()`` plus
``documents``: the per-document nats and scored tokens of every (setting, rate), which the tables need for
paired intervals between two settings other than native and for the bootstrap over topics, and ``run``:
the command, the wall time and the documents' topics.

Without ``--run`` the script reads those two files and prints the section's tables (Markdown, in the
order they appear in the note); ``--figures DIR`` writes ``live_delta_vs_kbar.png`` and
``live_corruption.png`` (dpi 100). Nothing is recomputed from the model: every cell is read from the two
files, and every interval is :func:`usmoe_lp.live.evaluate.bootstrap_ci` (the evaluation's own
bootstrap, same seed) on the recorded per-document sums.

Documents: the held-out text cut as Section 5's capture cut it (:func:`usmoe_lp.demo.capture_heldout`):
each held-out topic's bytes in pieces of 256 tokens, starting every 256 tokens while at least 64 remain,
no BOS/EOS. That gives the 190 sequences (47,939 tokens) that Section 5 re-routed offline, each one
window of the evaluation, and 190 resampling units for the bootstrap; the topic of each piece is kept
for the more conservative bootstrap over the 9 topics.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tables import table  # noqa: E402  (the note's one table format)

SEQ_LEN = 256
BATCH_SIZE = 8
SEED = 0
BOOTSTRAP = 2000
CONFIDENCE = 0.95
GENERATE = 128
PROMPT_TOKENS = 64
RATES = (0.0, 0.05, 0.1, 0.2)
THREADS = 1  # torch threads (the machine is shared: one thread per run)
K = 2  # the embedded model's k (checked against the model in run())

# (router, k, params): the settings of the clean run (native is added first by evaluate)
CLEAN_SETTINGS: tuple[tuple[str, int, dict], ...] = (
    ("tc", 2, {}), ("tc", 1, {}),
    *[("ec", 2, {"capacity_factor": cf}) for cf in (1.0, 0.875, 0.75, 0.625, 0.5)],
    *[("usmoe", 2, {"alpha": 0.5, "kbar": kb, "scope": "sequence"})
      for kb in (2.5, 2.0, 1.875, 1.75, 1.625, 1.5, 1.375, 1.25, 1.0)],
    *[("usmoe", 2, {"alpha": a, "kbar": kb, "scope": "sequence"}) for a in (0.3, 0.7) for kb in (2.0, 1.75, 1.5, 1.0)],
    *[("usmoe", 2, {"alpha": 0.5, "kbar": kb, "scope": sc}) for sc in ("batch", "position") for kb in (2.0, 1.5)],
    *[("causal_topc", 2, {"alpha": 0.5, "kbar": kb}) for kb in (2.0, 1.75, 1.5, 1.25, 1.0)],
    *[("topp", 2, {"p": p}) for p in (0.5, 0.4, 0.3)],
)
CORRUPT_SETTINGS: tuple[tuple[str, int, dict], ...] = (
    ("tc", 1, {}), ("ec", 2, {"capacity_factor": 1.0}), ("ec", 2, {"capacity_factor": 0.75}),
    *[("usmoe", 2, {"alpha": a, "kbar": 2.0, "scope": "sequence"}) for a in (0.3, 0.5, 0.7)],
    ("usmoe", 2, {"alpha": 0.5, "kbar": 1.5, "scope": "sequence"}),
    *[("causal_topc", 2, {"alpha": 0.5, "kbar": kb}) for kb in (2.0, 1.5)],
    ("topp", 2, {"p": 0.4}),
)
NATIVE = "native"
ROUTER_ORDER = ("native", "tc", "ec", "usmoe", "causal_topc", "topp")
"""Hue order of the routers in both figures (one hue per router across the figures)."""


def palette_for(items: list[str], router_of: dict[str, str]) -> dict:
    """One colour per item, one hue per router in :data:`ROUTER_ORDER` whatever the figure shows."""
    from usmoe_lp.report.analyze_figures import shaded_palette

    return shaded_palette(items, {**{f"_{r}": r for r in ROUTER_ORDER}, **router_of})


# ----------------------------------------------------------------------------- the run
def heldout_pieces(tokenizer) -> tuple[list[list[int]], list[int], list[str]]:
    """Section 5's sequences: ``(pieces, topic index of each piece, topic keys)`` (module docstring)."""
    from usmoe_lp.tiny import heldout_documents
    from usmoe_lp.tiny.data import heldout_keys

    pieces, topic = [], []
    for t, doc in enumerate(heldout_documents()):
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        for a in range(0, len(ids) - SEQ_LEN // 4, SEQ_LEN):
            pieces.append(list(ids[a:a + SEQ_LEN]))
            topic.append(t)
    return pieces, topic, heldout_keys()


def _evaluate(model, pieces, settings, *, rates, generate) -> tuple[dict, float]:
    """Run evaluate; its JSON with ``documents`` grouped: per (label, rate) the per-document nats and scored targets
    (from the result's per-document frame)."""
    from usmoe_lp.live.evaluate import evaluate
    from usmoe_lp.routers import RouterConfig

    configs = [RouterConfig(r, k, **p) for r, k, p in settings]
    t0 = time.perf_counter()
    res = evaluate(model, pieces, configs, seq_len=SEQ_LEN, batch_size=BATCH_SIZE, corrupt=rates,
                   generate=generate, prompt_tokens=PROMPT_TOKENS, bootstrap=BOOTSTRAP, confidence=CONFIDENCE,
                   seed=SEED, progress=False)
    seconds = time.perf_counter() - t0
    out = res.to_json()
    frame = res.documents.sort_values(["corrupt", "document"], kind="stable")
    records = [(label, g["nll"].to_numpy(), g["tokens"].to_numpy(), float(rate))
               for (rate, label), g in frame.groupby(["corrupt", "label"], sort=False)]
    out["documents"] = [{"label": label, "corrupt": rate, "nll": [round(float(v), 6) for v in nll],
                         "tokens": [int(c) for c in counts]} for label, nll, counts, rate in records]
    return out, seconds


def run(directory: Path) -> None:
    import torch

    from usmoe_lp.tiny import load_tiny

    torch.manual_seed(SEED)
    torch.set_num_threads(THREADS)
    model, tokenizer = load_tiny()
    if model.config.num_experts_per_tok != K:
        raise SystemExit(f"the embedded model has k = {model.config.num_experts_per_tok}, this script expects {K}")
    pieces, topic, keys = heldout_pieces(tokenizer)
    directory.mkdir(parents=True, exist_ok=True)
    command = "python papers/make_live_tables.py --run " + shlex.quote(str(directory))
    for name, settings, rates, generate in (("clean", CLEAN_SETTINGS, (0.0,), GENERATE),
                                            ("corrupt", CORRUPT_SETTINGS, RATES, 0)):
        out, seconds = _evaluate(model, pieces, settings, rates=rates, generate=generate)
        out["run"] = {"command": command, "seconds": round(seconds, 1), "torch_threads": torch.get_num_threads(),
                      "topic_of_document": topic, "topics": keys, "pieces": len(pieces),
                      "piece_tokens": sum(len(p) for p in pieces)}
        path = directory / f"{name}.json"
        path.write_text(json.dumps(out, separators=(",", ":")) + "\n", encoding="utf-8")
        print(f"wrote {path} ({seconds:.0f} s)", flush=True)


# ----------------------------------------------------------------------------- reading
class Run:
    """One evaluation file: its quality rows and per-document sums, by (label, rate)."""

    def __init__(self, path: Path) -> None:
        self.data = json.loads(path.read_text(encoding="utf-8"))
        self.quality = {(q["label"], float(q["corrupt"])): q for q in self.data["quality"]}
        self.docs = {(d["label"], float(d["corrupt"])): d for d in self.data["documents"]}
        self.topic = np.asarray(self.data["run"]["topic_of_document"])
        self.settings = {s["label"]: s for s in self.data["settings"]}
        self.labels = [s["label"] for s in self.data["settings"]]

    def q(self, label: str, rate: float = 0.0) -> dict:
        return self.quality[(label, float(rate))]

    def paired(self, a: str, b: str, rate: float = 0.0, unit: str = "document") -> tuple[float, float, float]:
        """ce(a) - ce(b) on the same documents at ``rate`` (nats/token) and its paired bootstrap interval,
        resampling documents (``unit="document"``) or topics (``"topic"``)."""
        from usmoe_lp.live.evaluate import bootstrap_ci

        da, db = self.docs[(a, float(rate))], self.docs[(b, float(rate))]
        sa, sb, n = (np.asarray(x, dtype=np.float64) for x in (da["nll"], db["nll"], da["tokens"]))
        if unit == "topic":
            g = self.topic.max() + 1
            sa, sb, n = (np.bincount(self.topic, weights=x, minlength=g) for x in (sa, sb, n))
            sa, sb, n = sa[n > 0], sb[n > 0], n[n > 0]
        return bootstrap_ci(sa, n, reference=sb, replicates=self.data["config"]["bootstrap"],
                            confidence=self.data["config"]["confidence"], seed=self.data["config"]["seed"])


def verdict(low: float, high: float, words=("better", "equal", "worse")) -> str:
    """CE difference interval -> better (entirely below 0), worse (entirely above 0), equal (contains 0), or
    identical (exactly 0: the same predictions on every document)."""
    if low == high == 0:
        return "identical"
    if high < 0:
        return words[0]
    if low > 0:
        return words[2]
    return words[1]


def signed(x: float, digits: int = 4) -> str:
    """``x`` with its sign at ``digits`` decimals; a non-zero value that would round to 0 in scientific notation
    (so that an interval end just above or below 0 keeps its sign visible)."""
    if x != 0 and abs(x) < 0.5 * 10 ** -digits:
        return f"{x:+.0e}"
    return f"{x:+.{digits}f}"


def ci(est: float, low: float, high: float, digits: int = 4) -> str:
    return f"{signed(est, digits)} [{signed(low, digits)}, {signed(high, digits)}]"


def pct(x: float, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}%"


def family(s: dict) -> str:
    """The curve a setting belongs to: a router with its parameters other than the budget."""
    r = s["router"]
    if r == "usmoe":
        return f"usmoe a={s['alpha']:g} {s['scope']}"
    if r == "causal_topc":
        return f"causal_topc a={s['alpha']:g}"
    return r


# ----------------------------------------------------------------------------- tables
def setup_table(clean: Run, corrupt: Run) -> str:
    c, m, r = clean.data["config"], clean.data["model"], clean.data["run"]
    rows = [
        ["model", f"the embedded tiny model, `load_tiny()` ({m['family']}), {m['layers']} layers x "
                  f"{m['num_experts']} experts, k = {m['k']}, "
                  f"{m['parameters']:,} parameters"],
        ["documents", f"{c['documents']} pieces of <= {SEQ_LEN} tokens from {len(r['topics'])} held-out topics, "
                      f"{r['piece_tokens']:,} tokens, {c['tokens']:,} scored targets per setting and rate"],
        ["settings", f"clean run: {len(clean.labels)} (native included); corruption run: {len(corrupt.labels)} at "
                     f"rates {', '.join(f'{x:g}' for x in corrupt.data['config']['corrupt'])}"],
        ["intervals", f"{c['confidence']:.0%} percentile bootstrap, {c['bootstrap']} replicates over documents, seed "
                      f"{c['seed']}; paired for every difference"],
        ["generation", f"{clean.data['generation'][0]['sequences']} prompts of {c['prompt_tokens']} tokens, "
                       f"{c['generate']} greedy tokens through the KV cache per setting"],
        ["combine weights", f"the model's rule (`weights=\"{c['weights']}\"`): softmax gate values of the selected "
                            "experts, not renormalised (OLMoE)"],
        ["wall time", f"clean run {clean.data['run']['seconds']:.0f} s, corruption run "
                      f"{corrupt.data['run']['seconds']:.0f} s (torch threads: {r['torch_threads']}; a 2-core "
                      "machine shared with other jobs, so the times are upper bounds)"],
    ]
    return table(["", "value"], rows)


def quality_table(run: Run) -> str:
    rows = []
    nat = run.q(NATIVE)
    for label in run.labels:
        q = run.q(label)
        rows.append([label, f"{q['kbar']:.3f}", f"{q['flops_vs_native']:.3f}",
                     f"{q['ce']:.4f} [{q['ce_low']:.4f}, {q['ce_high']:.4f}]",
                     "–" if label == NATIVE else ci(q["delta_ce"], q["delta_low"], q["delta_high"]),
                     "–" if label == NATIVE else pct(q["rel_delta"]),
                     "reference" if label == NATIVE else verdict(q["delta_low"], q["delta_high"])])
    head = ["setting", "realised k-bar", "MoE FLOPs / native", "CE nats/token [95% CI]",
            "Δ CE vs native [paired 95% CI]", "Δ / native CE", "vs native"]
    return (f"Native: {nat['ce']:.4f} nats/token ({nat['bpb']:.3f} bits/byte).\n\n" + table(head, rows))


def matched_table(run: Run) -> str:
    """USMoE (every alpha and scope) against TC and EC at k-bar = k, and at k-bar = 1 against TC k=1 / EC cf=0.5."""
    rows = []
    for budget, tc, ec in ((2.0, "tc k=2", "ec cf=1"), (1.0, "tc k=1", "ec cf=0.5")):
        for label in run.labels:
            s = run.settings[label]
            if s["router"] not in ("usmoe", "causal_topc") or abs(s["kbar"] - budget) > 1e-9:
                continue
            cells = [label]
            for ref in (tc, ec):
                est, lo, hi = run.paired(label, ref)
                t_est, t_lo, t_hi = run.paired(label, ref, unit="topic")
                cells += [ci(est, lo, hi), verdict(lo, hi), f"[{signed(t_lo)}, {signed(t_hi)}] {verdict(t_lo, t_hi)}"]
            rows.append(cells)
    head = ["setting", "Δ CE vs TC (same k-bar) [95% CI]", "vs TC", "over topics", "Δ CE vs EC (same k-bar) [95% CI]",
            "vs EC", "over topics"]
    return ("TC at the same k-bar: `tc k=2` for k-bar = 2, `tc k=1` for k-bar = 1; EC: `ec cf=1` (k-bar 2) and "
            "`ec cf=0.5` (k-bar 1). Negative = lower cross-entropy than the reference = better.\n\n"
            + table(head, rows))


def cost_table(run: Run) -> str:
    """Per router curve: the smallest budget within 1% / 2% of native's CE, and the compute saved against tc k=2."""
    nat = run.q(NATIVE)
    ref_flops = run.q("tc k=2")["moe_flops_per_token"]
    curves: dict[str, list[dict]] = {}
    for label in run.labels:
        s = run.settings[label]
        if s["router"] == NATIVE:
            continue
        curves.setdefault(family(s), []).append(run.q(label))
    rows = []
    for fam, qs in curves.items():
        qs = sorted(qs, key=lambda q: q["moe_flops_per_token"])
        cells = [fam, ", ".join(f"{q['kbar']:.4g}" for q in qs)]
        for tol in (0.01, 0.02):
            for bound in ("delta_ce", "delta_high"):
                within = [q[bound] / nat["ce"] <= tol for q in qs]
                # the smallest budget from which on every larger budget evaluated stays within
                first = next((i for i in range(len(qs)) if all(within[i:])), None)
                if first is not None:
                    best = qs[first]
                    cells.append(f"{best['kbar']:.4g} ({pct(1 - best['moe_flops_per_token'] / ref_flops, 1)})")
                else:
                    cells.append("none")
        rows.append(cells)
    head = ["router", "realised k-bar evaluated", "≤ 1%: point", "≤ 1%: upper CI", "≤ 2%: point", "≤ 2%: upper CI"]
    return ("Each cell: the smallest realised k-bar of the router from which on (it and every larger budget "
            "evaluated) Δ CE / native CE is at most the tolerance (by the point estimate, or by the upper end of its "
            "paired 95% interval), and in parentheses the routed-"
            f"expert FLOPs saved there against `tc k=2` (native CE {nat['ce']:.4f} nats/token: 1% = "
            f"{0.01 * nat['ce']:.4f} nats). The budgets evaluated are the grid's; a budget between two grid points "
            "is not resolved.\n\n" + table(head, rows))


def corruption_table(run: Run) -> str:
    rates = sorted({r for _, r in run.quality})
    rows = [["native CE (nats/token)", *[f"{run.q(NATIVE, r)['ce']:.4f}" for r in rates]]]
    for label in run.labels:
        if label == NATIVE:
            continue
        cells = [label]
        for r in rates:
            q = run.q(label, r)
            lo, hi = q["delta_low"], q["delta_high"]
            cells.append(f"{ci(q['delta_ce'], lo, hi, 3)} {verdict(lo, hi)}")
        rows.append(cells)
    # USMoE against TC k=2 (= native) and EC at k-bar 2, per rate
    out = table(["setting: Δ CE vs native at the same rate [95% CI]", *[f"p = {r:g}" for r in rates]], rows)
    pairs = [("usmoe a=0.5 kbar=2 seq", "ec cf=1"), ("usmoe a=0.5 kbar=1.5 seq", "ec cf=0.75"),
             ("causal_topc a=0.5 kbar=2", "usmoe a=0.5 kbar=2 seq"),
             ("usmoe a=0.5 kbar=1.5 seq", "topp p=0.4")]
    rows2 = []
    for a, b in pairs:
        if (a, rates[0]) not in run.docs or (b, rates[0]) not in run.docs:
            continue
        cells = [f"{a} − {b}"]
        for r in rates:
            est, lo, hi = run.paired(a, b, r)
            cells.append(f"{ci(est, lo, hi, 3)} {verdict(lo, hi)}")
        rows2.append(cells)
    if rows2:
        out += "\n\nPaired differences between two settings at each rate (negative: the first is better):\n\n"
        out += table(["difference [95% CI]", *[f"p = {r:g}" for r in rates]], rows2)
    return out


def causal_table(run: Run) -> str:
    rows = []
    for label in run.labels:
        s = run.settings[label]
        if s["router"] != "causal_topc":
            continue
        twin = next((lb for lb in run.labels if run.settings[lb]["router"] == "usmoe"
                     and run.settings[lb]["scope"] == "sequence" and run.settings[lb]["alpha"] == s["alpha"]
                     and abs(run.settings[lb]["kbar"] - s["kbar"]) < 1e-9), None)
        if twin is None:
            continue
        est, lo, hi = run.paired(label, twin)
        _, tlo, thi = run.paired(label, twin, unit="topic")
        rows.append([f"{s['kbar']:g}", f"{run.q(label)['kbar']:.4f}", f"{run.q(twin)['kbar']:.4f}",
                     ci(est, lo, hi), verdict(lo, hi), f"[{signed(tlo)}, {signed(thi)}] {verdict(tlo, thi)}"])
    return table(["target k-bar", "causal_topc realised k-bar", "usmoe seq realised k-bar",
                  "Δ CE causal_topc − usmoe seq [95% CI]", "causal vs sequence-scope", "over topics"], rows)


def decode_table(run: Run) -> str:
    gen = run.data["generation"]
    rows = [[g["label"], f"{g['token_agreement']:.3f}", f"{g['first_divergence']:.1f}",
             "–" if g["decode_mismatch"] is None else pct(g["decode_mismatch"], 1)] for g in gen]
    return table(["setting", "token agreement with native", "first divergence (token index)",
                  "decode-time vs teacher-forced routing: (token, layer) differing"], rows)


def same_budget_table(run: Run, reference: str = "usmoe a=0.5 kbar=1.5 seq", budget: float = 1.5,
                      tolerance: float = 0.03) -> str:
    """Every setting whose realised k-bar is within ``tolerance`` of ``budget``, against ``reference`` (paired)."""
    rows = []
    for label in run.labels:
        q = run.q(label)
        if label == reference or abs(q["kbar"] - budget) > tolerance:
            continue
        est, lo, hi = run.paired(label, reference)
        _, tlo, thi = run.paired(label, reference, unit="topic")
        rows.append([label, f"{q['kbar']:.3f}", ci(q["delta_ce"], q["delta_low"], q["delta_high"]), ci(est, lo, hi),
                     verdict(lo, hi), f"[{signed(tlo)}, {signed(thi)}] {verdict(tlo, thi)}"])
    ref = run.q(reference)
    return (f"Reference `{reference}`: realised k-bar {ref['kbar']:.3f}, Δ CE vs native "
            f"{ci(ref['delta_ce'], ref['delta_low'], ref['delta_high'])}. Negative = the setting is better than the "
            "reference.\n\n"
            + table(["setting", "realised k-bar", "Δ CE vs native [95% CI]", f"Δ CE vs {reference} [95% CI]",
                     "vs reference", "over topics"], rows))


# ----------------------------------------------------------------------------- figures
def _finish(fig, ax, path: Path) -> Path:
    """Legend outside on the right, light grid, tight layout; written as a PNG (dpi 100, the report metadata, so
    equal figures give equal bytes) and closed."""
    import matplotlib.pyplot as plt

    from usmoe_lp.report.outputs import save_png

    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path, dpi=100)
    plt.close(fig)
    return path


def figures(clean: Run, corrupt: Run, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    # 1. delta CE vs realised k-bar, one curve per router family
    curves: dict[str, list[dict]] = {}
    for label in clean.labels:
        s = clean.settings[label]
        curves.setdefault(family(s), []).append(clean.q(label))
    order = list(curves)
    palette = palette_for(order, {f: f.split()[0] for f in order})
    fig, ax = plt.subplots(figsize=(8.4, 4.2))
    markers = {"native": "*", "tc": "s", "ec": "D", "usmoe": "o", "causal_topc": "^", "topp": "v"}
    for i, (fam, qs) in enumerate(curves.items()):
        qs = sorted(qs, key=lambda q: q["kbar"])
        x = np.array([q["kbar"] for q in qs]) + 0.004 * (i - (len(curves) - 1) / 2)  # dodge the error bars
        y = np.array([q["delta_ce"] for q in qs])
        err = np.array([[q["delta_ce"] - q["delta_low"] for q in qs], [q["delta_high"] - q["delta_ce"] for q in qs]])
        router = fam.split()[0]
        style = ":" if router == "tc" else "-"  # TC has integer budgets only: the line joins k = 1 and k = 2
        ax.errorbar(x, y, yerr=np.clip(err, 0, None), marker=markers.get(router, "o"), ms=9 if router == NATIVE else 5,
                    capsize=2, lw=1.2, color=(0.0, 0.0, 0.0) if router == NATIVE else palette[fam],
                    ls=style if len(qs) > 1 else "none", label=fam)
    nat_ce = clean.q(NATIVE)["ce"]
    for tol, style in ((0.01, "--"), (0.02, ":")):
        ax.axhline(tol * nat_ce, color="0.4", ls=style, lw=0.8)
        ax.annotate(f"{tol:.0%} of native CE", (1.0, tol * nat_ce), xycoords=("axes fraction", "data"),
                    xytext=(-2, 2), textcoords="offset points", ha="right", fontsize=7, color="0.3")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_yscale("symlog", linthresh=0.02)
    ax.set_ylim(bottom=-0.01)
    c = clean.data["config"]
    ax.set_title(f"Live routing of the embedded model, clean held-out text ({c['documents']} pieces, "
                 f"{c['tokens']:,} tokens)", fontsize=9)
    ax.set_xlabel("realised k-bar (experts per token, mean over layers); model k = 2")
    ax.set_ylabel("Δ cross-entropy vs native (nats/token),\npaired 95% bootstrap CI")
    paths.append(_finish(fig, ax, out / "live_delta_vs_kbar.png"))
    # 2. delta CE vs native against the corruption rate
    rates = sorted({r for _, r in corrupt.quality})
    labels = [lb for lb in corrupt.labels if lb != NATIVE]
    palette = palette_for(labels, {lb: corrupt.settings[lb]["router"] for lb in labels})
    fig, ax = plt.subplots(figsize=(8.4, 4.2))
    for i, label in enumerate(labels):
        qs = [corrupt.q(label, r) for r in rates]
        x = np.array(rates) + 0.0015 * (i - len(labels) / 2)
        y = np.array([q["delta_ce"] for q in qs])
        err = np.array([[q["delta_ce"] - q["delta_low"] for q in qs], [q["delta_high"] - q["delta_ce"] for q in qs]])
        ax.errorbar(x, y, yerr=np.clip(err, 0, None), marker=markers.get(corrupt.settings[label]["router"], "o"),
                    ms=4, capsize=2, lw=1.1, color=palette[label], label=label)
    ax.axhline(0, color="black", lw=0.8, label="native (reference)")
    ax.set_xticks(rates, [f"{r:g}" for r in rates])
    ax.set_yscale("symlog", linthresh=0.02)
    ax.set_ylim(bottom=-0.01)
    c = corrupt.data["config"]
    ax.set_title(f"Corrupted inputs, embedded model ({c['documents']} pieces, {c['tokens']:,} tokens per rate)",
                 fontsize=9)
    ax.set_xlabel("input corruption rate p (share of input bytes replaced by uniform random bytes)")
    ax.set_ylabel("Δ cross-entropy vs native at the same p\n(nats/token), paired 95% CI")
    paths.append(_finish(fig, ax, out / "live_corruption.png"))
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("directory", type=Path, nargs="?", default=Path(__file__).resolve().parent / "live",
                    help="holds clean.json and corrupt.json (default papers/live)")
    ap.add_argument("--run", type=Path, default=None, help="evaluate the embedded model and write the JSON files here")
    ap.add_argument("--figures", type=Path, default=None, help="write the two PNG figures here")
    a = ap.parse_args(argv)
    if a.run is not None:
        run(a.run)
        return 0
    paths = [a.directory / "clean.json", a.directory / "corrupt.json"]
    for p in paths:
        if not p.is_file():
            print(f"error: {p} not found (run with --run {a.directory} first)", file=sys.stderr)
            return 2
    clean, corrupt = Run(paths[0]), Run(paths[1])
    sections = [("Setup", setup_table(clean, corrupt)), ("Quality and cost, clean inputs", quality_table(clean)),
                ("USMoE against TC and EC at the same k-bar", matched_table(clean)),
                ("The cost claim", cost_table(clean)), ("Every router at k-bar = 1.5", same_budget_table(clean)),
                ("Causal top-c against sequence-scope USMoE", causal_table(clean)),
                ("Corrupted inputs", corruption_table(corrupt)), ("Generation and decode-time routing",
                                                                  decode_table(clean))]
    for title, body in sections:
        print(f"#### Live: {title}\n\n{body}\n")
    if a.figures is not None:
        for p in figures(clean, corrupt, a.figures):
            print(f"<!-- wrote {p} -->")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
