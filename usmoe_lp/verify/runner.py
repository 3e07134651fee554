"""Run the claims over matrix families x sizes x k x trials, shrink failures, collect a result.

Instances are seeded independently of what else runs: the generator of a trial is
``default_rng(SeedSequence([seed, crc32(family), T, N, k, trial]))``, recorded as an integer in
every record, so the same seed gives the same report, and any single instance can be rebuilt
with ``FAMILIES[family].generate(np.random.default_rng(record.seed), T, N)``.

The instances of one matrix family x size x k are checked in batches (:class:`BatchTask`, a trial range
of :func:`batch_size` instances, :class:`usmoe_lp.verify.claims.Batch`): generated one by one from their
own seeds, then routed, solved and certified on the stacked scores. Batches are the tasks of
:func:`usmoe_lp.cluster.map_tasks`, in one process or on a Dask cluster; the failures are shrunk after
all batches are in, in job order, so a report does not depend on whether or where a cluster ran it.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from dataclasses import dataclass, field, replace

import numpy as np

from usmoe_lp._json import json_ready
from usmoe_lp._threads import one_torch_thread
from usmoe_lp._validate import check_int
from usmoe_lp.cluster import check_cluster, map_tasks, split_range
from usmoe_lp.errors import InvalidParameter
from usmoe_lp.verify.claims import (
    CLAIMS,
    DEFAULT_BACKENDS,
    EXHAUSTIVE_MAX_ENTRIES,
    ILP_BACKENDS,
    Batch,
    Context,
    get_claims,
)
from usmoe_lp.verify.families import FAMILIES, get_families
from usmoe_lp.verify.shrink import shrink


@dataclass(frozen=True)
class VerifyConfig:
    """What to verify.

    Attributes:
        families: matrix-family names (``usmoe_lp.verify.FAMILIES``: the random score matrices).
        sizes: (T, N) pairs.
        ks: experts per token of the matched TC; budgets are c = T*k (k > N is skipped).
        trials: instances per matrix family x size x k.
        seed: master seed.
        backends: optimum backends, at least two independent ones. Default
            (:data:`usmoe_lp.verify.claims.DEFAULT_BACKENDS`): ``closed_form`` (the threshold rule),
            ``highs`` (the LP relaxation, HiGHS on one block-diagonal model per batch), ``milp`` (the 0/1
            program by HiGHS's MIP, in-process, likewise) and ``exhaustive`` (every 0/1 mask, only where
            T*N <= 20). Also: ``cbc`` (the 0/1 program by PuLP/CBC: a subprocess per program and instance,
            slow) and ``flow`` (min-cost flow, one instance at a time).
        claims: claim ids (``usmoe_lp.verify.CLAIMS``).
        ilp_max_vars: integer-program backends (milp, exhaustive, cbc) only up to this T*N.
        shrink: shrink failures to minimal counterexamples.
        shrink_all: shrink every failing instance (with ``shrink``); otherwise only the first
            failure of each claim x matrix family x size, which keeps large runs fast.
    """

    families: tuple[str, ...] = tuple(FAMILIES)
    sizes: tuple[tuple[int, int], ...] = ((8, 4), (16, 8), (64, 8))
    ks: tuple[int, ...] = (1, 2)
    trials: int = 10
    seed: int = 0
    backends: tuple[str, ...] = DEFAULT_BACKENDS
    claims: tuple[str, ...] = tuple(CLAIMS)
    ilp_max_vars: int = 4096
    shrink: bool = True
    shrink_all: bool = False

    def __post_init__(self):
        get_families(self.families)
        get_claims(self.claims)
        empty = [name for name in ("families", "sizes", "ks", "claims", "backends") if not getattr(self, name)]
        if empty:
            raise InvalidParameter(f"nothing to verify: {', '.join(empty)} must not be empty")
        object.__setattr__(self, "trials", check_int(self.trials, "trials", low=1))
        # numpy's SeedSequence takes non-negative integers only
        object.__setattr__(self, "seed", check_int(self.seed, "seed", low=0))
        object.__setattr__(self, "ilp_max_vars", check_int(self.ilp_max_vars, "ilp_max_vars", low=0))
        for name in ("shrink", "shrink_all"):
            if not isinstance(getattr(self, name), bool | np.bool_):
                raise InvalidParameter(f"{name} must be True or False, got {getattr(self, name)!r}")
        for size in self.sizes:
            if not (isinstance(size, tuple | list) and len(size) == 2
                    and all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in size)):
                raise InvalidParameter(f"sizes must be (T, N) pairs of integers, got {size!r}")
            T, N = size
            if T < 1 or N < 1:
                raise InvalidParameter(f"sizes must be positive TxN, got {T}x{N}")
        if self.shrink_all and not self.shrink:
            raise InvalidParameter("shrink_all needs shrink=True")
        for k in self.ks:
            check_int(k, "ks", low=1)
        from usmoe_lp.lp import BACKENDS

        bad = [b for b in self.backends if b not in BACKENDS]
        if bad:
            raise InvalidParameter(f"unknown backends {bad}; choose from {', '.join(BACKENDS)}")
        if len(set(self.backends) & {"closed_form", "highs", *ILP_BACKENDS}) < 2:
            raise InvalidParameter("use at least two independent backends, e.g. closed_form,highs")
        _check_runnable(self)

    def to_dict(self) -> dict:
        return {"families": list(self.families), "sizes": [f"{T}x{N}" for T, N in self.sizes],
                "ks": list(self.ks), "trials": self.trials, "seed": self.seed,
                "backends": list(self.backends), "claims": list(self.claims),
                "ilp_max_vars": self.ilp_max_vars, "shrink": self.shrink, "shrink_all": self.shrink_all}


def _sizes_text(sizes) -> str:
    return ",".join(f"{T}x{N}" for T, N in sizes)


def _check_runnable(config: VerifyConfig) -> None:
    """Refuse a config in which a k, a size or a claim would run on no instance (never a silent "not run")."""
    idle_ks = [k for k in config.ks if all(k > N for _, N in config.sizes)]
    if idle_ks:
        raise InvalidParameter(
            f"ks={','.join(map(str, idle_ks))} cannot run: k experts per token need k <= N, and every size "
            f"has fewer experts (sizes={_sizes_text(config.sizes)}); lower ks or add a size with N >= "
            f"{max(idle_ks)}")
    idle_sizes = [(T, N) for T, N in config.sizes if all(k > N for k in config.ks)]
    if idle_sizes:
        raise InvalidParameter(
            f"sizes={_sizes_text(idle_sizes)} cannot run: every k of ks={','.join(map(str, config.ks))} "
            "exceeds their N; add a k <= N or drop those sizes")
    if "ilp_eq_lp" in config.claims:
        ilp = [b for b in config.backends if b in ILP_BACKENDS]
        limit = config.ilp_max_vars if set(ilp) - {"exhaustive"} else min(config.ilp_max_vars, EXHAUSTIVE_MAX_ENTRIES)
        fits = [(T, N) for T, N in config.sizes if T * N <= limit]
        if not ilp or "highs" not in config.backends or not fits:
            bound = (f"ilp_max_vars={limit}" if limit == config.ilp_max_vars else
                     f"{limit}, the limit of the exhaustive backend")
            need = ("an integer-program backend (milp, exhaustive or cbc) and highs in backends" if not ilp
                    or "highs" not in config.backends else
                    f"a size with T*N <= {bound} (sizes={_sizes_text(config.sizes)})")
            raise InvalidParameter(f"claim ilp_eq_lp cannot run: it needs {need}; change that or leave ilp_eq_lp "
                                   "out of claims")


def command_line(config: VerifyConfig) -> str:
    """The ``usmoe-lp verify`` command line that runs ``config`` (without ``--out``: the same for any
    output directory, so the report does not depend on where it is written)."""
    parts = ["usmoe-lp verify",
             "--families " + ("all" if config.families == tuple(FAMILIES) else ",".join(config.families)),
             "--sizes " + ",".join(f"{T}x{N}" for T, N in config.sizes),
             "--ks " + ",".join(map(str, config.ks)), f"--trials {config.trials}", f"--seed {config.seed}",
             "--backends " + ",".join(config.backends),
             "--claims " + ("all" if config.claims == tuple(CLAIMS) else ",".join(config.claims)),
             f"--ilp-max-vars {config.ilp_max_vars}"]
    if not config.shrink:
        parts.append("--no-shrink")
    if config.shrink_all:
        parts.append("--shrink-all")
    return " ".join(parts)


@dataclass(frozen=True)
class TrialRecord:
    """One claim checked on one instance."""

    claim: str
    family: str
    T: int
    N: int
    k: int
    trial: int
    seed: int
    passed: bool
    gap: float
    values: dict
    note: str


@dataclass(frozen=True)
class Counterexample:
    """A minimal failing instance of a claim (shrunk from a failing trial)."""

    claim: str
    family: str
    T: int
    N: int
    k: int
    trial: int
    seed: int
    scores: np.ndarray  # (T', N') float64, the shrunk matrix
    shrunk_k: int
    gap: float
    values: dict
    note: str
    evaluations: int

    def to_dict(self) -> dict:
        return {"claim": self.claim, "family": self.family, "from_size": f"{self.T}x{self.N}",
                "from_k": self.k, "trial": self.trial, "seed": self.seed,
                "size": f"{self.scores.shape[0]}x{self.scores.shape[1]}", "k": self.shrunk_k,
                "scores": self.scores.tolist(), "gap": self.gap, "values": self.values,
                "note": self.note, "shrink_evaluations": self.evaluations}


@dataclass(frozen=True)
class VerifyResult:
    """Everything a verify run found; ``cells()`` aggregates it claim x matrix family x size."""

    config: VerifyConfig
    records: list[TrialRecord] = field(default_factory=list)
    counterexamples: list[Counterexample] = field(default_factory=list)

    def cells(self) -> list[dict]:
        groups: dict[tuple, list[TrialRecord]] = defaultdict(list)
        for r in self.records:
            groups[(r.claim, r.family, r.T, r.N)].append(r)
        cex = {key: min(cs, key=_size_key) for key, cs in self._counterexamples_by_cell().items()}
        out = []
        for key in sorted(groups, key=_cell_order(self.config)):
            rs = groups[key]
            fails = [r for r in rs if not r.passed]
            gaps = [r.gap for r in fails]
            out.append({
                "claim": key[0], "family": key[1], "size": f"{key[2]}x{key[3]}",
                "trials": len(rs), "passes": len(rs) - len(fails), "failures": len(fails),
                "worst_gap": max(gaps) if gaps else 0.0,
                "failing_seeds": [{"k": r.k, "trial": r.trial, "seed": r.seed} for r in fails[:10]],
                "notes": sorted({r.note for r in fails})[:3],
                "counterexample": None if key not in cex else cex[key].to_dict(),
            })
        return out

    def _counterexamples_by_cell(self) -> dict[tuple, list[Counterexample]]:
        out: dict[tuple, list[Counterexample]] = defaultdict(list)
        for c in self.counterexamples:
            out[(c.claim, c.family, c.T, c.N)].append(c)
        return out

    def claim_summary(self) -> list[dict]:
        out = []
        for cid in self.config.claims:
            rs = [r for r in self.records if r.claim == cid]
            fails = [r for r in rs if not r.passed]
            fams = sorted({r.family for r in fails}, key=list(self.config.families).index)
            mine = [c for c in self.counterexamples if c.claim == cid]
            smallest = min(mine, key=_size_key, default=None)
            forms = {(c.shrunk_k, c.scores.shape, c.scores.tobytes()) for c in mine}
            claim = CLAIMS[cid]
            out.append({
                "claim": cid, "statement": claim.statement, "source": claim.source,
                "expectation": claim.expectation, "trials": len(rs), "failures": len(fails),
                "verdict": "not run" if not rs else ("holds" if not fails else "fails"),
                "worst_gap": max((r.gap for r in fails), default=0.0),
                "failing_families": fams,
                "minimal_counterexample": None if smallest is None else smallest.to_dict(),
                "shrunk_failures": len(mine), "distinct_minimal_forms": len(forms),
            })
        return out


def _size_key(c: Counterexample) -> tuple:
    """Smallest first: fewest entries, then fewest tokens, then the earliest trial."""
    return (c.scores.size, c.scores.shape, c.k, c.trial)


def _cell_order(config: VerifyConfig):
    claims, fams = list(config.claims), list(config.families)
    return lambda key: (claims.index(key[0]), fams.index(key[1]), key[2] * key[3], key[2])


def trial_seed(seed: int, family: str, T: int, N: int, k: int, trial: int) -> int:
    """The integer seed of one instance (stable across processes and platforms)."""
    ss = np.random.SeedSequence([seed, zlib.crc32(family.encode()), T, N, k, trial])
    return int(ss.generate_state(1, dtype=np.uint64)[0])


def batch_size(T: int, N: int) -> int:
    """Instances per task at size T x N: about :data:`BATCH_ENTRIES` score entries, at most
    :data:`MAX_BATCH` instances (decided by the data, never by the number of workers)."""
    return max(1, min(MAX_BATCH, BATCH_ENTRIES // (T * N)))


BATCH_ENTRIES = 8192
"""Score entries per batch of instances (a task); 256 instances of 8x4, 16 of 64x8, one of 1024x64."""
MAX_BATCH = 256


@dataclass(frozen=True)
class BatchTask:
    """Trials ``start`` .. ``stop - 1`` of one matrix family x size x k: one task, checked as one batch."""

    family: str
    T: int
    N: int
    k: int
    start: int
    stop: int
    seed: int
    claims: tuple[str, ...]
    backends: tuple[str, ...]
    ilp_max_vars: int

    @property
    def instances(self) -> int:
        return self.stop - self.start


def verify_tasks(config: VerifyConfig) -> list[BatchTask]:
    """The tasks of ``config`` in job order (matrix family, size, k, trials), each a trial range of
    :func:`batch_size` instances; the same for one process and any cluster."""
    return [BatchTask(f.name, T, N, k, a, b, config.seed, tuple(config.claims), tuple(config.backends),
                      config.ilp_max_vars)
            for f in get_families(config.families) for (T, N) in config.sizes for k in config.ks if k <= N
            for a, b in split_range(0, config.trials, batch_size(T, N))]


def run_batch(task: BatchTask) -> list[TrialRecord]:
    """Generate the instances of ``task`` from their own seeds, check every claim on the batch, and
    return the records in job order (trial, then claim)."""
    family = FAMILIES[task.family]
    T, N, k = task.T, task.N, task.k
    trials = range(task.start, task.stop)
    seeds = [trial_seed(task.seed, family.name, T, N, k, t) for t in trials]
    claims = get_claims(task.claims)
    with one_torch_thread():  # thousands of small torch calls: a thread pool costs more than it saves
        S = np.stack([family.generate(np.random.default_rng(s), T, N) for s in seeds])
        batch = Batch(S, k, Context(backends=task.backends, ilp_max_vars=task.ilp_max_vars))
        batch.prepare(claims)
        results = [claim.check(batch) for claim in claims]
    records = []
    for i, (t, seed) in enumerate(zip(trials, seeds, strict=True)):
        for claim, checks in zip(claims, results, strict=True):
            res = checks[i]
            if res is None:
                continue
            values = {key: json_ready(float(v)) for key, v in res.values.items()}
            records.append(TrialRecord(claim.id, family.name, T, N, k, t, seed, res.passed, float(res.gap),
                                       values, res.note))
    return records


@dataclass(frozen=True)
class ShrinkTask:
    """One failing record to shrink to a minimal counterexample."""

    record: TrialRecord
    backends: tuple[str, ...]
    ilp_max_vars: int


def shrink_record(task: ShrinkTask) -> Counterexample:
    """Rebuild the failing instance of ``task.record`` from its seed and shrink it."""
    r = task.record
    with one_torch_thread():
        S = FAMILIES[r.family].generate(np.random.default_rng(r.seed), r.T, r.N)
        sh = _shrink_fast(CLAIMS[r.claim], S, r.k, Context(backends=task.backends, ilp_max_vars=task.ilp_max_vars))
    return Counterexample(r.claim, r.family, r.T, r.N, r.k, r.trial, r.seed, sh.scores, sh.k, float(sh.check.gap),
                          {key: json_ready(float(v)) for key, v in sh.check.values.items()}, sh.check.note,
                          sh.evaluations)


def run_verify(config: VerifyConfig, progress: bool = True, client=None) -> VerifyResult:
    """Check every claim of ``config`` on every instance; shrink the first failure per cell.

    The instances are checked in batches (:func:`verify_tasks`: trial ranges of one matrix family x size
    x k, cut by the data); with ``client`` (a ``dask.distributed.Client``) the batches, then the
    shrinking, run on its workers through :func:`usmoe_lp.cluster.map_tasks`. Records come back in job
    order and the failures to shrink are picked in that order, so the result is the same with or
    without a cluster and for any number of workers. ``progress``: a bar that advances per finished
    batch (instances done / total), then per shrunk failure.
    """
    check_cluster(client=client)
    tasks = verify_tasks(config)
    bar = _progress(progress, sum(t.instances for t in tasks))
    try:
        def batch_done(i: int, _records) -> None:
            t = tasks[i]
            bar.advance(t.instances, f"{t.family} {t.T}x{t.N} k={t.k}")

        parts = map_tasks(run_batch, tasks, client=client, progress=batch_done if bar else None,
                          key="usmoe-lp-verify")
        records = [r for part in parts for r in part]
        shrinks = [ShrinkTask(r, tuple(config.backends), config.ilp_max_vars) for r in _to_shrink(config, records)]
        if bar is not None and shrinks:
            bar.phase("shrink", len(shrinks))

        def shrunk(i: int, cx: Counterexample) -> None:
            bar.advance(1, f"{cx.claim} {cx.family} {cx.T}x{cx.N}")

        counterexamples = map_tasks(shrink_record, shrinks, client=client, progress=shrunk if bar else None,
                                    key="usmoe-lp-shrink")
    finally:
        if bar is not None:
            bar.close()
    return VerifyResult(config, records, counterexamples)


def _to_shrink(config: VerifyConfig, records: list[TrialRecord]) -> list[TrialRecord]:
    """The failing records to shrink, in job order: the first of each claim x matrix family x size
    (every one with ``shrink_all``; none without ``shrink``)."""
    if not config.shrink:
        return []
    out, seen = [], set()
    for r in records:
        cell = (r.claim, r.family, r.T, r.N)
        if not r.passed and (config.shrink_all or cell not in seen):
            seen.add(cell)
            out.append(r)
    return out


ILP_CLAIMS = frozenset({"ilp_eq_lp", "lp_integral_tc", "lp_integral_ec", "lp_integral_budget",
                        "lp_integral_capped"})


def _shrink_fast(claim, S, k, ctx: Context):
    """Shrink with the LP-side backends only (closed form, HiGHS: the cheapest per evaluation; CBC is a
    subprocess per solve), then re-check the minimal instance with every backend; fall back to the full
    context if that disagrees. Claims about the 0/1 program shrink with every backend."""
    fast = tuple(b for b in ctx.backends if b not in ILP_BACKENDS)
    if claim.id in ILP_CLAIMS or len(fast) < 2 or len(fast) == len(ctx.backends):
        return shrink(claim, S, k, ctx)
    sh = shrink(claim, S, k, Context(fast, ctx.ilp_max_vars, ctx.rtol))
    full = claim.check_one(sh.scores, sh.k, ctx)
    if full is not None and not full.passed:
        return replace(sh, check=full)
    return shrink(claim, S, k, ctx)


class _Bar:
    """A rich progress bar: instances checked (per finished batch), then failures shrunk."""

    def __init__(self, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._p = Progress(TextColumn("{task.fields[phase]}"), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), TextColumn("{task.description}"), transient=True)
        self._p.start()
        self._task = self._p.add_task("", total=total, phase="verify")

    def advance(self, n: int, text: str) -> None:
        self._p.update(self._task, advance=n, description=text)

    def phase(self, name: str, total: int) -> None:
        """Start the next phase's bar (the previous one stays, complete)."""
        self._task = self._p.add_task("", total=total, phase=name)

    def close(self) -> None:
        self._p.stop()


def _progress(enabled: bool, total: int):
    return _Bar(total) if enabled else None
