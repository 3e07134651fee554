"""Report directories (verify, analyze, demo): no lost file, no ignored parameter, byte-identical reruns.

Every report is built aside and swapped in on success (usmoe_lp.staging): the user's files are never
deleted, a failed run leaves the previous report byte for byte, a rerun leaves no stale figure, and
the same inputs give the same bytes in every file whatever the output directory.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from usmoe_lp.cli import app
from usmoe_lp.diagnostics import AnalyzeConfig, analyze
from usmoe_lp.errors import InvalidParameter, OutputExists
from usmoe_lp.logs import LayerInfo, RouterLogWriter
from usmoe_lp.report import analyze_report, verify_report, write_analyze_report, write_verify_report
from usmoe_lp.report.outputs import foreign_entries
from usmoe_lp.verify import VerifyConfig, run_verify

runner = CliRunner()
N, K = 4, 2
VERIFY_ARGS = ["verify", "--families", "gaussian", "--sizes", "3x2,4x3", "--ks", "1,2", "--trials", "2",
               "--claims", "topc_optimal_le,usmoe_ge_tc,capped_greedy_optimal", "--backends", "closed_form,highs",
               "--no-progress"]
TINY = VerifyConfig(families=("gaussian",), sizes=((3, 2),), ks=(1,), trials=2, backends=("closed_form", "highs"),
                    claims=("topc_optimal_le", "usmoe_ge_tc"))


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def invoke(*args):
    res = runner.invoke(app, [str(a) for a in args])
    text = " ".join(res.output.split())
    assert "Traceback" not in text
    return res, text


@pytest.fixture(scope="module")
def log(tmp_path_factory) -> Path:
    """A tiny router log: 2 layers, N = 4, k = 2, three sequences of 12 tokens, random logits."""
    path = tmp_path_factory.mktemp("log") / "log"
    g = torch.Generator().manual_seed(0)
    n = 36
    with RouterLogWriter(path, [LayerInfo(f"l{i}", num_experts=N, top_k=K) for i in range(2)], fsync=False) as w:
        w.append({f"l{i}": torch.randn(n, N, generator=g) for i in range(2)}, token_ids=list(range(n)),
                 sequence_ids=[t // 12 for t in range(n)], positions=[t % 12 for t in range(n)])
    return path


@pytest.fixture(scope="module")
def tiny_result():
    return run_verify(TINY, progress=False)


@pytest.fixture(scope="module")
def verify_dir(tmp_path_factory) -> Path:
    """``usmoe-lp verify VERIFY_ARGS`` run once; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("verify") / "v"
    res, _ = invoke(*VERIFY_ARGS, "--out", out)
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def analyze_dir(log, tmp_path_factory) -> Path:
    """``usmoe-lp analyze LOG`` run once; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("analyze") / "a"
    res, _ = invoke("analyze", log, "--out", out)
    assert res.exit_code == 0, res.output
    return out


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- verify: no lost file
@pytest.mark.parametrize("user_file", ["notes.txt", "counterexamples/notes.json",
                                       "counterexamples/my__notes__v2.json", "counterexamples/all/x.json"])
def test_verify_never_deletes_a_user_file(tmp_path, verify_dir, user_file):
    out = copy_of(verify_dir, tmp_path / "v")
    (out / user_file).parent.mkdir(parents=True, exist_ok=True)
    (out / user_file).write_text("mine")
    before = snapshot(out)
    for extra in ((), ("--overwrite",)):
        res, text = invoke(*VERIFY_ARGS, "--out", out, *extra)
        assert res.exit_code == 2, res.output
        # without --overwrite: "not empty ... pass --overwrite"; with it: the foreign file is named
        assert ("--overwrite" in text) if not extra else (Path(user_file).name in text)
        assert snapshot(out) == before
    assert siblings(out) == ["v"]  # no staging directory left behind


def test_verify_overwrite_replaces_only_an_earlier_report(tmp_path, verify_dir):
    out = copy_of(verify_dir, tmp_path / "v")
    res, text = invoke(*VERIFY_ARGS, "--out", out)
    assert res.exit_code == 2 and "--overwrite" in text
    res, _ = invoke(*VERIFY_ARGS, "--out", out, "--overwrite", "--claims", "usmoe_ge_tc")
    assert res.exit_code == 0, res.output
    # the rerun found no failure: the earlier counterexamples and failure figures are gone
    assert not (out / "gap_distributions.png").exists() and not (out / "capped_greedy_gap.png").exists()
    assert list((out / "counterexamples").iterdir()) == []


def test_verify_failed_report_leaves_the_previous_one(tmp_path, tiny_result, monkeypatch):
    out = tmp_path / "v"
    write_verify_report(tiny_result, out)
    before = snapshot(out)

    def boom(*args, **kwargs):
        raise RuntimeError("injected failure after the figures")

    monkeypatch.setattr(verify_report, "render_html", boom)
    with pytest.raises(RuntimeError, match="injected"):
        write_verify_report(tiny_result, out, overwrite=True)
    assert snapshot(out) == before
    assert siblings(out) == ["v"]


def test_verify_refuses_out_inside_a_router_log(log, tmp_path):
    for out in (log, log / "report", log / "shards" / "r"):
        res, text = invoke(*VERIFY_ARGS, "--out", out, "--overwrite")
        assert res.exit_code == 2 and "router log" in text and "--out" in text
    assert not (log / "report").exists() and not (log / "shards" / "r").exists()


# ----------------------------------------------------------------------------- analyze: no lost file
def test_analyze_refuses_to_replace_silently_and_keeps_user_files(log, tmp_path, analyze_dir):
    out = copy_of(analyze_dir, tmp_path / "a")
    before = snapshot(out)
    res, text = invoke("analyze", log, "--out", out)  # was: silently overwritten
    assert res.exit_code == 2 and "--overwrite" in text
    assert snapshot(out) == before
    (out / "my-notes.md").write_text("mine")
    res, text = invoke("analyze", log, "--out", out, "--overwrite")
    assert res.exit_code == 2 and "my-notes.md" in text
    assert (out / "my-notes.md").read_text() == "mine" and snapshot(out) == {**before, "my-notes.md": b"mine"}


def test_analyze_rerun_leaves_no_stale_figure(log, tmp_path, analyze_dir):
    out = copy_of(analyze_dir, tmp_path / "a")
    assert (out / "leakage_per_offset.png").is_file()
    res, _ = invoke("analyze", log, "--out", out, "--no-leakage", "--overwrite")
    assert res.exit_code == 0, res.output
    assert not (out / "leakage_per_offset.png").exists()
    assert "leakage_per_offset.png" not in (out / "report.md").read_text()


def test_analyze_failed_report_leaves_the_previous_one(log, tmp_path, monkeypatch):
    result = analyze(log, config=AnalyzeConfig(leakage=False))
    out = tmp_path / "a"
    write_analyze_report(result, out)
    before = snapshot(out)

    def boom(*args, **kwargs):
        raise RuntimeError("injected failure in report.html")

    monkeypatch.setattr(analyze_report, "_html", boom)
    with pytest.raises(RuntimeError, match="injected"):
        write_analyze_report(result, out, overwrite=True)
    assert snapshot(out) == before
    assert siblings(out) == ["a"]


def test_analyze_out_and_log_must_not_overlap(log, tmp_path):
    before = snapshot(log)
    for out in (log, log / "report", log / "shards"):
        res, text = invoke("analyze", log, "--out", out, "--overwrite")
        assert res.exit_code == 2 and "router log" in text, res.output
    assert snapshot(log) == before and sorted(p.name for p in log.iterdir()) == ["manifest.json", "shards"]
    # a log inside the directory the report would replace
    outer = tmp_path / "outer"
    inner = outer / "log"
    inner.mkdir(parents=True)
    for p in log.rglob("*"):
        if p.is_file():
            (inner / p.relative_to(log)).parent.mkdir(parents=True, exist_ok=True)
            (inner / p.relative_to(log)).write_bytes(p.read_bytes())
    res, text = invoke("analyze", inner, "--out", outer, "--overwrite")
    assert res.exit_code == 2 and "contains the input" in text, res.output
    assert snapshot(inner) == before
    with pytest.raises(OutputExists, match="contains the input"):
        write_analyze_report(analyze(inner, config=AnalyzeConfig(leakage=False, counterfactual=False)), outer,
                             overwrite=True)


# ----------------------------------------------------------------------------- parameters never ignored
@pytest.mark.parametrize("top_k,message", [
    ("-1", "--top-k must be >= 0"),
    ("99", "--top-k = 99, but the log records k = 2"),
    ("3", "--top-k = 3, but the log records k = 2"),
])
def test_analyze_top_k_is_checked_against_the_log(log, tmp_path, top_k, message):
    out = tmp_path / "a"
    res, text = invoke("analyze", log, "--out", out, "--top-k", top_k)
    assert res.exit_code == 2 and message in text, res.output
    assert not out.exists()


def test_analyze_kbar_above_n_is_an_error(log, tmp_path):
    # was: dropped from the grid without a word
    res, text = invoke("analyze", log, "--out", tmp_path / "a", "--kbar", "1,5")
    assert res.exit_code == 2 and "--kbar 5 exceed the number of experts N = 4" in text, res.output
    with pytest.raises(InvalidParameter, match="kbars? 5 exceed"):
        analyze(log, config=AnalyzeConfig(kbars=(1.0, 5.0)))
    assert not (tmp_path / "a").exists()


def test_verify_shrink_all_without_shrink_is_an_error(tmp_path):
    # was: --shrink-all silently dropped by --no-shrink
    res, text = invoke(*VERIFY_ARGS, "--no-shrink", "--shrink-all", "--out", tmp_path / "v")
    assert res.exit_code == 2 and re.search(r"shrink[_-]all needs", text), res.output


def test_analyze_top_k_equal_to_the_log_is_accepted(log, tmp_path):
    res, _ = invoke("analyze", log, "--out", tmp_path / "a", "--top-k", "2", "--no-leakage", "--no-counterfactual")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["layers"]["l0"]["top_k"] == K


@pytest.mark.parametrize("top_k,match", [(3, "records k = 2"), (0, "top_k must be >= 1"), (-1, "top_k must be >= 1"),
                                         (2.5, "top_k must be an integer")])
def test_analyze_api_top_k(log, top_k, match):
    with pytest.raises(InvalidParameter, match=match):
        analyze(log, top_k=top_k)


def test_analyze_top_k_above_n_where_the_log_records_none(tmp_path):
    path = tmp_path / "log"
    with RouterLogWriter(path, [LayerInfo("l0", num_experts=N)], fsync=False) as w:
        w.append({"l0": torch.randn(6, N)}, token_ids=list(range(6)), sequence_ids=[0] * 6, positions=list(range(6)))
    with pytest.raises(InvalidParameter, match=r"top_k = 5 exceeds the number of experts N = 4"):
        analyze(path, top_k=5)
    with pytest.raises(InvalidParameter, match="does not record the model's top-k"):
        analyze(path)
    assert analyze(path, top_k=1, config=AnalyzeConfig(leakage=False, counterfactual=False)).layers[0].top_k == 1


@pytest.mark.parametrize("kwargs,match", [
    ({"capacity_factor": 0.0}, "capacity_factor"), ({"capacity_factor": float("nan")}, "capacity_factor"),
    ({"alphas": ()}, "alphas"), ({"scopes": ()}, "scopes"), ({"kbars": ()}, "kbars"),
    ({"routers": ()}, "routers"), ({"eps": (0.0,)}, "eps"), ({"leakage": "no"}, "leakage"),
    ({"alphas": (float("nan"),)}, "alphas"),
])
def test_analyze_config_validated_up_front(kwargs, match):
    with pytest.raises(InvalidParameter, match=match):
        AnalyzeConfig(**kwargs)


def test_analyze_empty_grids_are_fine_when_their_router_is_off():
    AnalyzeConfig(routers=("tc", "ec"), alphas=(), scopes=())
    AnalyzeConfig(routers=(), counterfactual=False)


@pytest.mark.parametrize("args,message", [
    (["--sizes", "4x2", "--ks", "5"], "--ks 5 cannot run"),  # was: exit 0 with every claim "not run"
    (["--sizes", "4x2,8x8", "--ks", "3"], "--sizes 4x2 cannot run"),
    (["--seed", "-1"], "seed must be >= 0"),  # was: a numpy traceback
    (["--claims", "ilp_eq_lp", "--backends", "closed_form,highs"], "ilp_eq_lp cannot run"),
])
def test_verify_parameters_that_cannot_run_are_errors(tmp_path, args, message):
    res, text = invoke("verify", "--families", "gaussian", "--trials", "1", "--no-progress", "--out", tmp_path / "v",
                       *args)
    assert res.exit_code == 2, res.output
    assert message.replace("--ks ", "ks=").replace("--sizes ", "sizes=") in text or message in text
    assert not (tmp_path / "v").exists()


# ----------------------------------------------------------------------------- determinism
def test_verify_is_byte_identical_across_output_directories(tmp_path, verify_dir):
    a, b = verify_dir, tmp_path / "elsewhere" / "b"
    res, _ = invoke(*VERIFY_ARGS, "--out", b)
    assert res.exit_code == 0, res.output
    files_a, files_b = snapshot(a), snapshot(b)
    assert {"gap_distributions.png", "report.json", "report.md"} <= set(files_a)
    assert files_a.keys() == files_b.keys()
    assert [n for n in files_a if files_a[n] != files_b[n]] == []
    report = json.loads(files_a["report.json"])
    assert str(a) not in report["command"] and "--out" not in report["command"]
    assert b"Software" not in files_a["gap_distributions.png"]


def test_verify_command_reproduces_the_config(tmp_path, tiny_result):
    write_verify_report(tiny_result, tmp_path / "r")
    command = json.loads((tmp_path / "r" / "report.json").read_text())["command"]
    res, _ = invoke(*command.split()[1:], "--out", tmp_path / "again", "--no-progress")
    assert res.exit_code == 0, res.output
    assert snapshot(tmp_path / "again") == snapshot(tmp_path / "r")


def test_analyze_is_byte_identical_across_output_directories(log, tmp_path, analyze_dir):
    a, b = analyze_dir, tmp_path / "deeper" / "b"
    res, _ = invoke("analyze", log, "--out", b)
    assert res.exit_code == 0, res.output
    files_a, files_b = snapshot(a), snapshot(b)
    assert {"metrics.json", "report.md", "report.html", "leakage_per_offset.png"} <= set(files_a)
    assert files_a.keys() == files_b.keys()
    assert [n for n in files_a if files_a[n] != files_b[n]] == []
    assert not any(b"Software" in data for name, data in files_a.items() if name.endswith(".png"))


# ----------------------------------------------------------------------------- the foreign-entry rule
def test_foreign_entries_oracle(tmp_path):
    for rel in ("report.json", "counterexamples/topc_optimal_le__gaussian__3x2.json",
                "counterexamples/all/topc_optimal_le__gaussian__3x2__k1__t0.json", "counterexamples/x.json",
                "stuff/a.txt", "report.json.bak"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    (tmp_path / "link.png").symlink_to(tmp_path / "report.json")
    assert foreign_entries(tmp_path, verify_report.VERIFY_OWNED) == [
        "counterexamples/x.json", "link.png", "report.json.bak", "stuff/"]


def _sweep_frame():
    """A pooled counterfactual frame: one single setting (tc), a router swept over kbar x alpha (usmoe),
    one swept over p only (topp), and a single setting whose leakage is undefined (causal_topc)."""
    import numpy as np
    import pandas as pd

    rows = [{"router": "tc", "label": "tc k=2", "realised_kbar": 2.0, "coverage": 0.7, "flip_rate": 0.0}]
    for alpha in (0.3, 0.5):
        for kbar in (1.0, 2.0, 3.0):
            rows.append({"router": "usmoe", "label": f"usmoe a={alpha:g} kbar={kbar:g} seq", "scope": "sequence",
                         "alpha": alpha, "kbar": kbar, "realised_kbar": kbar,
                         "coverage": 0.3 + 0.15 * kbar + alpha / 10, "flip_rate": 0.01 * kbar})
    for p, kbar in ((0.3, 1.4), (0.5, 1.8)):
        rows.append({"router": "topp", "label": f"topp p={p:g}", "p": p, "max_k": 0, "realised_kbar": kbar,
                     "coverage": p + 0.2, "flip_rate": 0.0})
    rows.append({"router": "causal_topc", "label": "causal_topc a=0.5 kbar=2", "alpha": 0.5, "kbar": 2.0,
                 "slack": 8.0, "min_k": 0, "realised_kbar": 1.97, "coverage": 0.69, "flip_rate": np.nan})
    frame = pd.DataFrame(rows).assign(layer="pooled", k=2, drop_rate=0.0, gini=0.1, tokens=96)
    return pd.concat([frame.assign(layer="l0"), frame], ignore_index=True)


def test_sweep_figure_draws_every_setting_from_the_registry_not_by_router_name():
    import matplotlib.pyplot as plt

    from usmoe_lp.report.analyze_figures import plot_sweeps, representative_labels, sweep_layout, sweep_omissions

    cf = _sweep_frame()
    layout = sweep_layout(cf[cf["layer"] == "pooled"]).set_index("label")
    assert layout.loc["tc k=2", "role"] == "reference" and layout.loc["causal_topc a=0.5 kbar=2", "role"] == "reference"
    usm = layout[layout["router"] == "usmoe"]
    assert set(usm["role"]) == {"curve"} and set(usm["curve_param"]) == {"kbar"}
    assert sorted(set(usm["series"])) == ["usmoe alpha=0.3", "usmoe alpha=0.5"]
    assert set(layout.loc[["topp p=0.3", "topp p=0.5"], "curve_param"]) == {"p"}
    fig = plot_sweeps(cf)
    try:
        counts = {}
        for ax in fig.axes:
            if not ax.get_visible():
                continue
            points = sum(len(line.get_xdata()) for line in ax.lines if line.get_marker() not in (None, "None", ""))
            counts[ax.get_ylabel()] = (points, ax.get_title())
        pooled = cf[cf["layer"] == "pooled"]
        for ylabel, (points, title) in counts.items():
            column = {"share": "coverage", "dropped": "drop_rate", "leakage": "flip_rate",
                      "load": "gini"}[ylabel.split()[0]]
            shown = int(pooled[column].notna().sum())
            assert points == shown, (ylabel, points, shown)
            assert f"{shown} of {len(pooled)} settings" in title
        assert len(counts) == 4 and counts["leakage flip rate (share of decisions)"][0] == len(pooled) - 1
        legend = " ".join(t.get_text() for leg in fig.legends for t in leg.get_texts())
        for name in ("tc k=2", "usmoe alpha=0.3", "usmoe alpha=0.5", "topp", "causal_topc a=0.5 kbar=2"):
            assert name in legend
    finally:
        plt.close(fig)
    omitted = sweep_omissions(cf)
    assert len(omitted) == 1 and "causal_topc a=0.5 kbar=2" in omitted[0] and "flip_rate" in omitted[0]
    shown = representative_labels(cf)
    assert "usmoe a=0.5 kbar=2 seq" in shown and "usmoe a=0.3 kbar=2 seq" not in shown   # alpha's default is 0.5
    assert {"tc k=2", "topp p=0.3", "topp p=0.5", "causal_topc a=0.5 kbar=2"} <= set(shown) and len(shown) == 7


def test_sweep_figure_of_single_settings_only():
    import matplotlib.pyplot as plt

    from usmoe_lp.report.analyze_figures import plot_sweeps

    cf = _sweep_frame()
    cf = cf[cf["router"].isin(["tc", "causal_topc"])]
    fig = plot_sweeps(cf)   # no swept router: still drawn (was None without USMoE rows)
    assert fig is not None
    plt.close(fig)
