"""Every key of a real metrics.json has a definition under its own name, and every definition points to a
section of the repository's docs that exists.

The metrics come from a tiny analysis with every registry router (so routers added later are covered), every
scope and leakage on; the walk below is generic: it recurses the JSON and treats as data only the keys that
are data (layer names, router labels, eps thresholds, library names), each checked to be what it claims.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from usmoe_lp.diagnostics import AnalyzeConfig, analyze_logits
from usmoe_lp.report import analyze_report
from usmoe_lp.report.analyze_report import DEFINITIONS, all_definitions, metrics_dict
from usmoe_lp.routers import list_routers

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

DATA_PARENTS = ("layers", "leakage", "cross_sequence", "fragile_pairs", "fragile_share", "library_versions")
"""Objects whose keys are data: layer names, router labels (twice), eps thresholds (twice), distribution names."""


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(2 * 6, 4, generator=g) for _ in range(2))
    cfg = AnalyzeConfig(routers=list_routers(), scopes=("sequence", "batch", "position"), batch_size=2,
                        kbars=(1.0, 2.0), alphas=(0.5,), threads=False)
    selected = tuple(torch.topk(z, 2, dim=-1).indices for z in logits)   # the model's own: native agreement runs
    result = analyze_logits(logits, top_k=2, padding_mask=torch.zeros(2, 6, dtype=torch.bool), selected=selected,
                            config=cfg)
    # what write_analyze_report writes, without rendering the figures (tests/test_analyze.py writes them)
    metrics = json.loads(json.dumps(metrics_dict(result), allow_nan=False))
    return result, metrics, analyze_report._markdown(result, analyze_report.report_tables(result), {}, "test")


def undefined_keys(metrics: dict) -> list[str]:
    """Paths of the keys of ``metrics`` that are neither defined in its ``definitions`` nor data."""
    defs = metrics["definitions"]
    labels = {r["label"] for r in metrics["pooled"]["counterfactual"]}
    eps = {float(e) for e in metrics["config"]["eps"]}
    missing: list[str] = []

    def defined(key: str) -> bool:
        base, at, _ = key.partition("@")
        return key in defs or (bool(at) and f"{base}@<eps>" in defs)

    def check_data(parent: str, key: str, value, where: str) -> None:
        ok = {"layers": key in metrics["layers"] and isinstance(value, dict),
              "leakage": key in labels, "cross_sequence": key in labels,
              "fragile_pairs": _float(key) in eps, "fragile_share": _float(key) in eps,
              "library_versions": isinstance(value, str)}[parent]
        if not ok:
            missing.append(f"{where}/{key} (not a valid data key of {parent})")

    def visit(path: tuple[str, ...], parent: str | None, key: str, value):
        where = "/".join(path)
        if parent in DATA_PARENTS:
            check_data(parent, key, value, where)
            return None
        if not defined(key):
            missing.append(f"{where}/{key}")
        return SKIP if path == () and key == "definitions" else key

    walk_keys(metrics, visit)
    return missing


SKIP = object()


def walk_keys(obj, visit, path: tuple[str, ...] = (), parent: str | None = None) -> None:
    """Call ``visit(path, parent, key, value)`` on every key of the dicts in ``obj`` (lists walked through); it
    returns the parent name the value's own keys are visited with, or :data:`SKIP` to leave the value out."""
    if isinstance(obj, list):
        for item in obj:
            walk_keys(item, visit, path, parent)
        return
    if not isinstance(obj, dict):
        return
    for key, value in obj.items():
        down = visit(path, parent, key, value)
        if down is not SKIP:
            walk_keys(value, visit, (*path, key), down)


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def test_every_key_of_a_real_metrics_json_is_defined(analysis):
    result, metrics, _ = analysis
    assert list(metrics["layers"]) == list(result.layer_names)
    assert {r["router"] for r in metrics["pooled"]["counterfactual"]} == set(list_routers())  # every router ran
    assert any(metrics["layers"][la]["cross_sequence"] for la in metrics["layers"])          # coupled groups ran
    assert all(m["native_agreement"]["tokens"] == 12 for m in metrics["layers"].values())  # native replay ran
    missing = undefined_keys(metrics)
    example = {}
    for path in missing:
        example.setdefault(path.rsplit("/", 1)[-1], path)
    listed = "; ".join(f"{k} (e.g. {p})" for k, p in example.items())
    assert not missing, ("keys of metrics.json without a definition (add them to usmoe_lp/report/analyze_report.py "
                         f"DEFINITIONS and docs/definitions.md): {listed}")


def test_the_walk_finds_an_undefined_key_and_a_bad_data_key(analysis):
    _, metrics, _ = analysis
    bad = json.loads(json.dumps(metrics))
    layer = next(iter(bad["layers"]))
    bad["layers"][layer]["load"]["mystery_metric"] = 1.0
    bad["layers"][layer]["leakage"]["no such label"] = {"flip_rate": 0.0}
    bad["pooled"]["counterfactual"][0]["another_column"] = None
    found = undefined_keys(bad)
    assert f"layers/{layer}/load/mystery_metric" in found
    assert "pooled/counterfactual/another_column" in found
    assert any("no such label" in f for f in found)
    assert len(found) == 3


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file: lower case, punctuation but - and _ dropped, spaces to -."""
    heads = re.findall(r"^#{1,6} (.+?)\s*$", path.read_text(encoding="utf-8"), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def _check_target(target: str, base: Path) -> str | None:
    """None if ``file#anchor`` (relative to ``base``) names an existing heading, else what is wrong."""
    file, _, anchor = target.partition("#")
    path = (base / file).resolve() if file else base
    if ROOT not in path.parents and path != ROOT:
        return f"{target}: outside the repository"
    if not path.is_file():
        return f"{target}: no such file"
    if anchor and anchor not in _anchors(path):
        return f"{target}: no heading #{anchor} in {path.relative_to(ROOT)}"
    return None


def test_every_definition_cites_an_existing_section_of_the_docs(analysis):
    _, metrics, report = analysis
    problems = [p for key, d in metrics["definitions"].items()
                if (p := _check_target(d["see"], ROOT)) is not None or not d["see"].startswith("docs/")]
    assert not problems, problems
    cited = re.findall(r"(docs/[\w./-]+#[\w-]+)", report)
    assert cited and all(_check_target(c, ROOT) is None for c in cited)
    section = report.split("## Definitions", 1)[1]
    assert "docs/definitions.md" in section and "../" not in section


def test_the_definitions_page_documents_every_key_and_its_links_resolve():
    text = (DOCS / "definitions.md").read_text(encoding="utf-8")
    undocumented = [k for k in DEFINITIONS if f"`{k}`" not in text]
    assert not undocumented, f"keys in analyze_report.DEFINITIONS but not in docs/definitions.md: {undocumented}"
    for page in ("definitions.md", "routers.md"):
        links = re.findall(r"\]\(([^)\s]+)\)", (DOCS / page).read_text(encoding="utf-8"))
        local = [lk for lk in links if not lk.startswith(("http://", "https://"))]
        broken = [p for lk in local if (p := _check_target(lk if not lk.startswith("#") else page + lk, DOCS))]
        assert not broken, broken


def test_router_parameters_are_defined_from_the_registry():
    from usmoe_lp.routers import ROUTERS

    defs = all_definitions()
    for entry in ROUTERS.values():
        for p in entry.params:
            assert p.name in defs, (entry.name, p.name)
            if p.name in DEFINITIONS:   # a name that is also a metric keeps the metric's definition
                continue
            owners = [r for r, e in ROUTERS.items() if p.name in e.param_names]
            assert f"{entry.name}: {p.help}" in defs[p.name].definition, (entry.name, p.name)
            assert defs[p.name].see in {f"docs/routers.md#{r}" for r in owners}, (entry.name, p.name)


# ------------------------------------------------------------------------------------------------ evaluate.json
EVALUATE_DATA_PARENTS = ("definitions", "library_versions")
"""Objects of evaluate.json whose keys are data: column names (each checked below), distribution names."""


@pytest.fixture(scope="module")
def evaluation():
    """A real evaluate.json: the embedded model live under three routers, two corruption rates, generation."""
    from usmoe_lp.live.evaluate import evaluate, settings_grid
    from usmoe_lp.report.evaluate_report import evaluate_dict
    from usmoe_lp.tiny import load_tiny

    model, tokenizer = load_tiny()
    settings = settings_grid(2, ["tc", "usmoe", "ec"], kbar=1, alpha=0.5)
    result = evaluate(model, ["The assert statement.", "A for loop iterates."], settings, tokenizer=tokenizer,
                      seq_len=8, bootstrap=5, corrupt=(0.0, 0.5), generate=2, prompt_tokens=4, progress=False)
    return json.loads(json.dumps(evaluate_dict(result), allow_nan=False))


def live_evaluation_section() -> str:
    """The `## Live evaluation` section of docs/definitions.md (its ### subsections included)."""
    text = (DOCS / "definitions.md").read_text(encoding="utf-8")
    start = text.index("\n## Live evaluation\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def undefined_evaluate_keys(data: dict, documented: set[str]) -> list[str]:
    """Paths of the keys of evaluate.json that the Live evaluation section does not define (router parameters in
    `settings` are defined with their routers, docs/routers.md)."""
    from usmoe_lp.routers import ROUTERS

    params = {p for entry in ROUTERS.values() for p in entry.param_names}
    missing: list[str] = []

    def visit(path: tuple[str, ...], parent: str | None, key: str, value):
        if parent in EVALUATE_DATA_PARENTS:
            return SKIP
        if key not in documented and not (parent == "settings" and key in params):
            missing.append("/".join((*path, key)))
        return key

    walk_keys(data, visit)
    return missing


def test_every_key_of_a_real_evaluate_json_is_defined(evaluation):
    section = live_evaluation_section()
    documented = set(re.findall(r"`([A-Za-z_]\w*)`", section))
    assert evaluation["generation"] and evaluation["documents"]                                  # every part ran
    assert len({r["corrupt"] for r in evaluation["quality"]}) == 2
    missing = undefined_evaluate_keys(evaluation, documented)
    assert not missing, f"keys of evaluate.json not defined in docs/definitions.md#live-evaluation: {missing}"
    columns = {k for part in ("quality", "layers", "generation", "documents") for row in evaluation[part] for k in row}
    assert columns <= set(evaluation["definitions"]), columns - set(evaluation["definitions"])
    assert set(evaluation["definitions"]) <= documented, set(evaluation["definitions"]) - documented
    assert all(isinstance(v, str) and v for v in evaluation["definitions"].values())
    assert isinstance(evaluation["library_versions"], dict)


def test_the_evaluate_walk_finds_an_undefined_key(evaluation):
    documented = set(re.findall(r"`([A-Za-z_]\w*)`", live_evaluation_section()))
    bad = json.loads(json.dumps(evaluation))
    bad["quality"][0]["mystery_metric"] = 1.0
    bad["model"]["vendor"] = "x"
    bad["settings"][1]["not_a_parameter"] = 1
    bad["settings"][1]["kbar"] = 1.0            # a router parameter: defined with its router
    assert sorted(undefined_evaluate_keys(bad, documented)) == ["model/vendor", "quality/mystery_metric",
                                                                 "settings/not_a_parameter"]


def test_the_evaluate_report_cites_an_existing_section():
    from usmoe_lp.report.evaluate_report import DOCS as EVALUATE_DOCS

    assert _check_target(EVALUATE_DOCS, ROOT) is None
