"""The registry of claims about routing as a linear program, each checked on a batch of instances.

A claim is checked on a :class:`Batch`: B score matrices S (B, T, N) float64 of one size with one k
(in a verify run, B trials of one matrix family). ``claim.check(batch)`` returns one :class:`Check`
per instance (None where the claim does not apply): passed or not, the size of the violation
(``gap``, in score units), and the numbers behind the verdict. A single instance is a batch of one
(:meth:`Batch.one`, :meth:`Claim.check_one`): shrinking and the API run the same check.

Every optimum is computed once per batch, program and backend, by at least two independent backends:
the closed form (``usmoe_lp.lp.closed_form``), the LP relaxation by HiGHS (one highspy model for the
whole batch), and the 0/1 program by HiGHS's MIP in-process (``milp``), by enumerating every mask
(``exhaustive``, T*N <= 20) or by CBC (``cbc``: a subprocess per instance, only when asked for).
Backends that disagree fail the check with a note, since that is a finding too.

Sources: arXiv 2503.22996 (USMoE) Prop. 3.1 and §3; proofs and caveats in papers/routing-as-lp.md §1-4.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from usmoe_lp._validate import INTEGRALITY_TOL
from usmoe_lp.errors import InvalidParameter
from usmoe_lp.lp import (
    EXHAUSTIVE_MAX_ENTRIES,
    Certificate,
    RawResult,
    RoutingProblem,
    certify_batch,
    closed_form_batch,
    solve,
    solve_exhaustive_batch,
    solve_highs_batch,
)
from usmoe_lp.routing import expert_choice, global_topc, token_choice
from usmoe_lp.routing.routers import expert_capacity

PROGRAMS = ("tc", "ec", "budget_eq", "budget_le", "capped")
ILP_BACKENDS = ("cbc", "milp", "exhaustive")
"""Backends that solve the 0/1 program itself (``closed_form`` and ``highs`` solve its LP relaxation)."""
DEFAULT_BACKENDS = ("closed_form", "highs", "milp", "exhaustive")
"""Two independent oracles for every claim at every size up to ``ilp_max_vars``, all in-process, none a
subprocess: the closed form and HiGHS's LP for the single-block programs; HiGHS's LP and its MIP for the
capped program and the integer claims; on tiny instances (T*N <= 20, shrunk counterexamples among them)
also every 0/1 mask enumerated, which shares no code with the others. CBC (a subprocess per program and
instance) runs only when asked for."""


@dataclass(frozen=True)
class Context:
    """How claims are checked.

    Attributes:
        backends: optimum backends to use (``closed_form``, ``highs``, ``milp``, ``exhaustive``, ``cbc``,
            ``flow``; :data:`DEFAULT_BACKENDS` by default).
        ilp_max_vars: run the integer-program backends (:data:`ILP_BACKENDS`) only when T*N is at most this
            (``exhaustive`` also only up to its own limit of 20 entries).
        rtol: relative tolerance when comparing objective values.
    """

    backends: tuple[str, ...] = DEFAULT_BACKENDS
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


def mask_objectives(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(B,) float64: the sum of the selected scores of each instance.

    scores (B, T, N) float64, masks (B, T, N) bool. Each sum is formed exactly as
    ``RoutingProblem.objective`` forms one (the selected entries gathered in row-major order, then
    numpy's sum), so an instance scores the same bits in a batch as alone.
    """
    B = scores.shape[0]
    flat = masks.reshape(B, -1)
    vals = scores.reshape(-1)[np.flatnonzero(flat)]
    out = np.empty(B)
    start = 0
    for b, end in enumerate(np.cumsum(flat.sum(axis=1)).tolist()):
        out[b] = vals[start:end].sum()
        start = end
    return out


class Batch:
    """B instances of one size and one k, each program built, solved and certified once per backend for
    the whole batch.

    Args:
        scores: (B, T, N) float64, one score matrix per instance.
        k: experts per token of the matched Token Choice; budgets are c = T*k.
        ctx: the checking :class:`Context` (default ``Context()``).

    Raises:
        InvalidParameter: scores not of shape (B, T, N), or k outside [1, N].
    """

    def __init__(self, scores, k: int, ctx: Context | None = None):
        S = np.ascontiguousarray(scores, dtype=np.float64)
        if S.ndim != 3 or S.size == 0:
            raise InvalidParameter(f"a batch holds scores of shape (B, T, N), B, T, N >= 1; got {S.shape}")
        self.S = S
        self.B, self.T, self.N = S.shape
        self.k = int(k)
        if not 1 <= self.k <= self.N:
            raise InvalidParameter(f"k = {k} must be between 1 and the number of experts N = {self.N}")
        self.ctx = ctx if ctx is not None else Context()
        self._problems: dict[str, list[RoutingProblem]] = {}
        self._optima: dict[tuple[str, str], np.ndarray] = {}
        self._lp: dict[tuple[str, str], list[RawResult]] = {}
        self._masks: dict[str, np.ndarray] = {}
        self._objectives: dict[str, np.ndarray] = {}
        self._certificates: dict[tuple[str, str], list[Certificate]] = {}

    @classmethod
    def one(cls, scores, k: int, ctx: Context | None = None) -> Batch:
        """A batch of one instance: scores (T, N)."""
        S = np.asarray(scores, dtype=np.float64)
        if S.ndim != 2:
            raise InvalidParameter(f"an instance's scores have shape (T, N); got {S.shape}")
        return cls(S[None], k, ctx)

    @property
    def c(self) -> int:
        return self.T * self.k

    @property
    def e(self) -> int:
        return ec_capacity(self.T, self.N, self.k)

    # ----------------------------------------------------------------------------- programs
    def _problem(self, name: str, S: np.ndarray) -> RoutingProblem:
        k = self.k
        if name == "tc":
            return RoutingProblem.token_choice(S, k)
        if name == "ec":
            return RoutingProblem.expert_choice(S, self.e)
        if name == "budget_eq":
            return RoutingProblem.budget(S, self.c, sense="==")
        if name == "budget_le":
            return RoutingProblem.budget(S, self.c, sense="<=")
        if name == "capped":
            c, tmax, emax = capped_bounds(self.T, self.N, k)
            return RoutingProblem.capped(S, c, token_max=tmax, expert_max=emax, sense="<=")
        raise InvalidParameter(f"unknown program {name!r}; expected one of {PROGRAMS}")

    def problems(self, name: str) -> list[RoutingProblem]:
        """Program ``name`` of every instance (B ``RoutingProblem`` s, built once: the constraints of the
        first instance's program on every score matrix, ``RoutingProblem.for_scores``)."""
        if name not in self._problems:
            self._problems[name] = self._problem(name, self.S[0]).for_scores(self.S)
        return self._problems[name]

    def backends_for(self, name: str) -> list[str]:
        """The backends of the context that solve program ``name`` at this size (the same for every
        instance: the closed form needs a single binding block, the 0/1 backends T*N <= ilp_max_vars)."""
        single = self.problems(name)[0].is_single_block
        size = self.T * self.N
        out = []
        for b in self.ctx.backends:
            if b == "closed_form" and not single:
                continue
            if b in ILP_BACKENDS and size > self.ctx.ilp_max_vars:
                continue
            if b == "exhaustive" and size > EXHAUSTIVE_MAX_ENTRIES:
                continue
            out.append(b)
        return out

    def lp(self, name: str, solver: str) -> list[RawResult]:
        """HiGHS's LP relaxation of program ``name`` for every instance (``solver``: simplex or ipm),
        the batch's programs as diagonal blocks of few highspy models."""
        self._solve_lp([name], solver)
        return self._lp[(name, solver)]

    def _solve_lp(self, names: Sequence[str], solver: str) -> None:
        """One ``solve_highs_batch`` call for the relaxations of every program in ``names`` not solved yet."""
        names = [n for n in dict.fromkeys(names) if (n, solver) not in self._lp]
        if names:
            raws = solve_highs_batch([p for n in names for p in self.problems(n)], solver=solver)
            for i, n in enumerate(names):
                self._lp[(n, solver)] = raws[i * self.B:(i + 1) * self.B]

    def optimum(self, name: str, backend: str) -> np.ndarray:
        """(B,) optimal value of program ``name`` by ``backend`` (the LP value for highs; otherwise the
        objective of the backend's 0/1 mask); NaN where the backend did not solve it."""
        self._solve_optima([name], backend)
        return self._optima[(name, backend)]

    def _solve_optima(self, names: Sequence[str], backend: str) -> None:
        """The optima of every program in ``names`` by ``backend``, in one call of the backend's batch
        function (one HiGHS model / MIP / enumeration / closed-form stack for them all)."""
        names = [n for n in dict.fromkeys(names) if (n, backend) not in self._optima]
        if not names:
            return
        if backend == "highs":
            self._solve_lp(names, "simplex")
            for n in names:
                self._optima[(n, backend)] = np.array([r.objective if r.status == "optimal" else math.nan
                                                       for r in self._lp[(n, "simplex")]])
            return
        problems = [p for n in names for p in self.problems(n)]
        if backend == "milp":
            raws = solve_highs_batch(problems, integer=True)
        elif backend == "exhaustive":
            raws = solve_exhaustive_batch(problems)
        elif backend == "closed_form":
            raws = closed_form_batch(problems)
        else:  # cbc, flow: one solve per instance
            sols = [solve(p, backend, certify_solution=False) for p in problems]
            raws = [RawResult(s.x, s.objective, s.status, s.message, s.duals, s.seconds) for s in sols]
        for i, n in enumerate(names):
            part = raws[i * self.B:(i + 1) * self.B]
            ok = np.array([r.status == "optimal" for r in part])
            masks = np.stack([r.x > 0.5 for r in part])
            self._optima[(n, backend)] = np.where(ok, mask_objectives(self.S, masks), math.nan)

    def prepare(self, claims: Sequence[Claim]) -> None:
        """Solve what ``claims`` read in few solver calls: each backend's optima of every program they name
        (:attr:`Claim.programs`) in one call, and the IPM relaxations (:attr:`Claim.ipm_programs`) in one.
        An optimisation only (a fixed cost of ~10 ms per HiGHS MIP call is paid once instead of once per
        program): whatever is not prepared is solved when first read, by the same functions."""
        claims = [c for c in claims if c.applies(self)]
        programs = [p for c in claims for p in c.programs]
        for backend in self.ctx.backends:
            self._solve_optima([p for p in programs if backend in self.backends_for(p)], backend)
        self._solve_lp([p for c in claims for p in c.ipm_programs], "ipm")

    def optima(self, name: str) -> dict[str, np.ndarray]:
        """{backend: (B,) optimum} over :meth:`backends_for`."""
        return {b: self.optimum(name, b) for b in self.backends_for(name)}

    # ----------------------------------------------------------------------------- routers
    def router_mask(self, name: str) -> np.ndarray:
        """(B, T, N) bool mask of the fast-path router on each instance: ``topc`` (c = T*k), ``tc``
        or ``ec`` (:mod:`usmoe_lp.routing`, the stack routed in one call)."""
        if name not in self._masks:
            self._masks[name] = self._route(name, torch.from_numpy(self.S))
        return self._masks[name]

    def _route(self, name: str, s: torch.Tensor) -> np.ndarray:
        if name == "topc":
            r = global_topc(s, budget=self.c)
        elif name == "tc":
            r = token_choice(s, self.k)
        elif name == "ec":
            r = expert_choice(s, capacity=self.e)
        else:
            raise InvalidParameter(f"unknown router {name!r}")
        return r.numpy_mask()

    def router_objective(self, name: str) -> np.ndarray:
        """(B,) objective of :meth:`router_mask`."""
        if name not in self._objectives:
            self._objectives[name] = self.objectives(self.router_mask(name))
        return self._objectives[name]

    def certificates(self, program: str, router: str) -> list[Certificate]:
        """The certificate of ``router``'s mask for ``program``, per instance (one batch call)."""
        key = (program, router)
        if key not in self._certificates:
            self._certificates[key] = certify_batch(self.problems(program), list(self.router_mask(router)))
        return self._certificates[key]

    def objectives(self, masks: np.ndarray) -> np.ndarray:
        """(B,) objective of masks (B, T, N) bool (:func:`mask_objectives`)."""
        return mask_objectives(self.S, masks)

    def close(self, a, b) -> np.ndarray:
        """Elementwise |a - b| <= rtol * max(1, |a|, |b|) (False where either is NaN)."""
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            return np.abs(a - b) <= self.ctx.rtol * np.maximum(np.maximum(1.0, np.abs(a)), np.abs(b))


# ----------------------------------------------------------------------------- helpers
def _first_max(arrays: Iterable[np.ndarray]) -> np.ndarray:
    """Elementwise ``max(values)`` as Python takes it: the first value, replaced by a later one only
    when strictly greater (so a leading NaN stays, a later NaN is skipped)."""
    arrays = list(arrays)
    best = np.array(arrays[0], dtype=np.float64)
    for v in arrays[1:]:
        best = np.where(v > best, v, best)
    return best


def _best(batch: Batch, optima: dict[str, np.ndarray]) -> np.ndarray:
    """(B,) ``max(optima.values())`` per instance (:func:`_first_max`); NaN without any backend."""
    return _first_max(optima.values()) if optima else np.full(batch.B, math.nan)


def _positive(x: np.ndarray) -> np.ndarray:
    """Elementwise ``max(0.0, x)`` as Python takes it (0.0 for NaN)."""
    return np.where(x > 0.0, x, 0.0)


def _named(prefix: str, optima: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{prefix}_{b}": v for b, v in optima.items()}


def _checks(passed: np.ndarray, gap: np.ndarray, columns: dict[str, np.ndarray], notes: Sequence[str],
            absent: dict[str, np.ndarray] | None = None) -> list[Check]:
    """One :class:`Check` per instance from per-batch columns; ``absent[name]`` (B,) bool leaves that
    value out of those instances."""
    names = list(columns)
    rows = zip(*[np.asarray(columns[n], dtype=np.float64).tolist() for n in names], strict=True)
    out = []
    for b, (ok, g, row, note) in enumerate(zip(passed.tolist(), gap.tolist(), rows, notes, strict=True)):
        values = dict(zip(names, row, strict=True))
        for name, where in (absent or {}).items():
            if where[b]:
                del values[name]
        out.append(Check(bool(ok), float(g), values, note))
    return out


def _agreement(batch: Batch, optima: dict[str, np.ndarray]) -> tuple[np.ndarray, list[str]]:
    """(B,) whether every backend solved and all agree, and the note of each instance where not."""
    names, arrays = list(optima), list(optima.values())
    notes = [""] * batch.B
    if not arrays:
        return np.zeros(batch.B, dtype=bool), [f"no backend of {list(batch.ctx.backends)} solves this program "
                                               f"at {batch.T}x{batch.N}"] * batch.B
    failed = np.zeros(batch.B, dtype=bool)
    same = np.ones(batch.B, dtype=bool)
    for v in arrays:
        failed |= np.isnan(v)
        same &= batch.close(v, arrays[0])
    agree = ~failed & same
    for b in np.flatnonzero(~agree):
        if failed[b]:
            failed_names = [n for n, v in zip(names, arrays, strict=True) if math.isnan(v[b])]
            notes[b] = f"backend(s) {failed_names} failed to solve"
        else:
            notes[b] = "backends disagree: " + ", ".join(f"{n}={float(v[b]):.12g}"
                                                         for n, v in zip(names, arrays, strict=True))
    return agree, notes


def _greedy_vs_optimum(batch: Batch, router: str, program: str):
    """(passed, gap, columns, notes) of "the router's mask reaches the program's optimum"."""
    obj = batch.router_objective(router)
    opts = batch.optima(program)
    agree, notes = _agreement(batch, opts)
    best = _best(batch, opts)
    ok = agree.copy()
    for v in opts.values():
        ok &= batch.close(obj, v)
    for b in np.flatnonzero(agree & ~ok):
        notes[b] = f"greedy {float(obj[b]):.12g} vs optimum {float(best[b]):.12g}"
    gap = np.where(ok, 0.0, _positive(best - obj))
    return ok, gap, {"greedy": obj, **_named("opt", opts)}, notes


# ----------------------------------------------------------------------------- the claims
def check_topc_optimal_eq(batch: Batch) -> list[Check]:
    """Global top-c reaches the optimum of max <S, x> s.t. sum x == c."""
    ok, gap, columns, notes = _greedy_vs_optimum(batch, "topc", "budget_eq")
    certs = batch.certificates("budget_eq", "topc")
    proven = np.array([c.optimal for c in certs])
    columns["certificate_optimal"] = proven.astype(np.float64)
    columns["ties"] = np.array([float(c.ties or 0) for c in certs])
    notes = [n or ("" if c.optimal else f"certificate: {c.message}") for n, c in zip(notes, certs, strict=True)]
    return _checks(ok & proven, gap, columns, notes)


def check_topc_optimal_le(batch: Batch) -> list[Check]:
    """Global top-c reaches the optimum of max <S, x> s.t. sum x <= c (the paper's statement)."""
    checks = _checks(*_greedy_vs_optimum(batch, "topc", "budget_le"))
    mask = batch.router_mask("topc")
    for b, chk in enumerate(checks):
        if chk.passed or chk.note.startswith("backend"):
            continue
        n_neg = int(np.sum(batch.S[b][mask[b]] < 0))
        best = max(v for key, v in chk.values.items() if key.startswith("opt_"))
        checks[b] = Check(False, chk.gap, {**chk.values, "negative_picks": float(n_neg)},
                          f"top-c (c = {batch.c}) scores {chk.values['greedy']:.6g} but the '<= c' optimum "
                          f"is {best:.6g}: top-c keeps {n_neg} negative score(s) that the optimum drops")
    return checks


def check_usmoe_ge_tc(batch: Batch) -> list[Check]:
    """obj(global top-c, c = T*k) >= obj(Token Choice, k): TC is feasible for the budget program."""
    usmoe = batch.router_objective("topc")
    opts = batch.optima("tc")
    agree, notes = _agreement(batch, opts)
    tc = _best(batch, opts)
    diff = usmoe - tc
    ok = agree & ((diff >= 0) | batch.close(usmoe, tc))
    for b in np.flatnonzero(~ok):
        notes[b] = notes[b] or f"TC {float(tc[b]):.12g} beats USMoE {float(usmoe[b]):.12g}"
    return _checks(ok, _positive(-diff), {"usmoe": usmoe, **_named("tc", opts), "usmoe_minus_tc": diff}, notes)


def check_usmoe_ge_ec(batch: Batch) -> list[Check]:
    """obj(global top-c, c = T*k) >= obj(Expert Choice, e = ceil(T*k/N)) at 'matched' budget."""
    usmoe = batch.router_objective("topc")
    opts = batch.optima("ec")
    agree, notes = _agreement(batch, opts)
    ec = _best(batch, opts)
    mismatch = batch.N * batch.e - batch.c
    diff = usmoe - ec
    ok = agree & ((diff >= 0) | batch.close(usmoe, ec))
    for b in np.flatnonzero(agree & ~ok):
        notes[b] = (f"EC (e = {batch.e}, {batch.N * batch.e} pairs) scores {float(ec[b]):.6g} and beats USMoE "
                    f"(c = {batch.c}) at {float(usmoe[b]):.6g}: budget mismatch N*e - T*k = {mismatch}")
    columns = {"usmoe": usmoe, **_named("ec", opts), "usmoe_minus_ec": diff,
               "budget_mismatch": np.full(batch.B, float(mismatch))}
    return _checks(ok, _positive(-diff), columns, notes)


def check_greedy_tc(batch: Batch) -> list[Check]:
    """Row-wise top-k (the TC router) reaches the TC LP/ILP optimum."""
    return _checks(*_greedy_vs_optimum(batch, "tc", "tc"))


def check_greedy_ec(batch: Batch) -> list[Check]:
    """Column-wise top-e (the EC router) reaches the EC LP/ILP optimum."""
    return _checks(*_greedy_vs_optimum(batch, "ec", "ec"))


def _integral(program: str) -> Callable[[Batch], list[Check]]:
    def check(batch: Batch) -> list[Check]:
        B = batch.B
        columns: dict[str, np.ndarray] = {}
        absent: dict[str, np.ndarray] = {}
        notes: list[list[str]] = [[] for _ in range(B)]
        fracs = []
        for solver in ("simplex", "ipm"):
            raws = batch.lp(program, solver)
            solved = np.array([r.status == "optimal" for r in raws])
            X = np.stack([r.x for r in raws]).reshape(B, -1)
            frac = np.where(solved, np.max(np.abs(X - np.round(X)), axis=1), math.nan)
            columns[f"frac_{solver}"] = frac
            columns[f"lp_{solver}"] = np.array([r.objective if ok else math.nan
                                                for r, ok in zip(raws, solved, strict=True)])
            absent[f"lp_{solver}"] = ~solved
            fracs.append(frac)
            for b in range(B):
                if not solved[b]:
                    notes[b].append(f"HiGHS {solver}: {raws[b].message}")
                elif frac[b] > INTEGRALITY_TOL:
                    notes[b].append(f"HiGHS {solver} returned a fractional vertex (max |x - round x| = "
                                    f"{float(frac[b]):.3g})")
        lp = columns["lp_simplex"]
        diffs = []
        for b_name in batch.backends_for(program):
            if b_name not in ILP_BACKENDS:
                continue
            v = batch.optimum(program, b_name)
            columns[f"ilp_{b_name}"] = v
            diffs.append(np.abs(lp - v))
            for b in np.flatnonzero(~batch.close(v, lp)):
                notes[b].append(f"integrality gap: LP {float(lp[b]):.12g} vs ILP ({b_name}) {float(v[b]):.12g}")
        passed = np.array([not n for n in notes])
        gap = np.where(passed, 0.0, _first_max(fracs + diffs))
        return _checks(passed, gap, columns, ["; ".join(n) for n in notes], absent)

    check.__doc__ = f"The LP relaxation of the {program} program has an integral optimal vertex."
    return check


ILP_EQ_LP_PROGRAMS = ("tc", "ec", "budget_le", "capped")


def _ilp_backends(batch: Batch) -> dict[str, list[str]]:
    return {p: [b for b in batch.backends_for(p) if b in ILP_BACKENDS] for p in ILP_EQ_LP_PROGRAMS}


def ilp_eq_lp_applies(batch: Batch) -> bool:
    """``ilp_eq_lp`` needs HiGHS's LP and a 0/1 backend that solves some program at this size."""
    return "highs" in batch.ctx.backends and any(_ilp_backends(batch).values())


def check_ilp_eq_lp(batch: Batch) -> list[Check | None]:
    """The 0/1 optimum equals the LP-relaxation optimum (TC, EC, budget, capped)."""
    if not ilp_eq_lp_applies(batch):
        return [None] * batch.B  # not applicable: no ILP backend at this size
    programs = ILP_EQ_LP_PROGRAMS
    ilp = _ilp_backends(batch)
    columns: dict[str, np.ndarray] = {}
    notes: list[list[str]] = [[] for _ in range(batch.B)]
    gap = np.zeros(batch.B)
    for program in programs:
        lp = batch.optimum(program, "highs")
        columns[f"{program}_lp"] = lp
        for b_name in ilp[program]:
            v = batch.optimum(program, b_name)
            columns[f"{program}_{b_name}"] = v
            off = ~batch.close(v, lp)
            for b in np.flatnonzero(off):
                notes[b].append(f"{program}: ILP ({b_name}) {float(v[b]):.12g} vs LP {float(lp[b]):.12g}")
            d = np.abs(lp - v)
            gap = np.where(off & (d > gap), d, gap)
    passed = np.array([not n for n in notes])
    return _checks(passed, gap, columns, ["; ".join(n) for n in notes])


def _row_transforms(X: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """Strictly increasing transforms of each row of X (B, R, L): softmax, sigmoid, a*x + b with a in
    [0.5, 2), b ~ N(0, 1) per row (a, b: (B, R, 1)), and the cube."""
    z = X - X.max(axis=-1, keepdims=True)
    soft = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    return {"softmax": soft, "sigmoid": 1 / (1 + np.exp(-X)), "affine": a * X + b, "cube": X ** 3}


def _invariance(axis: int) -> Callable[[Batch], list[Check]]:
    router, program = ("tc", "tc") if axis == 1 else ("ec", "ec")

    def check(batch: Batch) -> list[Check]:
        B = batch.B
        X = batch.S if axis == 1 else np.ascontiguousarray(batch.S.transpose(0, 2, 1))
        rows = X.shape[1]
        a, b = np.empty((B, rows, 1)), np.empty((B, rows, 1))
        for i, S in enumerate(batch.S):  # each instance's own generator, seeded by its scores
            rng = np.random.default_rng(zlib.crc32(S.tobytes()))
            a[i] = rng.uniform(0.5, 2.0, size=(rows, 1))
            b[i] = rng.normal(size=(rows, 1))
        transforms = _row_transforms(X, a, b)
        base = batch.router_mask(router)
        problems = batch.problems(program)
        base_certs = batch.certificates(program, router)
        columns: dict[str, np.ndarray] = {}
        notes: list[list[str]] = [[] for _ in range(B)]
        gap = [0.0] * B
        for name, F in transforms.items():
            f = torch.from_numpy(np.ascontiguousarray(F if axis == 1 else F.transpose(0, 2, 1)))
            with np.errstate(all="ignore"):
                m = batch._route(router, f)
            same = (m == base).reshape(B, -1).all(axis=1)
            certs = list(base_certs)  # a mask equal to the router's on S has the same certificate
            moved = np.flatnonzero(~same)
            if moved.size:
                for i, cert in zip(moved, certify_batch([problems[i] for i in moved], list(m[moved])), strict=True):
                    certs[i] = cert
            columns[f"{name}_same_mask"] = same.astype(np.float64)
            columns[f"{name}_optimal"] = np.array([float(c.optimal) for c in certs])
            for i, cert in enumerate(certs):
                if not cert.optimal:
                    gap[i] = max(gap[i], cert.gap)
                    notes[i].append(f"{name}: the mask chosen on f(S) loses {cert.gap:.3g} on S "
                                    f"(float ties created by the transform)")
        passed = np.array([not n for n in notes])
        return _checks(passed, np.array(gap), columns, ["; ".join(n) for n in notes])

    side = "row" if axis == 1 else "column"
    check.__doc__ = f"The {router.upper()} mask is invariant to {side}-wise strictly increasing transforms."
    return check


def greedy_capped(S: np.ndarray, c: int, token_max: int, expert_max: int) -> np.ndarray:
    """Bool mask of the same shape as S, (T, N) or (B, T, N): for each instance, scan entries by
    decreasing score (ties: lowest flat index first), keep one if its token, its expert and the budget
    c have room and its score is positive (the natural capacity-aware global top-c)."""
    S3 = S[None] if S.ndim == 2 else S
    B, T, N = S3.shape
    flat = S3.reshape(B, T * N)
    order = np.argsort(-flat, axis=1, kind="stable")
    positive = np.count_nonzero(flat > 0, axis=1).tolist()  # the positive entries lead the order
    mask = np.zeros((B, T * N), dtype=bool)
    for b in range(B):
        rows, cols, taken, picked = [0] * T, [0] * N, 0, []
        for idx in order[b, :positive[b]].tolist():
            if taken >= c:
                break
            i, j = divmod(idx, N)
            if rows[i] < token_max and cols[j] < expert_max:
                picked.append(idx)
                rows[i] += 1
                cols[j] += 1
                taken += 1
        mask[b, picked] = True
    return mask.reshape(S.shape)


def check_capped_greedy(batch: Batch) -> list[Check]:
    """Greedy top-c with per-token and per-expert caps reaches the capped program's optimum."""
    c, tmax, emax = capped_bounds(batch.T, batch.N, batch.k)
    greedy = batch.objectives(greedy_capped(batch.S, c, tmax, emax))
    opts = batch.optima("capped")
    agree, notes = _agreement(batch, opts)
    best = _best(batch, opts)
    gap = _positive(best - greedy)
    ok = agree & batch.close(greedy, best)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where((best != 0) & ~ok, gap / np.abs(best), 0.0)  # rounding noise on a pass is not a gap
    for b in np.flatnonzero(agree & ~ok):
        notes[b] = (f"greedy capped top-c (c = {c}, <= {tmax} per token, <= {emax} per expert) scores "
                    f"{float(greedy[b]):.6g} < optimum {float(best[b]):.6g} (relative gap {float(rel[b]):.3g})")
    return _checks(ok, gap, {"greedy": greedy, **_named("opt", opts), "relative_gap": rel}, notes)


# ----------------------------------------------------------------------------- registry
def _always(batch: Batch) -> bool:
    return True


@dataclass(frozen=True)
class Claim:
    """A checkable statement.

    Attributes:
        id: registry key (snake_case).
        statement: the claim in words.
        source: where it comes from.
        expectation: what the theory predicts (papers/routing-as-lp.md §2-4), so a reader can compare.
        check: ``check(batch) -> list[Check | None]``, one per instance of the :class:`Batch`
            (None: not applicable to that instance).
        programs: the programs whose optima (by every backend of the context) the check reads.
        ipm_programs: the programs whose LP relaxation it also solves with HiGHS's interior point method.
        applies: whether the check applies to a batch at all (it returns None for every instance
            otherwise). ``programs``, ``ipm_programs`` and ``applies`` only let :meth:`Batch.prepare`
            solve a batch's programs together; the check reads what it needs either way.
    """

    id: str
    statement: str
    source: str
    expectation: str
    check: Callable[[Batch], list[Check | None]]
    programs: tuple[str, ...] = ()
    ipm_programs: tuple[str, ...] = ()
    applies: Callable[[Batch], bool] = _always

    def check_one(self, scores, k: int, ctx: Context | None = None) -> Check | None:
        """The check on one instance, scores (T, N) float64: a batch of one."""
        return self.check(Batch.one(scores, k, ctx))[0]


CLAIMS: dict[str, Claim] = {
    c.id: c
    for c in [
        Claim("topc_optimal_eq", "Global top-c is optimal for max <S,x> s.t. sum x = c",
              "Prop. 3.1 with equality (papers/routing-as-lp.md §3)", "holds for every S (exchange argument)",
              check_topc_optimal_eq, programs=("budget_eq",)),
        Claim("topc_optimal_le", "Global top-c is optimal for max <S,x> s.t. sum x <= c, S real",
              "Prop. 3.1 as stated (arXiv 2503.22996 v2 §3)",
              "fails when the c-th largest score is negative (signed scores)", check_topc_optimal_le,
              programs=("budget_le",)),
        Claim("usmoe_ge_tc", "obj(USMoE top-c, c = T k) >= obj(TC, k) on the same S",
              "Prop. 3.1 / Lemma A.2 (relaxation)", "holds: TC is feasible for the budget program",
              check_usmoe_ge_tc, programs=("tc",)),
        Claim("usmoe_ge_ec", "obj(USMoE top-c, c = T k) >= obj(EC, e = ceil(T k / N)) on the same S",
              "Prop. 3.1 / Lemma A.2 (relaxation)",
              "holds when N e = T k; can fail when rounding gives EC a larger budget", check_usmoe_ge_ec,
              programs=("ec",)),
        Claim("greedy_tc_eq_lp", "Row-wise top-k equals the Token Choice LP optimum",
              "papers/routing-as-lp.md §3 (threshold dual)", "holds (rows are independent)", check_greedy_tc,
              programs=("tc",)),
        Claim("greedy_ec_eq_lp", "Column-wise top-e equals the Expert Choice LP optimum",
              "papers/routing-as-lp.md §3 (threshold dual)", "holds (columns are independent)", check_greedy_ec,
              programs=("ec",)),
        Claim("lp_integral_tc", "The TC LP relaxation has an integral optimal vertex",
              "papers/routing-as-lp.md §2 (single family)", "holds (interval matrix, totally unimodular)",
              _integral("tc"), programs=("tc",), ipm_programs=("tc",)),
        Claim("lp_integral_ec", "The EC LP relaxation has an integral optimal vertex",
              "papers/routing-as-lp.md §2 (single family)", "holds (totally unimodular)", _integral("ec"),
              programs=("ec",), ipm_programs=("ec",)),
        Claim("lp_integral_budget", "The budget (<= c) LP relaxation has an integral optimal vertex",
              "papers/routing-as-lp.md §2 (single family)", "holds (one all-ones row)", _integral("budget_le"),
              programs=("budget_le",), ipm_programs=("budget_le",)),
        Claim("lp_integral_capped", "The capped (budget + token + expert caps) LP has an integral vertex",
              "papers/routing-as-lp.md §2 (laminar families, flow)", "holds (b-matching / network flow)",
              _integral("capped"), programs=("capped",), ipm_programs=("capped",)),
        Claim("ilp_eq_lp", "The 0/1 optimum equals the LP optimum for TC, EC, budget and capped",
              "papers/routing-as-lp.md §2", "holds (integral relaxations)", check_ilp_eq_lp,
              programs=ILP_EQ_LP_PROGRAMS, applies=ilp_eq_lp_applies),
        Claim("tc_row_invariance", "TC masks are invariant to row-wise strictly increasing transforms",
              "papers/routing-as-lp.md §1 (invariances)",
              "holds in exact arithmetic; float saturation can tie entries", _invariance(axis=1)),
        Claim("ec_column_invariance", "EC masks are invariant to column-wise strictly increasing transforms",
              "papers/routing-as-lp.md §1 (invariances)",
              "holds in exact arithmetic; float saturation can tie entries", _invariance(axis=0)),
        Claim("capped_greedy_optimal", "Greedy top-c with token and expert caps is optimal for the capped program",
              "capacity-aware USMoE, defined in this project; papers/routing-as-lp.md §1",
              "fails: greedy is only a 1/2-approximation for b-matching; see the gap distribution",
              check_capped_greedy, programs=("capped",)),
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
