"""Brute-force oracle for the exact LP path (``usmoe_lp.lp``).

For T*N <= 12 there are at most 4096 0/1 masks. The oracle enumerates all of them, keeps those
that meet the program's bounds -- stated here from the constructor arguments, independently of
``RoutingProblem`` -- and returns the optimum value and the exact number of optimal masks.

Scores are rounded to a dyadic grid (multiples of 2^-20, |s| <= 7), so every subset sum is exact
in float64 whatever the order of summation: two masks tie in the oracle iff they tie in reals.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
import pytest

from usmoe_lp.errors import InfeasibleProblem, UnsupportedProblem
from usmoe_lp.lp import RoutingProblem, certify, certify_with_duals, dual_bound, solve

GRID = 2.0**-20
TOL = 1e-9  # far below the grid spacing: distinct subset sums differ by >= 2^-20
SHAPES = [(t, n) for t in range(1, 13) for n in range(1, 13) if t * n <= 12]
KINDS = ("gauss", "positive", "integer", "equal", "zeros")
SINGLE = ("tc", "ec", "budget<=", "budget==", "token_range", "expert_range")
COMBINED = ("capped<=", "capped==", "transport")
PROGRAMS = SINGLE + COMBINED


# ----------------------------------------------------------------------------- instances
def make_scores(kind: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    if kind == "gauss":
        s = rng.normal(size=shape)
    elif kind == "positive":
        s = rng.uniform(1e-3, 1.0, size=shape)
    elif kind == "integer":  # many ties, zeros included
        s = rng.integers(-2, 3, size=shape).astype(np.float64)
    elif kind == "equal":
        s = np.full(shape, rng.choice([-0.75, 0.5, 2.0]))
    elif kind == "zeros":
        s = np.zeros(shape)
    else:
        raise ValueError(kind)
    return np.clip(np.round(s / GRID) * GRID, -7.0, 7.0)


@dataclass(frozen=True, eq=False)
class Program:
    """A routing program stated twice: bounds for the oracle, a constructor call for the library."""

    name: str
    scores: np.ndarray
    make: Callable[[], RoutingProblem]
    token: tuple[np.ndarray, np.ndarray] | None = None  # (lo, hi), each (T,)
    expert: tuple[np.ndarray, np.ndarray] | None = None  # (lo, hi), each (N,)
    budget: tuple[np.ndarray, np.ndarray] | None = None  # (lo, hi), each (G,)
    groups: np.ndarray | None = None  # (T,) ids; None = one group

    @property
    def shape(self) -> tuple[int, int]:
        return self.scores.shape


def _random_groups(T: int, rng: np.random.Generator) -> np.ndarray | None:
    if rng.random() < 0.4:
        return None
    G = int(rng.integers(1, T + 1))
    g = np.concatenate([np.arange(G), rng.integers(0, G, T - G)])
    rng.shuffle(g)
    return g


def random_program(name: str, S: np.ndarray, rng: np.random.Generator) -> Program:
    """Random parameters for program ``name`` on scores ``S``; may be infeasible (capped ==,
    transport), never out of range for its constructor."""
    T, N = S.shape
    full = np.full
    if name == "tc":
        k = int(rng.integers(1, N + 1))
        return Program(name, S, lambda: RoutingProblem.token_choice(S, k),
                       token=(full(T, k), full(T, k)))
    if name == "ec":
        e = int(rng.integers(1, T + 1))
        return Program(name, S, lambda: RoutingProblem.expert_choice(S, e),
                       expert=(full(N, e), full(N, e)))
    if name == "token_range":
        lo = rng.integers(0, N + 1, T)
        hi = np.array([rng.integers(a, N + 1) for a in lo])
        return Program(name, S, lambda: RoutingProblem(S, token_min=lo, token_max=hi),
                       token=(lo, hi))
    if name == "expert_range":
        lo = rng.integers(0, T + 1, N)
        hi = np.array([rng.integers(a, T + 1) for a in lo])
        return Program(name, S, lambda: RoutingProblem(S, expert_min=lo, expert_max=hi),
                       expert=(lo, hi))
    if name == "transport":  # uniform ranges on both blocks (TC + EC when lo == hi)
        a1 = int(rng.integers(0, N + 1))
        a2 = int(rng.integers(a1, N + 1))
        b1 = int(rng.integers(0, T + 1))
        b2 = int(rng.integers(b1, T + 1))
        return Program(name, S,
                       lambda: RoutingProblem(S, token_min=a1, token_max=a2, expert_min=b1,
                                              expert_max=b2),
                       token=(full(T, a1), full(T, a2)), expert=(full(N, b1), full(N, b2)))
    sense = "==" if name.endswith("==") else "<="
    groups = _random_groups(T, rng)
    sizes = np.array([T]) if groups is None else np.bincount(groups)
    c = np.array([rng.integers(0, s * N + 1) for s in sizes])
    c_arg = int(c[0]) if groups is None else c
    bud = (c if sense == "==" else np.zeros_like(c), c)
    if name.startswith("budget"):
        return Program(name, S, lambda: RoutingProblem.budget(S, c_arg, sense=sense, groups=groups),
                       budget=bud, groups=groups)
    if name.startswith("capped"):
        a = int(rng.integers(1, N + 1))
        b = int(rng.integers(1, T + 1))
        return Program(name, S,
                       lambda: RoutingProblem.capped(S, c_arg, a, b, sense=sense, groups=groups),
                       token=(full(T, 0), full(T, a)), expert=(full(N, 0), full(N, b)),
                       budget=bud, groups=groups)
    raise ValueError(name)


# ----------------------------------------------------------------------------- the oracle
@cache
def all_masks(T: int, N: int) -> np.ndarray:
    """(2^(T*N), T, N) bool: every 0/1 mask."""
    n = T * N
    bits = (np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1
    out = bits.astype(bool).reshape(-1, T, N)
    out.setflags(write=False)
    return out


def meets_bounds(p: Program, masks: np.ndarray) -> np.ndarray:
    """(M,) bool: which of ``masks`` (M, T, N) satisfy every bound of ``p``."""
    rows = masks.sum(axis=2)
    cols = masks.sum(axis=1)
    ok = np.ones(masks.shape[0], dtype=bool)
    if p.token is not None:
        ok &= np.all((rows >= p.token[0]) & (rows <= p.token[1]), axis=1)
    if p.expert is not None:
        ok &= np.all((cols >= p.expert[0]) & (cols <= p.expert[1]), axis=1)
    if p.budget is not None:
        g = np.zeros(p.shape[0], dtype=int) if p.groups is None else p.groups
        per_group = np.stack([rows[:, g == k].sum(axis=1) for k in range(g.max() + 1)], axis=1)
        ok &= np.all((per_group >= p.budget[0]) & (per_group <= p.budget[1]), axis=1)
    return ok


@dataclass(frozen=True, eq=False)
class Oracle:
    masks: np.ndarray  # (M, T, N) bool
    feasible: np.ndarray  # (M,) bool
    objective: np.ndarray  # (M,) float64, exact on the grid
    opt: float | None  # None when no mask is feasible
    count: int  # number of optimal masks

    @property
    def optimal(self) -> np.ndarray:
        return self.feasible & (self.objective >= self.opt - TOL)


def brute_force(p: Program) -> Oracle:
    masks = all_masks(*p.shape)
    feasible = meets_bounds(p, masks)
    objective = masks.reshape(masks.shape[0], -1).astype(np.float64) @ p.scores.ravel()
    if not feasible.any():
        return Oracle(masks, feasible, objective, None, 0)
    opt = float(objective[feasible].max())
    count = int(np.sum(feasible & (objective >= opt - TOL)))
    return Oracle(masks, feasible, objective, opt, count)


def draw(name: str, kind: str, rng: np.random.Generator, shapes=SHAPES):
    """A feasible random instance: (Program, RoutingProblem, Oracle)."""
    for _ in range(200):
        shape = shapes[rng.integers(len(shapes))]
        prog = random_program(name, make_scores(kind, shape, rng), rng)
        oracle = brute_force(prog)
        if oracle.opt is not None:
            return prog, prog.make(), oracle
    raise AssertionError(f"no feasible {name} instance drawn")  # pragma: no cover


def _seed(*parts) -> int:
    return sum((i + 1) * sum(map(ord, str(x))) for i, x in enumerate(parts))


def close(a: float, b: float, tol: float = TOL) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


# ----------------------------------------------------------------------------- the oracle itself
def test_oracle_sanity():
    """The oracle on cases counted by hand (so the rest of the file rests on something)."""
    S = np.zeros((2, 3))
    tc = Program("tc", S, lambda: None, token=(np.full(2, 1), np.full(2, 1)))
    assert brute_force(tc).count == 9  # 3 choices per row
    le = Program("b", S, lambda: None, budget=(np.array([0]), np.array([4])))
    assert brute_force(le).count == sum(math.comb(6, p) for p in range(5))
    S2 = np.array([[0.5, -1.0], [-2.0, -0.2]])
    o = brute_force(Program("b", S2, lambda: None, budget=(np.array([0]), np.array([2]))))
    assert (o.opt, o.count) == (0.5, 1)
    o = brute_force(Program("b", S2, lambda: None, budget=(np.array([2]), np.array([2]))))
    assert math.isclose(o.opt, 0.3) and o.count == 1


# ----------------------------------------------------------------------------- feasibility
@pytest.mark.parametrize("name", ["capped==", "capped<=", "transport", "budget==", "tc", "ec"])
def test_construction_raises_iff_no_feasible_mask(name):
    """With uniform caps, RoutingProblem's construction-time check is exact: it raises
    InfeasibleProblem exactly when no 0/1 mask meets the bounds."""
    rng = np.random.default_rng(_seed("feasible", name))
    seen = set()
    for _ in range(120):
        shape = SHAPES[rng.integers(len(SHAPES))]
        prog = random_program(name, make_scores("gauss", shape, rng), rng)
        feasible = brute_force(prog).opt is not None
        seen.add(feasible)
        if feasible:
            prog.make()
        else:
            with pytest.raises(InfeasibleProblem):
                prog.make()
    if name in ("capped==", "transport"):
        assert seen == {True, False}  # both outcomes were exercised


# ----------------------------------------------------------------------------- every backend
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", PROGRAMS)
def test_every_backend_reaches_the_optimum(name, kind):
    rng = np.random.default_rng(_seed("backends", name, kind))
    for trial in range(5):
        prog, problem, oracle = draw(name, kind, rng)
        backends = ["highs", "milp"] + (["cbc"] if trial < 2 else [])
        if name in SINGLE or len(problem.blocks) <= 1:
            backends.insert(0, "closed_form")
        else:
            with pytest.raises(UnsupportedProblem):
                solve(problem, "closed_form")
        for backend in backends:
            sol = solve(problem, backend)
            where = f"{backend} on {problem.describe()}\nS={prog.scores.tolist()}"
            assert sol.success, where
            assert sol.mask.shape == prog.shape and sol.mask.dtype == bool
            assert meets_bounds(prog, sol.mask[None])[0], where
            assert close(problem.objective(sol.mask), oracle.opt), where
            assert close(sol.objective, oracle.opt), where
            assert sol.certificate is not None and sol.certificate.optimal, where
            assert sol.certificate.feasible
            if backend == "highs":
                assert sol.max_fractionality == 0.0, where
                # strong duality: HiGHS's multipliers close the Lagrangian bound
                assert close(dual_bound(problem, sol.duals), oracle.opt), where


# ----------------------------------------------------------------------------- multiplicity
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", SINGLE)
def test_closed_form_counts_the_optimal_masks(name, kind):
    rng = np.random.default_rng(_seed("count", name, kind))
    for _ in range(8):
        prog, problem, oracle = draw(name, kind, rng)
        sol = solve(problem, "closed_form")
        cert = sol.certificate
        where = f"{problem.describe()}\nS={prog.scores.tolist()}\ncount={oracle.count}"
        assert cert.optimal and cert.gap == 0.0, where
        assert abs(cert.log10_optimal_masks - math.log10(oracle.count)) < 1e-9, where
        assert (cert.ties == 0) == (oracle.count == 1), where
        assert cert.unique == (oracle.count == 1), where
        assert (cert.margin > 0) == (oracle.count == 1), where
        # the certificate's multipliers are a dual optimum
        assert close(dual_bound(problem, cert.duals), oracle.opt), where
        assert close(dual_bound(problem, sol.duals), oracle.opt), where
        # the same count from a certificate of a mask that is not optimal
        bad = np.flatnonzero(~oracle.optimal)
        if bad.size:
            other = certify(problem, oracle.masks[rng.choice(bad)])
            assert not other.optimal
            assert abs(other.log10_optimal_masks - math.log10(oracle.count)) < 1e-9, where
            assert (other.ties == 0) == (oracle.count == 1), where


# ----------------------------------------------------------------------------- certify, sampled
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", PROGRAMS)
def test_certify_sampled_masks(name, kind):
    """certify on random masks: feasibility, optimality and the gap OPT - objective."""
    rng = np.random.default_rng(_seed("sampled", name, kind))
    n_masks = 12 if name in SINGLE else 5  # combined programs solve one LP per certify
    for _ in range(3):
        prog, problem, oracle = draw(name, kind, rng)
        feas = np.flatnonzero(oracle.feasible)
        infeas = np.flatnonzero(~oracle.feasible)
        picks = list(rng.choice(feas, min(n_masks, feas.size), replace=False))
        picks += list(rng.choice(infeas, min(3, infeas.size), replace=False))
        picks.append(int(np.flatnonzero(oracle.optimal)[-1]))
        for i in picks:
            _check_certificate(problem, oracle, i, certify(problem, oracle.masks[i]))


def _check_certificate(problem, oracle: Oracle, i: int, cert) -> None:
    where = f"{problem.describe()}\nmask={oracle.masks[i].astype(int).tolist()}\n{cert.message}"
    assert cert.feasible == bool(oracle.feasible[i]), where
    assert cert.primal == pytest.approx(oracle.objective[i], abs=TOL), where
    if not oracle.feasible[i]:
        assert not cert.optimal and "infeasible" in cert.message, where
        return
    assert cert.optimal == bool(oracle.optimal[i]), where
    assert cert.gap == pytest.approx(oracle.opt - oracle.objective[i], abs=TOL), where
    assert cert.dual == pytest.approx(oracle.opt, abs=TOL), where


# ----------------------------------------------------------------------------- certify, all masks
ALL_MASK_CASES = [
    ("tc", "integer", (3, 3)), ("tc", "gauss", (2, 5)), ("ec", "integer", (3, 3)),
    ("ec", "equal", (4, 2)), ("budget<=", "gauss", (3, 3)), ("budget<=", "integer", (2, 4)),
    ("budget<=", "zeros", (3, 3)), ("budget==", "integer", (3, 3)), ("budget==", "equal", (2, 4)),
    ("budget==", "gauss", (5, 2)), ("token_range", "integer", (3, 3)),
    ("expert_range", "gauss", (3, 3)), ("capped<=", "integer", (3, 3)),
    ("capped==", "gauss", (3, 3)), ("capped==", "integer", (2, 4)), ("transport", "integer", (3, 3)),
]


@pytest.mark.parametrize(("name", "kind", "shape"), ALL_MASK_CASES)
def test_certify_every_mask(name, kind, shape):
    """Every one of the 2^(T*N) masks: optimal iff the oracle says so, gap = OPT - objective,
    infeasible masks flagged; margin sign and multiplicity for the closed form."""
    rng = np.random.default_rng(_seed("every", name, kind, shape))
    prog, problem, oracle = draw(name, kind, rng, shapes=[shape])
    if name in SINGLE:
        logm = math.log10(oracle.count)
        for i in range(oracle.masks.shape[0]):
            cert = certify(problem, oracle.masks[i])
            assert cert.backend == "closed_form"
            _check_certificate(problem, oracle, i, cert)
            assert abs(cert.log10_optimal_masks - logm) < 1e-9
            if oracle.feasible[i]:
                # margin: > 0 unique optimum, == 0 tied optimum, < 0 not optimal
                expected = 0 if not oracle.optimal[i] else (1 if oracle.count == 1 else 0.5)
                got = 0 if cert.margin < 0 else (0.5 if cert.margin == 0 else 1)
                assert got == expected, (oracle.masks[i].astype(int).tolist(), cert.margin)
    else:
        duals = solve(problem, "highs").duals
        for i in range(oracle.masks.shape[0]):
            cert = certify_with_duals(problem, oracle.masks[i], duals)
            _check_certificate(problem, oracle, i, cert)
            assert (cert.margin is None) == (not oracle.feasible[i])
        # and through certify() (a fresh HiGHS solve per call) on a subset
        for i in rng.choice(oracle.masks.shape[0], 24, replace=False):
            _check_certificate(problem, oracle, int(i), certify(problem, oracle.masks[i]))


# ----------------------------------------------------------------------------- weak duality
@pytest.mark.parametrize("name", PROGRAMS)
def test_weak_duality_at_random_multipliers(name):
    """g(u, v, lam) >= OPT for any multipliers, every block present or not (a constraint that
    does not bind is still valid), at several scales."""
    rng = np.random.default_rng(_seed("weak", name))
    for trial in range(12):
        prog, problem, oracle = draw(name, KINDS[trial % len(KINDS)], rng)
        T, N = prog.shape
        G = problem.num_groups
        for scale in (0.01, 0.3, 1.0, 5.0, 100.0):
            full = {"token": rng.normal(size=T) * scale, "expert": rng.normal(size=N) * scale,
                    "budget": rng.normal(size=G) * scale}
            for keys in (("token",), ("expert",), ("budget",), ("token", "expert"),
                         ("token", "expert", "budget")):
                bound = dual_bound(problem, {k: full[k] for k in keys})
                assert bound >= oracle.opt - TOL * max(1.0, abs(bound)), (keys, scale)
        # no multipliers at all: the sum of the positive scores
        assert dual_bound(problem, {}) == pytest.approx(np.maximum(prog.scores, 0).sum())
        assert dual_bound(problem, {}) >= oracle.opt - TOL
