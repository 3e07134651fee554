"""The registry of claims about routing as a linear program, each checked on one instance.

A claim is checked on an :class:`Instance` (a score matrix S (T, N) float64 and a k) and returns
a :class:`Check`: passed or not, the size of the violation (``gap``, in score units), and the
numbers behind the verdict. Every optimum is computed by at least two independent backends (the
closed form, HiGHS through highspy, and the CBC / SciPy integer programs on small instances);
backends that disagree fail the check with a note, since that is a finding too.

Sources: arXiv 2503.22996 (USMoE) Prop. 3.1 and §3; proofs and caveats in papers/routing-as-lp.md §1-4.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from usmoe_lp.errors import InvalidParameter
from usmoe_lp.lp import RoutingProblem, certify, solve
from usmoe_lp.lp.backends import solve_highs
from usmoe_lp.routing import expert_choice, global_topc, token_choice
from usmoe_lp.routing.routers import expert_capacity

PROGRAMS = ("tc", "ec", "budget_eq", "budget_le", "capped")
INTEGRALITY_TOL = 1e-9


@dataclass(frozen=True)
class Context:
    """How claims are checked.

    Attributes:
        backends: optimum backends to use (closed_form, highs, cbc, milp).
        ilp_max_vars: run the integer-program backends (cbc, milp) only when T*N is at most this.
        rtol: relative tolerance when comparing objective values.
    """

    backends: tuple[str, ...] = ("closed_form", "highs", "cbc")
    ilp_max_vars: int = 4096
    rtol: float = 1e-9


@dataclass(frozen=True)
class Check:
    """Outcome of one claim on one instance.

    Attributes:
        passed: the claim holds on this instance.
        gap: how far it is violated (>= 0; 0 when it holds), in units of the score.
        values: the numbers behind the verdict (objectives by backend, budget mismatch, ...).
        note: a short explanation when it fails.
    """

    passed: bool
    gap: float
    values: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def __post_init__(self):
        if self.passed:  # rounding noise (~1e-16) below the tolerance is not a violation
            object.__setattr__(self, "gap", 0.0)


CAPPED_CAPACITY_FACTOR = 1.25
"""Capacity factor of the capped program's per-expert cap (Switch Transformers' default, arXiv 2101.03961)."""


def ec_capacity(T: int, N: int, k: int) -> int:
    """EC capacity matched to a TC budget: e = min(T, ceil(1 * T * k / N)), capacity factor 1, by the
    routers' one rule :func:`usmoe_lp.routing.routers.expert_capacity` (clipped to T as
    :func:`usmoe_lp.routing.expert_choice` clips it; with k <= N the clip never binds)."""
    return min(T, expert_capacity(1.0, T, k, N))


def capped_bounds(T: int, N: int, k: int) -> tuple[int, int, int]:
    """(c, token_max, expert_max) of the capped program: c = T*k, at most k+1 experts per token, at most
    min(T, ceil(1.25 * T * k / N)) tokens per expert (:func:`usmoe_lp.routing.routers.expert_capacity`
    with :data:`CAPPED_CAPACITY_FACTOR`)."""
    return T * k, min(N, k + 1), min(T, expert_capacity(CAPPED_CAPACITY_FACTOR, T, k, N))


class Instance:
    """One score matrix and k, with each program built and solved at most once per backend.

    Args:
        scores: (T, N) float64.
        k: experts per token of the matched Token Choice; budgets are c = T*k.
        ctx: the checking :class:`Context`.
    """

    def __init__(self, scores: np.ndarray, k: int, ctx: Context):
        self.S = np.ascontiguousarray(scores, dtype=np.float64)
        self.T, self.N = self.S.shape
        self.k = int(k)
        self.ctx = ctx
        self._problems: dict[str, RoutingProblem] = {}
        self._optima: dict[tuple[str, str], float] = {}
        self._masks: dict[str, np.ndarray] = {}

    @property
    def c(self) -> int:
        return self.T * self.k

    @property
    def e(self) -> int:
        return ec_capacity(self.T, self.N, self.k)

    def problem(self, name: str) -> RoutingProblem:
        if name not in self._problems:
            S, k = self.S, self.k
            if name == "tc":
                p = RoutingProblem.token_choice(S, k)
            elif name == "ec":
                p = RoutingProblem.expert_choice(S, self.e)
            elif name == "budget_eq":
                p = RoutingProblem.budget(S, self.c, sense="==")
            elif name == "budget_le":
                p = RoutingProblem.budget(S, self.c, sense="<=")
            elif name == "capped":
                c, tmax, emax = capped_bounds(self.T, self.N, k)
                p = RoutingProblem.capped(S, c, token_max=tmax, expert_max=emax, sense="<=")
            else:
                raise InvalidParameter(f"unknown program {name!r}; expected one of {PROGRAMS}")
            self._problems[name] = p
        return self._problems[name]

    def backends_for(self, name: str, ilp: bool = True) -> list[str]:
        p = self.problem(name)
        out = []
        for b in self.ctx.backends:
            if b == "closed_form" and not p.is_single_block:
                continue
            if b in ("cbc", "milp") and (not ilp or self.S.size > self.ctx.ilp_max_vars):
                continue
            out.append(b)
        return out

    def optimum(self, name: str, backend: str) -> float:
        """Optimal value of program ``name`` by ``backend`` (the LP value for highs)."""
        key = (name, backend)
        if key not in self._optima:
            p = self.problem(name)
            sol = solve(p, backend, certify_solution=False)
            if not sol.success:
                self._optima[key] = math.nan
            elif backend == "highs":
                self._optima[key] = float(sol.objective)
            else:
                self._optima[key] = p.objective(sol.mask)
        return self._optima[key]

    def optima(self, name: str, ilp: bool = True) -> dict[str, float]:
        return {b: self.optimum(name, b) for b in self.backends_for(name, ilp)}

    def router_mask(self, name: str) -> np.ndarray:
        """(T, N) bool mask of the fast-path router: ``topc`` (c = T*k), ``tc`` or ``ec``."""
        if name not in self._masks:
            s = torch.from_numpy(self.S)
            if name == "topc":
                r = global_topc(s, budget=self.c)
            elif name == "tc":
                r = token_choice(s, self.k)
            elif name == "ec":
                r = expert_choice(s, capacity=self.e)
            else:
                raise InvalidParameter(f"unknown router {name!r}")
            self._masks[name] = r.numpy_mask()
        return self._masks[name]

    def objective(self, mask: np.ndarray) -> float:
        return float(self.S.ravel()[np.flatnonzero(mask)].sum())

    def close(self, a: float, b: float) -> bool:
        return abs(a - b) <= self.ctx.rtol * max(1.0, abs(a), abs(b))


# ----------------------------------------------------------------------------- helpers
def _named(prefix: str, optima: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{b}": v for b, v in optima.items()}


def _agreement(inst: Instance, optima: dict[str, float]) -> tuple[bool, str]:
    vals = list(optima.values())
    if any(math.isnan(v) for v in vals):
        failed = [b for b, v in optima.items() if math.isnan(v)]
        return False, f"backend(s) {failed} failed to solve"
    if not all(inst.close(v, vals[0]) for v in vals):
        return False, "backends disagree: " + ", ".join(f"{b}={v:.12g}" for b, v in optima.items())
    return True, ""


def _greedy_equals_optimum(inst: Instance, router: str, program: str) -> Check:
    obj = inst.objective(inst.router_mask(router))
    opts = inst.optima(program)
    agree, note = _agreement(inst, opts)
    best = max(opts.values())
    gap = max(0.0, best - obj)
    ok = agree and all(inst.close(obj, v) for v in opts.values())
    if agree and not ok:
        note = f"greedy {obj:.12g} vs optimum {best:.12g}"
    return Check(ok, gap, {"greedy": obj, **_named("opt", opts)}, note)


# ----------------------------------------------------------------------------- the claims
def check_topc_optimal_eq(inst: Instance) -> Check:
    """Global top-c reaches the optimum of max <S, x> s.t. sum x == c."""
    chk = _greedy_equals_optimum(inst, "topc", "budget_eq")
    cert = certify(inst.problem("budget_eq"), inst.router_mask("topc"))
    values = {**chk.values, "certificate_optimal": float(cert.optimal), "ties": float(cert.ties or 0)}
    ok = chk.passed and cert.optimal
    note = chk.note or ("" if cert.optimal else f"certificate: {cert.message}")
    return Check(ok, chk.gap, values, note)


def check_topc_optimal_le(inst: Instance) -> Check:
    """Global top-c reaches the optimum of max <S, x> s.t. sum x <= c (the paper's statement)."""
    chk = _greedy_equals_optimum(inst, "topc", "budget_le")
    if not chk.passed and not chk.note.startswith("backend"):
        n_neg = int(np.sum(inst.S[inst.router_mask("topc")] < 0))
        best = max(v for kk, v in chk.values.items() if kk.startswith("opt_"))
        chk = Check(False, chk.gap, {**chk.values, "negative_picks": float(n_neg)},
                    f"top-c (c = {inst.c}) scores {chk.values['greedy']:.6g} but the '<= c' optimum "
                    f"is {best:.6g}: top-c keeps {n_neg} negative score(s) that the optimum drops")
    return chk


def check_usmoe_ge_tc(inst: Instance) -> Check:
    """obj(global top-c, c = T*k) >= obj(Token Choice, k): TC is feasible for the budget program."""
    usmoe = inst.objective(inst.router_mask("topc"))
    opts = inst.optima("tc")
    agree, note = _agreement(inst, opts)
    tc = max(opts.values())
    diff = usmoe - tc
    ok = agree and (diff >= 0 or inst.close(usmoe, tc))
    gap = max(0.0, -diff)
    return Check(ok, gap, {"usmoe": usmoe, **_named("tc", opts), "usmoe_minus_tc": diff},
                 note or ("" if ok else f"TC {tc:.12g} beats USMoE {usmoe:.12g}"))


def check_usmoe_ge_ec(inst: Instance) -> Check:
    """obj(global top-c, c = T*k) >= obj(Expert Choice, e = ceil(T*k/N)) at 'matched' budget."""
    usmoe = inst.objective(inst.router_mask("topc"))
    opts = inst.optima("ec")
    agree, note = _agreement(inst, opts)
    ec = max(opts.values())
    mismatch = inst.N * inst.e - inst.c
    diff = usmoe - ec
    ok = agree and (diff >= 0 or inst.close(usmoe, ec))
    if agree and not ok:
        note = (f"EC (e = {inst.e}, {inst.N * inst.e} pairs) scores {ec:.6g} and beats USMoE "
                f"(c = {inst.c}) at {usmoe:.6g}: budget mismatch N*e - T*k = {mismatch}")
    return Check(ok, max(0.0, -diff), {"usmoe": usmoe, **_named("ec", opts), "usmoe_minus_ec": diff,
                                       "budget_mismatch": float(mismatch)}, note)


def check_greedy_tc(inst: Instance) -> Check:
    """Row-wise top-k (the TC router) reaches the TC LP/ILP optimum."""
    return _greedy_equals_optimum(inst, "tc", "tc")


def check_greedy_ec(inst: Instance) -> Check:
    """Column-wise top-e (the EC router) reaches the EC LP/ILP optimum."""
    return _greedy_equals_optimum(inst, "ec", "ec")


def _integral(program: str) -> Callable[[Instance], Check]:
    def check(inst: Instance) -> Check:
        p = inst.problem(program)
        values: dict[str, float] = {}
        notes = []
        for solver in ("simplex", "ipm"):
            raw = solve_highs(p, solver=solver)
            if raw.status != "optimal":
                notes.append(f"HiGHS {solver}: {raw.message}")
                values[f"frac_{solver}"] = math.nan
                continue
            frac = float(np.max(np.abs(raw.x - np.round(raw.x))))
            values[f"frac_{solver}"] = frac
            values[f"lp_{solver}"] = raw.objective
            if frac > INTEGRALITY_TOL:
                notes.append(f"HiGHS {solver} returned a fractional vertex (max |x - round x| = {frac:.3g})")
        ilp = {b: inst.optimum(program, b) for b in inst.backends_for(program) if b in ("cbc", "milp")}
        lp = values.get("lp_simplex", math.nan)
        for b, v in ilp.items():
            values[f"ilp_{b}"] = v
            if not inst.close(v, lp):
                notes.append(f"integrality gap: LP {lp:.12g} vs ILP ({b}) {v:.12g}")
        gap = max([values.get("frac_simplex", 0.0), values.get("frac_ipm", 0.0)]
                  + [abs(lp - v) for v in ilp.values()])
        return Check(not notes, 0.0 if not notes else float(gap), values, "; ".join(notes))

    check.__doc__ = f"The LP relaxation of the {program} program has an integral optimal vertex."
    return check


def check_ilp_eq_lp(inst: Instance) -> Check | None:
    """The 0/1 optimum equals the LP-relaxation optimum (TC, EC, budget, capped)."""
    values: dict[str, float] = {}
    notes, gap, any_ilp = [], 0.0, False
    for program in ("tc", "ec", "budget_le", "capped"):
        lp = inst.optimum(program, "highs") if "highs" in inst.ctx.backends else math.nan
        values[f"{program}_lp"] = lp
        for b in inst.backends_for(program):
            if b not in ("cbc", "milp"):
                continue
            any_ilp = True
            v = inst.optimum(program, b)
            values[f"{program}_{b}"] = v
            if not inst.close(v, lp):
                notes.append(f"{program}: ILP ({b}) {v:.12g} vs LP {lp:.12g}")
                gap = max(gap, abs(lp - v))
    if not any_ilp or "highs" not in inst.ctx.backends:
        return None  # not applicable: no ILP backend at this size
    return Check(not notes, gap, values, "; ".join(notes))


def _row_transforms(S: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    a = rng.uniform(0.5, 2.0, size=(S.shape[0], 1))
    b = rng.normal(size=(S.shape[0], 1))
    z = S - S.max(axis=1, keepdims=True)
    soft = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return {"softmax": soft, "sigmoid": 1 / (1 + np.exp(-S)), "affine": a * S + b, "cube": S ** 3}


def _invariance(axis: int) -> Callable[[Instance], Check]:
    router, program = ("tc", "tc") if axis == 1 else ("ec", "ec")

    def check(inst: Instance) -> Check:
        rng = np.random.default_rng(zlib.crc32(inst.S.tobytes()))
        S = inst.S
        transforms = _row_transforms(S, rng) if axis == 1 else {
            n: t.T for n, t in _row_transforms(np.ascontiguousarray(S.T), rng).items()}
        base = inst.router_mask(router)
        p = inst.problem(program)
        values, notes, gap = {}, [], 0.0
        for name, F in transforms.items():
            f = torch.from_numpy(np.ascontiguousarray(F))
            with np.errstate(all="ignore"):
                m = (token_choice(f, inst.k) if axis == 1 else expert_choice(f, capacity=inst.e)).numpy_mask()
            same = bool(np.array_equal(m, base))
            cert = certify(p, m)
            values[f"{name}_same_mask"] = float(same)
            values[f"{name}_optimal"] = float(cert.optimal)
            if not cert.optimal:
                gap = max(gap, cert.gap)
                notes.append(f"{name}: the mask chosen on f(S) loses {cert.gap:.3g} on S "
                             f"(float ties created by the transform)")
        return Check(not notes, gap, values, "; ".join(notes))

    side = "row" if axis == 1 else "column"
    check.__doc__ = f"The {router.upper()} mask is invariant to {side}-wise strictly increasing transforms."
    return check


def greedy_capped(S: np.ndarray, c: int, token_max: int, expert_max: int) -> np.ndarray:
    """(T, N) bool: scan entries by decreasing score, keep one if its token, its expert and the
    budget have room and its score is positive (the natural capacity-aware global top-c)."""
    T, N = S.shape
    order = np.argsort(-S, axis=None, kind="stable")
    mask = np.zeros(T * N, dtype=bool)
    rows = np.zeros(T, dtype=np.int64)
    cols = np.zeros(N, dtype=np.int64)
    taken = 0
    flat = S.ravel()
    for idx in order:
        if taken >= c or flat[idx] <= 0:
            break
        i, j = divmod(int(idx), N)
        if rows[i] < token_max and cols[j] < expert_max:
            mask[idx] = True
            rows[i] += 1
            cols[j] += 1
            taken += 1
    return mask.reshape(T, N)


def check_capped_greedy(inst: Instance) -> Check:
    """Greedy top-c with per-token and per-expert caps reaches the capped program's optimum."""
    c, tmax, emax = capped_bounds(inst.T, inst.N, inst.k)
    greedy = inst.objective(greedy_capped(inst.S, c, tmax, emax))
    opts = inst.optima("capped")
    agree, note = _agreement(inst, opts)
    best = max(opts.values())
    gap = max(0.0, best - greedy)
    ok = agree and inst.close(greedy, best)
    rel = gap / abs(best) if (best and not ok) else 0.0  # rounding noise on a pass is not a gap
    if agree and not ok:
        note = (f"greedy capped top-c (c = {c}, <= {tmax} per token, <= {emax} per expert) scores "
                f"{greedy:.6g} < optimum {best:.6g} (relative gap {rel:.3g})")
    return Check(ok, gap, {"greedy": greedy, **_named("opt", opts), "relative_gap": rel}, note)


# ----------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Claim:
    """A checkable statement.

    Attributes:
        id: registry key (snake_case).
        statement: the claim in words.
        source: where it comes from.
        expectation: what the theory predicts (papers/routing-as-lp.md §2-4), so a reader can compare.
        check: ``check(instance) -> Check | None`` (None: not applicable to this instance).
    """

    id: str
    statement: str
    source: str
    expectation: str
    check: Callable[[Instance], Check | None]


CLAIMS: dict[str, Claim] = {
    c.id: c
    for c in [
        Claim("topc_optimal_eq", "Global top-c is optimal for max <S,x> s.t. sum x = c",
              "Prop. 3.1 with equality (papers/routing-as-lp.md §3)", "holds for every S (exchange argument)",
              check_topc_optimal_eq),
        Claim("topc_optimal_le", "Global top-c is optimal for max <S,x> s.t. sum x <= c, S real",
              "Prop. 3.1 as stated (arXiv 2503.22996 v2 §3)",
              "fails when the c-th largest score is negative (signed scores)", check_topc_optimal_le),
        Claim("usmoe_ge_tc", "obj(USMoE top-c, c = T k) >= obj(TC, k) on the same S",
              "Prop. 3.1 / Lemma A.2 (relaxation)", "holds: TC is feasible for the budget program",
              check_usmoe_ge_tc),
        Claim("usmoe_ge_ec", "obj(USMoE top-c, c = T k) >= obj(EC, e = ceil(T k / N)) on the same S",
              "Prop. 3.1 / Lemma A.2 (relaxation)",
              "holds when N e = T k; can fail when rounding gives EC a larger budget", check_usmoe_ge_ec),
        Claim("greedy_tc_eq_lp", "Row-wise top-k equals the Token Choice LP optimum",
              "papers/routing-as-lp.md §3 (threshold dual)", "holds (rows are independent)", check_greedy_tc),
        Claim("greedy_ec_eq_lp", "Column-wise top-e equals the Expert Choice LP optimum",
              "papers/routing-as-lp.md §3 (threshold dual)", "holds (columns are independent)", check_greedy_ec),
        Claim("lp_integral_tc", "The TC LP relaxation has an integral optimal vertex",
              "papers/routing-as-lp.md §2 (single family)", "holds (interval matrix, totally unimodular)",
              _integral("tc")),
        Claim("lp_integral_ec", "The EC LP relaxation has an integral optimal vertex",
              "papers/routing-as-lp.md §2 (single family)", "holds (totally unimodular)", _integral("ec")),
        Claim("lp_integral_budget", "The budget (<= c) LP relaxation has an integral optimal vertex",
              "papers/routing-as-lp.md §2 (single family)", "holds (one all-ones row)", _integral("budget_le")),
        Claim("lp_integral_capped", "The capped (budget + token + expert caps) LP has an integral vertex",
              "papers/routing-as-lp.md §2 (laminar families, flow)", "holds (b-matching / network flow)",
              _integral("capped")),
        Claim("ilp_eq_lp", "The 0/1 optimum equals the LP optimum for TC, EC, budget and capped",
              "papers/routing-as-lp.md §2", "holds (integral relaxations)", check_ilp_eq_lp),
        Claim("tc_row_invariance", "TC masks are invariant to row-wise strictly increasing transforms",
              "papers/routing-as-lp.md §1 (invariances)",
              "holds in exact arithmetic; float saturation can tie entries", _invariance(axis=1)),
        Claim("ec_column_invariance", "EC masks are invariant to column-wise strictly increasing transforms",
              "papers/routing-as-lp.md §1 (invariances)",
              "holds in exact arithmetic; float saturation can tie entries", _invariance(axis=0)),
        Claim("capped_greedy_optimal", "Greedy top-c with token and expert caps is optimal for the capped program",
              "capacity-aware USMoE, defined in this project; papers/routing-as-lp.md §1",
              "fails: greedy is only a 1/2-approximation for b-matching; see the gap distribution",
              check_capped_greedy),
    ]
}


def get_claims(ids) -> list[Claim]:
    """Resolve claim ids (or ``"all"``) to :class:`Claim` objects, in registry order."""
    if isinstance(ids, str):
        ids = [i.strip() for i in ids.split(",") if i.strip()]
    if ids is None or list(ids) == ["all"]:
        return list(CLAIMS.values())
    unknown = [i for i in ids if i not in CLAIMS]
    if unknown:
        raise InvalidParameter(f"unknown claims {unknown}; choose from {', '.join(CLAIMS)}")
    return [CLAIMS[i] for i in ids]
