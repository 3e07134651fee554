"""``run_verify``: determinism, seeding, rebuilding instances, shrinking, aggregation, validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from usmoe_lp import UsmoeLpError
from usmoe_lp.report import write_verify_report
from usmoe_lp.verify import (
    CLAIMS,
    FAMILIES,
    Batch,
    Context,
    VerifyConfig,
    run_verify,
    shrink,
    trial_seed,
)

FAST = ("closed_form", "highs")
FAST_CTX = Context(backends=FAST)

# a small run where three claims fail (sign caveat, EC budget rounding, capped greedy)
SMALL = VerifyConfig(families=("gaussian", "sigmoid", "student_t"), sizes=((4, 3), (6, 4)),
                     ks=(1, 2), trials=2, seed=3, backends=FAST,
                     claims=("topc_optimal_le", "usmoe_ge_tc", "usmoe_ge_ec",
                             "capped_greedy_optimal"))


@pytest.fixture(scope="module")
def small_result():
    return run_verify(SMALL, progress=False)


def fails(claim_id: str, S: np.ndarray, k: int, ctx: Context = FAST_CTX) -> bool:
    if S.shape[0] < 1 or S.shape[1] < 1 or k > S.shape[1]:
        return False  # not an instance: k experts per token need k experts
    chk = CLAIMS[claim_id].check_one(S, k, ctx)
    return chk is not None and not chk.passed


def assert_one_minimal(claim_id: str, S: np.ndarray, k: int, ctx: Context = FAST_CTX) -> None:
    """The claim fails on S, and holds once any single token (row) or expert (column) is removed."""
    assert fails(claim_id, S, k, ctx), "the shrunk counterexample must still fail"
    for axis in (0, 1):
        for i in range(S.shape[axis]):
            smaller = np.delete(S, i, axis=axis)
            assert not fails(claim_id, smaller, k, ctx), (
                f"{claim_id}: still fails without {'row' if axis == 0 else 'column'} {i} of "
                f"{S.tolist()} (k={k})")


# ----------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_report_bytes(small_result, tmp_path):
    again = run_verify(SMALL, progress=False)
    write_verify_report(small_result, tmp_path / "a")
    write_verify_report(again, tmp_path / "b")
    a = (tmp_path / "a" / "report.json").read_bytes()
    b = (tmp_path / "b" / "report.json").read_bytes()
    assert a == b
    cex_a = sorted(p.name for p in (tmp_path / "a" / "counterexamples").iterdir())
    cex_b = sorted(p.name for p in (tmp_path / "b" / "counterexamples").iterdir())
    assert cex_a == cex_b and cex_a
    for name in cex_a:
        assert ((tmp_path / "a" / "counterexamples" / name).read_bytes()
                == (tmp_path / "b" / "counterexamples" / name).read_bytes())


def test_different_seed_gives_different_instances(small_result):
    other = run_verify(replace(SMALL, seed=4), progress=False)
    seeds = {r.seed for r in small_result.records}
    other_seeds = {r.seed for r in other.records}
    assert len(seeds) == len(other_seeds) == 3 * 2 * 2 * 2  # families x sizes x ks x trials
    assert seeds.isdisjoint(other_seeds)
    key = lambda r: (r.claim, r.family, r.T, r.N, r.k, r.trial)  # noqa: E731
    assert [key(r) for r in small_result.records] == [key(r) for r in other.records]
    assert ([r.values for r in small_result.records] != [r.values for r in other.records])


# ----------------------------------------------------------------------------- seeding
def test_trial_seed_stable_and_distinct():
    s = trial_seed(0, "gaussian", 8, 4, 1, 0)
    assert isinstance(s, int) and 0 <= s < 2 ** 64
    assert s == trial_seed(0, "gaussian", 8, 4, 1, 0)
    # pinned: reports name instances by this number, so it must never change
    assert s == 12445897835458626242
    variants = [trial_seed(1, "gaussian", 8, 4, 1, 0), trial_seed(0, "softmax", 8, 4, 1, 0),
                trial_seed(0, "gaussian", 4, 8, 1, 0), trial_seed(0, "gaussian", 8, 4, 2, 0),
                trial_seed(0, "gaussian", 8, 4, 1, 1)]
    assert len({s, *variants}) == 6


def test_trial_seed_same_in_a_fresh_process():
    code = ("from usmoe_lp.verify import trial_seed; "
            "print(trial_seed(0, 'gaussian', 8, 4, 1, 0), trial_seed(7, 'bf16', 3, 2, 2, 5))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    assert [int(x) for x in out] == [trial_seed(0, "gaussian", 8, 4, 1, 0),
                                     trial_seed(7, "bf16", 3, 2, 2, 5)]


def test_instance_independent_of_selected_families():
    common = dict(sizes=((8, 4),), ks=(1,), trials=1, backends=FAST,
                  claims=("usmoe_ge_tc", "topc_optimal_le"))
    alone = run_verify(VerifyConfig(families=("gaussian",), **common), progress=False)
    mixed = run_verify(VerifyConfig(families=("softmax", "all_equal", "gaussian"), **common),
                       progress=False)
    pick = lambda res: [r for r in res.records if r.family == "gaussian"]  # noqa: E731
    a, b = pick(alone), pick(mixed)
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b, strict=True):
        assert (ra.seed, ra.trial, ra.k) == (rb.seed, rb.trial, rb.k)
        assert ra.seed == trial_seed(0, "gaussian", 8, 4, 1, 0)
        assert ra.values == rb.values and ra.passed == rb.passed and ra.gap == rb.gap


def test_instances_rebuild_from_recorded_seed(small_result):
    checked = 0
    for r in small_result.records:
        S = FAMILIES[r.family].generate(np.random.default_rng(r.seed), r.T, r.N)
        c = r.T * r.k
        topc = float(np.sort(S, axis=None)[::-1][:c].sum())
        if r.claim == "usmoe_ge_tc":
            tc = float(np.sort(S, axis=1)[:, ::-1][:, :r.k].sum())
            assert r.values["usmoe"] == pytest.approx(topc)
            for key, v in r.values.items():
                if key.startswith("tc_"):
                    assert v == pytest.approx(tc)
            checked += 1
        elif r.claim == "topc_optimal_le":
            assert r.values["greedy"] == pytest.approx(topc)
            le_opt = float(np.sort(S, axis=None)[::-1][:c].clip(min=0).sum())
            assert r.passed == (abs(le_opt - topc) <= 1e-9 * max(1, abs(topc)))
            checked += 1
    assert checked == len(small_result.records) // 2


# ----------------------------------------------------------------------------- shrinking
def test_counterexamples_are_one_minimal_and_still_fail(small_result):
    assert small_result.counterexamples
    seen_claims = set()
    for cx in small_result.counterexamples:
        seen_claims.add(cx.claim)
        assert cx.scores.ndim == 2
        assert cx.scores.shape[0] <= cx.T and cx.scores.shape[1] <= cx.N
        assert 1 <= cx.shrunk_k <= cx.k
        assert cx.gap > 0
        assert_one_minimal(cx.claim, cx.scores, cx.shrunk_k)
        # the failing trial it came from is rebuildable and fails too
        S = FAMILIES[cx.family].generate(np.random.default_rng(cx.seed), cx.T, cx.N)
        assert fails(cx.claim, S, cx.k)
    assert {"topc_optimal_le", "usmoe_ge_ec"} <= seen_claims


def test_counterexamples_with_cbc_are_minimal_under_every_backend():
    # with CBC in the backends the runner shrinks with the in-process ones, then re-checks
    cfg = VerifyConfig(families=("gaussian",), sizes=((4, 3),), ks=(1, 2), trials=2, seed=1,
                       backends=("closed_form", "highs", "cbc"),
                       claims=("topc_optimal_le", "usmoe_ge_ec"))
    res = run_verify(cfg, progress=False)
    assert {cx.claim for cx in res.counterexamples} == {"topc_optimal_le", "usmoe_ge_ec"}
    full = Context(backends=cfg.backends)
    for cx in res.counterexamples:
        assert "opt_cbc" in cx.values or "ec_cbc" in cx.values
        assert_one_minimal(cx.claim, cx.scores, cx.shrunk_k, full)


def test_shrink_theory_counterexample_to_one_entry():
    S = np.array([[0.5, -1.0], [-2.0, -0.2]])
    sh = shrink(CLAIMS["topc_optimal_le"], S, 1, FAST_CTX)
    assert not sh.exhausted and not sh.check.passed
    # a single negative score: top-1 keeps it, the '<= 1' optimum takes nothing
    assert sh.scores.shape == (1, 1) and sh.scores[0, 0] < 0
    assert sh.k == 1
    assert_one_minimal("topc_optimal_le", sh.scores, sh.k)


def test_shrink_rounding_keeps_one_minimality():
    # on this instance rounding to integers creates ties that make a further token removable
    S = FAMILIES["student_t"].generate(
        np.random.default_rng(trial_seed(0, "student_t", 12, 5, 2, 0)), 12, 5)
    assert fails("capped_greedy_optimal", S, 2)
    sh = shrink(CLAIMS["capped_greedy_optimal"], S, 2, FAST_CTX)
    assert not sh.exhausted
    assert_one_minimal("capped_greedy_optimal", sh.scores, sh.k)


@pytest.mark.parametrize("claim_id,family,T,N,k", [
    ("topc_optimal_le", "gaussian", 8, 3, 2),
    ("usmoe_ge_ec", "softmax", 6, 4, 1),
    ("capped_greedy_optimal", "sigmoid", 8, 4, 1),
])
def test_shrink_produces_one_minimal_failing_instances(claim_id, family, T, N, k):
    shrunk = 0
    for trial in range(6):
        S = FAMILIES[family].generate(np.random.default_rng(trial_seed(0, family, T, N, k, trial)),
                                      T, N)
        if not fails(claim_id, S, k):
            continue
        sh = shrink(CLAIMS[claim_id], S, k, FAST_CTX)
        assert not sh.exhausted and not sh.check.passed
        assert sh.scores.size <= S.size
        assert_one_minimal(claim_id, sh.scores, sh.k)
        shrunk += 1
    assert shrunk >= 1


def test_shrink_refuses_a_holding_instance():
    with pytest.raises(ValueError, match="does not fail"):
        shrink(CLAIMS["topc_optimal_eq"], np.array([[1.0, 2.0]]), 1, FAST_CTX)


def test_no_counterexamples_without_shrink():
    cfg = replace(SMALL, shrink=False, families=("gaussian",))
    res = run_verify(cfg, progress=False)
    assert any(not r.passed for r in res.records)
    assert res.counterexamples == []
    assert all(cell["counterexample"] is None for cell in res.cells())


# ----------------------------------------------------------------------------- aggregation
def test_cells_add_up(small_result):
    cells = small_result.cells()
    # every claim applies at every size here: claims x families x sizes cells
    assert len(cells) == 4 * 3 * 2
    assert {(c["claim"], c["family"], c["size"]) for c in cells} == {
        (cl, f, s) for cl in SMALL.claims for f in SMALL.families for s in ("4x3", "6x4")}
    assert sum(c["trials"] for c in cells) == len(small_result.records)
    for cell in cells:
        T, N = map(int, cell["size"].split("x"))
        rs = [r for r in small_result.records
              if (r.claim, r.family, r.T, r.N) == (cell["claim"], cell["family"], T, N)]
        assert cell["trials"] == len(rs) == len(SMALL.ks) * SMALL.trials
        assert cell["passes"] + cell["failures"] == cell["trials"]
        assert cell["failures"] == sum(not r.passed for r in rs)
        assert len(cell["failing_seeds"]) == min(10, cell["failures"])
        assert cell["worst_gap"] == max([r.gap for r in rs if not r.passed], default=0.0)
        assert (cell["counterexample"] is not None) == (cell["failures"] > 0)
    summary = {c["claim"]: c for c in small_result.claim_summary()}
    for cid in SMALL.claims:
        mine = [c for c in cells if c["claim"] == cid]
        assert summary[cid]["trials"] == sum(c["trials"] for c in mine)
        assert summary[cid]["failures"] == sum(c["failures"] for c in mine)
        assert summary[cid]["verdict"] == ("fails" if summary[cid]["failures"] else "holds")
    assert summary["usmoe_ge_tc"]["verdict"] == "holds"
    assert summary["topc_optimal_le"]["verdict"] == "fails"
    assert "sigmoid" not in summary["topc_optimal_le"]["failing_families"]  # positive scores


def test_k_above_n_is_skipped_where_another_size_runs_it():
    cfg = VerifyConfig(families=("gaussian",), sizes=((3, 2), (2, 3)), ks=(2, 3), trials=1,
                       backends=FAST, claims=("topc_optimal_eq",))
    res = run_verify(cfg, progress=False)
    # k = 3 > N = 2 is skipped on 3x2 only; every k and every size still runs somewhere
    assert sorted({(r.T, r.N, r.k) for r in res.records}) == [(2, 3, 2), (2, 3, 3), (3, 2, 2)]


@pytest.mark.parametrize("kwargs,match", [
    # every size has N < k: nothing would run ("not run" for every claim, exit 0, before the fix)
    ({"sizes": ((4, 2),), "ks": (5,)}, r"ks=5 cannot run.*sizes=4x2"),
    ({"sizes": ((4, 2), (6, 3)), "ks": (1, 4)}, r"ks=4 cannot run.*sizes=4x2,6x3"),
    # a size that runs no k is ignored just as silently
    ({"sizes": ((4, 2), (6, 4)), "ks": (3,)}, r"sizes=4x2 cannot run"),
    # a claim that is applicable to no instance
    ({"claims": ("ilp_eq_lp",), "backends": FAST}, r"ilp_eq_lp cannot run.*milp, exhaustive or cbc"),
    ({"claims": ("ilp_eq_lp",), "sizes": ((3, 2), (2, 3)), "ks": (1,),
      "backends": ("closed_form", "highs", "milp"), "ilp_max_vars": 4},
     r"ilp_eq_lp cannot run.*T\*N <= ilp_max_vars=4"),
])
def test_config_that_would_run_nothing_is_refused(kwargs, match):
    with pytest.raises(UsmoeLpError, match=match):
        VerifyConfig(**{"families": ("gaussian",), "trials": 1, **kwargs})


def test_runnable_claims_actually_run():
    # the oracle for the applicability rule: whatever VerifyConfig accepts runs every claim somewhere
    cfg = VerifyConfig(families=("gaussian",), sizes=((3, 2), (8, 8)), ks=(1,), trials=1,
                       backends=("closed_form", "highs", "milp"), claims=("ilp_eq_lp", "topc_optimal_eq"),
                       ilp_max_vars=6)
    res = run_verify(cfg, progress=False)
    assert all(c["verdict"] != "not run" for c in res.claim_summary())
    assert {(r.T, r.N) for r in res.records if r.claim == "ilp_eq_lp"} == {(3, 2)}


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs,match", [
    ({"families": ("gaussian", "nope")}, "nope"),
    ({"claims": ("no_such_claim",)}, "no_such_claim"),
    ({"backends": ("closed_form", "gurobi")}, "gurobi"),
    ({"backends": ("highs",)}, "two"),
    ({"backends": ("highs", "highs")}, "two"),
    ({"trials": 0}, "trials"),
    ({"sizes": ((0, 4),)}, "sizes"),
    ({"sizes": ((8, -1),)}, "sizes"),
    ({"sizes": (8, 4)}, "sizes"),
    ({"sizes": ((8, 4, 2),)}, "sizes"),
    ({"sizes": ("8x4",)}, "sizes"),
    ({"sizes": ()}, "sizes"),
    ({"ks": (0,)}, "ks"),
    ({"families": ()}, "families"),
    ({"seed": -1}, "seed must be >= 0"),  # was a numpy traceback from SeedSequence
    ({"seed": 1.5}, "seed must be an integer"),
    ({"trials": 2.5}, "trials must be an integer"),
    ({"ilp_max_vars": -1}, "ilp_max_vars must be >= 0"),
    ({"backends": ()}, "backends"),
    ({"shrink": "no"}, "shrink must be True or False"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(UsmoeLpError, match=match):
        VerifyConfig(**kwargs)


def test_config_round_trips_to_json():
    d = SMALL.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["sizes"] == ["4x3", "6x4"] and d["seed"] == 3


# ----------------------------------------------------------------------------- shrink_all
def test_shrink_all_shrinks_every_failure(tmp_path):
    res = run_verify(replace(SMALL, shrink_all=True), progress=False)
    failing = {(r.claim, r.family, r.T, r.N, r.k, r.trial) for r in res.records if not r.passed}
    shrunk = {(c.claim, c.family, c.T, c.N, c.k, c.trial) for c in res.counterexamples}
    assert failing and shrunk == failing
    for cx in res.counterexamples:
        check = CLAIMS[cx.claim].check_one(cx.scores, cx.shrunk_k, FAST_CTX)
        assert check is not None and not check.passed
    # per cell the report keeps the smallest; every shrunk failure is written under all/
    for cell in res.cells():
        if cell["counterexample"] is not None:
            sizes = [c.scores.size for c in res.counterexamples
                     if (c.claim, c.family, f"{c.T}x{c.N}") == (cell["claim"], cell["family"], cell["size"])]
            T, N = map(int, cell["counterexample"]["size"].split("x"))
            assert T * N == min(sizes)
    summary = {c["claim"]: c for c in res.claim_summary()}
    for cid, c in summary.items():
        n = sum(1 for cx in res.counterexamples if cx.claim == cid)
        assert c["shrunk_failures"] == n == c["failures"]
        assert 1 <= c["distinct_minimal_forms"] <= n or n == 0
    write_verify_report(res, tmp_path)
    assert len(list((tmp_path / "counterexamples" / "all").glob("*.json"))) == len(failing)


def test_shrink_all_needs_shrink():
    with pytest.raises(UsmoeLpError, match="shrink_all"):
        VerifyConfig(shrink=False, shrink_all=True)


def test_first_per_cell_is_the_default(small_result):
    cells = {(c.claim, c.family, c.T, c.N) for c in small_result.counterexamples}
    assert len(cells) == len(small_result.counterexamples)


# ----------------------------------------------------------------------------- batches and progress
class _Recorder:
    def __init__(self, total):
        self.phases = [("verify", total, [])]
        self.closed = False

    def advance(self, n, text):
        self.phases[-1][2].append((n, text))

    def phase(self, name, total):
        self.phases.append((name, total, []))

    def close(self):
        self.closed = True


def test_progress_advances_per_batch_then_per_shrunk_failure(monkeypatch, small_result):
    from usmoe_lp.verify import runner as verify_runner

    bars = []
    monkeypatch.setattr(verify_runner, "_progress", lambda enabled, total: bars.append(_Recorder(total)) or bars[-1])
    monkeypatch.setattr(verify_runner, "BATCH_ENTRIES", 24)  # 2 instances of 4x3 per batch, 1 of 6x4
    res = run_verify(SMALL, progress=True)
    (bar,) = bars
    assert bar.closed
    (name, total, steps), (shrink_name, shrink_total, shrunk) = bar.phases
    instances = len(SMALL.families) * len(SMALL.sizes) * len(SMALL.ks) * SMALL.trials
    assert name == "verify" and total == instances == sum(n for n, _ in steps)
    tasks = verify_runner.verify_tasks(SMALL)
    assert [n for n, _ in steps] == [t.instances for t in tasks] and len(tasks) == 3 * 2 * (1 + 2)
    assert steps[0][1] == "gaussian 4x3 k=1"
    assert shrink_name == "shrink" and shrink_total == len(shrunk) == len(res.counterexamples) > 0
    # cutting the batches smaller (18 tasks instead of one per family x size x k) changes nothing in the result
    assert res.records == small_result.records
    assert [c.to_dict() for c in res.counterexamples] == [c.to_dict() for c in small_result.counterexamples]


def test_batch_rejects_bad_shapes_and_k():
    with pytest.raises(UsmoeLpError, match=r"shape \(B, T, N\)"):
        Batch(np.zeros((4, 3)), 1)
    with pytest.raises(UsmoeLpError, match=r"shape \(T, N\)"):
        Batch.one(np.zeros((2, 4, 3)), 1)
    with pytest.raises(UsmoeLpError, match="k = 4"):
        Batch(np.zeros((2, 4, 3)), 4)
