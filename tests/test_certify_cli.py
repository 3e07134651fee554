"""``usmoe-lp certify``: hand-computed certificates, every file format, every error message.

The command is mounted on a local app exactly as ``usmoe_lp/cli.py`` mounts it
(``app.command("certify")(certify_command)``). The oracle for each verdict is a case worked by hand
(optimum, gap, margin, ties of a 2x2 or 2x3 score matrix).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import typer
from safetensors.torch import save_file
from typer.testing import CliRunner

import usmoe_lp.lp
from usmoe_lp.certify_cli import certify_command, parse_array_spec
from usmoe_lp.errors import SolverError

app = typer.Typer(add_completion=False, rich_markup_mode=None)
app.command("certify")(certify_command)


@app.callback()
def _root() -> None:
    """A group, so that the command is invoked as ``certify`` like under usmoe-lp."""


runner = CliRunner(env={"COLUMNS": "200"})

# Token Choice k=1 on S: the row maxima 3 (row 0) and 5 (row 1); optimum 8; runner-ups 2 and 4.
S = np.array([[3.0, 1.0, 2.0], [0.0, 5.0, 4.0]])
BEST = np.array([[1, 0, 0], [0, 1, 0]])
WORSE = np.array([[0, 1, 0], [0, 1, 0]])  # 1 + 5 = 6: gap 2


def run(*args: str):
    return runner.invoke(app, ["certify", *args])


@pytest.fixture
def files(tmp_path):
    np.save(tmp_path / "s.npy", S)
    np.save(tmp_path / "best.npy", BEST)
    np.save(tmp_path / "worse.npy", WORSE.astype(bool))
    return tmp_path


def certificate(*args: str) -> dict:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_optimal_token_choice_prints_the_certificate(files):
    result = run("--scores", str(files / "s.npy"), "--mask", str(files / "best.npy"), "--program", "tc", "--k", "1")
    assert result.exit_code == 0, result.output
    lines = dict(line.strip().split(": ", 1) for line in result.output.strip().splitlines())
    assert lines["status"] == "optimal" and lines["optimal"] == "yes" and lines["feasible"] == "yes"
    assert float(lines["primal"]) == 8 and float(lines["dual bound"]) == 8 and float(lines["gap"]) == 0
    assert float(lines["margin"]) == 1  # min(3 - 2, 5 - 4)
    assert lines["ties"] == "0" and lines["message"] == "optimal (unique)"
    assert "token_choice program on 2x3 scores" in lines["program"]


def test_not_optimal_has_the_hand_computed_gap(files):
    cert = certificate("--scores", str(files / "s.npy"), "--mask", str(files / "worse.npy"), "--program", "tc",
                       "--k", "1")
    assert cert["status"] == "not_optimal" and cert["optimal"] is False and cert["feasible"] is True
    assert cert["primal"] == 6 and cert["dual"] == 8 and cert["gap"] == 2
    assert cert["margin"] == -2  # row 0: selected 1, best unselected 3
    assert set(cert) == set(usmoe_lp.lp.certify(usmoe_lp.lp.RoutingProblem.token_choice(S, 1), WORSE).to_dict())


def test_a_tie_is_reported(tmp_path):
    # row 0 ties 1 = 1: two optimal masks, margin 0
    np.save(tmp_path / "s.npy", np.array([[1.0, 1.0], [0.0, 2.0]]))
    np.save(tmp_path / "m.npy", np.array([[1, 0], [0, 1]]))
    cert = certificate("--scores", str(tmp_path / "s.npy"), "--mask", str(tmp_path / "m.npy"), "--program", "tc",
                       "--k", "1")
    assert cert["status"] == "optimal" and cert["gap"] == 0 and cert["margin"] == 0
    assert cert["ties"] > 0 and math.isclose(cert["log10_optimal_masks"], math.log10(2))


def test_budget_senses_expert_choice_and_capped(tmp_path):
    # S from papers/routing-as-lp.md §3: top-2 {0.5, -0.2} is optimal for "== 2", but "<= 2" drops -0.2
    np.save(tmp_path / "s.npy", np.array([[0.5, -1.0], [-2.0, -0.2]]))
    np.save(tmp_path / "top2.npy", np.array([[1, 0], [0, 1]]))
    s, m = str(tmp_path / "s.npy"), str(tmp_path / "top2.npy")
    le = certificate("--scores", s, "--mask", m, "--program", "budget", "--budget", "2")
    assert le["status"] == "not_optimal" and math.isclose(le["gap"], 0.2, abs_tol=1e-12)
    for sense in ("==", "eq"):
        eq = certificate("--scores", s, "--mask", m, "--program", "budget", "--budget", "2", "--sense", sense)
        assert eq["status"] == "optimal" and eq["gap"] == 0
    # Expert Choice, capacity 1: column maxima 0.5 (token 0) and -0.2 (token 1), the same mask
    ec = certificate("--scores", s, "--mask", m, "--program", "ec", "--capacity", "1")
    assert ec["status"] == "optimal" and math.isclose(ec["primal"], 0.3)
    # capped, budget <= 2, one expert per token, one token per expert: dropping -0.2 gains 0.2
    capped = certificate("--scores", s, "--mask", m, "--program", "capped", "--budget", "2", "--token-max", "1",
                         "--expert-max", "1")
    assert capped["status"] == "not_optimal" and math.isclose(capped["gap"], 0.2, abs_tol=1e-12)
    capped_eq = certificate("--scores", s, "--mask", m, "--program", "capped", "--budget", "2", "--token-max",
                            "1", "--expert-max", "1", "--sense", "le")
    assert capped_eq["status"] == "not_optimal"


def test_an_infeasible_mask_is_a_verdict_not_an_error(files):
    np.save(files / "two.npy", np.array([[1, 1, 0], [0, 1, 0]]))
    cert = certificate("--scores", str(files / "s.npy"), "--mask", str(files / "two.npy"), "--program", "tc",
                       "--k", "1")
    assert cert["status"] == "infeasible" and cert["feasible"] is False and cert["optimal"] is False
    assert "token constraint" in cert["message"]


def test_every_file_format(tmp_path):
    bf16 = torch.tensor(S, dtype=torch.bfloat16)  # S is exact in bfloat16
    np.savez(tmp_path / "one.npz", anything=S)
    np.savez(tmp_path / "both.npz", scores=S, mask=BEST)
    save_file({"scores": bf16, "mask": torch.tensor(BEST, dtype=torch.bool)}, str(tmp_path / "both.safetensors"))
    save_file({"only": bf16}, str(tmp_path / "one.safetensors"))
    torch.save({"scores": torch.tensor(S, dtype=torch.float32), "mask": torch.tensor(BEST)}, tmp_path / "both.pt")
    torch.save(torch.tensor(BEST, dtype=torch.uint8), tmp_path / "mask.pt")
    np.save(tmp_path / "best.npy", BEST.astype(np.float32))  # 0.0 / 1.0 floats are a 0/1 mask
    pairs = [("one.npz", "best.npy"), ("both.npz:scores", "both.npz:mask"),
             ("both.safetensors:scores", "both.safetensors:mask"), ("one.safetensors", "mask.pt"),
             ("both.pt:scores", "both.pt:mask")]
    for scores, mask in pairs:
        cert = certificate("--scores", str(tmp_path / scores), "--mask", str(tmp_path / mask), "--program", "tc",
                           "--k", "1")
        assert (cert["status"], cert["primal"], cert["margin"]) == ("optimal", 8.0, 1.0), (scores, mask)


def test_parse_array_spec_splits_a_key_only_after_a_known_suffix():
    assert parse_array_spec("a.npz:k") == (parse_array_spec("a.npz")[0], "k")
    assert parse_array_spec("dir:x/a.npy") == (parse_array_spec("dir:x/a.npy")[0], None)
    assert str(parse_array_spec("dir:x/a.npy")[0]) == "dir:x/a.npy"
    assert parse_array_spec("a.pt:") == (parse_array_spec("a.pt:")[0], None)


@pytest.mark.parametrize(("args", "message"), [
    (["--program", "tc"], "--program tc (Token Choice: every token takes exactly --k experts) needs --k"),
    (["--program", "ec"], "--program ec (Expert Choice: every expert takes exactly --capacity tokens) needs "
                          "--capacity"),
    (["--program", "budget"], "needs --budget"),
    (["--program", "capped", "--budget", "2"], "needs --token-max and --expert-max"),
    (["--program", "tc", "--k", "1", "--budget", "3"],
     "--budget does not apply to --program tc (--budget is for --program budget and capped)"),
    (["--program", "ec", "--capacity", "1", "--k", "1", "--token-max", "1"], "--k and --token-max do not apply"),
    (["--program", "tc", "--k", "1", "--sense", "=="], "--sense applies to --program budget and capped, not tc"),
    (["--program", "budget", "--budget", "1", "--sense", "<"], "--sense '<' is not a budget sense; use <= (or le) "
                                                              "or == (or eq)"),
    (["--program", "lp"], "--program 'lp' is not a routing program; use one of tc, ec, budget, capped"),
    (["--program", "tc", "--k", "4"], "--program tc --k 4: k = 4 exceeds the number of experts N = 3"),
    (["--program", "ec", "--capacity", "3"], "--program ec --capacity 3: capacity = 3 exceeds the number of "
                                             "tokens T = 2"),
    (["--program", "budget", "--budget", "7"], "--program budget --budget 7: budget 7 exceeds T*N = 6"),
    (["--program", "budget", "--budget", "2", "--sense", "=="], None),  # valid: the control
])
def test_flag_errors_exit_2_in_flag_words(files, args, message):
    result = run("--scores", str(files / "s.npy"), "--mask", str(files / "best.npy"), *args)
    if message is None:
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and message in result.output, result.output
    assert "Traceback" not in result.output


def test_typer_refuses_a_non_positive_k(files):
    result = run("--scores", str(files / "s.npy"), "--mask", str(files / "best.npy"), "--program", "tc", "--k", "0")
    assert result.exit_code == 2 and "--k" in result.output


def test_file_errors_exit_2_naming_the_flag(tmp_path):
    np.save(tmp_path / "s.npy", S)
    np.save(tmp_path / "best.npy", BEST)
    np.save(tmp_path / "nan.npy", np.where(S == 5.0, np.nan, S))
    np.save(tmp_path / "s3.npy", S[None])
    np.save(tmp_path / "wide.npy", np.zeros((2, 4), dtype=int))
    np.save(tmp_path / "two.npy", BEST * 2)
    np.save(tmp_path / "half.npy", BEST * 0.5)
    np.savez(tmp_path / "both.npz", scores=S, mask=BEST)
    (tmp_path / "s.txt").write_text("3 1 2\n0 5 4\n")
    cases = [
        ("nan.npy", "best.npy", "--scores: scores has 1 NaN and 0 Inf entries (first at index (1, 1))"),
        ("s3.npy", "best.npy", "--scores: scores must be 2-D (T tokens, N experts); got shape (1, 2, 3)"),
        ("s.npy", "wide.npy", f"--mask {tmp_path / 'wide.npy'}: mask has shape (2, 4); the program's scores have "
                              "shape (2, 3)"),
        ("s.npy", "two.npy", "mask must be boolean or 0/1"),
        ("s.npy", "half.npy", "mask must be boolean or 0/1"),
        ("both.npz", "best.npy", f"--scores {tmp_path / 'both.npz'} holds several arrays ['mask', 'scores']; pick "
                                 f"one as --scores {tmp_path / 'both.npz'}:KEY"),
        ("s.npy", "both.npz", "--mask " + str(tmp_path / "both.npz") + " holds several arrays"),
        ("both.npz:logits", "best.npy", "--scores: " + str(tmp_path / "both.npz") + ": holds ['mask', 'scores']; "
                                        "expected a single tensor or one named 'logits'"),
        ("missing.npy", "best.npy", "--scores: " + str(tmp_path / "missing.npy") + ": no such file"),
        ("s.txt", "best.npy", "unknown file type .txt"),
    ]
    for scores, mask, message in cases:
        result = run("--scores", str(tmp_path / scores), "--mask", str(tmp_path / mask), "--program", "tc",
                     "--k", "1")
        assert result.exit_code == 2, (scores, mask, result.output)
        assert message in " ".join(result.output.split()), (scores, mask, result.output)


class _Payload:
    """An arbitrary class: torch.load(weights_only=True) refuses to build it."""


def test_pickled_objects_are_never_loaded(tmp_path):
    np.save(tmp_path / "best.npy", BEST)
    torch.save({"scores": torch.tensor(S), "extra": _Payload()}, tmp_path / "evil.pt")  # needs unpickling
    result = run("--scores", f"{tmp_path / 'evil.pt'}:scores", "--mask", str(tmp_path / "best.npy"), "--program",
                 "tc", "--k", "1")
    assert result.exit_code == 2 and "cannot be read as a torch.save file of tensors" in result.output


def test_a_solver_failure_exits_1(files, monkeypatch):
    def broken(problem, mask):
        raise SolverError("could not certify: the LP relaxation did not solve (test)")

    monkeypatch.setattr(usmoe_lp.lp, "certify", broken)
    result = run("--scores", str(files / "s.npy"), "--mask", str(files / "best.npy"), "--program", "tc", "--k", "1")
    assert result.exit_code == 1 and "error: could not certify" in result.output


def test_help_documents_the_exit_codes():
    result = run("--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "Exit codes: 0 the certificate was computed" in text and "2 bad input" in text
    assert "FILE.npz:KEY" in text
