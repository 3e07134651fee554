"""The verify report files (report.json, report.md, counterexamples, PNG figures) and the CLI."""

from __future__ import annotations

import json
import math
import re

import matplotlib.image as mpimg
import numpy as np
import pytest
from typer.testing import CliRunner

from usmoe_lp.cli import app
from usmoe_lp.errors import OutputExists
from usmoe_lp.report import write_verify_report
from usmoe_lp.verify import CLAIMS, FAMILIES, VerifyConfig, VerifyResult, run_verify
from usmoe_lp.verify.runner import Counterexample, TrialRecord

FAST = ("closed_form", "highs")
CONFIG = VerifyConfig(families=("gaussian", "sigmoid"), sizes=((3, 2), (4, 3), (6, 4)), ks=(1, 2),
                      trials=2, seed=0, backends=FAST,
                      claims=("topc_optimal_eq", "topc_optimal_le", "usmoe_ge_tc", "usmoe_ge_ec",
                              "capped_greedy_optimal"))
FIGURES = ("gap_distributions.png", "usmoe_minus_tc.png", "capped_greedy_gap.png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLI_SMALL = ["--families", "gaussian,sigmoid", "--sizes", "3x2,4x3", "--ks", "1,2", "--trials", "2",
             "--claims", "topc_optimal_le,usmoe_ge_tc", "--backends", "closed_form,highs",
             "--no-progress"]


def _reject_constant(name):
    raise AssertionError(f"non-standard JSON constant {name} in the report")


def load_strict(path):
    return json.loads(path.read_text(), parse_constant=_reject_constant)


@pytest.fixture(scope="module")
def result():
    return run_verify(CONFIG, progress=False)


@pytest.fixture(scope="module")
def report_dir(result, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    paths = write_verify_report(result, out, command="usmoe-lp verify (test)")
    assert set(paths) == {"report.json", "report.md", "report.html", *FIGURES}
    return out


runner = CliRunner()


# ----------------------------------------------------------------------------- report.json
def test_report_json_structure(result, report_dir):
    text = (report_dir / "report.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    report = load_strict(report_dir / "report.json")
    assert report["command"] == "usmoe-lp verify (test)"
    assert report["config"] == CONFIG.to_dict()
    assert [c["claim"] for c in report["claims"]] == list(CONFIG.claims)
    cells = report["cells"]
    sizes = [f"{T}x{N}" for T, N in CONFIG.sizes]
    assert len(cells) == len(CONFIG.claims) * len(CONFIG.families) * len(sizes)
    assert {(c["claim"], c["family"], c["size"]) for c in cells} == {
        (cl, f, s) for cl in CONFIG.claims for f in CONFIG.families for s in sizes}
    for cell in cells:
        assert {"trials", "passes", "failures", "worst_gap", "failing_seeds",
                "counterexample"} <= set(cell)
        T, N = map(int, cell["size"].split("x"))
        ks = [k for k in CONFIG.ks if k <= N]
        assert cell["trials"] == len(ks) * CONFIG.trials
        assert cell["passes"] + cell["failures"] == cell["trials"]
        assert len(cell["failing_seeds"]) == cell["failures"]
        for fs in cell["failing_seeds"]:
            assert set(fs) == {"k", "trial", "seed"} and fs["k"] in ks
        if cell["failures"]:
            assert cell["worst_gap"] > 0
            cx = cell["counterexample"]
            assert cx["claim"] == cell["claim"] and cx["family"] == cell["family"]
            assert cx["from_size"] == cell["size"]
            rows, cols = map(int, cx["size"].split("x"))
            assert np.asarray(cx["scores"]).shape == (rows, cols)
        else:
            assert cell["worst_gap"] == 0 and cell["counterexample"] is None
    verdicts = {c["claim"]: c["verdict"] for c in report["claims"]}
    assert verdicts["topc_optimal_eq"] == verdicts["usmoe_ge_tc"] == "holds"
    assert verdicts["topc_optimal_le"] == verdicts["usmoe_ge_ec"] == "fails"
    assert sum(c["trials"] for c in report["claims"]) == len(result.records)


def test_failing_seeds_rebuild_failing_instances(report_dir):
    report = load_strict(report_dir / "report.json")
    cell = next(c for c in report["cells"]
                if c["claim"] == "topc_optimal_le" and c["failures"])
    T, N = map(int, cell["size"].split("x"))
    for fs in cell["failing_seeds"]:
        S = FAMILIES[cell["family"]].generate(np.random.default_rng(fs["seed"]), T, N)
        c = T * fs["k"]
        assert np.sort(S, axis=None)[::-1][c - 1] < 0  # the c-th largest score is negative


def test_counterexample_files_match_the_cells(report_dir):
    report = load_strict(report_dir / "report.json")
    with_cx = [c for c in report["cells"] if c["counterexample"]]
    files = sorted((report_dir / "counterexamples").glob("*.json"))
    assert len(files) == len(with_cx) > 0
    for cell in with_cx:
        path = report_dir / "counterexamples" / f"{cell['claim']}__{cell['family']}__{cell['size']}.json"
        cx = load_strict(path)
        assert cx == cell["counterexample"]
        assert {"claim", "family", "seed", "size", "k", "scores", "gap", "note"} <= set(cx)
    # the summary's minimal counterexample is the smallest one of that claim
    for claim in report["claims"]:
        mine = [c["counterexample"] for c in with_cx if c["claim"] == claim["claim"]]
        if not mine:
            assert claim["minimal_counterexample"] is None
            continue
        sizes = [np.asarray(cx["scores"]).size for cx in mine]
        assert np.asarray(claim["minimal_counterexample"]["scores"]).size == min(sizes)


def test_report_json_is_strict_even_with_non_finite_values(tmp_path):
    cfg = VerifyConfig(families=("gaussian",), sizes=((2, 2),), ks=(1,), trials=1, backends=FAST,
                       claims=("lp_integral_tc",))
    rec = TrialRecord("lp_integral_tc", "gaussian", 2, 2, 1, 0, 7, False, math.nan,
                      {"frac_simplex": None, "frac_ipm": math.inf, "lp_simplex": 1.5},
                      "HiGHS simplex: solver failed")
    cx = Counterexample("lp_integral_tc", "gaussian", 2, 2, 1, 0, 7, np.array([[1.0, math.nan]]),
                        1, math.inf, {"frac_simplex": math.nan}, "solver failed", 3)
    write_verify_report(VerifyResult(cfg, [rec], [cx]), tmp_path)
    for path in [tmp_path / "report.json", *(tmp_path / "counterexamples").glob("*.json")]:
        text = path.read_text()
        assert "NaN" not in text and "Infinity" not in text
        load_strict(path)
    report = load_strict(tmp_path / "report.json")
    assert report["cells"][0]["failures"] == 1 and report["cells"][0]["worst_gap"] is None


# ----------------------------------------------------------------------------- report.md
def test_report_markdown(result, report_dir):
    md = (report_dir / "report.md").read_text()
    assert md.startswith("# usmoe-lp verify report")
    assert "## Claims" in md
    assert "| claim | statement | theory expects | verdict | failures / trials |" in md
    for c in result.claim_summary():
        row = next(line for line in md.splitlines() if line.startswith(f"| `{c['claim']}` |"))
        assert f"{c['failures']} / {c['trials']}" in row
        assert ("**fails**" in row) == (c["verdict"] == "fails")
    assert "## Minimal counterexamples" in md
    for claim in ("topc_optimal_le", "usmoe_ge_ec"):
        assert f"### `{claim}`" in md
    assert "### `usmoe_ge_tc`" not in md
    for fig in FIGURES:
        assert f"({fig})" in md


def test_png_figures(report_dir):
    for name in FIGURES:
        path = report_dir / name
        data = path.read_bytes()
        assert data[:8] == PNG_SIGNATURE
        assert len(data) > 10_000
        img = mpimg.imread(path)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
        assert float(np.std(img[..., :3])) > 0.01  # not a blank canvas


@pytest.mark.parametrize("family,size,k", [("gaussian", (3, 2), 1), ("all_equal", (2, 2), 2)])
def test_minimal_runs_render_every_figure(tmp_path, family, size, k):
    # one family, one size, one k, one trial: every plot has a single level somewhere
    cfg = VerifyConfig(families=(family,), sizes=(size,), ks=(k,), trials=1, backends=FAST,
                       claims=("topc_optimal_le", "usmoe_ge_tc", "capped_greedy_optimal"))
    res = run_verify(cfg, progress=False)
    paths = write_verify_report(res, tmp_path)
    assert {"report.json", "report.md", "usmoe_minus_tc.png", "capped_greedy_gap.png"} <= set(paths)
    for name in paths:
        if name.endswith(".png"):
            assert paths[name].read_bytes()[:8] == PNG_SIGNATURE


def test_rewriting_a_directory_drops_stale_files(report_dir, tmp_path):
    out = tmp_path / "reused"
    first = run_verify(CONFIG, progress=False)
    write_verify_report(first, out)
    assert list((out / "counterexamples").glob("*.json"))
    clean = run_verify(VerifyConfig(families=("sigmoid",), sizes=((4, 2),), ks=(1,), trials=1,
                                    backends=FAST, claims=("usmoe_ge_tc",)), progress=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(OutputExists, match="overwrite=True"):
        write_verify_report(clean, out)  # an earlier report is replaced only when asked to
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    paths = write_verify_report(clean, out, overwrite=True)
    assert list((out / "counterexamples").glob("*.json")) == []
    assert not (out / "gap_distributions.png").exists()
    assert not (out / "capped_greedy_gap.png").exists()
    assert (out / "usmoe_minus_tc.png").exists() and "usmoe_minus_tc.png" in paths
    assert "## Minimal counterexamples" not in (out / "report.md").read_text()


# ----------------------------------------------------------------------------- CLI
def test_cli_verify_writes_report_and_exits_zero_on_failing_claims(tmp_path):
    out = tmp_path / "v"
    res = runner.invoke(app, ["verify", *CLI_SMALL, "--out", str(out)])
    assert res.exit_code == 0, res.output
    for name in ("report.json", "report.md", "gap_distributions.png", "usmoe_minus_tc.png"):
        assert (out / name).is_file()
    report = load_strict(out / "report.json")
    assert report["config"]["families"] == ["gaussian", "sigmoid"]
    assert report["config"]["sizes"] == ["3x2", "4x3"]
    assert report["config"]["claims"] == ["topc_optimal_le", "usmoe_ge_tc"]
    verdicts = {c["claim"]: c["verdict"] for c in report["claims"]}
    assert verdicts == {"topc_optimal_le": "fails", "usmoe_ge_tc": "holds"}
    assert list((out / "counterexamples").glob("topc_optimal_le__gaussian__*.json"))
    assert "report:" in res.output and "topc_optimal_le" in res.output


def test_cli_strict_exit_codes(tmp_path):
    res = runner.invoke(app, ["verify", *CLI_SMALL, "--out", str(tmp_path / "a"), "--strict"])
    assert res.exit_code == 1
    assert (tmp_path / "a" / "report.json").is_file()  # the report is still written
    holding = [a if a != "topc_optimal_le,usmoe_ge_tc" else "usmoe_ge_tc" for a in CLI_SMALL]
    res = runner.invoke(app, ["verify", *holding, "--out", str(tmp_path / "b"), "--strict"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("args,message", [
    (["--families", "gaussian,nope"], "unknown matrix families"),
    (["--claims", "topc_optimal_le,nope"], "unknown claims"),
    (["--backends", "highs"], "two independent backends"),
    (["--backends", "highs,gurobi"], "unknown backends"),
    (["--trials", "0"], "trials"),
    (["--sizes", "0x4"], "positive"),
    (["--sizes", "8by4"], "not of the form TxN"),
    (["--sizes", "8x4,16"], "not of the form TxN"),
    (["--sizes", "axb"], "not of the form TxN"),
    (["--ks", "1,a"], "comma-separated list of integers"),
    (["--trials", "many"], "Invalid value"),
    # cluster flags are checked before any cluster starts or any instance runs
    (["--workers", "0"], "--workers must be an integer >= 1"),
    (["--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "give at most one of --workers and --scheduler"),
    (["--scheduler", " "], "--scheduler must be the address of a Dask scheduler"),
])
def test_cli_bad_input_exits_2(tmp_path, args, message):
    out = tmp_path / "never"
    res = runner.invoke(app, ["verify", "--sizes", "3x2", "--ks", "1", "--trials", "1",
                              "--no-progress", "--out", str(out), *args])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())
    assert "Traceback" not in res.output
    assert not (out / "report.json").exists()


def test_cli_malformed_sizes_is_a_usage_error(tmp_path):
    res = runner.invoke(app, ["verify", "--sizes", "8by4", "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert "Usage" in res.output and "'8by4'" in res.output


def test_cli_families_lists_every_family():
    res = runner.invoke(app, ["families"])
    assert res.exit_code == 0
    lines = res.output.splitlines()
    for name, fam in FAMILIES.items():
        line = next(x for x in lines if x.split() and x.split()[0] == name)
        assert ("signed" if fam.signed else "positive") in line
    assert len([x for x in lines if x.strip()]) == len(FAMILIES)


def test_cli_claims_lists_every_claim():
    res = runner.invoke(app, ["claims"])
    assert res.exit_code == 0
    listed = re.findall(r"^(\w+): ", res.output, flags=re.MULTILINE)
    assert listed == list(CLAIMS)


def test_cli_without_arguments_shows_help():
    res = runner.invoke(app, [])
    assert "verify" in res.output and "demo" in res.output
