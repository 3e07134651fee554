"""`RoutingProblem`: one description for every routing linear program.

A routing program over a score matrix ``S`` (T tokens x N experts) is

    maximise   sum_ij S_ij x_ij
    subject to token_min_i  <= sum_j x_ij           <= token_max_i    (per token)
               expert_min_j <= sum_i x_ij           <= expert_max_j   (per expert)
               budget_lo_g  <= sum_{i in g, j} x_ij <= budget_g       (per group g)
               x_ij in {0, 1}   (the LP relaxation: 0 <= x_ij <= 1)

with ``budget_lo_g = budget_g`` for the sense ``"=="`` and ``0`` for ``"<="``. Token Choice,
Expert Choice and the USMoE global top-c (papers/routing-as-lp.md §1, arXiv 2503.22996 §3 / Prop. 3.1) are
constructors of it; ``capped`` is the capacity-aware global router (a b-matching).
The constraints come in three *blocks* of rows: the token block (one row per token), the expert
block (one per expert) and the budget block (one per group). The constraint matrix of any *single*
block is an interval matrix and the matrix of the token and expert blocks together is a bipartite
incidence matrix; with one extra all-ones row (a budget) the matrix stays that of a network flow,
so every vertex of the relaxation is integral (``usmoe_lp.lp.flow`` solves it as one).

Construction checks the bounds' totals (O(T + N), exact when at most one block binds or the
bounds of each block are uniform); :func:`usmoe_lp.lp.check_feasible` is the exact check for
the rest (a flow computation, kept out of construction).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from usmoe_lp._validate import INT64_MAX, as_float64_scores, check_finite_numpy, check_int, check_summable
from usmoe_lp.errors import InfeasibleProblem, InvalidParameter, InvalidScores, ShapeMismatch

Sense = Literal["<=", "=="]
BLOCKS = ("token", "expert", "budget")
"""The constraint blocks of a routing program: rows per token, per expert, per budget group."""


def _as_bounds(value, length: int, name: str, default: int) -> np.ndarray:
    if value is None:
        return np.full(length, default, dtype=np.int64)
    if isinstance(value, int | np.integer) and not isinstance(value, bool):  # the common case, fast
        if value < 0:
            raise InvalidParameter(f"{name}[0] = {value} is negative")
        if value > INT64_MAX:
            raise InvalidParameter(f"{name}[0] = {value} is beyond the int64 range")
        return np.full(length, value, dtype=np.int64)
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.ndim == 0:
        arr = np.full(length, arr)
    if arr.shape != (length,):
        raise ShapeMismatch(f"{name} has shape {arr.shape}; expected a scalar or shape ({length},)")
    if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
        raise InvalidParameter(f"{name} must be finite integers")
    if np.any(arr != np.round(arr)):
        raise InvalidParameter(f"{name} must be integers, got {arr[arr != np.round(arr)][:3]}")
    if np.any(arr < 0):
        i = int(np.argmax(arr < 0))
        raise InvalidParameter(f"{name}[{i}] = {arr[i]} is negative")
    if np.any(arr > INT64_MAX):  # checked before the int64 cast, which would wrap
        i = int(np.argmax(arr > INT64_MAX))
        raise InvalidParameter(f"{name}[{i}] = {arr[i]} is beyond the int64 range")
    return arr.astype(np.int64)


@dataclass(frozen=True, eq=False)
class RoutingProblem:
    """A routing program (see the module docstring for the formulation).

    Attributes:
        scores: (T, N) float64, finite, a copy. Accepted input: any real float dtype (numpy or
            torch, bfloat16 included; converted exactly) or integers up to 2**53 in magnitude
            (exact in float64); complex, bool, string and object arrays are refused, and so are
            scores so large that their sums could overflow (max |S| > float64 max / (8 T*N)).
        token_min, token_max: (T,) int64, per-token bounds on experts per token (max clipped to N).
        expert_min, expert_max: (N,) int64, per-expert bounds on tokens per expert (max clipped to T).
        budget: (G,) int64 per-group global budget, or None for no budget.
        budget_sense: ``"<="`` or ``"=="``. They are different programs: with signed scores the
            ``"<="`` optimum drops negative entries that top-c keeps (papers/routing-as-lp.md §3).
        groups: (T,) int64 group id in [0, G) for each token (the scope of the budget), or None
            for a single group holding every token.
        name: which constructor built it (``token_choice``, ``expert_choice``, ``budget``,
            ``capped`` or ``custom``).

    Raises:
        InvalidScores: empty, non-2-D, non-finite, non-real or too large scores.
        ShapeMismatch: a bound or group vector of the wrong length.
        InvalidParameter: negative or non-integer bounds, a budget beyond the group's T_g * N.
        InfeasibleProblem: bounds whose totals no 0/1 routing can meet; the message names them.
            Exact when at most one block binds or each block's bounds are uniform; otherwise
            :func:`usmoe_lp.lp.check_feasible` decides (e.g. token 0 needing both experts while
            expert 0 takes nobody balances every total).

    >>> import numpy as np
    >>> p = RoutingProblem.budget(np.array([[0.5, -1.0], [-2.0, -0.2]]), 2, sense="<=")
    >>> p.shape, p.blocks, p.budget_sense
    ((2, 2), ('budget',), '<=')
    """

    scores: np.ndarray
    token_min: np.ndarray | None = None
    token_max: np.ndarray | None = None
    expert_min: np.ndarray | None = None
    expert_max: np.ndarray | None = None
    budget: np.ndarray | None = None
    budget_sense: Sense = "<="
    groups: np.ndarray | None = None
    name: str = "custom"
    _group_sizes: np.ndarray = field(init=False, repr=False)
    _blocks: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        s = as_float64_scores(self.scores)  # a copy: never freeze the caller's array
        if s.ndim != 2:
            raise InvalidScores(f"scores must be 2-D (T tokens, N experts); got shape {s.shape}")
        check_finite_numpy(s)
        check_summable(s)
        T, N = s.shape
        s.setflags(write=False)
        set_ = object.__setattr__
        set_(self, "scores", s)
        set_(self, "token_min", _as_bounds(self.token_min, T, "token_min", 0))
        set_(self, "token_max", np.minimum(_as_bounds(self.token_max, T, "token_max", N), N))
        set_(self, "expert_min", _as_bounds(self.expert_min, N, "expert_min", 0))
        set_(self, "expert_max", np.minimum(_as_bounds(self.expert_max, N, "expert_max", T), T))
        if self.budget_sense not in ("<=", "=="):
            raise InvalidParameter(f'budget_sense must be "<=" or "==", got {self.budget_sense!r}')

        if self.groups is None:
            groups = None
            sizes = np.array([T], dtype=np.int64)
        else:
            groups = np.asarray(self.groups)
            if groups.shape != (T,):
                raise ShapeMismatch(f"groups has shape {groups.shape}; expected ({T},), one id per token")
            if not np.issubdtype(groups.dtype, np.integer):
                raise InvalidParameter(f"groups must be integer ids, got dtype {groups.dtype}")
            groups = groups.astype(np.int64)
            if groups.min() < 0:
                raise InvalidParameter("groups must be non-negative ids 0..G-1")
            sizes = np.bincount(groups)
            if np.any(sizes == 0):
                raise InvalidParameter(
                    f"groups must use every id 0..{sizes.size - 1}; id {int(np.argmin(sizes))} is unused"
                )
        set_(self, "groups", groups)
        set_(self, "_group_sizes", sizes)

        if self.budget is not None:
            b = np.asarray(self.budget)
            if b.ndim == 0:
                b = np.full(sizes.size, b)
            if b.shape != (sizes.size,):
                raise ShapeMismatch(f"budget has shape {b.shape}; expected a scalar or ({sizes.size},), one per group")
            b = _as_bounds(b, sizes.size, "budget", 0)
            cap = sizes * N
            if np.any(b > cap):
                g = int(np.argmax(b > cap))
                where = "T*N" if sizes.size == 1 else f"T_g*N for group {g}"
                raise InvalidParameter(f"budget {int(b[g])} exceeds {where} = {int(cap[g])} token-expert pairs")
            set_(self, "budget", b)
        for name in ("token_min", "token_max", "expert_min", "expert_max", "budget", "groups"):
            arr = getattr(self, name)
            if arr is not None:  # read-only, like the scores: the cached blocks below stay true
                arr.setflags(write=False)
        sizes.setflags(write=False)
        blocks = []
        if np.any(self.token_min > 0) or np.any(self.token_max < N):
            blocks.append("token")
        if np.any(self.expert_min > 0) or np.any(self.expert_max < T):
            blocks.append("expert")
        if self.budget is not None:
            blocks.append("budget")
        set_(self, "_blocks", tuple(blocks))
        self._check_totals()

    # ----------------------------------------------------------------------------- constructors
    @classmethod
    def token_choice(cls, scores, k: int) -> RoutingProblem:
        """Token Choice: every token takes exactly ``k`` experts (rows sum to k). scores: (T, N)."""
        s = as_float64_scores(scores)
        n = s.shape[-1] if s.ndim == 2 and s.size else None  # empty: InvalidScores below
        k = check_int(k, "k", low=1)
        if n is not None and k > n:
            raise InvalidParameter(f"k = {k} exceeds the number of experts N = {n}")
        return cls(s, token_min=k, token_max=k, name="token_choice")

    @classmethod
    def expert_choice(cls, scores, capacity: int) -> RoutingProblem:
        """Expert Choice: every expert takes exactly ``capacity`` tokens (columns sum to e)."""
        s = as_float64_scores(scores)
        t = s.shape[0] if s.ndim == 2 and s.size else None  # empty: InvalidScores below
        e = check_int(capacity, "capacity", low=1)
        if t is not None and e > t:
            raise InvalidParameter(f"capacity = {e} exceeds the number of tokens T = {t}")
        return cls(s, expert_min=e, expert_max=e, name="expert_choice")

    @classmethod
    def capped(cls, scores, c, token_max, expert_max, sense: Sense = "<=", groups=None) -> RoutingProblem:
        """Global budget plus a per-token cap and a per-expert cap (capacity-aware global router).

        A b-matching: its relaxation is integral, but it has no single-threshold closed form, so
        it is solved and certified through LP duals.
        """
        c_arr = np.asarray(c)
        if c_arr.ndim == 0:
            c_arr = np.asarray(check_int(c, "budget c", low=0))
        return cls(
            scores, token_max=token_max, expert_max=expert_max, budget=c_arr,
            budget_sense=sense, groups=groups, name="capped",
        )

    def for_scores(self, scores) -> list[RoutingProblem]:
        """This program's constraints on each score matrix of a stack: B programs at once.

        Args:
            scores: (B, T, N), any real dtype accepted by the constructor (converted exactly).

        Returns:
            B programs equal field by field to ``RoutingProblem(scores[b], <this program's bounds,
            budget, sense, groups, name>)``; the bounds are validated once (they are this
            program's) and shared (read-only), the scores validated together, each program's
            scores a read-only view of one float64 copy of the stack. ~100x cheaper than B
            constructions at 8x4 (per-program validation is a dozen small numpy calls).

        Raises:
            ShapeMismatch: ``scores`` not (B, T, N) with this program's (T, N).
            InvalidScores: a non-finite or too large score (the message names the program b).
        """
        S = as_float64_scores(scores)
        if S.ndim != 3 or S.shape[1:] != self.shape:
            raise ShapeMismatch(f"scores has shape {S.shape}; expected (B, {self.shape[0]}, {self.shape[1]}), "
                                "a stack of this program's score matrices")
        if S.shape[0] == 0:
            return []
        check_finite_numpy(S)
        b = int(np.argmax(np.abs(S).reshape(S.shape[0], -1).max(axis=1)))
        check_summable(S[b], name=f"scores[{b}]")
        S.setflags(write=False)
        fields = dict(self.__dict__)
        out = []
        for b in range(S.shape[0]):
            p = object.__new__(RoutingProblem)
            p.__dict__.update(fields)
            p.__dict__["scores"] = S[b]
            out.append(p)
        return out

    # ----------------------------------------------------------------------------- properties
    @property
    def shape(self) -> tuple[int, int]:
        return self.scores.shape

    @property
    def num_groups(self) -> int:
        return int(self._group_sizes.size)

    @property
    def group_sizes(self) -> np.ndarray:
        """(G,) int64: tokens per group."""
        return self._group_sizes

    @property
    def group_ids(self) -> np.ndarray:
        """(T,) int64: the group of each token (all zeros without groups)."""
        if self.groups is None:
            return np.zeros(self.shape[0], dtype=np.int64)
        return self.groups

    @property
    def budget_lo(self) -> np.ndarray | None:
        """(G,) int64 lower bound of each group's count: the budget for ``"=="``, else 0."""
        if self.budget is None:
            return None
        return self.budget.copy() if self.budget_sense == "==" else np.zeros_like(self.budget)

    @property
    def blocks(self) -> tuple[str, ...]:
        """The constraint blocks that restrict anything: a subset of token, expert, budget (in
        that order; computed once, at construction)."""
        return self._blocks

    @property
    def is_single_block(self) -> bool:
        """True when at most one block binds: the closed form applies (papers/routing-as-lp.md §2-3)."""
        return len(self.blocks) <= 1

    def block_bounds(self, block: str) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) int64 count bounds of each row of ``block``: (T,) for ``token``, (N,) for
        ``expert``, (G,) for ``budget``."""
        if block == "token":
            return self.token_min, self.token_max
        if block == "expert":
            return self.expert_min, self.expert_max
        if block == "budget":
            if self.budget is None:
                return np.zeros(self.num_groups, np.int64), self._group_sizes * self.shape[1]
            return self.budget_lo, self.budget
        raise ValueError(f"unknown constraint block {block!r}; expected one of {BLOCKS}")

    # Former names, kept so that callers outside usmoe_lp.lp keep working; use the block names.
    @property
    def families(self) -> tuple[str, ...]:
        """Alias of :attr:`blocks` (former name)."""
        return self.blocks

    @property
    def is_single_family(self) -> bool:
        """Alias of :attr:`is_single_block` (former name)."""
        return self.is_single_block

    def family_bounds(self, family: str) -> tuple[np.ndarray, np.ndarray]:
        """Alias of :meth:`block_bounds` (former name)."""
        return self.block_bounds(family)

    def objective(self, mask) -> float:
        """sum_ij S_ij x_ij of a (T, N) bool mask or 0/1 / fractional float matrix, in float64."""
        x = np.asarray(mask)
        if x.dtype == bool:  # gather the selected entries: ~10x faster than np.sum(where=)
            return float(self.scores.ravel()[np.flatnonzero(x)].sum())
        return float(np.sum(self.scores * x.astype(np.float64)))

    def describe(self) -> str:
        T, N = self.shape
        parts = [f"{self.name} program on {T}x{N} scores"]
        if "token" in self.blocks:
            parts.append(_range_text("experts per token", self.token_min, self.token_max))
        if "expert" in self.blocks:
            parts.append(_range_text("tokens per expert", self.expert_min, self.expert_max))
        if self.budget is not None:
            b = self.budget
            scope = "" if self.num_groups == 1 else f" in each of {self.num_groups} groups"
            val = str(int(b[0])) if np.all(b == b[0]) else f"{int(b.min())}..{int(b.max())}"
            parts.append(f"budget {self.budget_sense} {val}{scope}")
        return "; ".join(parts)

    # ----------------------------------------------------------------------------- feasibility
    def _check_totals(self) -> None:
        """The O(T + N) checks of construction: every bound and every total must be consistent."""
        T, N = self.shape
        tmin, tmax, emin, emax = self.token_min, self.token_max, self.expert_min, self.expert_max
        if np.any(tmin > N):
            i = int(np.argmax(tmin > N))
            raise InfeasibleProblem(f"token_min[{i}] = {tmin[i]} exceeds the N = {N} experts")
        if np.any(emin > T):
            j = int(np.argmax(emin > T))
            raise InfeasibleProblem(f"expert_min[{j}] = {emin[j]} exceeds the T = {T} tokens")
        if np.any(tmin > tmax):
            i = int(np.argmax(tmin > tmax))
            raise InfeasibleProblem(f"token_min[{i}] = {tmin[i]} > token_max[{i}] = {tmax[i]}")
        if np.any(emin > emax):
            j = int(np.argmax(emin > emax))
            raise InfeasibleProblem(f"expert_min[{j}] = {emin[j]} > expert_max[{j}] = {emax[j]}")
        if tmin.sum() > emax.sum():
            raise InfeasibleProblem(
                f"the token minimums need {tmin.sum()} selections but the expert maximums allow {emax.sum()}"
            )
        if emin.sum() > tmax.sum():
            raise InfeasibleProblem(
                f"the expert minimums need {emin.sum()} selections but the token maximums allow {tmax.sum()}"
            )
        if self.budget is not None:
            self._check_group_totals()

    @property
    def totals_decide_feasibility(self) -> bool:
        """True when the construction-time totals are an exact feasibility test: at most one block
        binds, or every binding block has uniform bounds (a complete bipartite graph with uniform
        capacities). Otherwise :func:`usmoe_lp.lp.check_feasible` decides."""
        blocks = self.blocks
        return len(blocks) < 2 or all(_uniform(*self.block_bounds(b)) for b in blocks)

    def _check_group_totals(self) -> None:
        T, N = self.shape
        tmin, tmax, emin, emax = self.token_min, self.token_max, self.expert_min, self.expert_max
        gid = self.group_ids
        g_tmin = np.bincount(gid, weights=tmin, minlength=self.num_groups).astype(np.int64)
        g_tmax = np.bincount(gid, weights=tmax, minlength=self.num_groups).astype(np.int64)
        lo, hi = self.budget_lo, self.budget
        if np.any(g_tmin > hi):
            g = int(np.argmax(g_tmin > hi))
            raise InfeasibleProblem(
                f"budget {hi[g]} of group {g} is below the {g_tmin[g]} selections that token_min demands"
            )
        if np.any(lo > g_tmax):
            g = int(np.argmax(lo > g_tmax))
            raise InfeasibleProblem(
                f"budget == {lo[g]} of group {g} exceeds the {g_tmax[g]} selections that token_max allows"
            )
        if emin.sum() > hi.sum():
            raise InfeasibleProblem(
                f"the expert minimums need {emin.sum()} selections but the budget allows {hi.sum()}"
            )
        if lo.sum() > emax.sum():
            raise InfeasibleProblem(
                f"budget == {lo.sum()} exceeds the {emax.sum()} selections that expert_max allows"
            )


def _budget_constructor(cls, scores, c, sense: Sense = "<=", groups=None) -> RoutingProblem:
    """USMoE global budget: ``sum x <= c`` (the paper's statement) or ``== c`` (top-c).

    scores: (T, N); ``c`` an integer, or (G,) integers, one per group, when ``groups`` (T,) is
    given (the scope of the global top-c: a sequence, a batch, or one position across a batch).
    """
    c_arr = np.asarray(c)
    if c_arr.ndim == 0:
        c_arr = np.asarray(check_int(c, "budget c", low=0))
    return cls(scores, budget=c_arr, budget_sense=sense, groups=groups, name="budget")


class _FieldOrConstructor:
    """``RoutingProblem.budget(...)`` constructs; ``problem.budget`` is the (G,) budget field."""

    def __init__(self, constructor):
        self._constructor = constructor
        self.__doc__ = constructor.__doc__

    def __get__(self, obj, cls):
        if obj is None:
            return self._constructor.__get__(cls, type(cls))
        return obj.__dict__["budget"]


RoutingProblem.budget = _FieldOrConstructor(_budget_constructor)


def _uniform(lo: np.ndarray, hi: np.ndarray) -> bool:
    return bool(np.all(lo == lo[0]) and np.all(hi == hi[0]))


def _range_text(what: str, lo: np.ndarray, hi: np.ndarray) -> str:
    if np.all(lo == lo[0]) and np.all(hi == hi[0]):
        a, b = int(lo[0]), int(hi[0])
        return f"{what} == {a}" if a == b else f"{a} <= {what} <= {b}"
    return f"{what} in per-row ranges"
