"""The exact optimum of a routing program as a min-cost flow, on a graph compressed onto the experts.

Every :class:`~usmoe_lp.lp.problem.RoutingProblem` is a network flow (papers/routing-as-lp.md §1;
Ahuja, Magnanti & Orlin, *Network Flows*, 1993, ch. 9): a circulation over the nodes

    t -> s_g  [budget_lo_g, budget_g]      one arc per budget group g (a single group without a budget)
    s_g -> i  [token_min_i, token_max_i]   one arc per token i of group g
    i -> j    [0, 1], gain S_ij            one arc per token-expert pair
    j -> t    [expert_min_j, expert_max_j] one arc per expert j

and the routing of largest objective is the circulation of largest gain. Its residual graph has
T + N + G + 1 nodes, but a token is only ever passed through: a path enters token i from a group
or an expert and leaves it to another, so the paths that matter alternate expert -> token -> expert
and live on the N + G + 1 nodes (experts, groups, t), with arc gains

    j -> j'  max over tokens i in j, not in j'  of  S_ij' - S_ij      (token i moves from j to j')
    s_g -> j max over spare tokens i of g, not in j of S_ij           (i takes one more expert)
    j -> s_g max over tokens i of g in j above token_min of -S_ij     (i gives up expert j)

plus gain-0 arcs between t and the experts and groups where their counts may still move.

The solver has two stages, both on this compressed graph:

1. **Prices** (a warm start, no exactness needed): expert prices v (N,) and budget prices lam (G,)
   by a few Jacobi rounds of coordinate minimisation of the Lagrangian dual: each expert's price
   moves (over-relaxed, ``PRICE_OVERRELAX``) towards the price that clears its capacity against
   the tokens' current best responses, and the budget price is the closed form at those expert
   prices. The rounds stop once the imbalance left is small (``_imbalance_target``) or stalls.
   Every token then takes its best experts at these prices (``closed_form.row_thresholds`` /
   ``fill_rows``): a *pseudo-flow* that is optimal for its own node imbalances (Lagrangian
   optimality), though it may overfill some experts.
2. **Repair** (exact): successive shortest paths (longest, in gains) from the nodes with excess
   to those with deficit, one unit at a time, by Bellman-Ford on the (N + G + 1)-node graph; the
   arcs an augmentation touches are updated from the tokens that moved. Each augmentation keeps
   the pseudo-flow optimal, so when no imbalance is left the routing is optimal, and node
   potentials (longest-path distances) give the dual prices of experts and groups, from which
   each token's multiplier follows by the closed-form rule. :func:`usmoe_lp.lp.solve` certifies
   the routing with these multipliers, exactly (``usmoe_lp.lp.exact``).

Cost (benchmarks/bench_capped_flow.py): a price round is a few passes over the (T, N) scores and
two partitions (~0.15 s at 16384x128), an augmentation a few small numpy operations (~3 ms); at
16384x128 the capped program takes ~0.4 s (Gaussian scores: no round, no augmentation) to ~2 s
(skewed expert popularity: ~10 rounds, ~200 augmentations) plus ~0.2-0.5 s of certificate.

Gains are compared in float64 with a relative tolerance (improvements below ~1e-15 of max |S|
are not taken): near-ties at that scale may leave a routing the exact certificate cannot prove;
:func:`usmoe_lp.lp.solve` then falls back to HiGHS and says so.

Deterministic: the same program always gives the same routing (ties broken by lowest index in
every order statistic and argmax).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from usmoe_lp._validate import EPS
from usmoe_lp.errors import UnsupportedProblem
from usmoe_lp.lp.closed_form import fill_rows, kth_largest, row_thresholds
from usmoe_lp.lp.problem import RoutingProblem

MAX_NODES = 1024
"""The compressed graph has N + G + 1 nodes; beyond this many the flow solver refuses the program
(its arc matrix is dense: a batch of 16384 one-token groups would need 2 GiB)."""

MAX_PRICE_ROUNDS = 40
"""Cap on the warm-start price rounds; they stop earlier once the imbalance is small or stalls."""

_BAND_PARTITION = 16  # rank bands up to this wide are read from one np.partition


@dataclass(frozen=True, eq=False)
class FlowResult:
    """The flow solver's answer, before certification.

    Attributes:
        mask: (T, N) bool, the routing (all False unless ``status == "optimal"``).
        duals: multipliers by binding block, ``token`` (T,), ``expert`` (N,), ``budget`` (G,)
            float64, from the final node potentials (None unless optimal).
        status: ``optimal``, ``infeasible`` (no routing meets the bounds), ``time_limit`` or
            ``error`` (float64 trouble; the message says what).
        message: one line.
        seconds: wall time.
        price_rounds: warm-start rounds run.
        augmentations: unit augmentations of the exact repair.
        imbalance: units the warm start left for the repair to move.
    """

    mask: np.ndarray
    duals: dict[str, np.ndarray] | None
    status: str
    message: str
    seconds: float
    price_rounds: int
    augmentations: int
    imbalance: int


class _Numerics(Exception):
    """float64 arithmetic produced an inconsistent graph (a positive cycle of rounding size)."""


class _TimeUp(Exception):
    pass


def flow_unsupported(problem: RoutingProblem) -> str | None:
    """Why the flow solver refuses ``problem`` (None when it solves it): only too many nodes."""
    N = problem.shape[1]
    nodes = N + problem.num_groups + 1
    if nodes > MAX_NODES:
        return (f"the flow solver works on the experts and budget groups (N + G + 1 = {nodes} nodes "
                f"here, at most {MAX_NODES}); use backend='highs' for programs with this many groups")
    return None


def flow_optimum(problem: RoutingProblem, *, time_limit: float | None = None) -> FlowResult:
    """The optimal routing of ``problem`` and its dual multipliers, by min-cost flow (module docstring).

    Args:
        problem: any routing program of at most ``MAX_NODES - 1`` experts plus groups: token,
            expert and budget bounds, either sense, any groups.
        time_limit: seconds; the repair stops with ``status="time_limit"`` past it.

    Returns:
        A :class:`FlowResult`; the routing is optimal when ``status == "optimal"`` (certify it
        with ``usmoe_lp.lp.certify_with_duals(problem, result.mask, result.duals)``, as
        ``solve(problem, "flow")`` does).

    Raises:
        UnsupportedProblem: more than ``MAX_NODES`` nodes (:func:`flow_unsupported`).

    >>> import numpy as np
    >>> S = np.array([[0.9, 0.8, 0.1], [0.7, 0.6, 0.2], [0.5, 0.4, 0.3]])
    >>> r = flow_optimum(RoutingProblem.capped(S, 4, token_max=2, expert_max=1))
    >>> r.status, r.mask.astype(int).tolist()
    ('optimal', [[1, 1, 0], [0, 0, 0], [0, 0, 1]])
    """
    t0 = time.perf_counter()
    reason = flow_unsupported(problem)
    if reason is not None:
        raise UnsupportedProblem(reason)
    deadline = None if time_limit is None else t0 + float(time_limit)
    T, N = problem.shape
    blocks = problem.blocks
    perm = None
    if problem.num_groups > 1 and np.any(np.diff(problem.group_ids) < 0):
        perm = np.argsort(problem.group_ids, kind="stable")  # groups become contiguous row ranges
    S = problem.scores if perm is None else problem.scores[perm]
    tmin, tmax = problem.block_bounds("token")
    if perm is not None:
        tmin, tmax = tmin[perm], tmax[perm]
    emin, emax = problem.block_bounds("expert")
    blo, bhi = problem.block_bounds("budget")
    gstart = np.concatenate([[0], np.cumsum(problem.group_sizes)]).astype(np.int64)
    gid = np.repeat(np.arange(problem.num_groups), problem.group_sizes)
    data = _Data(S, np.ascontiguousarray(S.T), gid, gstart, tmin, tmax, emin, emax, blo, bhi, blocks)

    X, v, lam, rounds = _warm_start(data)
    net = _Residual(data, X, v, lam)
    imbalance = net.imbalance()
    try:
        status = net.repair(deadline)
        duals = net.duals() if status == "optimal" else None
    except _Numerics as exc:
        status, duals = "error", None
        message = f"flow: float64 trouble ({exc})"
    except _TimeUp:
        status, duals = "time_limit", None
    mask = net.X if status == "optimal" else np.zeros((T, N), dtype=bool)
    if perm is not None:
        inv = np.empty_like(perm)
        inv[perm] = np.arange(T)
        mask = mask[inv]
        if duals is not None and "token" in duals:
            duals["token"] = duals["token"][inv]
    if status == "optimal":
        message = (f"flow: optimal ({rounds} price rounds, {net.augmentations} augmentations "
                   f"for an imbalance of {imbalance})")
    elif status == "infeasible":
        message = ("flow: infeasible: no routing meets the bounds (units left at "
                   f"{net.describe_imbalance()} with no residual path to a deficit)")
    elif status == "time_limit":
        message = f"flow: time limit reached after {net.augmentations} augmentations"
    return FlowResult(mask, duals, status, message, time.perf_counter() - t0, rounds,
                      net.augmentations, imbalance)


# ----------------------------------------------------------------------------- data
@dataclass(frozen=True, eq=False)
class _Data:
    """The program with token rows ordered by group (groups are contiguous ranges)."""

    S: np.ndarray          # (T, N) float64
    ST: np.ndarray         # (N, T) float64, S transposed and contiguous
    gid: np.ndarray        # (T,) group of each row, non-decreasing
    gstart: np.ndarray     # (G + 1,) row range of each group
    tmin: np.ndarray
    tmax: np.ndarray
    emin: np.ndarray
    emax: np.ndarray
    blo: np.ndarray
    bhi: np.ndarray
    blocks: tuple[str, ...]

    @property
    def G(self) -> int:
        return int(self.blo.size)

    def group_sum(self, per_row: np.ndarray) -> np.ndarray:
        return np.add.reduceat(per_row, self.gstart[:-1]) if per_row.size else np.zeros(self.G, np.int64)

    def arc_flows(self, load: np.ndarray, gcount: np.ndarray, v: np.ndarray, lam: np.ndarray):
        """Flows on the j -> t and t -> s_g arcs that keep prices v, lam complementary: at the
        upper bound for a positive price, the lower for a negative one, else as near the count
        as the bounds allow."""
        f_e = np.where(v > 0, self.emax, np.where(v < 0, self.emin, np.clip(load, self.emin, self.emax)))
        f_g = np.where(lam > 0, self.bhi, np.where(lam < 0, self.blo, np.clip(gcount, self.blo, self.bhi)))
        return f_e.astype(np.int64), f_g.astype(np.int64)


def _imbalance(data: _Data, X: np.ndarray, v: np.ndarray, lam: np.ndarray) -> int:
    return _imbalance_counts(data, X.sum(axis=0), data.group_sum(X.sum(axis=1)), v, lam)


def _imbalance_counts(data: _Data, load: np.ndarray, gcount: np.ndarray, v: np.ndarray, lam: np.ndarray) -> int:
    """Units the repair must move: half the total |excess| of the nodes (module docstring)."""
    f_e, f_g = data.arc_flows(load, gcount, v, lam)
    total = np.abs(load - f_e).sum() + np.abs(f_g - gcount).sum() + abs(int(f_e.sum() - f_g.sum()))
    return int(total) // 2


# ----------------------------------------------------------------------------- stage 1: prices
def _uniform(a: np.ndarray) -> bool:
    return bool(a.size == 0 or np.all(a == a[0]))


def _at_ranks(M: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(k-th, (k+1)-th) largest of each row of M (B, L), +inf for rank 0 and -inf beyond L;
    one partition when k is the same for every row."""
    B, L = M.shape
    if _uniform(k) and 1 <= int(k[0]) < L:
        kk = int(k[0])
        part = np.partition(M, [L - kk - 1, L - kk], axis=1)
        return part[:, L - kk], part[:, L - kk - 1]
    return kth_largest(M, k), kth_largest(M, k + 1)


def _others_kth(R: np.ndarray, k: np.ndarray) -> np.ndarray:
    """(T, N): the k_i-th largest of row i of R leaving entry j out (exact with ties)."""
    top_k, top_k1 = _at_ranks(R, k)
    return np.where(R >= top_k[:, None], top_k1[:, None], top_k[:, None])


def _expert_prices(data: _Data, R: np.ndarray, v: np.ndarray) -> np.ndarray:
    """One Jacobi round: each expert's price that clears its bounds against the others' prices.

    Token i takes expert j iff S_ij - lam_g - v_j beats phi_ij = max(q_tmax, min(0, q_tmin)),
    q_k the k-th largest reduced score of its other experts; so j's demand at price p is the
    number of bids theta_ij = S_ij - lam_g - phi_ij above p, and the clearing price is the
    closed-form threshold of the column of bids (the exact minimiser of the dual along v_j).
    """
    phi = _others_kth(R, data.tmax)
    if np.any(data.tmin > 0):
        np.maximum(phi, np.minimum(0.0, _others_kth(R, data.tmin)), out=phi)
    else:
        np.maximum(phi, 0.0, out=phi)
    theta = R - phi
    theta += v[None, :]
    return row_thresholds(np.ascontiguousarray(theta.T), data.emin, data.emax)


def _top_mask(M: np.ndarray, k: np.ndarray) -> np.ndarray:
    """(B, L) bool: the k_b largest entries of each row, ties to the lowest index."""
    kth = kth_largest(M, k)
    gt = M > kth[:, None]
    need = k - gt.sum(axis=1)
    if np.any(need > 0):
        eq = M == kth[:, None]
        gt |= eq & (np.cumsum(eq, axis=1) <= need[:, None])
    return gt


def _budget_prices(data: _Data, v: np.ndarray) -> np.ndarray:
    """Each group's budget price at expert prices v: the closed-form threshold of the group's
    breakpoints (a token's count grows past token_min as the price falls below its reduced
    scores of rank token_min + 1 .. token_max)."""
    Rv = data.S - v[None, :]
    T, N = Rv.shape
    tmin, tmax = data.tmin, data.tmax
    lam = np.zeros(data.G)
    if _uniform(tmin) and _uniform(tmax):
        lo_r, hi_r = int(tmin[0]), int(tmax[0])
        if lo_r == 0 and hi_r >= N:
            band = Rv
        elif hi_r - lo_r <= _BAND_PARTITION:
            kth = list(range(N - hi_r, N - lo_r))
            band = np.partition(Rv, kth, axis=1)[:, N - hi_r:N - lo_r] if kth else Rv[:, :0]
        else:
            band = None
        if band is not None:
            for g in range(data.G):
                a, b = data.gstart[g], data.gstart[g + 1]
                lam[g] = _group_threshold(band[a:b].ravel(), data.blo[g] - lo_r * (b - a),
                                          data.bhi[g] - lo_r * (b - a))
            return lam
    in_band = _top_mask(Rv, tmax) & ~_top_mask(Rv, tmin)
    base = data.group_sum(tmin)
    for g in range(data.G):
        a, b = data.gstart[g], data.gstart[g + 1]
        lam[g] = _group_threshold(Rv[a:b][in_band[a:b]], data.blo[g] - base[g], data.bhi[g] - base[g])
    return lam


def _group_threshold(values: np.ndarray, lo: int, hi: int) -> float:
    return float(row_thresholds(values[None, :], np.array([lo]), np.array([hi]))[0])


def _token_response(data: _Data, R: np.ndarray) -> np.ndarray:
    """(T, N) bool: every token's best experts at reduced scores R (closed-form rule per row)."""
    u = row_thresholds(R, data.tmin, data.tmax)
    return fill_rows(R, u, data.tmin, data.tmax)


def _imbalance_target(T: int, N: int) -> int:
    """Stop the price rounds once this few units are left to the exact repair: a round costs
    about as much as ~50 augmentations at 16384x128 and removes ~30-40% of the imbalance, so
    rounds pay while the imbalance is above a few hundred there (scaled with T*N)."""
    return max(32, (T * N) >> 13)


def _warm_start(data: _Data):
    """(X, v, lam, rounds): a pseudo-flow optimal for its imbalances, from Jacobi price rounds."""
    K = _fast_rank(data)
    if K is not None and "expert" in data.blocks:
        v, lam, rounds = _prices_top_k(data, K)
        R = data.S - v[None, :] - lam[data.gid][:, None]
        return _token_response(data, R), v, lam, rounds
    return _prices_general(data)


def _fast_rank(data: _Data) -> int | None:
    """K when every token takes at most K experts (token_min 0, K < N small): the prices then
    need only each token's top K + 1 reduced scores."""
    N = data.S.shape[1]
    if not (_uniform(data.tmin) and _uniform(data.tmax)) or int(data.tmin[0]) != 0:
        return None
    K = int(data.tmax[0])
    return K if 1 <= K <= _BAND_PARTITION and K < N else None


PRICE_OVERRELAX = 1.5
"""Price rounds move each expert price 1.5x the way to its clearing price: from below, Jacobi
rounds approach the prices monotonically and slowly; the overshoot is left to the exact repair
(measured at 16384x128: ~40% fewer rounds for the same imbalance)."""


def _prices_top_k(data: _Data, K: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Price rounds for token_min = 0, token_max = K: one partition of S - v per round gives each
    token's K + 1 best reduced scores r_1 >= ... >= r_K+1, from which the budget prices, the
    demands and the bids follow. Token i takes expert j iff its bid theta_ij = S_ij - max(q_ij,
    lam_g) beats v_j, q_ij = r_K+1 if S_ij - v_j >= r_K else r_K (its K-th best elsewhere), and
    each expert's clearing price is the closed-form threshold of its column of bids."""
    S, ST = data.S, data.ST
    T, N = S.shape
    budget = "budget" in data.blocks
    kth = list(range(N - K - 1, N))
    v = np.zeros(N)
    lam = np.zeros(data.G)
    target = _imbalance_target(T, N)
    best = (np.inf, v, lam)
    rounds = 0
    while True:
        Rv = S - v[None, :]
        Rv.partition(kth, axis=1)
        top = Rv[:, N - K - 1:]  # ascending: r_K+1, r_K, ..., r_1
        if budget:
            lam = np.array([_group_threshold(top[a:b, 1:].ravel(), data.blo[g], data.bhi[g])
                            for g, (a, b) in enumerate(zip(data.gstart[:-1], data.gstart[1:], strict=True))])
        lam_t = lam[data.gid]
        r_k, r_k1 = top[:, 1], top[:, 0]
        q = ST - v[:, None]
        q = np.where(q >= r_k[None, :], r_k1[None, :], r_k[None, :])
        np.maximum(q, lam_t[None, :], out=q)
        theta = np.subtract(ST, q, out=q)  # (N, T) bids
        load = np.count_nonzero(theta > v[:, None], axis=1)
        gcount = data.group_sum(np.count_nonzero(top[:, 1:] > lam_t[:, None], axis=1))
        imb = _imbalance_counts(data, load, gcount, v, lam)
        if imb >= best[0]:  # no progress: keep the better prices
            break
        stalled = imb > 0.9 * best[0]
        best = (imb, v, lam)
        if imb <= target or stalled or rounds >= MAX_PRICE_ROUNDS:
            break
        clearing = row_thresholds(theta, data.emin, data.emax)
        v = clearing + (PRICE_OVERRELAX - 1.0) * (clearing - v)
        v = np.where(clearing >= 0, np.maximum(v, 0.0), np.minimum(v, 0.0))
        rounds += 1
    return best[1], best[2], rounds


def _prices_general(data: _Data):
    """Price rounds for any bounds (full passes over the (T, N) scores per round)."""
    T, N = data.S.shape
    v = np.zeros(N)
    budget = "budget" in data.blocks
    lam = _budget_prices(data, v) if budget else np.zeros(data.G)
    R = data.S - v[None, :] - lam[data.gid][:, None]
    X = _token_response(data, R)
    imb = _imbalance(data, X, v, lam)
    rounds = 0
    if "expert" not in data.blocks:
        return X, v, lam, rounds
    target = _imbalance_target(T, N)
    while imb > target and rounds < MAX_PRICE_ROUNDS:
        v_new = _expert_prices(data, R, v)
        lam_new = _budget_prices(data, v_new) if budget else lam
        R_new = data.S - v_new[None, :] - lam_new[data.gid][:, None]
        X_new = _token_response(data, R_new)
        imb_new = _imbalance(data, X_new, v_new, lam_new)
        rounds += 1
        if imb_new >= imb:  # no progress: keep the better pseudo-flow
            break
        stalled = imb_new > 0.9 * imb
        v, lam, R, X, imb = v_new, lam_new, R_new, X_new, imb_new
        if stalled:
            break
    return X, v, lam, rounds


# ----------------------------------------------------------------------------- stage 2: repair
class _Residual:
    """The residual graph compressed onto experts 0..N-1, groups N..N+G-1 and t = N+G."""

    def __init__(self, data: _Data, X: np.ndarray, v: np.ndarray, lam: np.ndarray) -> None:
        self.d = data
        S = data.S
        T, N = S.shape
        G = data.G
        self.T, self.N, self.G, self.t = T, N, G, N + G
        self.M = N + G + 1
        self.X = np.ascontiguousarray(X)
        self.XT = np.ascontiguousarray(X.T)
        self.cnt = X.sum(axis=1).astype(np.int64)
        self.load = X.sum(axis=0).astype(np.int64)
        self.gcount = data.group_sum(self.cnt).astype(np.int64)
        self.f_e, self.f_g = data.arc_flows(self.load, self.gcount, v, lam)
        peak = float(np.max(np.abs(S))) if S.size else 0.0
        self.tol = 8.0 * EPS * peak  # improvements below this are rounding, not gain
        self.augmentations = 0
        self.W = np.full((self.M, self.M), -np.inf)
        self.arg = np.full((self.M, self.M), -1, dtype=np.int64)
        # scores of the experts each token does not have (-inf where it has them): the
        # candidates of the j -> j' arcs
        self.SX = np.where(self.X, -np.inf, S)
        # eligible entries for the s_g -> j arcs: spare tokens, experts they do not have
        spare = self.cnt < data.tmax
        self.STe = np.where(self.XT | ~spare[None, :], -np.inf, data.ST)
        for g in range(G):
            a, b = data.gstart[g], data.gstart[g + 1]
            seg = self.STe[:, a:b]
            k = seg.argmax(axis=1)
            self.W[N + g, :N] = seg[np.arange(N), k]
            self.arg[N + g, :N] = a + k
        for j in range(N):
            self._expert_entries(j, None)
            self._expert_to_groups(j)
        self._direct_arcs()

    # ------------------------------------------------------------------ arcs
    def _expert_entries(self, j: int, cols: np.ndarray | None) -> None:
        """Arcs j -> j' for j' in ``cols`` (all experts when None): the best token of j to move."""
        W, arg = self.W, self.arg
        members = np.flatnonzero(self.XT[j])
        if members.size == 0:
            W[j, slice(0, self.N) if cols is None else cols] = -np.inf
            arg[j, slice(0, self.N) if cols is None else cols] = -1
            return
        if cols is None:
            cols = slice(0, self.N)
            sub = self.SX[members]
        else:
            sub = self.SX[members[:, None], cols[None, :]]
        sub = sub - self.d.S[members, j][:, None]
        k = sub.argmax(axis=0)
        W[j, cols] = sub[k, np.arange(sub.shape[1])]
        arg[j, cols] = members[k]

    def _expert_to_groups(self, j: int) -> None:
        """Arcs j -> s_g: the token of group g in j that gives it up at the least loss."""
        N, G, d = self.N, self.G, self.d
        W, arg = self.W, self.arg
        W[j, N:N + G] = -np.inf
        arg[j, N:N + G] = -1
        members = np.flatnonzero(self.XT[j])
        ok = members[self.cnt[members] > d.tmin[members]]
        if ok.size == 0:
            return
        vals = -d.S[ok, j]
        if G == 1:
            k1 = int(vals.argmax())
            W[j, N], arg[j, N] = vals[k1], ok[k1]
            return
        g = d.gid[ok]
        order = np.lexsort((-vals, g))
        groups, first = np.unique(g[order], return_index=True)
        W[j, N + groups] = vals[order[first]]
        arg[j, N + groups] = ok[order[first]]

    def _token_moved(self, i: int, before: np.ndarray, cnt_before: int) -> None:
        """Update the arcs out of the experts token i had or has (it went from ``before``, (N,)
        bool, to its current row): incremental where only i's own candidate changed, and a
        recomputation of the entries i realised where it no longer can."""
        d, W, arg, N = self.d, self.W, self.arg, self.N
        after = self.X[i]
        S_i = d.S[i]
        left = np.flatnonzero(before & ~after)
        joined = np.flatnonzero(after & ~before)
        stayed = np.flatnonzero(before & after)
        gcol = N + int(d.gid[i])
        drop_before, drop_after = cnt_before > d.tmin[i], self.cnt[i] > d.tmin[i]  # i may give one up
        for j in stayed.tolist():
            if left.size:  # experts i gave up: new candidates S_ij' - S_ij
                cand = S_i[left] - S_i[j]
                up = cand > W[j, left]
                W[j, left[up]] = cand[up]
                arg[j, left[up]] = i
            if joined.size:  # experts i took: i no longer realises j -> j'
                stale = joined[arg[j, joined] == i]
                if stale.size:
                    self._expert_entries(j, stale)
            self._group_candidate(j, i, gcol, drop_after, drop_before and not drop_after)
        for j in left.tolist():
            stale = np.flatnonzero(arg[j, :N] == i)
            if stale.size:
                self._expert_entries(j, stale)
            self._group_candidate(j, i, gcol, False, True)
        for j in joined.tolist():
            cand = self.SX[i] - S_i[j]
            up = cand > W[j, :N]
            W[j, :N][up] = cand[up]
            arg[j, :N][up] = i
            self._group_candidate(j, i, gcol, drop_after, False)

    def _group_candidate(self, j: int, i: int, gcol: int, offer: bool, withdraw: bool) -> None:
        """Arc j -> s_g(i): token i (in j) offers to give j up, or withdraws that offer."""
        if offer and -self.d.S[i, j] > self.W[j, gcol]:
            self.W[j, gcol], self.arg[j, gcol] = -self.d.S[i, j], i
        elif withdraw and self.arg[j, gcol] == i:
            self._expert_to_groups(j)

    def _direct_arcs(self) -> None:
        N, G, t, d = self.N, self.G, self.t, self.d
        self.W[:N, t] = np.where(self.f_e < d.emax, 0.0, -np.inf)
        self.W[t, :N] = np.where(self.f_e > d.emin, 0.0, -np.inf)
        self.W[t, N:N + G] = np.where(self.f_g < d.bhi, 0.0, -np.inf)
        self.W[N:N + G, t] = np.where(self.f_g > d.blo, 0.0, -np.inf)

    def _refresh_token(self, i: int) -> None:
        """Token i moved: its column of eligible entries and the s_g -> j arcs it realises."""
        d, N = self.d, self.N
        g = int(d.gid[i])
        col = np.where(self.X[i] | (self.cnt[i] >= d.tmax[i]), -np.inf, d.S[i])
        self.STe[:, i] = col
        row, arg = self.W[N + g, :N], self.arg[N + g, :N]
        better = col > row
        row[better] = col[better]
        arg[better] = i
        stale = np.flatnonzero((arg == i) & (col < row))
        if stale.size:
            a, b = d.gstart[g], d.gstart[g + 1]
            seg = self.STe[stale, a:b]
            k = seg.argmax(axis=1)
            row[stale] = seg[np.arange(stale.size), k]
            arg[stale] = a + k

    # ------------------------------------------------------------------ imbalance
    def excess(self) -> np.ndarray:
        exc = np.empty(self.M, dtype=np.int64)
        exc[:self.N] = self.load - self.f_e
        exc[self.N:self.t] = self.f_g - self.gcount
        exc[self.t] = int(self.f_e.sum() - self.f_g.sum())
        return exc

    def imbalance(self) -> int:
        return int(np.abs(self.excess()).sum()) // 2

    def describe_imbalance(self) -> str:
        exc = self.excess()
        names = [f"expert {j}" for j in range(self.N)] + [f"group {g}" for g in range(self.G)] + ["the budget sink"]
        parts = [f"{names[n]} ({'+' if exc[n] > 0 else ''}{int(exc[n])})" for n in np.flatnonzero(exc != 0)[:4]]
        return ", ".join(parts)

    # ------------------------------------------------------------------ paths
    def _longest(self, d0: np.ndarray, W: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Bellman-Ford longest paths from the finite entries of d0 (all arcs at once per round);
        over the reversed arcs with ``W = self.W.T``."""
        W = self.W if W is None else W
        M, tol = self.M, self.tol
        d = d0.copy()
        pred = np.full(M, -1, dtype=np.int64)
        cols = np.arange(M)
        for _ in range(M + 1):
            cand = d[:, None] + W
            k = cand.argmax(axis=0)
            best = cand[k, cols]
            better = best > d + tol
            if not better.any():
                return d, pred
            d[better] = best[better]
            pred[better] = k[better]
        raise _Numerics("longest paths did not settle: a positive cycle of rounding size")

    def repair(self, deadline: float | None) -> str:
        """Successive longest paths from excess to deficit until balanced: optimal or infeasible."""
        while True:
            exc = self.excess()
            if not np.any(exc):
                return "optimal"
            if deadline is not None and time.perf_counter() > deadline:
                raise _TimeUp
            d0 = np.where(exc > 0, 0.0, -np.inf)
            dist, pred = self._longest(d0)
            sinks = np.flatnonzero((exc < 0) & np.isfinite(dist))
            if sinks.size == 0:
                return "infeasible"
            target = int(sinks[np.argmax(dist[sinks])])
            path = [target]
            while pred[path[-1]] >= 0:
                path.append(int(pred[path[-1]]))
                if len(path) > self.M:
                    raise _Numerics("a cycle in the longest-path tree")
            path.reverse()
            self._augment(path)
            self.augmentations += 1

    def _augment(self, path: list[int]) -> None:
        N, t, d = self.N, self.t, self.d
        X, XT = self.X, self.XT
        moved: dict[int, tuple[np.ndarray, int]] = {}
        for a, b in zip(path[:-1], path[1:], strict=True):
            if a < t and b < t and (a < N or b < N):
                i = int(self.arg[a, b])
                if i not in moved:
                    moved[i] = (X[i].copy(), int(self.cnt[i]))
                if a < N and b < N:  # token i moves from expert a to expert b
                    if not X[i, a] or X[i, b]:
                        raise _Numerics(f"stale arc {a}->{b}")
                    X[i, a] = XT[a, i] = False
                    X[i, b] = XT[b, i] = True
                    self.load[a] -= 1
                    self.load[b] += 1
                elif a < N:  # token i gives up expert a
                    if not X[i, a] or self.cnt[i] <= d.tmin[i] or d.gid[i] != b - N:
                        raise _Numerics(f"stale arc {a}->group {b - N}")
                    X[i, a] = XT[a, i] = False
                    self.cnt[i] -= 1
                    self.load[a] -= 1
                    self.gcount[b - N] -= 1
                else:  # token i takes expert b
                    if X[i, b] or self.cnt[i] >= d.tmax[i] or d.gid[i] != a - N:
                        raise _Numerics(f"stale arc group {a - N}->{b}")
                    X[i, b] = XT[b, i] = True
                    self.cnt[i] += 1
                    self.load[b] += 1
                    self.gcount[a - N] += 1
            elif b == t and a < N:
                self.f_e[a] += 1
            elif a == t and b < N:
                self.f_e[b] -= 1
            elif a == t:
                self.f_g[b - N] += 1
            elif b == t:
                self.f_g[a - N] -= 1
            else:
                raise _Numerics(f"no arc {a}->{b}")
        for i in moved:
            self.SX[i] = np.where(X[i], -np.inf, d.S[i])
        for i, (before, cnt_before) in moved.items():
            self._refresh_token(i)
            self._token_moved(i, before, cnt_before)
        self._direct_arcs()

    # ------------------------------------------------------------------ duals
    def duals(self) -> dict[str, np.ndarray]:
        """Multipliers from node potentials P: v_j = P_j - P_t, lam_g = P_t - P_g, and each
        token's u_i inside the interval its selection allows (papers/routing-as-lp.md §2).

        Potentials P with P_b >= P_a + gain(a -> b) on every residual arc are exactly the optimal
        duals. With P_t = 0, the smallest (longest paths from t) and the largest (minus longest
        paths to t) are computed, each summed exactly (``fractions.Fraction``) along its tree,
        and their midpoint is taken, rounded once to float64: each price sits in the middle of
        its own range, so an arc is tight only where every optimal dual makes it tight (the exact
        certificate meets no accidental ties), and a price that must equal a score is that score
        bit for bit."""
        N, t, d = self.N, self.t, self.d
        # anchored at t (P_t = 0): v_j = P_j lies in [longest t -> j, -longest j -> t]; nodes
        # that t does not reach (or that do not reach t) hang off a root at -BIG instead
        peak = float(np.max(np.abs(d.S))) if d.S.size else 0.0
        big = float(2.0 ** np.ceil(np.log2(2.0 * (peak + 1.0) * (self.M + 2))))
        d0 = np.full(self.M, -big)
        d0[t] = 0.0
        low = self._exact_potentials(self._longest(d0)[1], reverse=False, root=-big)
        out_len = self._exact_potentials(self._longest(d0, self.W.T)[1], reverse=True, root=-big)
        P = [(a - b) / 2 for a, b in zip(low, out_len, strict=True)]
        v = np.array([float(P[j] - P[t]) for j in range(N)])
        lam = np.array([float(P[t] - P[N + g]) for g in range(self.G)])
        if "expert" not in d.blocks:
            v = np.zeros(N)  # a block that binds nothing has a zero multiplier (valid: see module doc)
        if "budget" not in d.blocks:
            lam = np.zeros(self.G)
        R = d.S - v[None, :] - lam[d.gid][:, None]
        lo = np.where(self.X, -np.inf, R).max(axis=1)  # u_i >= every unselected reduced score
        hi = np.where(self.X, R, np.inf).min(axis=1)   # u_i <= every selected one
        lo = np.where(self.cnt > d.tmin, np.maximum(lo, 0.0), lo)  # u_i < 0 only at token_min
        hi = np.where(self.cnt < d.tmax, np.minimum(hi, 0.0), hi)  # u_i > 0 only at token_max
        fin_lo, fin_hi = np.isfinite(lo), np.isfinite(hi)
        with np.errstate(invalid="ignore"):
            u = np.where(fin_lo & fin_hi, 0.5 * lo + 0.5 * hi,
                         np.where(fin_lo, lo + np.maximum(1.0, np.abs(lo)),
                                  np.where(fin_hi, hi - np.maximum(1.0, np.abs(hi)), 0.0)))
        out = {}
        if "token" in d.blocks:
            out["token"] = u
        if "expert" in d.blocks:
            out["expert"] = v
        if "budget" in d.blocks:
            out["budget"] = lam
        return out

    def _gain(self, a: int, b: int) -> Fraction:
        """The exact gain of the residual arc a -> b (as realised by its token)."""
        N, t, S = self.N, self.t, self.d.S
        if a == t or b == t:
            return Fraction(0)
        i = int(self.arg[a, b])
        if a < N and b < N:
            return Fraction(float(S[i, b])) - Fraction(float(S[i, a]))
        if a < N:
            return -Fraction(float(S[i, a]))
        return Fraction(float(S[i, b]))

    def _exact_potentials(self, pred: np.ndarray, *, reverse: bool, root: float) -> list[Fraction]:
        """Longest-path lengths summed in rationals along the tree ``pred`` (t at 0, the other
        roots at ``root``): into each node, or out of it when the tree came from the reversed arcs."""
        children: list[list[int]] = [[] for _ in range(self.M)]
        for b, a in enumerate(pred.tolist()):
            if a >= 0:
                children[a].append(b)
        P: list[Fraction] = [Fraction(root)] * self.M
        P[self.t] = Fraction(0)
        stack = [b for b in range(self.M) if pred[b] < 0]
        while stack:
            a = stack.pop()
            for b in children[a]:
                P[b] = P[a] + (self._gain(b, a) if reverse else self._gain(a, b))
                stack.append(b)
        return P
