"""The batch engine of ``usmoe-lp verify`` against a per-instance reference.

The reference below is the per-instance claim code from before batching (git 2e8fe86,
``usmoe_lp/verify/claims.py``), trimmed: every program built, solved (``usmoe_lp.lp.solve``, SciPy's
``milp`` for the 0/1 program), certified and routed on one (T, N) matrix at a time. The batch engine
must give the same records: the same verdicts, notes and values, bit for bit except where a solver
computes a number (HiGHS's LP value, a MIP's mask on a tie), which must agree within 1e-9.
"""

from __future__ import annotations

import math
import re
import zlib

import numpy as np
import pytest
import torch

from usmoe_lp._validate import INTEGRALITY_TOL
from usmoe_lp.lp import RoutingProblem, certify, solve
from usmoe_lp.lp.backends import solve_highs
from usmoe_lp.routing import expert_choice, global_topc, token_choice
from usmoe_lp.verify import CLAIMS, FAMILIES, Batch, Context, VerifyConfig, run_verify, trial_seed
from usmoe_lp.verify.claims import capped_bounds, ec_capacity, greedy_capped, mask_objectives
from usmoe_lp.verify.runner import batch_size, verify_tasks

ILP = ("cbc", "milp", "exhaustive")


# ----------------------------------------------------------------------------- the per-instance reference
class Ref:
    """One instance, every program solved on its own (the code path before batching)."""

    def __init__(self, S: np.ndarray, k: int, ctx: Context):
        self.S, self.k, self.ctx = S, k, ctx
        self.T, self.N = S.shape
        self.c, self.e = self.T * k, ec_capacity(self.T, self.N, k)
        self._optima = {}

    def problem(self, name):
        S, k = self.S, self.k
        if name == "capped":
            c, tmax, emax = capped_bounds(self.T, self.N, k)
            return RoutingProblem.capped(S, c, token_max=tmax, expert_max=emax, sense="<=")
        return {"tc": lambda: RoutingProblem.token_choice(S, k), "ec": lambda: RoutingProblem.expert_choice(S, self.e),
                "budget_eq": lambda: RoutingProblem.budget(S, self.c, sense="=="),
                "budget_le": lambda: RoutingProblem.budget(S, self.c, sense="<=")}[name]()

    def backends_for(self, name):
        single = self.problem(name).is_single_block
        return [b for b in self.ctx.backends if not (b == "closed_form" and not single)
                and not (b in ILP and self.S.size > self.ctx.ilp_max_vars)
                and not (b == "exhaustive" and self.S.size > 20)]

    def optimum(self, name, backend):
        if (name, backend) not in self._optima:
            self._optima[name, backend] = self._solve(name, backend)
        return self._optima[name, backend]

    def _solve(self, name, backend):
        p = self.problem(name)
        sol = solve(p, backend, certify_solution=False)
        if not sol.success:
            return math.nan
        return float(sol.objective) if backend == "highs" else p.objective(sol.mask)

    def optima(self, name):
        return {b: self.optimum(name, b) for b in self.backends_for(name)}

    def mask(self, name, S=None):
        s = torch.from_numpy(np.ascontiguousarray(self.S if S is None else S))
        r = {"topc": lambda: global_topc(s, budget=self.c), "tc": lambda: token_choice(s, self.k),
             "ec": lambda: expert_choice(s, capacity=self.e)}[name]()
        return r.numpy_mask()

    def objective(self, mask):
        return float(self.S.ravel()[np.flatnonzero(mask)].sum())

    def close(self, a, b):
        return abs(a - b) <= self.ctx.rtol * max(1.0, abs(a), abs(b))


def agreement(inst, opts):
    vals = list(opts.values())
    if any(math.isnan(v) for v in vals):
        return False, f"backend(s) {[b for b, v in opts.items() if math.isnan(v)]} failed to solve"
    if not all(inst.close(v, vals[0]) for v in vals):
        return False, "backends disagree: " + ", ".join(f"{b}={v:.12g}" for b, v in opts.items())
    return True, ""


def greedy_vs_optimum(inst, router, program):
    obj = inst.objective(inst.mask(router))
    opts = inst.optima(program)
    agree, note = agreement(inst, opts)
    best = max(opts.values())
    ok = agree and all(inst.close(obj, v) for v in opts.values())
    if agree and not ok:
        note = f"greedy {obj:.12g} vs optimum {best:.12g}"
    return ok, max(0.0, best - obj), {"greedy": obj, **{f"opt_{b}": v for b, v in opts.items()}}, note


def ref_check(claim, inst):
    """(passed, gap, values, note) of ``claim`` on one instance, or None (not applicable)."""
    if claim in ("topc_optimal_eq", "topc_optimal_le", "greedy_tc_eq_lp", "greedy_ec_eq_lp"):
        router, program = {"topc_optimal_eq": ("topc", "budget_eq"), "topc_optimal_le": ("topc", "budget_le"),
                           "greedy_tc_eq_lp": ("tc", "tc"), "greedy_ec_eq_lp": ("ec", "ec")}[claim]
        ok, gap, values, note = greedy_vs_optimum(inst, router, program)
        if claim == "topc_optimal_eq":
            cert = certify(inst.problem("budget_eq"), inst.mask("topc"))
            values = {**values, "certificate_optimal": float(cert.optimal), "ties": float(cert.ties or 0)}
            ok, note = ok and cert.optimal, note or ("" if cert.optimal else f"certificate: {cert.message}")
        if claim == "topc_optimal_le" and not ok and not note.startswith("backend"):
            n_neg = int(np.sum(inst.S[inst.mask("topc")] < 0))
            best = max(v for key, v in values.items() if key.startswith("opt_"))
            values = {**values, "negative_picks": float(n_neg)}
            note = (f"top-c (c = {inst.c}) scores {values['greedy']:.6g} but the '<= c' optimum is {best:.6g}: "
                    f"top-c keeps {n_neg} negative score(s) that the optimum drops")
        return ok, gap, values, note
    if claim in ("usmoe_ge_tc", "usmoe_ge_ec"):
        program = claim[-2:]
        usmoe = inst.objective(inst.mask("topc"))
        opts = inst.optima(program)
        agree, note = agreement(inst, opts)
        other = max(opts.values())
        diff = usmoe - other
        ok = agree and (diff >= 0 or inst.close(usmoe, other))
        values = {"usmoe": usmoe, **{f"{program}_{b}": v for b, v in opts.items()}, f"usmoe_minus_{program}": diff}
        if program == "tc":
            return ok, max(0.0, -diff), values, note or ("" if ok else f"TC {other:.12g} beats USMoE {usmoe:.12g}")
        mismatch = inst.N * inst.e - inst.c
        if agree and not ok:
            note = (f"EC (e = {inst.e}, {inst.N * inst.e} pairs) scores {other:.6g} and beats USMoE "
                    f"(c = {inst.c}) at {usmoe:.6g}: budget mismatch N*e - T*k = {mismatch}")
        return ok, max(0.0, -diff), {**values, "budget_mismatch": float(mismatch)}, note
    if claim.startswith("lp_integral"):
        program = {"tc": "tc", "ec": "ec", "budget": "budget_le", "capped": "capped"}[claim.split("_")[-1]]
        p, values, notes = inst.problem(program), {}, []
        for solver in ("simplex", "ipm"):
            raw = solve_highs(p, solver=solver)
            if raw.status != "optimal":
                notes.append(f"HiGHS {solver}: {raw.message}")
                values[f"frac_{solver}"] = math.nan
                continue
            frac = float(np.max(np.abs(raw.x - np.round(raw.x))))
            values[f"frac_{solver}"], values[f"lp_{solver}"] = frac, raw.objective
            if frac > INTEGRALITY_TOL:
                notes.append(f"HiGHS {solver} returned a fractional vertex (max |x - round x| = {frac:.3g})")
        ilp = {b: inst.optimum(program, b) for b in inst.backends_for(program) if b in ILP}
        lp = values.get("lp_simplex", math.nan)
        for b, v in ilp.items():
            values[f"ilp_{b}"] = v
            if not inst.close(v, lp):
                notes.append(f"integrality gap: LP {lp:.12g} vs ILP ({b}) {v:.12g}")
        gap = max([values["frac_simplex"], values["frac_ipm"]] + [abs(lp - v) for v in ilp.values()])
        return not notes, 0.0 if not notes else gap, values, "; ".join(notes)
    if claim == "ilp_eq_lp":
        values, notes, gap, any_ilp = {}, [], 0.0, False
        for program in ("tc", "ec", "budget_le", "capped"):
            lp = inst.optimum(program, "highs")
            values[f"{program}_lp"] = lp
            for b in inst.backends_for(program):
                if b in ILP:
                    any_ilp = True
                    v = values[f"{program}_{b}"] = inst.optimum(program, b)
                    if not inst.close(v, lp):
                        notes.append(f"{program}: ILP ({b}) {v:.12g} vs LP {lp:.12g}")
                        gap = max(gap, abs(lp - v))
        return (not notes, gap, values, "; ".join(notes)) if any_ilp else None
    if claim in ("tc_row_invariance", "ec_column_invariance"):
        axis = 1 if claim.startswith("tc") else 0
        router = "tc" if axis == 1 else "ec"
        rng = np.random.default_rng(zlib.crc32(inst.S.tobytes()))
        X = inst.S if axis == 1 else np.ascontiguousarray(inst.S.T)
        a, b = rng.uniform(0.5, 2.0, size=(X.shape[0], 1)), rng.normal(size=(X.shape[0], 1))
        z = X - X.max(axis=1, keepdims=True)
        fs = {"softmax": np.exp(z) / np.exp(z).sum(axis=1, keepdims=True), "sigmoid": 1 / (1 + np.exp(-X)),
              "affine": a * X + b, "cube": X ** 3}
        base, p = inst.mask(router), inst.problem(router)
        values, notes, gap = {}, [], 0.0
        for name, F in fs.items():
            with np.errstate(all="ignore"):
                m = inst.mask(router, F if axis == 1 else F.T)
            cert = certify(p, m)
            values[f"{name}_same_mask"], values[f"{name}_optimal"] = float(np.array_equal(m, base)), float(cert.optimal)
            if not cert.optimal:
                gap = max(gap, cert.gap)
                notes.append(f"{name}: the mask chosen on f(S) loses {cert.gap:.3g} on S "
                             "(float ties created by the transform)")
        return not notes, gap, values, "; ".join(notes)
    assert claim == "capped_greedy_optimal"
    c, tmax, emax = capped_bounds(inst.T, inst.N, inst.k)
    greedy = inst.objective(ref_greedy_capped(inst.S, c, tmax, emax))
    opts = inst.optima("capped")
    agree, note = agreement(inst, opts)
    best = max(opts.values())
    gap = max(0.0, best - greedy)
    ok = agree and inst.close(greedy, best)
    rel = gap / abs(best) if (best and not ok) else 0.0
    if agree and not ok:
        note = (f"greedy capped top-c (c = {c}, <= {tmax} per token, <= {emax} per expert) scores "
                f"{greedy:.6g} < optimum {best:.6g} (relative gap {rel:.3g})")
    return ok, gap, {"greedy": greedy, **{f"opt_{b}": v for b, v in opts.items()}, "relative_gap": rel}, note


def ref_greedy_capped(S, c, token_max, expert_max):
    T, N = S.shape
    mask = np.zeros(T * N, dtype=bool)
    rows, cols, taken = np.zeros(T, int), np.zeros(N, int), 0
    for idx in np.argsort(-S, axis=None, kind="stable"):
        if taken >= c or S.flat[idx] <= 0:
            break
        i, j = divmod(int(idx), N)
        if rows[i] < token_max and cols[j] < expert_max:
            mask[idx], rows[i], cols[j], taken = True, rows[i] + 1, cols[j] + 1, taken + 1
    return mask.reshape(T, N)


# ----------------------------------------------------------------------------- comparison
SOLVED = re.compile(r"(highs|milp|cbc|exhaustive|simplex|ipm|_lp$|^frac_|minus|relative_gap)")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def same_number(a, b) -> bool:
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)):
        return (a is None or math.isnan(a)) and (b is None or math.isnan(b))
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


def assert_same_note(a: str, b: str) -> None:
    assert NUMBER.sub("#", a) == NUMBER.sub("#", b), (a, b)
    for x, y in zip(NUMBER.findall(a), NUMBER.findall(b), strict=True):
        assert same_number(float(x), float(y)), (a, b)


def assert_same_record(rec, ref) -> None:
    passed, gap, values, note = ref
    assert rec.passed == passed, (rec, note)
    assert same_number(rec.gap, 0.0 if passed else gap), (rec, gap)
    assert list(rec.values) == list(values), (rec.claim, list(rec.values), list(values))
    for key, v in values.items():
        got = rec.values[key]
        v = None if math.isnan(v) else v  # records hold JSON: NaN as None
        if SOLVED.search(key):
            assert same_number(got, v), (rec.claim, key, got, v)
        else:  # the closed form, the routers, the certificates: the same bits
            assert got == v, (rec.claim, key, got, v)
    assert_same_note(rec.note, note)


CONFIG = VerifyConfig(families=("gaussian", "bf16", "near_ties", "all_equal"), sizes=((4, 3), (8, 4)),
                      ks=(1, 2), trials=2, seed=5, backends=("closed_form", "highs", "milp", "exhaustive"),
                      shrink=False)


def test_batch_records_equal_the_per_instance_reference():
    res = run_verify(CONFIG, progress=False)
    ctx = Context(backends=CONFIG.backends, ilp_max_vars=CONFIG.ilp_max_vars)
    expected = []
    for fam in CONFIG.families:
        for T, N in CONFIG.sizes:
            for k in CONFIG.ks:
                for t in range(CONFIG.trials):
                    seed = trial_seed(CONFIG.seed, fam, T, N, k, t)
                    inst = Ref(FAMILIES[fam].generate(np.random.default_rng(seed), T, N), k, ctx)
                    for claim in CONFIG.claims:
                        out = ref_check(claim, inst)
                        if out is not None:
                            expected.append(((claim, fam, T, N, k, t, seed), out))
    assert [(r.claim, r.family, r.T, r.N, r.k, r.trial, r.seed) for r in res.records] == [key for key, _ in expected]
    for rec, (_, ref) in zip(res.records, expected, strict=True):
        assert_same_record(rec, ref)
    # the run is not vacuous: some claims fail, with notes, and ties occur; exhaustive ran at 4x3 only
    assert any(not r.passed for r in res.records)
    assert {(r.T, r.N) for r in res.records if "opt_exhaustive" in r.values} == {(4, 3)}
    assert any(r.values.get("ties", 0) > 0 for r in res.records if r.claim == "topc_optimal_eq")


def test_a_batch_checks_each_instance_as_alone():
    """Stacking never changes an instance's check: a batch of 5 equals five batches of one."""
    rng = np.random.default_rng(0)
    S = np.stack([FAMILIES["bf16"].generate(rng, 6, 4) for _ in range(3)] + [np.full((6, 4), 0.25),
                                                                             -np.abs(rng.standard_normal((6, 4)))])
    ctx = Context(backends=("closed_form", "highs"))
    batch = Batch(S, 2, ctx)
    batch.prepare(list(CLAIMS.values()))  # as the runner does: programs solved together
    for claim in CLAIMS.values():
        if claim.id == "ilp_eq_lp":
            assert claim.check(batch) == [None] * 5  # no 0/1 backend in ctx
            continue
        together = claim.check(batch)
        assert len(together) == 5
        for b in range(5):
            alone = claim.check_one(S[b], 2, ctx)
            assert (together[b].passed, together[b].values.keys(), together[b].note) == (
                alone.passed, alone.values.keys(), alone.note)
            for key, v in alone.values.items():
                assert together[b].values[key] == pytest.approx(v, rel=1e-9, nan_ok=True)


def test_mask_objectives_are_the_bits_of_one_instance_alone():
    rng = np.random.default_rng(2)
    for B, T, N in ((1, 1, 1), (7, 3, 5), (4, 40, 9), (3, 17, 16)):
        S = rng.standard_normal((B, T, N)) * 10.0 ** rng.integers(-3, 4, size=(B, 1, 1))
        M = rng.random((B, T, N)) < rng.random()
        M[0] = False  # an empty selection sums to 0.0
        got = mask_objectives(S, M)
        for b in range(B):
            assert got[b] == RoutingProblem.token_choice(S[b], 1).objective(M[b])


def test_greedy_capped_on_a_stack_equals_the_reference_loop():
    rng = np.random.default_rng(4)
    for T, N, k in ((3, 4, 1), (8, 4, 2), (5, 7, 3), (1, 3, 2)):
        S = np.round(rng.standard_normal((6, T, N)), 1)  # ties and negatives
        c, tmax, emax = capped_bounds(T, N, k)
        stacked = greedy_capped(S, c, tmax, emax)
        assert stacked.shape == S.shape
        for b in range(6):
            np.testing.assert_array_equal(stacked[b], ref_greedy_capped(S[b], c, tmax, emax))
            np.testing.assert_array_equal(greedy_capped(S[b], c, tmax, emax), stacked[b])


def test_tasks_are_cut_by_the_data():
    cfg = VerifyConfig(families=("gaussian", "bf16"), sizes=((8, 4), (64, 8)), ks=(1, 2), trials=300,
                       backends=("closed_form", "highs"), claims=("topc_optimal_eq",))
    tasks = verify_tasks(cfg)
    assert batch_size(8, 4) == 256 and batch_size(64, 8) == 16 and batch_size(1024, 64) == 1
    # job order: family, size, k, then consecutive trial ranges covering every trial once
    keys = [(t.family, t.T, t.N, t.k) for t in tasks]
    assert keys == sorted(keys, key=lambda key: (cfg.families.index(key[0]), cfg.sizes.index(key[1:3]), key[3]))
    for key in set(keys):
        ranges = [(t.start, t.stop) for t in tasks if (t.family, t.T, t.N, t.k) == key]
        assert ranges[0][0] == 0 and ranges[-1][1] == 300
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        assert all(b - a <= batch_size(*key[1:3]) for a, b in ranges)
    assert sum(t.instances for t in tasks) == 2 * 2 * 2 * 300


def test_prepare_solves_each_backend_once_for_all_programs(monkeypatch):
    """One solver call per backend for every program the claims read (plus one for the IPM relaxations),
    and nothing solved twice afterwards."""
    import usmoe_lp.verify.claims as claims_module

    calls = []
    for name in ("solve_highs_batch", "closed_form_batch", "solve_exhaustive_batch"):
        original = getattr(claims_module, name)

        def counted(problems, *args, _name=name, _original=original, **kwargs):
            calls.append((_name, kwargs.get("solver"), kwargs.get("integer", False),
                          sorted({p.name for p in problems}), len(problems)))
            return _original(problems, *args, **kwargs)

        monkeypatch.setattr(claims_module, name, counted)
    S = np.random.default_rng(3).standard_normal((6, 4, 3))
    batch = Batch(S, 1, Context(backends=("closed_form", "highs", "milp", "exhaustive")))
    batch.prepare(list(CLAIMS.values()))
    programs = ["budget", "capped", "expert_choice", "token_choice"]  # RoutingProblem.name (budget: == and <=)
    assert calls == [("closed_form_batch", None, False, programs[:1] + programs[2:], 6 * 4),
                     ("solve_highs_batch", "simplex", False, programs, 6 * 5),
                     ("solve_highs_batch", None, True, programs, 6 * 5),
                     ("solve_exhaustive_batch", None, False, programs, 6 * 5),
                     ("solve_highs_batch", "ipm", False, programs, 6 * 4)]
    for claim in CLAIMS.values():
        assert all(chk is not None for chk in claim.check(batch))
    assert len(calls) == 5  # the checks solve nothing again
