"""Routing locality along a sequence: expert reuse between consecutive tokens and the hit rate of an LRU
expert cache, exact across any cut of the log into token ranges.

Sources: expert caching for offloaded MoE inference keeps the most recently used experts of each layer on the
accelerator (Eliseev & Mazur 2023, "Fast inference of mixture-of-experts language models with offloading",
arXiv 2312.17238, §3.1: an LRU cache of k experts per layer, motivated by consecutive tokens reusing experts);
the hit rates of every cache size at once come from LRU's stack property (Mattson et al. 1970, "Evaluation
techniques for storage hierarchies": an access hits a cache of m entries iff fewer than m distinct items were
used since its previous use). Definitions: ``docs/definitions.md``, "Routing patterns".
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from usmoe_lp._json import json_ready
from usmoe_lp._validate import check_int
from usmoe_lp.diagnostics.load import mask_counts
from usmoe_lp.diagnostics.routed import Routed, ids_mask
from usmoe_lp.errors import InvalidScores, ShapeMismatch

__all__ = ["LocalityPartial", "LocalityStats"]

_BLOCK = 4096
"""Tokens whose recency ranks are computed together (a (block, k, N) comparison), at most."""

_CMP_CELLS = 1 << 21
"""Cells of that comparison, at most (the block is shorter for large k N)."""

_PAIR_CELLS = 1 << 22
"""Cells of the (sequences, N, N) comparison of one merge step, at most."""


@dataclass(frozen=True, eq=False)
class LocalityStats:
    """Locality of one layer's routing along each sequence (sequence = tokens with one sequence id, in log order).

    - ``num_experts``: N; ``tokens``: T; ``sequences``: distinct sequence ids seen.
    - ``expert_reuse_rate``: mean over consecutive token pairs (t-1, t) of one sequence, with |S_t| > 0, of
      |S_t ∩ S_{t-1}| / |S_t| (S_t: the experts of token t). NaN without such a pair.
    - ``reuse_baseline``: the rate if consecutive selections were independent draws with the layer's marginal
      inclusion rates f_e = c_e / T (c_e: tokens that selected e): E|S_t ∩ S_{t-1}| / E|S_t| =
      sum_e f_e^2 / sum_e f_e = sum_e c_e^2 / (T sum_e c_e); k / N for a balanced top-k layer. NaN when T = 0
      or no expert was selected.
    - ``reuse_pairs``: the pairs averaged; ``reuse_skipped``: consecutive pairs whose later token has no expert.
    - ``lru_hit_rate``: (N,) float64, entry m-1 = hit rate of a per-sequence LRU cache of the m most recently
      used experts, m = 1..N: hits / accesses, an access being one (token, selected expert). Before token t the
      cache holds the m experts most recently used by the sequence; each expert of S_t hits iff it is there;
      then S_t becomes the most recent, ``ranked[t, 0]`` the most recent of all (the rank order counts within a
      token). An expert's first use in a sequence is a miss at every m (cold start). NaN without an access.
    - ``recency_histogram``: (N,) int64, accesses whose expert had r more recently used experts before the
      token (its stack distance), r = 0..N-1; hits at m = sum_{r<m}; ``cold_misses``: first uses;
      ``accesses``: all accesses.
    """

    num_experts: int
    tokens: int
    sequences: int
    expert_reuse_rate: float
    reuse_baseline: float
    reuse_pairs: int
    reuse_skipped: int
    lru_hit_rate: np.ndarray
    recency_histogram: np.ndarray
    cold_misses: int
    accesses: int

    def to_dict(self) -> dict:
        """Plain JSON values keyed by field name (arrays as lists, NaN -> None)."""
        return json_ready({f.name: getattr(self, f.name) for f in fields(self)})


def _compact_rows(values: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's kept entries moved to its front in order, and how many each row kept."""
    order = np.argsort(~keep, axis=1, kind="stable")
    return np.take_along_axis(values, order, axis=1), keep.sum(axis=1)


def _place(dest: np.ndarray, values: np.ndarray, offset: np.ndarray, count: np.ndarray) -> None:
    """dest[s, offset[s] + j] = values[s, j] for j < count[s] (in place)."""
    j = np.arange(values.shape[1])
    m = j[None, :] < count[:, None]
    rows = np.broadcast_to(np.arange(values.shape[0])[:, None], m.shape)
    dest[rows[m], (offset[:, None] + j[None, :])[m]] = values[m]


class LocalityPartial:
    """Mergeable accumulator of :class:`LocalityStats` (protocol: :mod:`usmoe_lp.diagnostics.partial`), exact
    for any cut of the log into token ranges merged in order.

    State, besides integer sums (T, per-expert counts, the reuse numerators and pair counts by |S_t|, the
    recency histogram, accesses): per sequence the partial touched (sorted ids ``seq``, S of them), as (S, N)
    arrays padded with -1

    - ``stack``: its experts by recency at the range's end, most recent first;
    - ``first`` / ``first_start``: its experts in order of first use in the range, and for each the number of
      experts first used at earlier tokens of the range (those used before it, all more recent than any
      expert of an earlier range). Their recency rank is unknown until a range before is merged in:
      ``merge(A, B)`` gives B's first use of e, if A's sequence used e, the rank
      ``first_start + pos_A(e) - #{x used in B before it with pos_A(x) < pos_A(e)}`` (pos_A: rank in A's
      final stack); otherwise it stays a first use of the merged range (a cold miss if none comes before);
    - ``head`` / ``tail``: (S, N) bool, the selections of its first and last token (the reuse pair across a cut);
      ``first_pos`` / ``last_pos``: their positions (a merge checks they increase).

    The per-sequence state grows with the number of sequences (about 6 N bytes each), not with tokens.
    """

    def __init__(self, num_experts: int) -> None:
        n = self.num_experts = check_int(num_experts, "num_experts", low=1, high=2**15 - 1)
        self.tokens = 0
        self.counts = np.zeros(n, dtype=np.int64)
        self.reuse_num = np.zeros(n + 1, dtype=np.int64)
        self.reuse_pairs = np.zeros(n + 1, dtype=np.int64)
        self.hist = np.zeros(n, dtype=np.int64)
        self.accesses = 0
        self.seq = np.zeros(0, dtype=np.int64)
        self.stack = np.zeros((0, n), dtype=np.int16)
        self.first = np.zeros((0, n), dtype=np.int16)
        self.first_start = np.zeros((0, n), dtype=np.int16)
        self.used = np.zeros(0, dtype=np.int64)
        self.head = np.zeros((0, n), dtype=bool)
        self.tail = np.zeros((0, n), dtype=bool)
        self.first_pos = np.zeros(0, dtype=np.int64)
        self.last_pos = np.zeros(0, dtype=np.int64)

    @classmethod
    def empty(cls, num_experts: int) -> LocalityPartial:
        """A partial with no token, for N = ``num_experts`` experts."""
        return cls(num_experts)

    # ------------------------------------------------------------------ one chunk
    def update(self, r: Routed, mask: np.ndarray | None = None) -> None:
        """Add one chunk, after everything seen (in place). mask: optionally ``r.mask()``."""
        if r.num_experts != self.num_experts:
            raise ShapeMismatch(f"chunk has N = {r.num_experts} experts, this partial was made for {self.num_experts}")
        if r.num_tokens == 0:
            return
        self.__dict__.update(self.merge(_chunk_partial(r, mask)).__dict__)

    # ------------------------------------------------------------------ merge
    def merge(self, other: LocalityPartial) -> LocalityPartial:
        """A new partial holding both, ``self``'s tokens first (neither is modified)."""
        n = self.num_experts
        if other.num_experts != n:
            raise ShapeMismatch(f"cannot merge locality partials of N = {n} and {other.num_experts} experts")
        a, b = self, other
        out = LocalityPartial(n)
        out.tokens = a.tokens + b.tokens
        out.counts = a.counts + b.counts
        out.reuse_num = a.reuse_num + b.reuse_num
        out.reuse_pairs = a.reuse_pairs + b.reuse_pairs
        out.hist = a.hist + b.hist
        out.accesses = a.accesses + b.accesses
        seq = np.union1d(a.seq, b.seq)
        ia, ib = np.searchsorted(seq, a.seq), np.searchsorted(seq, b.seq)
        s = seq.size
        out.seq = seq
        arrays = ("stack", "first", "first_start", "used", "head", "tail", "first_pos", "last_pos")
        for name in arrays:
            src_a, src_b = getattr(a, name), getattr(b, name)
            dst = np.empty((s, *src_a.shape[1:]), dtype=src_a.dtype)
            dst[ia] = src_a
            dst[ib] = src_b  # common sequences are overwritten below
            setattr(out, name, dst)
        _, ca, cb = np.intersect1d(a.seq, b.seq, assume_unique=True, return_indices=True)
        if ca.size:
            _join(out, a, b, ca, cb, ia[ca])
        return out

    # ------------------------------------------------------------------ result
    def result(self) -> LocalityStats:
        """The :class:`LocalityStats` of every token seen."""
        n = self.num_experts
        nan = float("nan")
        pairs = int(self.reuse_pairs[1:].sum())
        rate = float(sum(int(self.reuse_num[j]) / j for j in range(1, n + 1)) / pairs) if pairs else nan
        total = int(self.counts.sum())
        sq = sum(int(c) ** 2 for c in self.counts)
        baseline = sq / (self.tokens * total) if total else nan
        hits = np.cumsum(self.hist)
        hit_rate = hits / self.accesses if self.accesses else np.full(n, nan)
        return LocalityStats(
            num_experts=n, tokens=self.tokens, sequences=int(self.seq.size), expert_reuse_rate=rate,
            reuse_baseline=baseline, reuse_pairs=pairs, reuse_skipped=int(self.reuse_pairs[0]),
            lru_hit_rate=hit_rate, recency_histogram=self.hist.copy(),
            cold_misses=self.accesses - int(self.hist.sum()), accesses=self.accesses)


def _add_pairs(out: LocalityPartial, prev: np.ndarray, cur: np.ndarray) -> None:
    """Reuse of consecutive token pairs: (P, N) bool selections of the earlier and the later token."""
    size = mask_counts(cur)[0]
    inter = mask_counts(prev & cur)[0]
    n1 = out.num_experts + 1
    out.reuse_num += np.bincount(size, weights=inter, minlength=n1).astype(np.int64)
    out.reuse_pairs += np.bincount(size, minlength=n1)


def _join(out: LocalityPartial, a: LocalityPartial, b: LocalityPartial, ca: np.ndarray, cb: np.ndarray,
          rows: np.ndarray) -> None:
    """The sequences both ranges touched (a's rows ca, b's rows cb, out's rows ``rows``): a's range first."""
    n = out.num_experts
    late = b.first_pos[cb] <= a.last_pos[ca]
    if late.any():
        i = int(np.flatnonzero(late)[0])
        raise InvalidScores(f"positions of sequence {int(a.seq[ca[i]])} do not increase through the log: a later"
                            f" range starts at position {int(b.first_pos[cb[i]])} after position "
                            f"{int(a.last_pos[ca[i]])}")
    _add_pairs(out, a.tail[ca], b.head[cb])
    step = max(1, _PAIR_CELLS // (n * n))
    for lo in range(0, ca.size, step):
        _join_block(out, a, b, ca[lo:lo + step], cb[lo:lo + step], rows[lo:lo + step])


def _join_block(out, a, b, ca, cb, rows) -> None:
    n = out.num_experts
    sc = ca.size
    r_idx = np.arange(sc)[:, None]
    stack_a = a.stack[ca].astype(np.int64)
    pos_a = np.empty((sc, n + 1), dtype=np.int64)
    pos_a[:] = n
    pos_a[r_idx, np.where(stack_a >= 0, stack_a, n)] = np.arange(n)[None, :]
    pos_a[:, n] = n
    fb = b.first[cb].astype(np.int64)
    start = b.first_start[cb].astype(np.int64)
    valid = fb >= 0
    pe = pos_a[r_idx, np.where(valid, fb, n)]
    in_a = valid & (pe < n)
    earlier = np.arange(n)[None, None, :] < start[:, :, None]
    cnt = ((pe[:, None, :] < pe[:, :, None]) & earlier).sum(axis=2)
    rank = start + pe - cnt
    out.hist += np.bincount(rank[in_a], minlength=n)
    # the merged first uses: a's, then b's experts that a's range never used
    kept = valid & ~in_a
    before = np.concatenate([np.zeros((sc, 1), dtype=np.int64), np.cumsum(kept, axis=1)], axis=1)
    len_a = a.used[ca]
    new_start = len_a[:, None] + np.take_along_axis(before, start, axis=1)
    vals, kcount = _compact_rows(fb, kept)
    starts, _ = _compact_rows(new_start, kept)
    first = a.first[ca].copy()
    first_start = a.first_start[ca].copy()
    _place(first, vals.astype(np.int16), len_a, kcount)
    _place(first_start, starts.astype(np.int16), len_a, kcount)
    # the merged recency order: b's, then a's experts b's range did not use
    stack_b = b.stack[cb]
    used_b = np.zeros((sc, n + 1), dtype=bool)
    used_b[r_idx, np.where(stack_b >= 0, stack_b, n)] = True
    keep_a = (stack_a >= 0) & ~used_b[r_idx, np.where(stack_a >= 0, stack_a, n)]
    rest, rcount = _compact_rows(stack_a, keep_a)
    stack = stack_b.copy()
    _place(stack, rest.astype(np.int16), b.used[cb], rcount)
    out.first[rows], out.first_start[rows], out.stack[rows] = first, first_start, stack
    out.used[rows] = len_a + kcount
    out.head[rows], out.first_pos[rows] = a.head[ca], a.first_pos[ca]
    out.tail[rows], out.last_pos[rows] = b.tail[cb], b.last_pos[cb]


def _row_popcount(c: np.ndarray) -> np.ndarray:
    """(..., M) C-contiguous bool -> (...) int64 count of True along the last axis. For M a multiple of 8 up to
    248: the bools' bytes added as uint64 words (each byte lane a count <= M / 8), then each word's 8 byte lanes
    summed by one multiply (the high byte of w * 0x0101010101010101, exact while the total M fits a byte);
    otherwise a uint8 sum."""
    m = c.shape[-1]
    if m % 8 or m > 248 or not c.flags.c_contiguous:
        return np.add.reduce(c.view(np.uint8), axis=-1, dtype=np.int64)
    words = c.view(np.uint64)  # (..., M / 8)
    acc = words[..., 0].copy()
    for j in range(1, m // 8):
        acc += words[..., j]
    return ((acc * np.uint64(0x0101010101010101)) >> np.uint64(56)).astype(np.int64)


def _chunk_partial(r: Routed, mask: np.ndarray | None = None) -> LocalityPartial:
    """The partial of one chunk: its sequences' tokens in log order (a stable sort by sequence id; none when the
    chunk's sequence ids already ascend). mask: ``r.mask()`` (in log order) when the caller has it, read for the
    reuse of consecutive tokens."""
    n_exp = r.num_experts
    out = LocalityPartial(n_exp)
    n = r.num_tokens
    sid = r.sequence_ids
    if n > 1 and not (sid[1:] >= sid[:-1]).all():
        order = np.argsort(sid, kind="stable")
        sseq, rk, pos = sid[order], r.ranked[order], r.positions[order]
    else:
        order, sseq, rk, pos = None, sid, r.ranked, r.positions
    new = np.ones(n, dtype=bool)
    new[1:] = sseq[1:] != sseq[:-1]
    seg = np.cumsum(new) - 1
    seg_first = np.flatnonzero(new)
    seg_last = np.append(seg_first[1:] - 1, n - 1)
    s = seg_first.size
    kw = rk.shape[1]
    valid = rk >= 0
    ids = np.where(valid, rk, n_exp)  # n_exp: the empty slot's column, dropped
    out.tokens = n
    out.counts = np.bincount(ids.ravel(), minlength=n_exp + 1)[:n_exp].astype(np.int64)
    # reuse of consecutive pairs of a sequence: |S_t ∩ S_{t-1}| = the later token's experts the earlier one held
    cont = np.flatnonzero(~new)
    if cont.size and kw:
        held = (r.mask() if mask is None else mask).reshape(-1)  # (n N,) the chunk's mask, in log order
        before = cont - 1 if order is None else order[cont - 1]  # the earlier token, as a row of the log
        size = np.add.reduce(valid[cont].view(np.uint8), axis=1, dtype=np.int32)
        cells = before[:, None] * n_exp + np.minimum(ids[cont], n_exp - 1)  # empty slots: masked below
        inter = np.add.reduce((held[cells] & valid[cont]).view(np.uint8), axis=1, dtype=np.int32)
        n1 = n_exp + 1
        out.reuse_num += np.bincount(size, weights=inter, minlength=n1).astype(np.int64)
        out.reuse_pairs += np.bincount(size, minlength=n1)
    elif cont.size:
        out.reuse_pairs[0] += cont.size
    out.seq = sseq[seg_first]
    out.head, out.tail = ids_mask(rk[seg_first], n_exp), ids_mask(rk[seg_last], n_exp)
    out.first_pos, out.last_pos = pos[seg_first], pos[seg_last]
    out.stack = np.full((s, n_exp), -1, dtype=np.int16)
    out.first = np.full((s, n_exp), -1, dtype=np.int16)
    out.first_start = np.full((s, n_exp), -1, dtype=np.int16)
    out.used = np.zeros(s, dtype=np.int64)
    out.accesses = int(valid.sum())
    if kw == 0 or out.accesses == 0:
        return out
    # A timestamp per access, larger = more recent (ranked[t, 0] the most recent of token t): access (t, j) has
    # t kw + kw - 1 - j. Within a block they are stored relative to the block's first (int16: block kw <= 2**15),
    # the last uses before the block (the carry, kept absolute in int64) as their order, negative: a comparison
    # of int16 needs half the memory traffic of int32.
    block = max(1, min(n, _BLOCK, _CMP_CELLS // (kw * n_exp), (1 << 15) // kw))
    slot_ts = (kw - 1 - np.arange(kw, dtype=np.int16))[None, :]
    lowest = np.iinfo(np.int16).min  # below every carry order value, -(N + 1) >= -2**15
    # incl: row 0 the carry's order, row i + 1 the relative last uses after the block's token i (excl of i + 1)
    incl = np.empty((block + 1, n_exp + 1), dtype=np.int16)
    carry = np.full(n_exp + 1, -1, dtype=np.int64)
    cmp = np.empty((block, kw, n_exp), dtype=bool)
    final = np.empty((s, n_exp), dtype=np.int64)
    pend_g, pend_e, pend_start = [], [], []
    for a in range(0, n, block):
        b = min(n, a + block)
        w, base = b - a, a * kw
        v, e = valid[a:b], rk[a:b]

        def absolute(rel: np.ndarray, cols: np.ndarray, base=base, carry=carry) -> np.ndarray:
            """Relative timestamps (or carry order values) of columns ``cols`` as absolute int64."""
            return np.where(rel >= 0, rel.astype(np.int64) + base, carry[cols])

        # ties in the carry (unused experts, earlier sequences) all lie below the sequences' thresholds
        incl[0, np.argsort(carry, kind="stable")] = np.arange(-(n_exp + 1), 0, dtype=np.int16)
        use = incl[1:w + 1]
        use.fill(lowest)
        flat_ix = (np.arange(w, dtype=np.int64)[:, None] * (n_exp + 1) + ids[a:b]).ravel()
        use.reshape(-1)[flat_ix] = (np.arange(w, dtype=np.int16)[:, None] * kw + slot_ts).ravel()
        np.maximum.accumulate(incl[:w + 1], axis=0, out=incl[:w + 1])
        excl = incl[:w, :n_exp]
        th = seg_first[seg[a:b]] * kw  # absolute timestamps below: an earlier sequence
        last = incl.reshape(-1)[flat_ix].reshape(w, kw)  # row i of incl is token i's excl
        seen = v & (absolute(last, ids[a:b]) >= th[:, None])
        # rank = #{x : excl[x] > last} (distinct experts used in the sequence have distinct timestamps)
        c = cmp[:w]
        np.greater(excl[:, None, :], last[:, :, None], out=c)
        rank = _row_popcount(c)
        out.hist += np.bincount(rank[seen], minlength=n_exp)
        pend = v & ~seen
        if pend.any():
            tok, slot = np.nonzero(pend)
            pend_g.append(tok + a)
            pend_e.append(e[tok, slot])
            pend_start.append((absolute(excl[tok], np.arange(n_exp)[None, :]) >= th[tok, None]).sum(axis=1))
        ends = np.flatnonzero((seg_last >= a) & (seg_last < b))
        final[ends] = absolute(incl[seg_last[ends] - a + 1, :n_exp], np.arange(n_exp)[None, :])
        carry = absolute(incl[w], np.arange(n_exp + 1))
    g = np.concatenate(pend_g)
    ps = seg[g]
    within = np.arange(g.size) - np.searchsorted(ps, ps, side="left")
    out.first[ps, within] = np.concatenate(pend_e)
    out.first_start[ps, within] = np.concatenate(pend_start)
    th = (seg_first * kw)[:, None]
    srt = np.argsort(-final, axis=1, kind="stable")
    alive = np.take_along_axis(final, srt, axis=1) >= th
    out.stack = np.where(alive, srt, -1).astype(np.int16)
    out.used = alive.sum(axis=1)
    return out
