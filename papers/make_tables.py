"""Markdown tables for papers/routing-as-lp.md from a verify report and an analyze report.

Usage:
    .venv/bin/python papers/make_tables.py VERIFY_DIR ANALYSIS_DIR [--figures DIR]

VERIFY_DIR holds ``report.json`` and ``counterexamples/*.json`` written by ``usmoe-lp verify``;
ANALYSIS_DIR holds ``metrics.json`` written by ``usmoe-lp analyze``. The tables go to stdout, in
the order they appear in the note. With ``--figures DIR`` two small PNGs (dpi 100) are written:
``leakage_vs_kbar.png`` (token flip rates) and ``drops_vs_kbar.png`` (zero-expert tokens), mean over
layers. Nothing here recomputes a number: every cell
is read from the two reports, averaged over layers where a table says so.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


# ----------------------------------------------------------------------------- formatting
def fmt(x, digits: int = 3) -> str:
    """A compact cell: integers as is, floats to ``digits`` significant figures, None as a dash."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x):
            return "–"
        if x == 0:
            return "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return "\n".join(out)


def matrix(scores: list[list[float]]) -> str:
    return "[" + ", ".join("[" + ", ".join(f"{v:.4g}" for v in row) + "]" for row in scores) + "]"


def mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def span(xs) -> str:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return "–"
    lo, hi = min(xs), max(xs)
    return fmt(lo) if lo == hi else f"{fmt(lo)}–{fmt(hi)}"


# ----------------------------------------------------------------------------- verify
def verify_tables(vdir: Path) -> str:
    rep = json.loads((vdir / "report.json").read_text())
    cfg = rep["config"]
    parts = [f"### Verify: claims (command: `{rep.get('command') or 'usmoe-lp verify'}`)", "",
             f"Config: families {', '.join(cfg['families'])}; sizes {', '.join(cfg['sizes'])}; "
             f"k in {cfg['ks']}; {cfg['trials']} trials; seed {cfg['seed']}; backends "
             f"{', '.join(cfg['backends'])}; ILP up to {cfg['ilp_max_vars']} variables.", ""]
    rows = []
    for c in rep["claims"]:
        mc = c.get("minimal_counterexample")
        cex = "–" if mc is None else f"`S = {matrix(mc['scores'])}`, k = {mc['k']}"
        fams = ", ".join(c["failing_families"]) if c["failing_families"] else "–"
        res = f"{c['trials'] - c['failures']}/{c['trials']}"
        verdict = c["verdict"] if c["verdict"] != "fails" else "**fails**"
        rows.append([f"`{c['claim']}`", c["statement"], c["source"], c["expectation"], verdict, res,
                     fmt(c["worst_gap"]), fams, cex])
    parts.append(table(["id", "statement", "source", "theory expects", "verdict", "holds on", "worst gap",
                        "failing families", "minimal counterexample"], rows))

    # failures by family x size for the failing claims
    failing = [c["claim"] for c in rep["claims"] if c["failures"]]
    if failing:
        sizes = cfg["sizes"]
        parts += ["", "### Verify: failures per family (both k pooled; trials per cell = "
                  f"{2 * cfg['trials'] if len(cfg['ks']) == 2 else len(cfg['ks']) * cfg['trials']})", ""]
        for cid in failing:
            cells = [c for c in rep["cells"] if c["claim"] == cid]
            fams = [f for f in cfg["families"] if any(c["family"] == f for c in cells)]
            rows = []
            for f in fams:
                row = [f]
                for s in sizes:
                    cell = next((c for c in cells if c["family"] == f and c["size"] == s), None)
                    row.append("–" if cell is None else f"{cell['failures']}/{cell['trials']}")
                rows.append(row)
            parts += [f"`{cid}`:", "", table(["family", *sizes], rows), ""]

    # the counterexample files
    cdir = vdir / "counterexamples"
    files = sorted(cdir.glob("*.json")) if cdir.is_dir() else []
    if files:
        by_claim: dict[str, list[dict]] = {}
        for p in files:
            d = json.loads(p.read_text())
            by_claim.setdefault(d["claim"], []).append(d)
        parts += ["### Verify: minimal counterexamples (smallest per claim x family x size, "
                  f"{len(files)} files)", ""]
        rows = []
        for cid, ds in by_claim.items():
            sizes = sorted({d["size"] for d in ds}, key=lambda s: (eval(s.replace("x", "*")), s))  # noqa: S307
            smallest = min(ds, key=lambda d: (len(d["scores"]) * len(d["scores"][0]), d["k"]))
            forms = {(d["size"], d["k"], json.dumps(d["scores"])) for d in ds}
            rows.append([f"`{cid}`", len(ds), len(forms), ", ".join(sizes),
                         f"`{matrix(smallest['scores'])}`, k = {smallest['k']}", smallest["note"]])
        parts.append(table(["claim", "files", "distinct forms", "shrunk sizes", "smallest", "note"], rows))

    gain = rep.get("usmoe_minus_tc") or []
    if gain:
        parts += ["", "### Verify: obj(USMoE, c = Tk) - obj(TC, k), per token (mean over trials)", ""]
        fams = list(dict.fromkeys(g["family"] for g in gain))
        keys = list(dict.fromkeys((g["size"], g["k"]) for g in gain))
        rows = []
        for f in fams:
            row = [f]
            for s, k in keys:
                g = next((g for g in gain if g["family"] == f and g["size"] == s and g["k"] == k), None)
                row.append(None if g is None else g["mean_per_token"])
            rows.append(row)
        parts.append(table(["family", *[f"{s} k={k}" for s, k in keys]], rows))
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- analyze
def _configs(m: dict) -> dict[str, list[dict]]:
    """label -> the per-layer counterfactual dicts (one per layer)."""
    out: dict[str, list[dict]] = {}
    for layer in m["layers"].values():
        for c in layer.get("counterfactual") or []:
            out.setdefault(c["label"], []).append(c)
    return out


def _cross(m: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for layer in m["layers"].values():
        for label, d in (layer.get("cross_sequence") or {}).items():
            out.setdefault(label, []).append(d)
    return out


def analyze_tables(adir: Path) -> str:
    m = json.loads((adir / "metrics.json").read_text())
    layers = m["layers"]
    cfg = m["config"]
    ntok = [v["tokens"] for v in layers.values()]
    sample = [v.get("sample") or {} for v in layers.values()]
    parts = [f"### Analyze: {m['model']['name']} ({len(layers)} layers; {ntok[0]:,} tokens per layer; "
             f"per-sequence sample {sample[0].get('sequences')} sequences / {sample[0].get('tokens')} tokens; "
             f"batch size {cfg['batch_size']} for the batch/position scopes; {m['seconds']:.0f} s)", ""]

    # load, per layer and pooled
    rows = []
    for name, v in layers.items():
        ld = v["load"]
        rows.append([name, ld["num_tokens"], ld["entropy"], ld["maxvio"], ld["cv"], ld["gini"], ld["dead_experts"],
                     ld["cold_experts"], ld["token_entropy_normalised"], ld["aux_loss"], ld["z_loss"]])
    pl = m.get("pooled", {}).get("load_pooled_tokens") or m.get("pooled", {}).get("load")
    if pl:
        rows.append(["pooled (all layers' tokens in one set)", pl["num_tokens"], pl["entropy"], pl["maxvio"], pl["cv"],
                     pl["gini"], pl["dead_experts"], pl["cold_experts"], pl["token_entropy_normalised"],
                     pl["aux_loss"], pl["z_loss"]])
    parts += ["#### Load of the model's own top-2 selection", "",
              table(["layer", "tokens", "load entropy (norm.)", "MaxVio", "CV", "Gini", "dead", "cold (<= 0.1%)",
                     "token entropy (norm.)", "aux loss", "z-loss"], rows), ""]
    pooled = m.get("pooled", {})
    if "aux_loss_pooled" in pooled:
        parts += [f"Aux loss (k = {next(iter(layers.values()))['top_k']} at perfect balance): pooled over layers "
                  f"(transformers) {fmt(pooled['aux_loss_pooled'], 5)}, mean of per-layer losses (OLMoE scripts) "
                  f"{fmt(pooled['aux_loss_per_layer_mean'], 5)}.", ""]

    # collapse
    rows = []
    for name, v in layers.items():
        c = v["collapse"]
        rows.append([name, c["logit_effective_rank"], c["logit_effective_rank_centered"], c["mean_expert_cosine"],
                     c["router_row_similarity"], c.get("span_energy"), c.get("span_energy_isotropic"),
                     c.get("hidden_effective_rank"), c.get("hidden_dim")])
    parts += ["#### Collapse diagnostics", "",
              table(["layer", "logit erank (<= N)", "centred logit erank (<= N-1)", "mean expert cosine",
                     "router-row mean abs cos", "span energy", "span energy if isotropic", "hidden erank", "d"],
                    rows), ""]

    # counterfactual re-routing, mean over layers (every layer sees the same tokens)
    confs = _configs(m)
    cross = _cross(m)
    rows = []
    for label, cs in confs.items():
        if cs[0]["router"] == "usmoe" and cs[0]["alpha"] != 0.5:
            continue
        cr = cross.get(label)
        rows.append([label, mean([c["realised_kbar"] for c in cs]), mean([c["coverage"] for c in cs]),
                     span([c["drop_rate"] for c in cs]), mean([c["budget_mismatch"] / c["tokens"] for c in cs]),
                     span([c["flip_rate"] for c in cs]), span([c["token_flip_rate"] for c in cs]),
                     mean([c["displacement_mean"] for c in cs]),
                     "–" if not cr else span([d["token_flip_rate"] for d in cr]),
                     mean([c["gini"] for c in cs]), mean([c["agreement"] for c in cs]),
                     f"{sum(c['certified_optimal'] for c in cs)}/{sum(c['certified_total'] for c in cs)}",
                     max(abs(c["max_lp_gap"]) for c in cs if c.get("max_lp_gap") is not None)
                     if any(c.get("max_lp_gap") is not None for c in cs) else None])
    parts += ["#### Counterfactual re-routing of the captured logits (USMoE at alpha = 0.5; mean over layers, "
              "or min–max over layers where a range is shown)", "",
              table(["router", "realised k-bar", "prob. coverage", "drop rate (tokens)", "budget mismatch / token",
                     "flip rate (decisions)", "token flip rate", "displacement", "cross-seq. token flip rate",
                     "Gini", "agreement with model", "certified optimal", "max abs(LP - router)"], rows), ""]

    # alpha sensitivity at the sequence scope
    alphas = sorted({c["alpha"] for cs in confs.values() for c in cs if c["router"] == "usmoe"})
    kbars = sorted({c["kbar"] for cs in confs.values() for c in cs if c["router"] == "usmoe"})
    if len(alphas) > 1:
        rows = []
        for kb in kbars:
            for a in alphas:
                cs = [c for cc in confs.values() for c in cc
                      if c["router"] == "usmoe" and c["kbar"] == kb and c["alpha"] == a and c["scope"] == "sequence"]
                if cs:
                    rows.append([fmt(kb), fmt(a), mean([c["coverage"] for c in cs]),
                                 mean([c["drop_rate"] for c in cs]), mean([c["flip_rate"] for c in cs]),
                                 mean([c["token_flip_rate"] for c in cs]), mean([c["gini"] for c in cs])])
        parts += ["#### USMoE, sequence scope: k-bar x alpha (mean over layers)", "",
                  table(["k-bar", "alpha", "coverage", "drop rate", "flip rate", "token flip rate", "Gini"], rows), ""]

    # per layer, the key configs
    keys = [lb for lb in confs if confs[lb][0]["router"] in ("ec",)]
    k = next(iter(layers.values()))["top_k"]
    keys += [lb for lb in confs if confs[lb][0]["router"] == "usmoe" and confs[lb][0]["alpha"] == 0.5
             and confs[lb][0]["scope"] == "sequence" and confs[lb][0]["kbar"] in (float(k), k + 0.5)]
    rows = []
    for lb in keys:
        for name, c in zip(layers, confs[lb], strict=False):
            rows.append([lb, name, c["drop_rate"], c["flip_rate"], c["token_flip_rate"], c["displacement_mean"],
                         c["gini"]])
    parts += ["#### Per layer: EC and USMoE (alpha 0.5, sequence scope)", "",
              table(["router", "layer", "drop rate", "flip rate", "token flip rate", "displacement", "Gini"], rows), ""]

    # capacity-TC
    cap = [lb for lb in confs if confs[lb][0]["router"] == "capacity_tc"]
    rows = []
    for lb in cap:
        for name, c in zip(layers, confs[lb], strict=False):
            rows.append([lb, name, c["realised_kbar"], c["drop_rate"], c["budget_mismatch"], c["lp_checked"],
                         c["max_lp_gap"], c["lp_relative_gap"]])
    if rows:
        parts += ["#### Capacity-limited TC (GShard/Switch style, dropping by position)", "",
                  table(["router", "layer", "realised k-bar", "drop rate (tokens with 0 experts)",
                         "budget mismatch (dropped assignments)", "LP-checked sequences", "LP optimum - greedy",
                         "relative gap"], rows), ""]
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- figures
def figures(adir: Path, out: Path) -> list[Path]:
    """Two PNGs (dpi 100): token flip rates vs k-bar, and drop rates vs k-bar (USMoE at alpha 0.5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = json.loads((adir / "metrics.json").read_text())
    confs, cross = _configs(m), _cross(m)
    out.mkdir(parents=True, exist_ok=True)
    usm = {lb: cs for lb, cs in confs.items() if cs[0]["router"] == "usmoe" and cs[0]["alpha"] == 0.5}
    scopes = sorted({cs[0]["scope"] for cs in usm.values()})
    ec = next((cs for cs in confs.values() if cs[0]["router"] == "ec"), None)

    def curve(scope, value):
        pts = sorted((cs[0]["kbar"], value(lb, cs)) for lb, cs in usm.items() if cs[0]["scope"] == scope)
        return [p[0] for p in pts], [p[1] for p in pts]

    paths = []
    # 1. leakage: prefix token flip rate (sequence scope) and cross-sequence token flip rate (batch, position)
    fig, ax = plt.subplots(figsize=(5.2, 3.3))
    for scope in scopes:
        if scope == "sequence":
            xs, ys = curve(scope, lambda lb, cs: mean([c["token_flip_rate"] for c in cs]))
            ax.plot(xs, ys, marker="o", label="USMoE sequence scope: prefix vs full")
        else:
            xs, ys = curve(scope, lambda lb, cs: mean([d["token_flip_rate"] for d in cross.get(lb, [])]))
            ax.plot(xs, ys, marker="s", ls="--", label=f"USMoE {scope} scope: batch vs alone")
    if ec is not None:
        ax.axhline(mean([c["token_flip_rate"] for c in ec]), color="grey", ls=":", label="EC cf=1: prefix vs full")
    ax.axhline(0, color="black", lw=0.8, label="TC (exactly 0)")
    ax.set_xlabel("k-bar (mean experts per token); model k = 2")
    ax.set_ylabel("token flip rate (share of tokens)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "leakage_vs_kbar.png")
    fig.savefig(paths[-1], dpi=100, metadata={"Software": None})
    plt.close(fig)
    # 2. drops
    fig, ax = plt.subplots(figsize=(5.2, 3.3))
    for scope in scopes:
        xs, ys = curve(scope, lambda lb, cs: mean([c["drop_rate"] for c in cs]))
        ax.plot(xs, ys, marker="o", label=f"USMoE {scope} scope")
    for router, style in (("ec", ":"), ("capacity_tc", "-.")):
        cs = next((cs for cs in confs.values() if cs[0]["router"] == router), None)
        if cs is not None:
            ax.axhline(mean([c["drop_rate"] for c in cs]), color="grey", ls=style, label=cs[0]["label"])
    ax.set_xlabel("k-bar (mean experts per token); model k = 2")
    ax.set_ylabel("share of tokens with zero experts")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "drops_vs_kbar.png")
    fig.savefig(paths[-1], dpi=100, metadata={"Software": None})
    plt.close(fig)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("verify_dir", type=Path)
    ap.add_argument("analysis_dir", type=Path)
    ap.add_argument("--figures", type=Path, default=None, help="write the two PNG figures here")
    a = ap.parse_args(argv)
    for p in (a.verify_dir / "report.json", a.analysis_dir / "metrics.json"):
        if not p.is_file():
            print(f"error: {p} not found (run usmoe-lp verify / analyze first)", file=sys.stderr)
            return 2
    print(verify_tables(a.verify_dir))
    print(analyze_tables(a.analysis_dir))
    if a.figures is not None:
        for p in figures(a.analysis_dir, a.figures):
            print(f"<!-- wrote {p} -->")
    return 0


if __name__ == "__main__":
    sys.exit(main())
