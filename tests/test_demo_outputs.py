"""`usmoe-lp demo` output directory: replaces its own earlier output (so `make demo` runs twice in a row),
never a file of the user's; a failed run leaves the earlier demo as it was.

The demo's work is replaced by a fast fake (``_run_into``) that writes a few of the files the real demo
writes; test_demo.py checks that the real demo writes nothing outside ``DEMO_OWNED``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from usmoe_lp import demo
from usmoe_lp.cli import app
from usmoe_lp.errors import OutputExists

FILES = ("report.html", "summary.json", "timings.json", "verify/report.json", "verify/counterexamples/"
         "topc_optimal_le__gaussian__8x4.json", "analysis/metrics.json", "analysis/sweeps.png",
         "router-log/manifest.json", "router-log/shards/00000.safetensors", "evaluate/evaluate.json",
         "evaluate/quality_vs_cost.png", "report.md")


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def fake_run(monkeypatch):
    """Replace the demo's work by writing FILES with the run number; ``fail_after`` injects a failure."""
    state = {"run": 0, "fail_after": None}

    def run_into(out: Path, *, progress: bool, max_tokens: int):
        state["run"] += 1
        for i, name in enumerate(FILES):
            if state["fail_after"] == i:
                raise RuntimeError("injected failure mid-demo")
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text(f"run {state['run']}")
        return None, None, None, ("a",) * 6, {"verify": 0.0, "capture": 0.0, "analyze": 0.0, "evaluate": 0.0}

    monkeypatch.setattr(demo, "_run_into", run_into)
    return state


def test_demo_replaces_its_own_earlier_output(tmp_path, fake_run):
    out = tmp_path / "demo"
    demo.run_demo(out)
    demo.run_demo(out)  # `make demo` twice in a row: no flag needed
    assert snapshot(out) == {name: b"run 2" for name in FILES}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


@pytest.mark.parametrize("user_file", ["notes.txt", "verify/notes.txt", "analysis/old/fig.png",
                                       "router-log/shards/mine.bin", "evaluate/notes.md"])
def test_demo_never_deletes_a_user_file(tmp_path, fake_run, user_file):
    out = tmp_path / "demo"
    demo.run_demo(out)
    (out / user_file).parent.mkdir(parents=True, exist_ok=True)
    (out / user_file).write_text("mine")
    before = snapshot(out)
    with pytest.raises(OutputExists, match="refusing to delete"):
        demo.run_demo(out)
    assert snapshot(out) == before and fake_run["run"] == 1  # refused before any work


def test_demo_no_overwrite_refuses_an_earlier_demo(tmp_path, fake_run):
    out = tmp_path / "demo"
    demo.run_demo(out)
    res = CliRunner().invoke(app, ["demo", "--out", str(out), "--no-overwrite"])
    assert res.exit_code == 2 and "--overwrite" in " ".join(res.output.split())
    assert snapshot(out) == {name: b"run 1" for name in FILES}


def test_failed_demo_leaves_the_earlier_one(tmp_path, fake_run):
    out = tmp_path / "demo"
    demo.run_demo(out)
    fake_run["fail_after"] = 4
    with pytest.raises(RuntimeError, match="injected"):
        demo.run_demo(out)
    assert snapshot(out) == {name: b"run 1" for name in FILES}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_demo_refuses_out_inside_a_router_log(tmp_path, fake_run):
    out = tmp_path / "demo"
    demo.run_demo(out)
    res = CliRunner().invoke(app, ["demo", "--out", str(out / "router-log" / "d")])
    assert res.exit_code == 2 and "router log" in " ".join(res.output.split())
    assert not (out / "router-log" / "d").exists() and fake_run["run"] == 1


def test_demo_cli_rejects_a_bad_token_budget(tmp_path, fake_run):
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--tokens", "0"])
    assert res.exit_code == 2 and "--tokens must be >= 1" in res.output
    assert not (tmp_path / "d").exists() and fake_run["run"] == 0
